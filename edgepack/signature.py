"""Signed bundles: a DSSE-enveloped in-toto Statement with a SLSA provenance predicate over the
bundle's manifest, ed25519, checked fully offline.

Device side: this module imports the standard library, ``cryptography`` and edgepack's core
only, so ``edgepack verify --key`` and ``edgepack serve --require-signature`` work on a device
without the build extras.

The formats are the published ones, so tools other than edgepack can read them:

* envelope: DSSE v1 JSON envelope ``{"payload", "payloadType", "signatures": [{"keyid",
  "sig"}]}``, signature over ``PAE(payloadType, payload)`` (secure-systems-lab/dsse
  ``envelope.md`` and ``protocol.md``);
* payload: in-toto Statement v1 (``_type`` ``https://in-toto.io/Statement/v1``, ``subject``,
  ``predicateType``, ``predicate``), payloadType ``application/vnd.in-toto+json``
  (in-toto/attestation ``spec/v1``);
* predicate: SLSA Provenance v1 (``buildDefinition`` {buildType, externalParameters,
  internalParameters, resolvedDependencies}, ``runDetails`` {builder, byproducts};
  https://slsa.dev/spec/v1.0/provenance);
* keys: :mod:`edgepack.keys` (ed25519, the same files as ``repo init`` writes);
* file: ``provenance.intoto.jsonl``, one envelope per line (the ``.intoto.jsonl`` naming the
  SLSA generators use), in the bundle's root, beside ``manifest.json``.

The statement is derived from the manifest alone and ed25519 signatures are deterministic, so
signing the same bundle with the same key gives the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError, IntegrityError
from edgepack.keys import PublicKey, keyid_of, load_private_key, load_public_key
from edgepack.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    load_manifest_and_digest,
    verify_and_hold,
    verify_bundle,
)

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
# SLSA asks for a buildType URI that documents the build; edgepack's is described in the
# README section "What a bundle tells you".
BUILD_TYPE = "urn:edgepack:buildtype:bundle:v1"
BUILDER_ID = "urn:edgepack:builder:cli"
MAX_ENVELOPE_BYTES = 4 << 20  # a statement lists file digests: kilobytes, never megabytes


# -- DSSE -------------------------------------------------------------------------------------
def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


# -- the statement ----------------------------------------------------------------------------
def _purl(repo_id: str, sha: str) -> str:
    # purl's huggingface type: pkg:huggingface/<org>/<name>@<commit>, the namespace lower-
    # cased, the name as is (https://github.com/package-url/purl-spec, PURL-TYPES.rst); hub
    # ids use only [A-Za-z0-9_.-], which need no percent-encoding.
    org, _, name = repo_id.rpartition("/")
    return f"pkg:huggingface/{org.lower()}/{name}@{sha}" if org else f"pkg:huggingface/{name}@{sha}"


def statement_for(manifest_bytes: bytes, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The in-toto Statement (SLSA provenance v1) for a bundle, from its manifest alone."""
    source = manifest.get("source") or {}
    device = manifest.get("device") or {}
    plan = manifest.get("plan") or {}
    subjects = [{"name": MANIFEST_NAME,
                 "digest": {"sha256": hashlib.sha256(manifest_bytes).hexdigest()}}]
    subjects += [{"name": f["path"], "digest": {"sha256": f["sha256"]}}
                 for f in manifest["files"]]
    deps: list[dict[str, Any]] = []
    repo_id, rev = source.get("repo_id"), source.get("revision")
    if repo_id and rev:
        deps.append({"uri": _purl(repo_id, rev), "name": repo_id, "digest": {"gitCommit": rev}})
    for path, digest in sorted((source.get("files") or {}).items()):
        dep: dict[str, Any] = {"name": path, "digest": {"sha256": digest}}
        if repo_id and rev:
            dep["uri"] = f"{_purl(repo_id, rev)}#{path}"
        deps.append(dep)
    card = manifest.get("card") or {}
    for lic in card.get("license_files") or []:
        deps.append({"name": lic["path"], "digest": {"sha256": lic["sha256"]},
                     "annotations": {"role": "licence text of the source model"}})
    profile_digest = str(device.get("profile_digest") or "")
    if profile_digest.startswith("sha256:"):
        deps.append({"name": f"device_profiles/{device.get('profile_id')}.toml",
                     "digest": {"sha256": profile_digest.split(":", 1)[1]}})
    engine, converter = manifest.get("engine") or {}, manifest.get("converter") or {}
    version = {"edgepack": str(manifest.get("edgepack_version"))}
    if converter.get("name"):
        version[str(converter["name"])] = str(converter.get("version"))
    if engine.get("package") and engine.get("built_with"):
        version[str(engine["package"])] = str(engine["built_with"])
    byproducts: list[dict[str, Any]] = [{
        "name": "validation", "mediaType": "application/json",
        "annotations": {"validation": manifest.get("validation") or {},
                        "golden_prompts": manifest.get("golden_prompts") or []},
    }]
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "model": source.get("ref"),
                    "requested_revision": source.get("requested_revision"),
                    "device": device.get("profile_id"),
                    "bundle": manifest.get("bundle"),
                    "format": plan.get("format"), "quant": plan.get("quant"),
                    "ctx": plan.get("ctx"),
                },
                "internalParameters": {"engine": engine, "converter": converter,
                                       "license": {k: card.get(k) for k in (
                                           "license", "license_name", "license_link")}},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": version},
                "byproducts": byproducts,
            },
        },
    }


