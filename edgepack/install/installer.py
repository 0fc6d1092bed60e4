"""``edgepack install BUNDLE|BUNDLE.tar``: put a verified bundle in service on this device.

Steps, each safe to repeat (a rerun with a newer bundle upgrades in place):

1. read the bundle: a folder is verified against its manifest; an archive goes through
   ``edgepack.archive`` (links, ``..`` and oversize refused) and is verified as it unpacks;
2. the venv (``--prefix``, default ``/opt/edgepack``) from the bundle's runtime pack, offline
   (``edgepack.install.venv``); a bundle without a pack uses the edgepack already running;
3. the ``edgepack`` system user;
4. the bundle into the state dir as the update agent lays it out: ``slots/<version>/``, then
   ``current`` switched to it (``previous`` keeps the one it replaced), atomically, last;
5. the systemd units rendered for this venv and state dir; enabled and started where
   systemd runs;
6. the URL and the command that checks health.

A bundle that fails verification is refused with exit 6 before anything is placed; a slot
appears only after its copy verified, and ``current`` moves only after that.

Device side: never imports edgepack.build or edgepack.cli.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.archive import extract_archive, is_archive, scan_archive
from edgepack.errors import ConfigError
from edgepack.install.system import (
    chown_tree,
    ensure_user,
    install_units,
    systemd_running,
)
from edgepack.install.venv import check_platform, ensure_venv
from edgepack.manifest import MANIFEST_NAME, SIGNATURE_NAME, verify_bundle
from edgepack.ota.agent.state import StateDir, fsync_dir

DEFAULT_PREFIX = Path("/opt/edgepack")
DEFAULT_STATE_DIR = Path("/var/lib/edgepack")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")


@dataclass(frozen=True)
class InstallOptions:
    prefix: Path = DEFAULT_PREFIX
    state_dir: Path = DEFAULT_STATE_DIR
    unit_dir: Path = DEFAULT_UNIT_DIR
    create_user: bool = True
    # auto: write, enable and start the units where systemd runs, else say how to start;
    # write: only write the unit files (an image prepared offline); no: leave systemd alone.
    systemd: str = "auto"
    venv: bool = True  # False: use the edgepack running this command, even with a pack
    host: str = "127.0.0.1"
    port: int = 8080
    python: str = "python3"
    # Public keys (edgepack keygen / repo init): when given, the bundle must carry a valid
    # signature by one of them (edgepack sign) before anything is placed.
    trusted_keys: tuple[Path, ...] = ()


@dataclass(frozen=True)
class InstallResult:
    bundle_name: str
    version: int | str
    slot: Path
    upgraded_from: int | str | None
    edgepack: str  # the executable the units and the hint use
    venv_changed: bool
    units: tuple[Path, ...]
    systemd_started: bool
    url: str

    def describe(self) -> str:
        if self.upgraded_from is None:
            what = "installed"
        elif str(self.upgraded_from) == str(self.version):
            what = "reinstalled (unchanged)"
        else:
            what = f"upgraded from version {self.upgraded_from}"
        lines = [f"{what}: {self.bundle_name} version {self.version} -> {self.slot}"]
        if self.systemd_started:
            lines.append("started: edgepack-server.service (enabled at boot)")
        elif self.units:
            lines.append(f"systemd units written to {self.units[0].parent} (not started)")
        else:
            current = self.slot.parent.parent / "current"
            lines.append("systemd units not installed (systemd is not running here, or "
                         f"--systemd no); start the server with:\n  {self.edgepack} serve "
                         f"{current}")
        lines += [f"url: {self.url}",
                  f"check: curl -fsS {self.url}/readyz   (200 once the model answered)",
                  "updates: edgepack agent init --root ROOT.json --state-dir "
                  f"{self.slot.parent.parent}, then systemctl enable --now "
                  "edgepack-agent.service (README: Deploy to a Raspberry Pi)"]
        return "\n".join(lines)


def _executable(opts: InstallOptions, has_pack: bool) -> str:
    if has_pack and opts.venv:
        return str(opts.prefix / "bin" / "edgepack")
    found = shutil.which("edgepack")
    return found or str(Path(sys.executable).with_name("edgepack"))


def _same_bundle(slot: Path, manifest_bytes: bytes) -> bool:
    try:
        return (slot / MANIFEST_NAME).read_bytes() == manifest_bytes
    except OSError:
        return False


def _check_signature(bundle: Path, keys: tuple[Path, ...], log: Callable[[str], None]) -> None:
    """Refuse (exit 6) a bundle that no trusted key signed. The check needs ``cryptography``,
    which a bare device python may lack: say how to get it rather than skip the check."""
    from edgepack.signature import verify_signed_bundle

    try:
        import cryptography  # noqa: F401 - only to ask before the check needs it
    except ImportError as e:
        raise ConfigError(
            f"--key needs the 'cryptography' package, which this python lacks ({e})",
            hint="install python3-cryptography (Debian/Raspberry Pi OS), or run the install "
                 "from an edgepack venv; never drop --key to get past this") from e
    signed = verify_signed_bundle(bundle, list(keys))
    log(f"signature by key {signed.keyid[:12]} ({signed.key_source}) verified")


def _copy_verified(src: Path, dest: Path) -> None:
    """Copy a bundle folder to ``dest`` through a hidden partial folder; verify, rename."""
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        manifest = verify_bundle(src)
        for entry in sorted(manifest["files"], key=lambda e: e["path"]):
            target = work / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry["path"], target)
        if (src / SIGNATURE_NAME).is_file():  # outside the manifest: it signs the manifest
            shutil.copyfile(src / SIGNATURE_NAME, work / SIGNATURE_NAME)
        shutil.copyfile(src / MANIFEST_NAME, work / MANIFEST_NAME)  # last
        verify_bundle(work)
        os.replace(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _render_units(manifest: dict[str, Any], exe: str, opts: InstallOptions) -> dict[str, str]:
    from edgepack.runtimes.systemd import render_units

    plan = manifest.get("plan") or {}
    memory = (plan.get("memory") or {}).get("required_bytes")
    return render_units(str(opts.state_dir / "current"), memory_bytes=memory,
                        gpu_offload=(plan.get("gpu_layers") or 0) > 0, executable=exe,
                        host=opts.host, port=opts.port, state_dir=str(opts.state_dir))


def install_bundle(source: Path, opts: InstallOptions,
                   log: Callable[[str], None] = lambda _m: None) -> InstallResult:
    """Install ``source`` (a bundle folder or archive) per ``opts``; see the module doc.

    Raises IntegrityError (exit 6: bad bundle or archive; nothing placed), ConfigError
    (exit 3: wrong platform, no root for the user), RuntimeHealthError (exit 7: venv, pip or
    systemctl failed).
    """
    source = Path(source)
    if opts.systemd not in ("auto", "write", "no"):
        raise ConfigError(f"systemd mode {opts.systemd!r}, expected auto, write or no")
    state = StateDir(opts.state_dir)
    unpacked: Path | None = None
    try:
        if is_archive(source):
            state.staging.mkdir(parents=True, exist_ok=True)
            listing = scan_archive(source)
            log(f"unpacking {source} ({listing.total_bytes} bytes, {len(listing.files)} files)")
            unpacked = extract_archive(
                listing, Path(tempfile.mkdtemp(prefix=".install-", dir=state.staging)) / "b")
            bundle = unpacked
        elif source.is_dir():
            bundle = source
        else:
            raise ConfigError(f"bundle {str(source)!r} does not exist",
                              hint="pass a bundle folder or its .tar")
        manifest = verify_bundle(bundle)
        log(f"verified {len(manifest['files'])} files of {bundle}")
        if opts.trusted_keys:
            _check_signature(bundle, opts.trusted_keys, log)
        return _install_verified(bundle, manifest, state, opts, log)
    finally:
        if unpacked is not None:
            shutil.rmtree(unpacked.parent, ignore_errors=True)


def _install_verified(bundle: Path, manifest: dict[str, Any], state: StateDir,
                      opts: InstallOptions, log: Callable[[str], None]) -> InstallResult:
    runtime = manifest.get("runtime")
    has_pack = isinstance(runtime, dict)
    venv_changed = False
    if has_pack and opts.venv:
        check_platform(runtime)  # type: ignore[arg-type]  # has_pack: a dict
        venv_changed = ensure_venv(opts.prefix, bundle, python=opts.python, log=log)
    elif not has_pack:
        log("this bundle has no runtime pack: the edgepack running this command serves it")
    exe = _executable(opts, has_pack)

    for d in (state.root, state.slots):
        d.mkdir(parents=True, exist_ok=True)
    owner = ensure_user(state.root, log) if opts.create_user else None
    version = manifest["bundle"]["version"]
    previous = state.installed_version()
    slot = state.slot(version)
    manifest_bytes = (bundle / MANIFEST_NAME).read_bytes()
    if _same_bundle(slot, manifest_bytes) and state.verified(slot):
        log(f"{slot} already holds this bundle")
    else:
        if slot.exists():
            # Same version, other content (a rebuild): the new copy replaces it only once
            # it verified; the old one is renamed away first so the swap is two renames.
            old = slot.with_name(f".{slot.name}.old-{os.getpid()}")
            _copy_verified(bundle, slot.with_name(f"{slot.name}.new"))
            os.replace(slot, old)
            os.replace(slot.with_name(f"{slot.name}.new"), slot)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _copy_verified(bundle, slot)
        fsync_dir(state.slots)
    cur = state.current_slot()
    if cur is None or cur.resolve() != slot.resolve():
        if cur is not None:
            state.set_link(state.previous, cur)
        state.set_link(state.current, slot)  # last: what the server runs
    if owner is not None:
        chown_tree(state.root, *owner)

    units = _render_units(manifest, exe, opts)
    written: tuple[Path, ...] = ()
    started = False
    manage = opts.systemd == "auto" and systemd_running()
    if manage or opts.systemd == "write":
        res = install_units(units, opts.unit_dir, manage=manage,
                            restart=str(previous) != str(version) or venv_changed, log=log)
        written, started = res.written, res.started
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
    return InstallResult(
        bundle_name=manifest["bundle"]["name"], version=version, slot=slot,
        upgraded_from=previous, edgepack=exe, venv_changed=venv_changed, units=written,
        systemd_started=started, url=f"http://{host}:{opts.port}",
    )

