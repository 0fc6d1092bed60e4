"""Every step of the README's "Deploy to a Raspberry Pi", on an emulated Raspberry Pi 5:
a Debian 12 arm64 root run under qemu (Cortex-A76) with proot (tests/support/arm.py).

Build SmolLM2 for raspberry-pi-5-8gb with the runtime pack (llama-cpp-python cross-compiled
for the Cortex-A76) and its archive -> copy the .tar onto the device -> unpack it and run
``sh install.sh`` with the network cut (``unshare -n``) -> rerun ``edgepack install`` on the
.tar (idempotent) -> start the server the way the install says -> the official openai client
on the host asks the capital of France -> provision the update agent with a repository root.

Slow: the first run makes the root (seconds) and cross-compiles llama-cpp-python (tens of
minutes on two cores; cached by version and CPU in the shared build cache).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.arm import arm_server, fresh_root, require_emulator, run_arm, same_path_bind

from edgepack.cli.main import cli

pytestmark = pytest.mark.slow
DEVICE = "raspberry-pi-5-8gb"
NAME = f"smollm2-135m-instruct-{DEVICE}"


@pytest.fixture
def pi5_archive(local_hub, smollm2_dir, tmp_path_factory) -> Path:
    """README step 1: the build, with the runtime pack and the archive."""
    require_emulator()
    from support.programs import require_program

    require_program("aarch64-linux-gnu-gcc")
    local_hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_dir)
    out = tmp_path_factory.mktemp("bundles")
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, [
        "build", "HuggingFaceTB/SmolLM2-135M-Instruct", "--device", DEVICE, "--quant", "Q4_0",
        "--runtime", "--archive", "--out", str(out)])
    assert res.exit_code == 0, res.output
    print(f"\n[arm] build with runtime pack: {time.monotonic() - t0:.0f} s")
    tar = out / f"{NAME}.tar"
    m = json.loads((out / NAME / "manifest.json").read_text())
    rt = m["runtime"]
    assert rt["target_cpu"] == "cortex-a76" and rt["python"] == "3.11"
    assert rt["llama_cpp_python"]["cflags"] == "-mcpu=cortex-a76"
    pack = sum(f["size"] for f in m["files"] if f["path"].startswith("runtime/"))
    print(f"[arm] runtime pack: {len(rt['wheels'])} wheels, {pack / 2**20:.1f} MiB; "
          f"archive {tar.stat().st_size / 2**20:.1f} MiB")
    return tar


def test_readme_deploy_on_an_emulated_pi5(pi5_archive, tmp_path):
    root = fresh_root(tmp_path / "pi")
    # README step 2: copy the archive onto the device.
    shutil.copy2(pi5_archive, root / "root" / pi5_archive.name)
    # README step 3: unpack and install, offline.
    t0 = time.monotonic()
    res = run_arm(root, ["/bin/sh", "-c", f"cd /root && tar -xf {pi5_archive.name} && "
                         f"sh {NAME}/install.sh"], offline=True, timeout=3600)
    took = time.monotonic() - t0
    print(f"\n[arm] offline install: {took:.0f} s\n{res.stdout}{res.stderr[-1500:]}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "installed: " in res.stdout and "systemd units not installed" in res.stdout
    assert (root / "var/lib/edgepack/current").is_symlink()
    assert "edgepack:" in (root / "etc/passwd").read_text()  # the system user exists
    # Rerun on the .tar with the installed edgepack: nothing to do, still offline.
    again = run_arm(root, ["/opt/edgepack/bin/edgepack", "install", f"/root/{pi5_archive.name}"],
                    offline=True, timeout=1800)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reinstalled (unchanged)" in again.stdout
    assert "already holds this runtime pack" in again.stderr

    # README step 4: start it as the install said, and ask it.
    # The state dir at its host path too (support.arm.same_path_bind: proot's faccessat2 gap
    # would otherwise fail click's readability check of the guest path).
    bind, state = same_path_bind(root, "/var/lib/edgepack")
    with arm_server(root, f"{state}/current", tmp_path / "serve.log", binds=[bind]) as server:
        print(f"[arm] ready after {server.ready_s:.0f} s")
        from openai import OpenAI

        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=900)
        question = "What is the capital of France?"
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": question}])
        answer = reply.choices[0].message.content or ""
        print(f"[arm] user: {question}\n[arm] emulated Pi 5: {answer}")
        assert "Paris" in answer

    # README step 5: provision the update agent with the repository's root (offline).
    repo = tmp_path / "repo"
    made = CliRunner().invoke(cli, ["repo", "init", str(repo)])
    assert made.exit_code == 0, made.output
    shutil.copy2(repo / "public" / "metadata" / "root.json", root / "root" / "root.json")
    home_bind, home = same_path_bind(root, "/root")
    init = run_arm(root, ["/opt/edgepack/bin/edgepack", "agent", "init", "--root",
                          f"{home}/root.json", "--state-dir", state],
                   offline=True, timeout=900, binds=[bind, home_bind])
    assert init.returncode == 0, init.stdout + init.stderr
    assert (root / "var/lib/edgepack/trust/root.json").is_file()
    assert (root / "var/lib/edgepack/current").is_symlink()  # provisioning kept the bundle
