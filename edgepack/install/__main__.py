"""``python3 -m edgepack.install BUNDLE [options]``: the installer without click.

``install.sh`` runs this straight from the edgepack wheel inside the bundle
(``PYTHONPATH=runtime/wheels/edgepack-*.whl``), on a device that has nothing but python3 and
python3-venv; the same options as ``edgepack install``. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from edgepack.errors import EXIT_INTERNAL, EXIT_USAGE, EdgepackError
from edgepack.install.installer import (
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    DEFAULT_UNIT_DIR,
    InstallOptions,
    install_bundle,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgepack install",
        description="Install a bundle (folder or .tar) on this device, offline: verify it, "
        "fill the venv from its runtime pack, create the edgepack user, place it under the "
        "state dir with current -> it, install the systemd units. Rerun to upgrade.")
    p.add_argument("bundle", type=Path, help="bundle folder or the .tar of one")
    p.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX,
                   help=f"venv for edgepack and its engine (default {DEFAULT_PREFIX})")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help=f"where bundles live, current -> the served one (default "
                   f"{DEFAULT_STATE_DIR}; the update agent uses the same)")
    p.add_argument("--unit-dir", type=Path, default=DEFAULT_UNIT_DIR,
                   help=f"where systemd unit files go (default {DEFAULT_UNIT_DIR})")
    p.add_argument("--systemd", choices=("auto", "write", "no"), default="auto",
                   help="auto: install, enable and start the units where systemd runs; "
                   "write: only write the unit files; no: leave systemd alone")
    p.add_argument("--no-user", action="store_true",
                   help="do not create the 'edgepack' system user (files stay yours)")
    p.add_argument("--no-venv", action="store_true",
                   help="ignore the runtime pack; serve with the edgepack running this")
    p.add_argument("--host", default="127.0.0.1", help="address the server listens on")
    p.add_argument("--port", type=int, default=8080, help="port the server listens on")
    p.add_argument("--python", default="python3", help="interpreter that makes the venv")
    p.add_argument("--key", action="append", type=Path, default=[], metavar="PUB",
                   help="trusted public key (repeatable): refuse the bundle (exit 6, nothing "
                   "placed) unless one of these keys signed it (edgepack sign)")
    return p


def options_from(args: argparse.Namespace) -> InstallOptions:
    return InstallOptions(prefix=args.prefix.absolute(), state_dir=args.state_dir.absolute(),
                          unit_dir=args.unit_dir, create_user=not args.no_user,
                          systemd=args.systemd, venv=not args.no_venv, host=args.host,
                          port=args.port, python=args.python,
                          trusted_keys=tuple(k.absolute() for k in args.key))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port} is not a TCP port (1-65535)", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = install_bundle(args.bundle, options_from(args),
                                log=lambda m: print(f"· {m}", file=sys.stderr, flush=True))
    except EdgepackError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a message, not a traceback, unless debugging
        if os.environ.get("EDGEPACK_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"internal error: {type(e).__name__}: {e}\n  hint: rerun with EDGEPACK_DEBUG=1 "
              "and report the traceback", file=sys.stderr)
        return EXIT_INTERNAL
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
