"""The static update repository: create it, publish bundles to it, keep its timestamp fresh.

Build side (python-tuf's ``tuf.api.metadata`` and securesystemslib's ``CryptoSigner``; chunking
needs fastcdc). The layout is described in ``edgepack.ota.release``. Signing follows python-tuf's
``examples/manual_repo/basic_repo.py``: ed25519 keys, one per role (``--threshold`` root keys),
consistent snapshots, and the timestamp written last with ``os.replace`` so a reader sees
either the old repository or the new one, never a mix.

Keeping the repository fresh: the timestamp expires after ``Expiry.timestamp`` (2 days by
default; ``repo init --timestamp-days``, stored in ``DIR/expiry.json`` and used by every later
publish, rollout and refresh). ``repo init`` writes a systemd service + timer for ``repo
refresh`` into ``DIR/systemd/`` and prints them with a cron line (``edgepack.ota.refresh``);
``repo show`` warns when metadata expires within a day or a quarter of its period.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.errors import ConfigError, IntegrityError, UsageError
from edgepack.manifest import (
    MANIFEST_NAME,
    SBOM_NAME,
    SIGNATURE_NAME,
    canonical_json,
    verify_bundle,
)
from edgepack.ota.expiry import (  # noqa: F401 - Expiry is part of this module's API
    EXPIRY_FILE,
    ROOT_DAYS,
    SNAPSHOT_DAYS,
    TARGETS_DAYS,
    TIMESTAMP_DAYS,
    Expiry,
)
from edgepack.ota.release import (
    Channel,
    Release,
    ReleaseFile,
    blob_target,
    channel_doc,
    channel_target,
    check_channel,
    check_group,
    check_rollout,
    chunk_path,
    index_target,
    parse_channel_doc,
    provenance_target,
    release_target,
    sbom_target,
    stored_target_path,
    version_key,
)

ROLES = ("root", "targets", "snapshot", "timestamp")
# `repo refresh` re-signs snapshot and targets too when they expire within this window.
RESIGN_WINDOW = timedelta(days=7)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass(frozen=True)
class PublishResult:
    channel: str
    version: int | str
    target: str
    files: int
    chunks_total: int
    chunks_new: int
    bytes_new: int


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_key(path: Path, pem: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise ConfigError(
            f"key file {path} already exists", hint="refusing to overwrite a signing key"
        ) from e
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)


def _load_signer(path: Path):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"key file {path} has mode {mode:o}, expected 600",
                hint=f"chmod 600 {path}",
            )
        return CryptoSigner(load_pem_private_key(path.read_bytes(), None))
    except OSError as e:
        raise ConfigError(f"cannot read signing key {path}: {e}") from e


class Repository:
    """A repository folder on the publisher's machine (see ``edgepack.ota.release``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.keys = self.root / "keys"
        self.public = self.root / "public"
        self.metadata = self.public / "metadata"
        self.targets = self.public / "targets"

    # -- reading ---------------------------------------------------------------------------

    def _check(self) -> None:
        if not (self.metadata / "timestamp.json").is_file():
            raise ConfigError(
                f"{self.root} is not an edgepack repository (no public/metadata/timestamp.json)",
                hint=f"create one with `edgepack repo init {self.root}`",
            )

    def _load(self, role: str, version: int | None = None):
        from tuf.api.metadata import Metadata

        name = f"{role}.json" if version is None else f"{version}.{role}.json"
        try:
            return Metadata.from_file(str(self.metadata / name))
        except Exception as e:  # noqa: BLE001 - tuf raises several kinds
            raise IntegrityError(f"cannot load {self.metadata / name}: {e}") from e

    def _current(self):
        timestamp = self._load("timestamp")
        snap_v = timestamp.signed.snapshot_meta.version
        snapshot = self._load("snapshot", snap_v)
        targets = self._load("targets", snapshot.signed.meta["targets.json"].version)
        return timestamp, snapshot, targets

    def _signer(self, role: str):
        return _load_signer(self.keys / f"{role}.key")

    def root_json(self) -> Path:
        return self.metadata / "root.json"

    def expiry(self) -> Expiry:
        """The expiry periods chosen at ``repo init`` (DIR/expiry.json), else the defaults."""
        try:
            data = json.loads((self.root / EXPIRY_FILE).read_text())
        except FileNotFoundError:
            return Expiry()
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {self.root / EXPIRY_FILE}: {e}",
                              hint="fix or delete it (the defaults then apply)") from e
        return Expiry.from_days(targets=data.get("targets_days"),
                                snapshot=data.get("snapshot_days"),
                                timestamp=data.get("timestamp_days"))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._check()
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- writing ---------------------------------------------------------------------------

    def _write_md(self, md, name: str) -> None:
        from tuf.api.serialization.json import JSONSerializer

        _write_atomic(self.metadata / name, md.to_bytes(JSONSerializer(compact=False)))

    def _add_target(self, targets_md, path: str, data: bytes, custom: dict | None = None):
        from tuf.api.metadata import TargetFile

        info = TargetFile.from_data(path, data, ["sha256"])
        if custom is not None:
            info.unrecognized_fields["custom"] = custom
        dest = self.targets / stored_target_path(path, info.hashes["sha256"])
        if not dest.exists():
            _write_atomic(dest, data)
        targets_md.signed.targets[path] = info
        return info

    def _sign_and_write(self, timestamp, snapshot, targets, expiry: Expiry,
                        resign_targets: bool = True, resign_snapshot: bool = True) -> None:
        from tuf.api.metadata import MetaFile

        now = _now()
        if resign_targets:
            targets.signed.version += 1
            targets.signed.expires = now + expiry.targets
            targets.signatures.clear()
            targets.sign(self._signer("targets"))
            self._write_md(targets, f"{targets.signed.version}.targets.json")
        if resign_snapshot or resign_targets:
            snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
            snapshot.signed.version += 1
            snapshot.signed.expires = now + expiry.snapshot
            snapshot.signatures.clear()
            snapshot.sign(self._signer("snapshot"))
            self._write_md(snapshot, f"{snapshot.signed.version}.snapshot.json")
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        timestamp.signed.version += 1
        timestamp.signed.expires = now + expiry.timestamp
        timestamp.signatures.clear()
        timestamp.sign(self._signer("timestamp"))
        # Written last and atomically: this one file switches every reader to the new state.
        self._write_md(timestamp, "timestamp.json")

    # -- channels --------------------------------------------------------------------------

    def _read_target(self, targets_md, path: str) -> bytes | None:
        info = targets_md.signed.targets.get(path)
        if info is None:
            return None
        return (self.targets / stored_target_path(path, info.hashes["sha256"])).read_bytes()

    def _channel(self, targets_md, channel: str) -> Channel:
        data = self._read_target(targets_md, channel_target(channel))
        return Channel(()) if data is None else parse_channel_doc(data, channel_target(channel))

    def channels(self) -> list[str]:
        _, _, targets = self._current()
        return sorted(p[len("channels/"):-len(".json")] for p in targets.signed.targets
                      if p.startswith("channels/") and p.endswith(".json"))

    def channel_versions(self, channel: str) -> list[int | str]:
        """Versions published to ``channel`` (oldest first)."""
        _, _, targets = self._current()
        return sorted(self._channel(targets, channel).versions, key=version_key)

    def publish(self, bundle_dir: Path, channel: str, *, rollout: int = 100,
                min_agent_version: str | None = None, expiry: Expiry | None = None
                ) -> PublishResult:
        """Add a verified bundle as the newest version of ``channel``.

        Raises UsageError if the bundle's version is not newer than every version already
        on the channel, IntegrityError if the bundle does not match its manifest.
        """
        from edgepack.ota.chunks import CHUNK_THRESHOLD, index_file, write_if_absent

        check_channel(channel)
        rollout = check_rollout(rollout)
        bundle_dir = Path(bundle_dir)
        manifest = verify_bundle(bundle_dir)
        bundle = manifest.get("bundle") or {}
        version = bundle.get("version")
        if version is None:
            raise UsageError(
                f"{bundle_dir}/{MANIFEST_NAME} has no bundle.version",
                hint="rebuild with `edgepack build --bundle-version V`",
            )
        key = version_key(version)
        with self._locked():
            timestamp, snapshot, targets = self._current()
            doc = self._channel(targets, channel)
            existing = list(doc.versions)
            # Versions withdrawn by a rollback stay burnt: a device may still hold them.
            ever = [*existing, *doc.withdrawn]
            newest = max(ever, key=version_key) if ever else None
            if newest is not None and key <= version_key(newest):
                raise UsageError(
                    f"bundle version {version!r} is not newer than {newest!r}, the newest on "
                    f"channel {channel!r}",
                    hint="devices never install an older or equal version; rebuild with a "
                    "higher `edgepack build --bundle-version`",
                )
            relpaths = [e["path"] for e in manifest["files"]] + [MANIFEST_NAME]
            files: list[ReleaseFile] = []
            chunks_total = chunks_new = bytes_new = 0
            for rel in sorted(relpaths):
                p = bundle_dir / rel
                size = p.stat().st_size
                if size > CHUNK_THRESHOLD:
                    index, chunks = index_file(p)
                    for c, view in chunks:
                        chunks_total += 1
                        if write_if_absent(self.public / chunk_path(c.sha256), view):
                            chunks_new += 1
                            bytes_new += c.size
                    self._add_target(targets, index_target(index.file_sha256),
                                     canonical_json(index.to_dict()))
                    files.append(ReleaseFile(rel, index.file_sha256, size, True))
                else:
                    data = p.read_bytes()
                    info = self._add_target(targets, blob_target(_sha(data)), data)
                    files.append(ReleaseFile(rel, info.hashes["sha256"], size, False))
            release = Release(channel, version, str(bundle.get("name", "")), tuple(files))
            custom = {
                "edgepack": {
                    "channel": channel,
                    "version": version,
                    "bundle": release.bundle,
                    "rollout": rollout,
                    "min_agent_version": min_agent_version or __version__,
                }
            }
            target = release_target(channel, version)
            self._add_target(targets, target, canonical_json(release.to_dict()), custom)
            # The ML-BOM and the signed provenance, under predictable names beside the version,
            # so an auditor can read what a fleet runs without assembling a bundle.
            for name, path_of in ((SBOM_NAME, sbom_target), (SIGNATURE_NAME, provenance_target)):
                if (bundle_dir / name).is_file():
                    self._add_target(targets, path_of(channel, version),
                                     (bundle_dir / name).read_bytes())
            # A new version ends a rollback: devices move forward to it again.
            self._add_target(targets, channel_target(channel),
                             canonical_json(channel_doc(channel, [*existing, version],
                                                        withdrawn=doc.withdrawn)))
            self._sign_and_write(timestamp, snapshot, targets, expiry or self.expiry())
        return PublishResult(channel, version, target, len(files), chunks_total, chunks_new,
                             bytes_new)

    def set_rollout(self, channel: str, version: int | str, rollout: int | None = None,
                    expiry: Expiry | None = None, *, groups: list[str] | None = None
                    ) -> dict[str, Any]:
        """Change who is offered a published version: its rollout percentage and/or the
        device groups (device ids or group names) it reaches whatever the percentage
        (``groups=[]`` clears them). Re-signs targets; returns the new custom fields."""
        if rollout is None and groups is None:
            raise UsageError("nothing to change", hint="give --percent and/or --group")
        if rollout is not None:
            rollout = check_rollout(rollout)
        if groups is not None:
            groups = sorted({check_group(g) for g in groups})
        with self._locked():
            timestamp, snapshot, targets = self._current()
            info = targets.signed.targets.get(release_target(channel, version))
            if info is None or version not in self._channel(targets, channel).versions:
                raise UsageError(
                    f"version {version!r} is not published on channel {channel!r}",
                    hint="`edgepack repo show DIR` lists the channels and their versions")
            meta = info.unrecognized_fields["custom"]["edgepack"]
            if rollout is not None:
                meta["rollout"] = rollout
            if groups is not None:
                if groups:
                    meta["groups"] = groups
                else:
                    meta.pop("groups", None)
            self._sign_and_write(timestamp, snapshot, targets, expiry or self.expiry())
            return dict(meta)

    def rollback(self, channel: str, to: int | str | None = None,
                 expiry: Expiry | None = None) -> dict[str, Any]:
        """Re-point ``channel`` at an earlier version (default: the one before the newest).

        The versions above it are withdrawn from the channel and the channel document says
        ``rollback_to``: the only signed permission an agent accepts to install a version
        lower than the one it runs. Raises UsageError when there is nothing to go back to.
        """
        check_channel(channel)
        with self._locked():
            timestamp, snapshot, targets = self._current()
            doc = self._channel(targets, channel)
            versions = sorted(doc.versions, key=version_key)
            if not versions:
                raise UsageError(f"channel {channel!r} has no versions",
                                 hint=f"channels: {', '.join(self.channels()) or 'none'}")
            if to is None:
                if len(versions) < 2:
                    raise UsageError(
                        f"channel {channel!r} has only version {versions[0]!r}; nothing "
                        "earlier to roll back to")
                to = versions[-2]
            match = [v for v in versions if version_key(v) == version_key(to)]
            if not match:
                raise UsageError(
                    f"version {to!r} is not on channel {channel!r} (versions: "
                    f"{', '.join(str(v) for v in versions)})",
                    hint="roll back to a version still on the channel (`repo gc` keeps it)")
            to = match[0]
            withdrawn = [v for v in versions if version_key(v) > version_key(to)]
            if not withdrawn:
                raise UsageError(f"version {to!r} is already the newest on {channel!r}")
            kept = [v for v in versions if version_key(v) <= version_key(to)]
            self._add_target(targets, channel_target(channel), canonical_json(channel_doc(
                channel, kept, rollback_to=to, withdrawn=[*doc.withdrawn, *withdrawn])))
            self._sign_and_write(timestamp, snapshot, targets, expiry or self.expiry())
        return {"channel": channel, "rollback_to": to, "withdrawn": withdrawn}

    def refresh(self, expiry: Expiry | None = None) -> dict[str, Any]:
        """Re-sign the timestamp (and snapshot/targets when they expire within a week)."""
        expiry = expiry or self.expiry()
        with self._locked():
            timestamp, snapshot, targets = self._current()
            soon = _now() + RESIGN_WINDOW
            re_t = targets.signed.expires <= soon
            re_s = re_t or snapshot.signed.expires <= soon
            self._sign_and_write(timestamp, snapshot, targets, expiry, re_t, re_s)
            return {
                "timestamp_version": timestamp.signed.version,
                "timestamp_expires": timestamp.signed.expires.isoformat(),
                "resigned_snapshot": re_s,
                "resigned_targets": re_t,
            }


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def init_repo(root: Path, *, threshold: int = 1, root_key: Path | None = None,
              expiry: Expiry | None = None) -> Repository:
    """Create an empty repository with fresh ed25519 keys; return it.

    ``threshold`` root keys are made and all of them are needed to sign root. With
    ``root_key`` the root key(s) are written there (``PATH``, ``PATH.2`` ...) instead of
    ``DIR/keys``, so they can be moved offline. Raises ConfigError if DIR is not empty.
    """
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

    if threshold < 1:
        raise UsageError(f"--threshold {threshold} must be at least 1")
    repo = Repository(root)
    if repo.root.exists() and any(repo.root.iterdir()):
        raise ConfigError(f"{repo.root} exists and is not empty",
                          hint="choose a new folder for the repository")
    expiry = expiry or Expiry()
    repo.root.mkdir(parents=True, exist_ok=True)
    _write_atomic(repo.root / EXPIRY_FILE,
                  json.dumps(expiry.to_dict(), indent=2, sort_keys=True).encode() + b"\n")
    now = _now()
    signed_root = Root(expires=now + timedelta(days=ROOT_DAYS), consistent_snapshot=True)
    signers: dict[str, Any] = {}
    root_signers = []
    for i in range(threshold):
        s = CryptoSigner.generate_ed25519()
        signed_root.add_key(s.public_key, "root")
        if root_key is None:
            path = repo.keys / ("root.key" if i == 0 else f"root-{i + 1}.key")
        else:
            path = Path(root_key) if i == 0 else Path(f"{root_key}.{i + 1}")
        _write_key(path, s.private_bytes)
        root_signers.append(s)
    signed_root.roles["root"].threshold = threshold
    for role in ROLES[1:]:
        s = CryptoSigner.generate_ed25519()
        signed_root.add_key(s.public_key, role)
        _write_key(repo.keys / f"{role}.key", s.private_bytes)
        signers[role] = s
    root_md = Metadata(signed_root)
    for s in root_signers:
        root_md.sign(s, append=True)
    repo.targets.mkdir(parents=True, exist_ok=True)
    (repo.public / "chunks").mkdir(parents=True, exist_ok=True)
    repo._write_md(root_md, "1.root.json")
    repo._write_md(root_md, "root.json")
    targets_md = Metadata(Targets(expires=now + expiry.targets))
    targets_md.sign(signers["targets"])
    repo._write_md(targets_md, "1.targets.json")
    snapshot_md = Metadata(Snapshot(expires=now + expiry.snapshot))
    snapshot_md.signed.meta["targets.json"] = MetaFile(version=1)
    snapshot_md.sign(signers["snapshot"])
    repo._write_md(snapshot_md, "1.snapshot.json")
    timestamp_md = Metadata(Timestamp(expires=now + expiry.timestamp))
    timestamp_md.signed.snapshot_meta = MetaFile(version=1)
    timestamp_md.sign(signers["timestamp"])
    repo._write_md(timestamp_md, "timestamp.json")
    return repo
