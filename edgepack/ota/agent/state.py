"""The agent's state directory: slots, the current/previous switch, status and journal.

Layout (DESIGN.md, "Updates over the air")::

    STATE/trust/root.json        the trusted root the device was provisioned with
    STATE/metadata/              ngclient's metadata cache
    STATE/device-id              this device's id (rollout cohort)
    STATE/slots/<version>/       verified bundles
    STATE/current -> slots/<v>   what the server runs; switched by symlink + rename
    STATE/previous -> slots/<v>  what a rollback returns to
    STATE/staging/<version>/     a bundle being assembled (partial files resume from here)
    STATE/cache/chunks/<sha256>  downloaded chunks not yet in a slot
    STATE/cache/indexes/         chunk indexes of installed files (delta sources)
    STATE/journal.json           the update in progress
    STATE/status.json            last result and why
    STATE/blocked.json           versions that failed the health gate: never retried on their own

Device side: standard library and edgepack.errors/manifest/release only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError, EdgepackError, IntegrityError
from edgepack.manifest import verify_bundle
from edgepack.ota.release import version_key, version_text


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a reader or a power cut sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError):
        # A damaged status file must not stop the agent; the journal is handled apart.
        return default


class StateDir:
    """Paths and small atomic operations on one agent state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.trust = self.root / "trust" / "root.json"
        self.metadata = self.root / "metadata"
        self.slots = self.root / "slots"
        self.staging = self.root / "staging"
        self.chunks = self.root / "cache" / "chunks"
        self.indexes = self.root / "cache" / "indexes"
        self.current = self.root / "current"
        self.previous = self.root / "previous"
        self.journal_path = self.root / "journal.json"
        self.status_path = self.root / "status.json"
        self.blocked_path = self.root / "blocked.json"

    # -- provisioning ----------------------------------------------------------------------

    def init(self, root_json: bytes, device_id: str | None = None) -> None:
        """Provision: store the trusted root and a device id; refuses a different root."""
        from tuf.api.metadata import Metadata, Root

        try:
            md = Metadata.from_bytes(root_json)
            if not isinstance(md.signed, Root):
                raise ValueError("not root metadata")
            md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
        except Exception as e:  # noqa: BLE001 - tuf raises several kinds
            raise IntegrityError(f"the root file is not valid, self-signed TUF root: {e}",
                                 hint="pass the repository's public/metadata/root.json") from e
        if self.trust.exists() and self.trust.read_bytes() != root_json:
            raise ConfigError(
                f"{self.root} is already provisioned with another root",
                hint="keys rotate through the repository; to re-provision, use a new state dir",
            )
        for d in (self.trust.parent, self.metadata, self.slots, self.staging, self.chunks,
                  self.indexes):
            d.mkdir(parents=True, exist_ok=True)
        if not self.trust.exists():
            tmp = self.trust.with_name(".root.json.tmp")
            tmp.write_bytes(root_json)
            os.replace(tmp, self.trust)
        idfile = self.root / "device-id"
        if device_id or not idfile.exists():
            idfile.write_text((device_id or str(uuid.uuid4())) + "\n")

    def check(self) -> None:
        if not self.trust.is_file():
            raise ConfigError(
                f"{self.root} is not a provisioned agent state directory",
                hint=f"run `edgepack agent init --root ROOT.json --state-dir {self.root}`",
            )

    def device_id(self) -> str:
        return (self.root / "device-id").read_text().strip()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One agent per state directory: a second one fails fast instead of interleaving."""
        with open(self.root / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise ConfigError(f"another agent is running on {self.root}") from e
            yield

    # -- slots and the switch --------------------------------------------------------------

    def slot(self, version: int | str) -> Path:
        return self.slots / version_text(version)

    def _link_target(self, link: Path) -> Path | None:
        try:
            return self.root / os.readlink(link)
        except (FileNotFoundError, OSError):
            return None

    def current_slot(self) -> Path | None:
        return self._link_target(self.current)

    def previous_slot(self) -> Path | None:
        return self._link_target(self.previous)

    def set_link(self, link: Path, slot: Path | None) -> None:
        """Point ``link`` at ``slot`` atomically (new symlink, then rename over the old)."""
        if slot is None:
            link.unlink(missing_ok=True)
        else:
            tmp = link.with_name(f".{link.name}.tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(slot, self.root), tmp)
            os.replace(tmp, link)
        fsync_dir(self.root)

    def installed_version(self) -> int | str | None:
        slot = self.current_slot()
        if slot is None:
            return None
        try:
            return json.loads((slot / "manifest.json").read_text())["bundle"]["version"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def verified(self, slot: Path | None) -> bool:
        if slot is None or not slot.is_dir():
            return False
        try:
            verify_bundle(slot)
            return True
        except EdgepackError:
            return False

    def gc(self) -> list[str]:
        """Delete slots other than current and previous, staging leftovers of older
        versions, and cached chunks (they now live inside a slot); return what went."""
        keep = {p.resolve() for p in (self.current_slot(), self.previous_slot()) if p}
        removed = []
        for d in sorted(self.slots.iterdir()) if self.slots.is_dir() else []:
            if d.resolve() not in keep:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        installed = self.installed_version()
        for d in sorted(self.staging.iterdir()) if self.staging.is_dir() else []:
            try:
                stale = installed is not None and version_key(d.name) <= version_key(installed)
            except EdgepackError:
                stale = True
            if stale:
                shutil.rmtree(d, ignore_errors=True)
        if installed is not None and self.chunks.is_dir():
            for c in self.chunks.iterdir():
                c.unlink(missing_ok=True)
        return removed

    # -- status and blocked versions -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return read_json(self.status_path, {})

    def record(self, **fields: Any) -> None:
        data = self.status()
        data.update(fields, at=now_iso())
        write_json_atomic(self.status_path, data)

    def blocked(self) -> dict[str, str]:
        return read_json(self.blocked_path, {})

    def block(self, version: int | str, reason: str) -> None:
        data = self.blocked()
        data[version_text(version)] = reason
        write_json_atomic(self.blocked_path, data)

    def unblock(self, version: str) -> str:
        """Forget that ``version`` failed here; return why it was blocked. Raises
        UsageError naming the blocked versions when it is not one of them."""
        from edgepack.errors import UsageError

        data = self.blocked()
        key = next((k for k in data if k == version or
                    _same_version(k, version)), None)
        if key is None:
            raise UsageError(
                f"version {version!r} is not blocked on this device "
                f"(blocked: {', '.join(sorted(data)) or 'none'})",
                hint="`edgepack agent status` lists blocked versions and why")
        reason = data.pop(key)
        write_json_atomic(self.blocked_path, data)
        return reason


def _same_version(a: str, b: str) -> bool:
    try:
        return version_key(a) == version_key(b)
    except EdgepackError:
        return False
