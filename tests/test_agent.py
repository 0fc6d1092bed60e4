"""The update agent against a real repository over real HTTP (nginx and http.server).

The health gate here uses the STAND-IN server (tests/support/standin_server.py) so that many
updates stay fast; tests/test_agent_serve.py runs the real `edgepack serve`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.ota import STANDIN, make_bundle, random_model
from tuf.api.metadata import Metadata

from edgepack.cli.main import cli
from edgepack.errors import FetchError, IntegrityError
from edgepack.manifest import verify_bundle
from edgepack.ota.agent.config import AgentConfig
from edgepack.ota.agent.fetcher import DeadlineExceeded
from edgepack.ota.agent.health import SubprocessLauncher
from edgepack.ota.agent.installer import NoSpaceError
from edgepack.ota.agent.state import StateDir
from edgepack.ota.agent.updater import Agent
from edgepack.ota.release import rollout_bucket
from edgepack.ota.repo import Expiry, init_repo

MODEL = 6 << 20


class World:
    """A repository, bundles of it, and agents provisioned with its root."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = init_repo(tmp / "repo")
        self.model = random_model(MODEL, seed=7)
        self.url = ""

    def bundle(self, version, *, edit: bytes = b"", server=None, model=None) -> Path:
        m = bytearray(self.model if model is None else model)
        if edit:
            m[1000:1000 + len(edit)] = edit
        return make_bundle(self.tmp / f"bundle-{version}-{len(edit)}-{id(server)}", version,
                           bytes(m), server=server)

    def publish(self, version, **kw) -> None:
        rollout = kw.pop("rollout", 100)
        self.repo.publish(self.bundle(version, **kw), "stable", rollout=rollout)

    def agent(self, name="dev", *, device_id=None, state_root=None, **config) -> Agent:
        state = StateDir(state_root or self.tmp / f"state-{name}")
        state.init(self.repo.root_json().read_bytes(), device_id or name)
        config.setdefault("health_window", 30)
        return Agent(state, AgentConfig(self.url, "stable", **config),
                     launcher=SubprocessLauncher(STANDIN))


def served_version(agent: Agent):
    """What `current` serves: a verified bundle's version, or a failure."""
    slot = agent.state.current_slot()
    return verify_bundle(slot)["bundle"]["version"]


@pytest.fixture
def world(tmp_path, nginx):
    w = World(tmp_path)
    w.server = nginx(w.repo.public)
    w.url = w.server.url
    return w


def test_install_update_and_noop_over_nginx(world):
    world.publish(1)
    agent = world.agent()
    r1 = agent.run_once()
    assert r1.result == "installed" and served_version(agent) == 1
    assert r1.bytes_downloaded >= MODEL
    world.publish(2, edit=b"a small edit in one tensor")
    r2 = agent.run_once()
    assert r2.result == "installed" and served_version(agent) == 2
    assert agent.state.previous_slot().name == "1"
    # Delta: one or two chunks (each <= 1 MiB) plus metadata, not the 6 MiB model.
    assert r2.details["chunks_downloaded"] <= 2 and r2.bytes_downloaded < 1.1 * (1 << 20)
    served_before = world.server.bytes_served()
    r3 = agent.run_once()
    assert r3.result == "up-to-date" and served_version(agent) == 2
    # Nothing new: the timestamp only.
    assert r3.bytes_downloaded < 4096
    assert world.server.bytes_served() - served_before < 4096
    world.publish(3)
    assert agent.run_once().result == "installed"
    assert sorted(p.name for p in agent.state.slots.iterdir()) == ["2", "3"], "older slots GC"
    status = json.loads(CliRunner().invoke(
        cli, ["agent", "status", "--state-dir", str(agent.state.root), "--json"]).output)
    assert status["installed"] == 3 and status["previous"] == "2"
    assert status["last_result"] == "installed" and status["pending"] is None


def test_install_over_python_http_server_without_range(tmp_path, static_http):
    world = World(tmp_path)
    world.url = static_http(world.repo.public)
    world.publish(1)
    agent = world.agent()
    assert agent.run_once().result == "installed"
    world.publish("1.1.0", edit=b"xyz")
    assert agent.run_once().result == "installed" and served_version(agent) == "1.1.0"


def _installed_v1(world) -> Agent:
    world.publish(1)
    agent = world.agent()
    assert agent.run_once().result == "installed"
    return agent


def _assert_rejected(agent, exc=IntegrityError, match=None):
    with pytest.raises(exc, match=match):
        agent.run_once()
    assert served_version(agent) == 1
    assert agent.state.status()["last_result"] == "failed"


def test_tampered_chunk_is_rejected(world):
    agent = _installed_v1(world)
    world.publish(2, model=random_model(MODEL, seed=99))
    chunk = max((world.repo.public / "chunks").iterdir(), key=lambda p: p.stat().st_mtime)
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    _assert_rejected(agent, match="does not match its signed index")


def test_tampered_small_target_is_rejected(world):
    agent = _installed_v1(world)
    world.publish(2, server={"engine": {"ctx": 1024}})
    toml = next(p for p in (world.repo.targets / "blobs").iterdir()
                if p.read_bytes().startswith(b"[engine]") and b"1024" in p.read_bytes())
    toml.write_bytes(toml.read_bytes().replace(b"1024", b"9999"))
    _assert_rejected(agent, match="signed length/sha256")


