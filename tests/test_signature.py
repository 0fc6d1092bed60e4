"""Signed bundles: sign → verify offline → tamper with each part → exit 6 naming it."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.bundle import BundleSpec, write_bundle
from edgepack.cli.main import cli
from edgepack.errors import ConfigError, IntegrityError
from edgepack.keys import generate_keypair
from edgepack.manifest import SIGNATURE_NAME
from edgepack.signature import PAYLOAD_TYPE, pae, sign_bundle, verify_signed_bundle


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def written_bundle(tmp_path: Path) -> Path:
    """A bundle from the real bundle writer (the build's last stage)."""
    model = tmp_path / "demo-Q8_0.gguf"
    model.write_bytes(b"GGUF" + bytes(4096))
    spec = BundleSpec(
        name="demo-laptop", version=2, model_file=model, model_name="demo", model_format="gguf",
        model_kind="chat", quant="Q8_0", plan={"ctx": 512, "format": "gguf", "quant": "Q8_0"},
        server={"model": {"path": "m"}},
        source={"ref": "Org/Demo", "repo_id": "Org/Demo", "revision": "a" * 40,
                "files": {"config.json": "b" * 64}},
        device={"profile_id": "laptop-x86-16gb", "profile_digest": "sha256:" + "c" * 64},
        engine={"name": "llama.cpp", "package": "llama-cpp-python", "built_with": "0.3.36"},
        validation={"metric": "top1_agreement", "value": 0.99, "threshold": 0.9,
                    "passed": True},
        systemd_units={"edgepack-server.service": "[Service]\n"},
    )
    return write_bundle(spec, tmp_path / "bundle")


def envelope(bundle: Path) -> dict:
    return json.loads((bundle / SIGNATURE_NAME).read_text())


def test_pae_matches_the_dsse_spec_example():
    # secure-systems-lab/dsse protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def test_statement_is_in_toto_v1_slsa_provenance_and_signing_is_deterministic(tmp_path):
    bundle = written_bundle(tmp_path)
    key, pub = generate_keypair(tmp_path / "keys" / "release")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    first = sign_bundle(bundle, key).read_bytes()
    assert sign_bundle(bundle, key).read_bytes() == first  # same bundle, same key: same bytes
    env = envelope(bundle)
    assert env["payloadType"] == PAYLOAD_TYPE == "application/vnd.in-toto+json"
    st = json.loads(base64.b64decode(env["payload"]))
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    m = json.loads((bundle / "manifest.json").read_text())
    names = [s["name"] for s in st["subject"]]
    assert names == ["manifest.json", *(f["path"] for f in m["files"])]
    bd, rd = st["predicate"]["buildDefinition"], st["predicate"]["runDetails"]
    assert bd["externalParameters"]["model"] == "Org/Demo"
    deps = {d["name"]: d for d in bd["resolvedDependencies"]}
    assert deps["Org/Demo"]["uri"] == "pkg:huggingface/org/Demo@" + "a" * 40
    assert deps["Org/Demo"]["digest"] == {"gitCommit": "a" * 40}
    assert deps["config.json"]["digest"] == {"sha256": "b" * 64}
    assert rd["builder"]["version"]["edgepack"] == m["edgepack_version"]
    assert rd["builder"]["version"]["llama-cpp-python"] == "0.3.36"
    assert rd["byproducts"][0]["annotations"]["validation"]["value"] == 0.99
    signed = verify_signed_bundle(bundle, [pub])
    assert signed.manifest == m and signed.statement == st


def test_keyid_is_securesystemslib_s_so_repo_keys_match_root_json(tmp_path):
    from securesystemslib.signer import SSlibKey

    from edgepack.keys import keyid_of, load_public_key, signing_keyid, write_public_key
    from edgepack.ota.repo import init_repo

    init_repo(tmp_path / "repo")
    key = tmp_path / "repo" / "keys" / "targets.key"
    bundle = written_bundle(tmp_path)
    sign_bundle(bundle, key)  # `repo init` keys sign bundles too
    pub = write_public_key(key, tmp_path / "targets.pub")
    assert verify_signed_bundle(bundle, [pub]).keyid == signing_keyid(key)
    raw = load_public_key(pub).raw
    sslib = SSlibKey("x", "ed25519", "ed25519", {"public": raw.hex()})
    from securesystemslib.signer._key import compute_default_keyid

    assert keyid_of(raw) == compute_default_keyid(sslib.keytype, sslib.scheme, sslib.keyval)
    root = json.loads((tmp_path / "repo" / "public" / "metadata" / "1.root.json").read_text())
    assert signing_keyid(key) in root["signed"]["roles"]["targets"]["keyids"]


def test_key_mistakes_are_config_errors(tmp_path):
    bundle = written_bundle(tmp_path)
    key, pub = generate_keypair(tmp_path / "k")
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path / "k")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 644, expected 600"):
        sign_bundle(bundle, key)
    key.chmod(0o600)
    sign_bundle(bundle, key)
    with pytest.raises(ConfigError, match="is a private key"):
        verify_signed_bundle(bundle, [key])
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        verify_signed_bundle(bundle, [tmp_path / "junk.pub"])


