"""The MiniLM ONNX embedding bundle and the update agent on an emulated Raspberry Pi 5 (a
Debian 12 arm64 root under qemu Cortex-A76 with proot, tests/support/arm.py).

One emulated device per module: the bundle, built for raspberry-pi-5-8gb with its runtime
pack (aarch64 onnxruntime, numpy, tokenizers... from PyPI), is installed with the network cut
(``unshare -n``). Then

- it serves there, and the official openai client on the host embeds the held-out sentences
  (tests/support/heldout_sentences.py, none of them in the build's validation set); each
  vector must point where the same bundle served on this x86 machine points (cosine >= 0.99);
- the update agent inside the device, provisioned with a repository's root, follows a static
  TUF repository served on the host's loopback (proot shares the network namespace): v1
  (installed) is up to date, v2 is fetched, verified, health-gated by a real emulated
  ``edgepack serve`` and switched to, and a v3 whose server asks for CUDA (exit 7 on a Pi) is
  rolled back and blocked; at the end the device's server answers as version 2.

Emulator minutes are printed with the ``[arm]`` prefix (pytest -s) for the issue's note.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from openai import OpenAI
from support.arm import arm_server, fresh_root, require_emulator, run_arm, same_path_bind
from support.bundles import serve_bundle
from support.heldout_sentences import HELDOUT
from support.hub import HubServer, point_hub_client_at
from support.models import minilm_path

from edgepack.cli.main import cli
from edgepack.manifest import MANIFEST_NAME, canonical_json, describe_files, verify_bundle

pytestmark = pytest.mark.slow
DEVICE = "raspberry-pi-5-8gb"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
NAME = f"all-minilm-l6-v2-{DEVICE}"
STATE = "/var/lib/edgepack"


@pytest.fixture(scope="module")
def minilm_bundles(tmp_path_factory) -> dict[int, Path]:
    """Versions 1 and 2 of the MiniLM bundle for the Pi 5, each with its runtime pack: two
    real builds from a hub on loopback (the second reuses the cached ONNX export)."""
    require_emulator()
    out: dict[int, Path] = {}
    with pytest.MonkeyPatch.context() as mp, HubServer() as hub:
        point_hub_client_at(mp, hub.endpoint, tmp_path_factory.mktemp("hf-home"))
        hub.add_repo(MINILM, minilm_path())
        for version in (1, 2):
            dest = tmp_path_factory.mktemp(f"v{version}")
            t0 = time.monotonic()
            res = CliRunner().invoke(cli, [
                "build", MINILM, "--device", DEVICE, "--runtime",
                "--bundle-version", str(version), "--out", str(dest)])
            assert res.exit_code == 0, res.output
            print(f"\n[arm] MiniLM v{version} build with runtime pack: "
                  f"{time.monotonic() - t0:.0f} s")
            out[version] = dest / NAME
    return out


@dataclass
class Pi:
    root: Path
    bind: str  # the state dir at its host path (support.arm.same_path_bind)
    state: str  # that path, as the emulated programs are given it


@pytest.fixture(scope="module")
def pi(minilm_bundles, tmp_path_factory) -> Pi:
    """A fresh emulated Pi 5 with bundle v1 installed offline from its runtime pack."""
    v1 = minilm_bundles[1]
    m = verify_bundle(v1)
    rt = m["runtime"]
    assert rt["python"] == "3.11" and rt["arch"] == "aarch64" and "onnx" in rt["extras"]
    wheels = {w.split("-")[0].lower() for w in rt["wheels"]}
    # the engine and what the agent needs to check signatures, built for aarch64 CPython 3.11
    assert {"onnxruntime", "numpy", "psutil", "tokenizers", "tuf", "securesystemslib",
            "cryptography"} <= wheels, wheels
    ort = next(w for w in rt["wheels"] if w.startswith("onnxruntime-"))
    assert "cp311" in ort and "aarch64" in ort
    pack = sum(f["size"] for f in m["files"] if f["path"].startswith("runtime/"))
    print(f"[arm] ONNX runtime pack: {len(rt['wheels'])} wheels, {pack / 2**20:.1f} MiB")

    root = fresh_root(tmp_path_factory.mktemp("pi") / "root")
    shutil.copytree(v1, root / "root" / NAME)
    t0 = time.monotonic()
    res = run_arm(root, ["/bin/sh", f"/root/{NAME}/install.sh"], offline=True, timeout=3600)
    print(f"[arm] offline install of the ONNX bundle: {time.monotonic() - t0:.0f} s\n"
          f"{res.stdout}{res.stderr[-1500:]}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "installed: " in res.stdout
    assert (root / STATE.lstrip("/") / "current").is_symlink()
    bind, state = same_path_bind(root, STATE)
    return Pi(root, bind, state)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _embed(url: str, texts: list[str]) -> np.ndarray:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=1800)
    got = client.embeddings.create(model=client.models.list().data[0].id, input=texts)
    assert [d.index for d in got.data] == list(range(len(texts)))
    return np.array([d.embedding for d in got.data])


def _fitting(bundle: Path) -> list[str]:
    """The held-out sentences that fit the model's context (MiniLM: 256 tokens with [CLS] and
    [SEP]); the server refuses longer ones with a 400 rather than cut them silently."""
    from tokenizers import Tokenizer

    limit = json.loads((bundle / "tokenizer" / "edgepack_tokenizer.json").read_text())
    tok = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    tok.no_truncation()
    fit = [t for t in HELDOUT if len(tok.encode(t).ids) <= limit["max_length"]]
    assert len(fit) >= 60, len(fit)
    return fit


@pytest.fixture(scope="module")
def x86_reference(minilm_bundles) -> tuple[list[str], np.ndarray]:
    """The held-out sentences embedded by the same v1 bundle served on this x86 machine."""
    texts = _fitting(minilm_bundles[1])
    server = serve_bundle(minilm_bundles[1])
    try:
        return texts, _embed(server.base_url, texts)
    finally:
        server.stop()


def test_minilm_embeddings_on_the_emulated_pi5_match_x86(pi, x86_reference, tmp_path):
    with arm_server(pi.root, f"{pi.state}/current", tmp_path / "serve.log",
                    binds=[pi.bind]) as server:
        print(f"\n[arm] ONNX server ready after {server.ready_s:.0f} s")
        texts, x86 = x86_reference
        t0 = time.monotonic()
        arm = _embed(server.url, texts)
        took = time.monotonic() - t0
    assert arm.shape == x86.shape == (len(texts), 384)
    cos = _cosines(arm, x86)
    print(f"[arm] {len(texts)} of {len(HELDOUT)} held-out sentences (the rest exceed the "
          f"256-token context) embedded in {took:.1f} s; cosine vs x86: "
          f"min {cos.min():.6f}, mean {cos.mean():.6f}")
    worst = int(cos.argmin())
    assert cos.min() >= 0.99, (cos.min(), texts[worst][:80])


def _derive(src: Path, dest: Path, version: int, server_toml: str) -> Path:
    """``src`` as ``version`` with another server.toml: files hard-linked, the two that
    change written anew (never through a link), the manifest rehashed and written last."""
    shutil.copytree(src, dest, copy_function=os.link)
    manifest = json.loads((src / MANIFEST_NAME).read_text())
    (dest / "server.toml").unlink()
    (dest / "server.toml").write_text(server_toml)
    manifest["bundle"]["version"] = version
    entry = describe_files(dest, ["server.toml"])[0].to_dict()
    manifest["files"] = [entry if f["path"] == "server.toml" else f for f in manifest["files"]]
    (dest / MANIFEST_NAME).unlink()
    (dest / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    verify_bundle(dest)
    return dest


def _invoke(args: list[str]) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture
def repo(tmp_path, static_http) -> Iterator[tuple[Path, str]]:
    """A static update repository (edgepack repo init) served on the host's loopback."""
    root = tmp_path / "repo"
    _invoke(["repo", "init", root])
    yield root, static_http(root / "public")


