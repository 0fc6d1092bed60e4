"""ed25519 keys for signing bundles: load, generate, and name them (device side).

Private keys are PKCS#8 PEM files of mode 600, the format ``edgepack repo init`` writes its
TUF keys in, so a repository's ``targets.key`` can sign bundles too; public keys are
SubjectPublicKeyInfo PEM files. Key ids are securesystemslib's, so a repository key has the
same id here as in its ``root.json``. Standard library, ``cryptography`` and edgepack's errors
only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError


def keyid_of(public_raw: bytes) -> str:
    """The key id securesystemslib (and so TUF's root.json) gives an ed25519 key: sha256 of
    the canonical JSON of {keytype, scheme, keyval{public}}. A hint only, never trusted."""
    doc = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": public_raw.hex()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # 32 bytes
    source: str

    @property
    def keyid(self) -> str:
        return keyid_of(self.raw)

    def verify(self, sig: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(sig, data)
        except InvalidSignature:
            return False
        return True


def _read_key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror or e}",
                          hint="pass the .pub (to verify) or .key (to sign) file that "
                               "`edgepack keygen` or `edgepack repo init` wrote") from e
    if len(data) > 64 * 1024:
        raise ConfigError(f"{path} is {len(data)} bytes: not an ed25519 key file")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Any:
    """An ed25519 private key from a PEM (PKCS#8) file, mode 600 as `repo init` writes them.

    Raises ConfigError for an unreadable, group/world-readable, encrypted or non-ed25519 key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    p = Path(path)
    data = _read_key_file(p)
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"signing key {p} has mode {mode:o}, expected 600",
                          hint=f"chmod 600 {p}; anyone who can read it can sign bundles")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{p} is not an unencrypted PEM private key: {e}",
                          hint="create one with `edgepack keygen NAME`") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p} holds a {type(key).__name__}, expected an ed25519 key",
                          hint="create one with `edgepack keygen NAME`")
    return key


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """An ed25519 public key from a PEM file (SubjectPublicKeyInfo, as `keygen` writes).

    Raises ConfigError when it is not one (a private key is refused: it does not belong on
    the device that verifies).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    p = Path(path)
    data = _read_key_file(p)
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{p} is a private key; verification needs the public key",
                          hint=f"write it with `edgepack keygen --public-of {p}` and give the "
                               "device only the .pub file")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{p} is not a PEM public key: {e}",
                          hint="pass the .pub file `edgepack keygen` wrote") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{p} holds a {type(key).__name__}, expected an ed25519 key")
    return PublicKey(key.public_bytes(Encoding.Raw, PublicFormat.Raw), str(p))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise ConfigError(f"{path} already exists", hint="refusing to overwrite a key file; "
                          "choose another name") from e
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def public_pem(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bytes(private_key.public_key().public_bytes(Encoding.PEM,
                                                       PublicFormat.SubjectPublicKeyInfo))


def generate_keypair(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a fresh ed25519 key: ``PREFIX.key`` (PKCS#8 PEM, mode 600, the same format as
    `repo init`'s keys) and ``PREFIX.pub`` (SubjectPublicKeyInfo PEM). Never overwrites."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    base = Path(prefix)
    key_path, pub_path = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise ConfigError(f"{p} already exists", hint="refusing to overwrite a key file")
    base.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    _write_new(key_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
               0o600)
    _write_new(pub_path, public_pem(key), 0o644)
    return key_path, pub_path


def write_public_key(key_path: str | os.PathLike[str],
                     out: str | os.PathLike[str] | None = None) -> Path:
    """Write the public half of an existing private key (e.g. `repo init`'s targets.key)."""
    key = load_private_key(key_path)
    target = Path(out) if out else Path(key_path).with_suffix(".pub")
    _write_new(target, public_pem(key), 0o644)
    return target


def signing_keyid(key_path: str | os.PathLike[str]) -> str:
    """The key id (securesystemslib's, as in TUF's root.json) of a private key file."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = load_private_key(key_path)
    return keyid_of(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