def test_an_unsigned_or_damaged_bundle_is_not_signed_and_not_accepted(tmp_path):
    bundle = written_bundle(tmp_path)
    key, pub = generate_keypair(tmp_path / "k")
    with pytest.raises(IntegrityError, match="is not signed"):
        verify_signed_bundle(bundle, [pub])
    (bundle / "server.toml").write_text("tampered")
    with pytest.raises(IntegrityError, match="server.toml"):
        sign_bundle(bundle, key)
    assert not (bundle / SIGNATURE_NAME).exists()


def _tamper_payload(bundle: Path) -> None:
    env = envelope(bundle)
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["buildDefinition"]["externalParameters"]["model"] = "evil/model"
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    (bundle / SIGNATURE_NAME).write_text(json.dumps(env) + "\n")


def _tamper_signature(bundle: Path) -> None:
    env = envelope(bundle)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 1
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    (bundle / SIGNATURE_NAME).write_text(json.dumps(env) + "\n")


def _tamper_manifest(bundle: Path) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["bundle"]["version"] = 99
    path.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def _tamper_file(bundle: Path) -> None:
    model = next((bundle / "model").iterdir())
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))


def _tamper_extra_file(bundle: Path) -> None:
    (bundle / "model" / "backdoor.bin").write_bytes(b"x")


TAMPERS = {
    "statement": (_tamper_payload, "signature does not verify"),
    "signature": (_tamper_signature, "signature does not verify"),
    "manifest": (_tamper_manifest, "manifest was altered after signing"),
    "model file": (_tamper_file, "does not match its manifest"),
    "added file": (_tamper_extra_file, "backdoor.bin: not listed"),
}


def sign_verify_tamper(bundle: Path, tmp_path: Path) -> None:
    """The whole walk on ``bundle``, through the CLI: each tamper on a fresh copy → exit 6."""
    key = tmp_path / "keys" / "release.key"
    pub = tmp_path / "keys" / "release.pub"
    code, text = run("keygen", str(tmp_path / "keys" / "release"))
    assert code == 0 and key.is_file() and pub.is_file(), text
    code, text = run("sign", str(bundle), "--key", str(key))
    assert code == 0 and SIGNATURE_NAME in text, text
    code, text = run("verify", str(bundle), "--key", str(pub))
    assert code == 0 and "ok: signature by key" in text, text
    assert run("verify", str(bundle))[0] == 0  # the signature file is not an unlisted file
    for what, (tamper, expected) in TAMPERS.items():
        copy = tmp_path / f"copy-{what.replace(' ', '-')}"
        shutil.copytree(bundle, copy)
        tamper(copy)
        code, text = run("verify", str(copy), "--key", str(pub))
        assert code == 6, (what, text)
        assert expected in text, (what, text)
    # A signed archive for USB: verified with the key, tampering inside it is caught.
    code, text = run("sign", str(bundle), "--key", str(key), "--archive")
    tar = bundle.with_name(bundle.name + ".tar")
    assert code == 0 and str(tar) in text, text
    code, text = run("verify", str(tar), "--key", str(pub))
    assert code == 0 and "ok: signature by key" in text, text
    assert run("verify", str(tar))[0] == 0
    # The right bundle, the wrong key.
    run("keygen", str(tmp_path / "keys" / "other"))
    code, text = run("verify", str(bundle), "--key", str(tmp_path / "keys" / "other.pub"))
    assert code == 6 and "signature does not verify" in text and "other.pub" in text, text
    # Several trusted keys: one of them signed it.
    code, text = run("verify", str(bundle), "--key", str(tmp_path / "keys" / "other.pub"),
                     "--key", str(pub))
    assert code == 0, text
    # Signature removed: a bundle that must be signed is refused.
    (bundle / SIGNATURE_NAME).unlink()
    code, text = run("verify", str(bundle), "--key", str(pub))
    assert code == 6 and "is not signed" in text, text


def test_sign_verify_and_every_tamper_exits_6_on_a_written_bundle(tmp_path):
    sign_verify_tamper(written_bundle(tmp_path), tmp_path)


@pytest.mark.slow
def test_sign_verify_and_every_tamper_exits_6_on_a_built_bundle(local_hub, tiny_llama_dir,
                                                                tmp_path):
    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    code, text = run("build", "edgepack-test/tiny-llama", "--device", "laptop-x86-16gb",
                     "--no-golden", "--out", str(tmp_path / "out"))
    assert code == 0, text
    sign_verify_tamper(tmp_path / "out" / "tiny-llama-laptop-x86-16gb", tmp_path)


def _serve_exit(bundle: Path, *args: str) -> tuple[int, str]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "edgepack", "serve", str(bundle), "--port", "0",
                        *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr


@pytest.mark.slow
def test_serve_require_signature_starts_signed_bundles_only(chat_bundle, tmp_path):
    import os

    import httpx
    from support.bundles import serve_bundle

    bundle = tmp_path / "signed"
    shutil.copytree(chat_bundle, bundle, copy_function=os.link)  # the model is hard-linked
    key, pub = generate_keypair(tmp_path / "k")
    _, other = generate_keypair(tmp_path / "other")
    code, err = _serve_exit(bundle, "--require-signature", str(pub))
    assert code == 6 and "is not signed" in err, err
    sign_bundle(bundle, key)
    code, err = _serve_exit(bundle, "--require-signature", str(other))
    assert code == 6 and "signature does not verify" in err, err
    server = serve_bundle(bundle, "--require-signature", str(pub))
    try:
        assert httpx.get(server.base_url + "/readyz").status_code == 200
    finally:
        assert server.stop() == 0
    # A file altered after signing: the signature still verifies, the manifest check refuses.
    toml = bundle / "server.toml"
    text = toml.read_text()
    toml.unlink()  # a new inode: the shared original stays intact
    toml.write_text(text + "\n# changed\n")
    code, err = _serve_exit(bundle, "--require-signature", str(pub))
    assert code == 6 and "server.toml" in err, err


def _rchar_when_ready(bundle: Path, *args: str) -> int:
    """Bytes the server process read (read/pread syscalls, /proc/PID/io) until /readyz 200."""
    from support.bundles import serve_bundle

    server = serve_bundle(bundle, *args)
    try:
        io = Path(f"/proc/{server.proc.pid}/io").read_text()
        return int(next(line.split()[1] for line in io.splitlines() if line.startswith("rchar")))
    finally:
        assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/PID/io")
def test_serve_require_signature_reads_the_model_once(chat_bundle, tmp_path):
    # Counting, not trusting the code path: every byte a process reads through read() or
    # pread() counts in rchar (llama.cpp maps the model, so the hash is the model's only read).
    # The signature check may add the manifest and some imports, not a second pass over the
    # ~100 MB model.
    import os

    bundle = tmp_path / "signed"
    shutil.copytree(chat_bundle, bundle, copy_function=os.link)
    key, pub = generate_keypair(tmp_path / "k")
    sign_bundle(bundle, key)
    model_size = sum(f.stat().st_size for f in (bundle / "model").iterdir())
    plain = _rchar_when_ready(bundle)
    signed = _rchar_when_ready(bundle, "--require-signature", str(pub))
    assert plain >= model_size, (plain, model_size)  # the one verification pass is counted
    assert signed - plain < model_size // 2, (
        f"serve --require-signature read {signed - plain} bytes more than serve ({plain}); "
        f"the model is {model_size} bytes: it was hashed twice")


def test_a_manifest_swapped_after_the_signature_check_is_refused(tmp_path, monkeypatch):
    # The race the server closes: the signature verifies the manifest, then someone replaces
    # manifest.json (and a file) with a consistent but unsigned pair before the files are
    # checked. The files must be checked against the manifest the signature covered.
    import edgepack.runtimes.serve as serve_mod

    import edgepack.signature as signature_mod
    from edgepack.errors import RuntimeHealthError
    from edgepack.manifest import MANIFEST_NAME, canonical_json, sha256_file

    bundle = written_bundle(tmp_path)
    key, pub = generate_keypair(tmp_path / "k")
    sign_bundle(bundle, key)
    real = signature_mod.verify_signature

    def verify_then_swap(*args, **kwargs):
        result = real(*args, **kwargs)
        toml = bundle / "server.toml"
        toml.write_text(toml.read_text() + "\n# swapped in after the signature check\n")
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        for f in manifest["files"]:
            if f["path"] == "server.toml":
                f["sha256"], f["size"] = sha256_file(toml), toml.stat().st_size
        (bundle / MANIFEST_NAME).write_bytes(canonical_json(manifest))
        return result

    def no_engine(cfg):  # the bundle got through: stop before loading anything
        raise RuntimeHealthError("reached the engine with an unsigned manifest")

    monkeypatch.setattr(signature_mod, "verify_signature", verify_then_swap)
    monkeypatch.setattr(serve_mod, "make_engine", no_engine)
    code, text = run("serve", str(bundle), "--port", "0", "--require-signature", str(pub))
    assert code == 6, text
    assert "manifest changed after its signature was checked" in text, text
    # The swapped bundle is consistent by itself: only the signature tells it apart.
    code, text = run("verify", str(bundle))
    assert code == 0, text
    code, text = run("verify", str(bundle), "--key", str(pub))
    assert code == 6 and "manifest was altered after signing" in text, text


def test_keygen_public_of_a_repo_key_verifies_what_that_key_signed(tmp_path):
    from edgepack.ota.repo import init_repo

    init_repo(tmp_path / "repo")
    key = tmp_path / "repo" / "keys" / "targets.key"
    bundle = written_bundle(tmp_path)
    code, text = run("sign", str(bundle), "--key", str(key))
    assert code == 0, text
    code, text = run("keygen", "--public-of", str(key))
    assert code == 0 and "targets.pub" in text, text
    code, text = run("verify", str(bundle), "--key", str(key.with_suffix(".pub")))
    assert code == 0, text
    code, text = run("keygen", "--public-of", str(key))  # never overwrites
    assert code == 3 and "already exists" in text, text
    code, text = run("verify", str(bundle), "--key", str(key))  # a private key on a device
    assert code == 3 and "is a private key" in text, text