def test_agent_updates_v1_to_v2_and_rolls_back_v3_inside_the_emulated_pi5(
        pi, minilm_bundles, repo, tmp_path):
    repo_dir, url = repo
    shutil.copy2(repo_dir / "public" / "metadata" / "root.json", pi.root / "root" / "root.json")
    home_bind, home = same_path_bind(pi.root, "/root")
    binds = [pi.bind, home_bind]
    agent = ["/opt/edgepack/bin/edgepack", "agent"]
    init = run_arm(pi.root, [*agent, "init", "--root", f"{home}/root.json",
                             "--state-dir", pi.state, "--device-id", "pi5-emulated"],
                   binds=binds)
    assert init.returncode == 0, init.stdout + init.stderr

    def cycle(code: int) -> dict:
        t0 = time.monotonic()
        res = run_arm(pi.root, [*agent, "run", "--repo-url", url, "--state-dir", pi.state,
                                "--channel", "stable", "--once", "--json",
                                "--health-window", "1800"], binds=binds, timeout=3600)
        print(f"[arm] agent cycle: exit {res.returncode} in {time.monotonic() - t0:.0f} s")
        assert res.returncode == code, res.stdout + res.stderr[-3000:]
        return json.loads(res.stdout)

    def publish(bundle: Path) -> None:
        _invoke(["publish", bundle, "--repo", repo_dir, "--channel", "stable"])

    state = Path(pi.state)
    publish(minilm_bundles[1])
    out = cycle(0)  # v1 is what `install` put there
    assert out["outcome"] == "up-to-date", out

    publish(minilm_bundles[2])
    out = cycle(10)
    assert out["outcome"] == "installed" and str(out["version"]) == "2", out
    print(f"[arm] v2 fetched {out['bytes_downloaded']} bytes")
    assert verify_bundle(state / "current")["bundle"]["version"] == 2
    assert (state / "previous").resolve().name == "1"
    health = (state / "logs" / "health-2.log").read_text(errors="replace")
    assert "all-minilm-l6-v2" in health, health[-2000:]  # the gate served v2 in the device

    # v3 asks for the CUDA provider, which no Pi has: the gated server exits 7, the agent
    # rolls back and blocks 3, v2 stays.
    toml = (minilm_bundles[2] / "server.toml").read_text()
    assert 'providers = ["cpu"]' in toml
    v3 = _derive(minilm_bundles[2], tmp_path / "v3", 3,
                 toml.replace('providers = ["cpu"]', 'providers = ["cuda"]'))
    publish(v3)
    out = cycle(7)
    assert out["outcome"] == "rolled-back" and str(out["version"]) == "3", out
    status = json.loads(_invoke(["agent", "status", "--state-dir", state, "--json"]))
    assert status["installed"] == 2 and "3" in status["blocked"], status
    assert "exit status 7" in status["reason"], status["reason"]
    assert "CUDAExecutionProvider" in status["reason"], status["reason"]
    assert verify_bundle(state / "current")["bundle"]["version"] == 2
    assert not (state / "slots" / "3").exists()

    # What the device serves after all that: version 2.
    with arm_server(pi.root, f"{pi.state}/current", tmp_path / "serve.log",
                    binds=[pi.bind]) as server:
        import httpx

        ready = httpx.get(f"{server.url}/readyz", timeout=60).json()
        assert str(ready["bundle_version"]) == "2", ready  # /readyz says it as a string
        assert len(_embed(server.url, ["Is it still serving?"])[0]) == 384



