"""``edgepack install``: the click face of ``python3 -m edgepack.install`` (same options)."""

from __future__ import annotations

import click


@click.command("install", context_settings={"ignore_unknown_options": True,
                                             "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def install(args: tuple[str, ...]) -> None:
    """Install BUNDLE (folder or .tar) on this device, offline (--help for the options).

    Verify it (exit 6, nothing placed, if any file differs or the archive holds a link or a
    path outside the bundle), fill the venv (default /opt/edgepack) from its runtime pack with
    no index, create the edgepack user, place it under the state dir (default
    /var/lib/edgepack) with current -> it, install and start the systemd units where systemd
    runs, print the URL and the health check. Rerunning upgrades in place.
    """
    from edgepack.install.__main__ import main

    code = main(list(args))
    if code:
        raise SystemExit(code)