def envelope_line(statement: Mapping[str, Any], private_key: Any) -> bytes:
    """One DSSE envelope (a JSON line) signing ``statement`` with an ed25519 key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    sig = private_key.sign(pae(PAYLOAD_TYPE, payload))
    raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    env = {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE,
           "signatures": [{"keyid": keyid_of(raw), "sig": base64.b64encode(sig).decode()}]}
    return json.dumps(env, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def sign_bundle(bundle_dir: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> Path:
    """Verify the bundle, then write ``provenance.intoto.jsonl`` signed with the key at
    ``key_path`` (atomically; a signature already there is replaced). Returns its path.

    Raises IntegrityError (the bundle does not match its manifest: nothing is signed) and
    ConfigError (the key).
    """
    root = Path(bundle_dir)
    key = load_private_key(key_path)
    verify_bundle(root)
    manifest_bytes = (root / MANIFEST_NAME).read_bytes()
    line = envelope_line(statement_for(manifest_bytes, json.loads(manifest_bytes)), key)
    target = root / SIGNATURE_NAME
    # Beside the bundle, not in it: an interrupted sign must not leave a stray file that
    # `verify` would report as unlisted.
    tmp = root.parent / f".{root.name}.{SIGNATURE_NAME}.partial"
    with open(tmp, "wb") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


# -- verification ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SignedBundle:
    """A bundle whose statement verified with a trusted key and whose files match it."""

    manifest: dict[str, Any]
    statement: dict[str, Any]
    keyid: str
    key_source: str


def _b64(text: Any, what: str, where: Path) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        try:  # DSSE allows either base64 alphabet
            return base64.urlsafe_b64decode(str(text))
        except (binascii.Error, ValueError) as e:
            raise IntegrityError(f"{where}: the envelope's {what} is not base64",
                                 hint="the signature file was altered; sign the bundle "
                                      "again") from e


def _envelopes(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise IntegrityError(f"bundle {str(path.parent)!r} is not signed (no {SIGNATURE_NAME})",
                             hint="sign it on the build machine: edgepack sign BUNDLE --key "
                                  "KEY, then copy it again")
    if path.stat().st_size > MAX_ENVELOPE_BYTES:
        raise IntegrityError(f"{path} is {path.stat().st_size} bytes, above the "
                             f"{MAX_ENVELOPE_BYTES}-byte bound for a signature file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            env = json.loads(line)
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{path} line {n}: the signature envelope is not JSON: {e}",
                                 hint="the signature file was altered; sign again") from e
        if not isinstance(env, dict) or not {"payload", "payloadType", "signatures"} <= env.keys():
            raise IntegrityError(f"{path} line {n}: not a DSSE envelope (payload, payloadType "
                                 "and signatures are required)", hint="sign the bundle again")
        out.append(env)
    if not out:
        raise IntegrityError(f"{path} holds no signature envelope", hint="sign the bundle again")
    return out


def _verified_statement(path: Path, keys: list[PublicKey]) -> tuple[dict[str, Any], PublicKey]:
    """The statement of the first envelope a trusted key signed. Raises IntegrityError."""
    seen: list[str] = []
    for env in _envelopes(path):
        if env["payloadType"] != PAYLOAD_TYPE:
            raise IntegrityError(f"{path}: payloadType {env['payloadType']!r}, expected "
                                 f"{PAYLOAD_TYPE!r}", hint="sign the bundle again")
        payload = _b64(env["payload"], "payload", path)
        signed = pae(PAYLOAD_TYPE, payload)
        for sig in env["signatures"] if isinstance(env["signatures"], list) else []:
            if not isinstance(sig, dict):
                continue
            seen.append(str(sig.get("keyid") or "(no keyid)"))
            raw = _b64(sig.get("sig", ""), "signature", path)
            # The keyid is a hint only (DSSE protocol.md): every trusted key is tried.
            for key in keys:
                if key.verify(raw, signed):
                    try:
                        statement = json.loads(payload)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise IntegrityError(f"{path}: the signed statement is not JSON: {e}",
                                             hint="sign the bundle again") from e
                    return statement, key
    trusted = ", ".join(f"{k.keyid[:16]}… ({k.source})" for k in keys)
    raise IntegrityError(
        f"{path}: the signature does not verify: no signature (key ids "
        f"{', '.join(s[:16] + '…' for s in seen) or 'none'}) is valid for the trusted key "
        f"{trusted} over the statement; the statement or the signature was altered, or the "
        "bundle was signed with another key",
        hint="do not install this bundle; get it again from its builder, or check that --key "
             "is the public key of the key that signed it")


def verify_signed_bundle(bundle_dir: str | os.PathLike[str],
                         public_keys: Iterable[str | os.PathLike[str] | PublicKey]
                         ) -> SignedBundle:
    """Check a bundle's signature and every byte it covers, offline; return what verified.

    Order: the envelope's signature with a trusted key → the statement's shape → the
    manifest's digest against the statement's subject → every file against the manifest
    (and against the statement's subjects). Raises IntegrityError naming what failed
    (signature, statement, manifest or file), ConfigError for an unusable key.
    """
    root = Path(bundle_dir)
    statement, key = verify_signature(root, public_keys)
    where = root / SIGNATURE_NAME
    subjects = {str(s.get("name")): (s.get("digest") or {}).get("sha256")
                for s in statement["subject"] if isinstance(s, dict)}
    # The manifest the files are checked against is the one the signature covers (read again
    # here: a manifest swapped after the signature check is refused, not trusted).
    manifest, _ = verify_and_hold(root, (), manifest_sha256=signed_manifest_sha256(statement))
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    signed_files = {k: v for k, v in subjects.items() if k != MANIFEST_NAME}
    if listed != signed_files:
        raise IntegrityError(f"{where}: the statement's subjects differ from the manifest's "
                             "files", hint="sign the bundle again")
    return SignedBundle(manifest, statement, key.keyid, key.source)


def verify_signature(bundle_dir: str | os.PathLike[str],
                     public_keys: Iterable[str | os.PathLike[str] | PublicKey]
                     ) -> tuple[dict[str, Any], PublicKey]:
    """The first half of :func:`verify_signed_bundle`: the signature with a trusted key, the
    statement's shape and the manifest's digest, without hashing the files. For a caller that
    checks every file against the (now authenticated) manifest itself, as the server does at
    start, so a multi-GB model is not read twice. Raises IntegrityError, ConfigError."""
    root = Path(bundle_dir)
    keys = [k if isinstance(k, PublicKey) else load_public_key(k) for k in public_keys]
    if not keys:
        raise ConfigError("no trusted public key given", hint="pass --key PUB")
    # A clear message for a folder that is not a bundle at all; the digest of what was read.
    _, manifest_digest = load_manifest_and_digest(root)
    statement, key = _verified_statement(root / SIGNATURE_NAME, keys)
    where = root / SIGNATURE_NAME
    if (not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE
            or statement.get("predicateType") != PREDICATE_TYPE
            or not isinstance(statement.get("subject"), list)):
        raise IntegrityError(f"{where}: the signed statement is not an in-toto v1 statement "
                             f"with a {PREDICATE_TYPE} predicate", hint="sign the bundle again")
    subjects = {str(s.get("name")): (s.get("digest") or {}).get("sha256")
                for s in statement["subject"] if isinstance(s, dict)}
    if subjects.get(MANIFEST_NAME) != manifest_digest:
        raise IntegrityError(
            f"bundle {str(root)!r}: {MANIFEST_NAME} has sha256 {manifest_digest[:16]}…, but "
            f"the signed statement covers {str(subjects.get(MANIFEST_NAME))[:16]}…: the "
            "manifest was altered after signing",
            hint="do not install this bundle; get it again from its builder")
    return statement, key


def signed_manifest_sha256(statement: dict[str, Any]) -> str:
    """The manifest digest covered by a statement that :func:`verify_signature` accepted."""
    return next(str(s["digest"]["sha256"]) for s in statement["subject"]
                if isinstance(s, dict) and s.get("name") == MANIFEST_NAME)