def test_profiles_detect_inside_the_emulated_pi5(pi):
    """`profiles detect --save` run by the installed edgepack on the device: [software] is
    read from the Debian 12 arm64 root (its os-release, its python3 3.11, its glibc 2.36; this
    host happens to run the same versions, so the arch and the board say where it ran: the
    Pi 5's cpuinfo and board model, support.arm.device_binds); the saved TOML loads back on
    the host as the same profile."""
    home_bind, home = same_path_bind(pi.root, "/root")
    res = run_arm(pi.root, ["/opt/edgepack/bin/edgepack", "profiles", "detect", "--json",
                            "--save", f"{home}/pi5-detected.toml"], offline=True,
                  binds=[home_bind])
    assert res.returncode == 0, res.stdout + res.stderr
    printed = json.loads(res.stdout)
    printed.pop("derived")
    assert printed["cpu"]["arch"] == "aarch64" and printed["class"] == "sbc"
    assert printed["cpu"]["isa"] == ["neon", "fp16", "dotprod"]
    assert printed["software"] == {"os": "debian-12", "python": "3.11", "libc": "glibc-2.36"}
    assert "ID=debian VERSION_ID=12" in printed["sources"]["software.os"]
    assert "glibc 2.36" in printed["sources"]["software.libc"]
    from edgepack.device.resolve import load_profile
    from edgepack.device.validation import parse_profile_dict

    loaded = load_profile(str(pi.root / "root" / "pi5-detected.toml"))
    assert loaded.id == "pi5-detected" and loaded.to_dict() == printed
    assert parse_profile_dict(printed, origin="the emulated Pi 5's detect") == loaded