def test_oversized_file_is_cut_off(world):
    agent = _installed_v1(world)
    world.publish(2, model=random_model(MODEL, seed=98))
    chunk = max((world.repo.public / "chunks").iterdir(), key=lambda p: p.stat().st_mtime)
    good = chunk.read_bytes()
    chunk.write_bytes(good + b"\0" * 4_000_000)
    _assert_rejected(agent, match="more than the")
    # The oversized download left no partial behind (issue #13: before, the next run resumed
    # from it and failed once as "tampered" although the repository was fixed).
    assert not list(agent.state.chunks.glob("*.part"))
    chunk.write_bytes(good)
    assert agent.run_once().result == "installed"


def test_wrongly_signed_and_unsigned_timestamp_are_rejected(world, tmp_path):
    from securesystemslib.signer import CryptoSigner

    agent = _installed_v1(world)
    world.publish(2, edit=b"zz")
    ts_path = world.repo.metadata / "timestamp.json"
    good = ts_path.read_bytes()
    md = Metadata.from_bytes(good)
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    ts_path.write_bytes(md.to_bytes())
    _assert_rejected(agent, match="Unsigned|signed by 0")
    md.signatures.clear()
    ts_path.write_bytes(md.to_bytes())
    _assert_rejected(agent, match="Unsigned|signed by 0")
    ts_path.write_bytes(good)
    assert agent.run_once().result == "installed"


def test_replayed_old_timestamp_is_rejected(world):
    agent = _installed_v1(world)
    old = (world.repo.metadata / "timestamp.json").read_bytes()
    world.publish(2, edit=b"r")
    world.publish(3, edit=b"rr")
    assert agent.run_once().result == "installed"
    (world.repo.metadata / "timestamp.json").write_bytes(old)
    with pytest.raises(IntegrityError, match="version"):
        agent.run_once()
    assert served_version(agent) == 3


def test_expired_metadata_is_rejected(world):
    agent = _installed_v1(world)
    world.repo.publish(world.bundle(2, edit=b"e"), "stable",
                       expiry=Expiry(timestamp=-__import__("datetime").timedelta(hours=1)))
    _assert_rejected(agent, match="Expired")


@pytest.mark.slow
def test_rollout_zero_hundred_and_cohorts(world):
    world.publish(1, rollout=0)
    agent = world.agent("solo")
    r = agent.run_once()
    assert r.result == "held-back" and agent.state.installed_version() is None
    assert "rollout 0%" in r.details["skipped"]["1"]
    world.repo.set_rollout("stable", 1, 100)
    assert agent.run_once().result == "installed"
    world.publish(2, edit=b"c", rollout=30)
    ids = [f"fleet-{i}" for i in range(24)]
    installed = set()
    for d in ids:
        a = world.agent(d)
        a.run_once()
        if a.state.installed_version() == 2:
            installed.add(d)
    assert installed == {d for d in ids if rollout_bucket(d) < 30}
    assert 0 < len(installed) < len(ids)


def test_never_installs_a_lower_version(world):
    world.publish(5)
    agent = world.agent()
    assert agent.run_once().result == "installed"
    world.repo.publish(world.bundle(1), "beta")
    beta = Agent(agent.state, AgentConfig(world.url, "beta"), launcher=agent.launcher)
    assert beta.run_once().result == "up-to-date" and served_version(agent) == 5


@pytest.mark.parametrize("standin,reason", [
    ({"ready": False}, "not ready within"),
    ({"answer": "Berlin, of course"}, "expected one of"),
    ({"crash": True}, "exited before it was ready"),
])
def test_failed_health_gate_rolls_back_and_blocks_the_version(world, standin, reason):
    agent = _installed_v1(world)
    world.publish(2, server={"engine": {"ctx": 512}, "standin": standin})
    agent.config = AgentConfig(world.url, "stable", health_window=3)
    r = agent.run_once()
    assert r.result == "rolled-back" and reason in r.reason
    assert served_version(agent) == 1 and not agent.state.slot(2).exists()
    assert "2" in agent.state.blocked()
    st = agent.state.status()
    assert st["last_result"] == "rolled-back" and reason in st["reason"]
    again = agent.run_once()
    assert again.result == "blocked", "a failed version is not retried"
    assert again.version == 1 and "version 2: blocked:" in again.reason
    world.publish(3, edit=b"fixed")
    assert agent.run_once().result == "installed" and served_version(agent) == 3


class _Trickle(threading.Thread):
    """An HTTP server that answers every request with one byte every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            pass
        finally:
            conn.close()


def test_trickling_server_hits_the_total_deadline_and_a_later_run_succeeds(world):
    agent = _installed_v1(world)
    world.publish(2, edit=b"t")
    trickle = _Trickle()
    trickle.start()
    try:
        slow = Agent(agent.state, AgentConfig(trickle.url, "stable", deadline=2.0,
                                              gap_timeout=1.0), launcher=agent.launcher)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            slow.run_once()
        # The gap timeout alone would never fire (a byte every 0.2 s).
        assert time.monotonic() - t0 < 10
    finally:
        trickle.stop.set()
        trickle.join(5)
        trickle.sock.close()
    assert served_version(agent) == 1
    assert agent.run_once().result == "installed" and served_version(agent) == 2


def test_stalled_chunk_download_resumes_with_range(world):
    agent = _installed_v1(world)
    world.publish(2, model=random_model(MODEL, seed=5))
    # A partial chunk from an interrupted run: the rest comes with a Range request (nginx 206).
    idx = json.loads(max((world.repo.targets / "indexes").iterdir(),
                         key=lambda p: p.stat().st_mtime).read_bytes())
    first = idx["chunks"][0][0]
    part = agent.state.chunks / f"{first}.part"
    part.write_bytes((world.repo.public / "chunks" / first).read_bytes()[:1000])
    r = agent.run_once()
    assert r.result == "installed"
    assert r.bytes_downloaded < MODEL + 200_000 - 1000 + 1
    log = (world.server.prefix / "access.log").read_text()
    assert "206 " in log and first in log


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_staging_fails_cleanly(world, tiny_disk):
    world.publish(1)
    agent = world.agent(state_root=tiny_disk / "state")
    assert agent.run_once().result == "installed"
    # A different 12 MiB model does not fit beside the installed 6 MiB one on 40 MiB
    # (staging holds the downloaded chunks and the assembled file).
    world.publish(2, model=random_model(2 * MODEL, seed=11))
    with pytest.raises(NoSpaceError, match="free"):
        agent.run_once()
    assert served_version(agent) == 1
    # And a real ENOSPC during the write (the free-space check fooled by a later filler).
    world.publish(3, model=random_model(MODEL, seed=12))
    import edgepack.ota.agent.installer as installer

    orig = installer.Stager._check_space

    def fill_after_check(self, *a):
        orig(self, *a)
        free = shutil.disk_usage(tiny_disk).free
        (tiny_disk / "filler").write_bytes(b"\0" * (free - 2_000_000))

    installer.Stager._check_space = fill_after_check
    try:
        with pytest.raises((NoSpaceError, FetchError)):
            agent.run_once()
    finally:
        installer.Stager._check_space = orig
    assert served_version(agent) == 1
    (tiny_disk / "filler").unlink()
    assert agent.run_once().result == "installed" and served_version(agent) == 3


def test_switch_plan_side_by_side_or_stop_swap_start():
    from edgepack.ota.agent.memory import (
        RUNTIME_OVERHEAD_BYTES,
        SIDE_BY_SIDE,
        STOP_SWAP_START,
        bundle_memory_bytes,
        plan_switch,
    )

    mib = 1 << 20
    assert plan_switch(300 * mib, None, budget_bytes=mib).mode == SIDE_BY_SIDE  # nothing to stop
    assert plan_switch(300 * mib, 300 * mib, budget_bytes=600 * mib).mode == SIDE_BY_SIDE
    p = plan_switch(300 * mib, 300 * mib, budget_bytes=600 * mib - 1)
    assert p.mode == STOP_SWAP_START and "do not fit in --memory-budget-bytes" in p.why
    # Without a budget the running server is already outside what is available.
    assert plan_switch(300 * mib, 900 * mib, available_bytes=301 * mib).mode == SIDE_BY_SIDE
    assert plan_switch(300 * mib, 1, available_bytes=299 * mib).mode == STOP_SWAP_START
    # A built plan's peak RSS wins over required bytes; without a plan: model + overhead.
    built = {"plan": {"memory": {"required_bytes": 5, "expected_peak_rss_bytes": 7}}}
    assert bundle_memory_bytes(built) == 7
    assert bundle_memory_bytes({"plan": {"memory": {"total_bytes": 9}}}) == 9
    bare = {"plan": {}, "model": {"path": "model/m.gguf"},
            "files": [{"path": "model/m.gguf", "size": 1000}]}
    assert bundle_memory_bytes(bare) == 1000 + RUNTIME_OVERHEAD_BYTES


def test_agent_unit_execstart_is_a_valid_agent_command_line():
    """The systemd unit's ExecStart parses with the agent's own CLI, environment file
    variables substituted (and EDGEPACK_* options read from that environment)."""
    import shlex

    from edgepack.runtimes.systemd import AGENT_UNIT, render_units

    from edgepack.cli.agent import agent_run

    text = render_units()[AGENT_UNIT]
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    env = {"EDGEPACK_REPO_URL": "https://updates.example.com/e", "EDGEPACK_CHANNEL": "stable",
           "EDGEPACK_DEVICE_ID": "pi-0042"}
    for k, v in env.items():
        line = line.replace("${" + k + "}", v)
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[1:3] == ["agent", "run"]
    ctx = agent_run.make_context("run", argv[3:])
    assert ctx.params["repo_url"] == env["EDGEPACK_REPO_URL"]
    assert ctx.params["state_dir"] == Path("/var/lib/edgepack")
    assert ctx.params["device_id"] == "pi-0042" and ctx.params["channel"] == "stable"
