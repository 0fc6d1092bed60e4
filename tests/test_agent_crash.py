"""kill -9 of the agent at every step of an update: after a restart a verified bundle is
behind `current`, every time, and the update finishes or is rolled back.

The agent kills itself with SIGKILL at the named point (test hook EDGEPACK_AGENT_CRASH_AT);
the health gate uses the STAND-IN server (the real server is in test_agent_serve.py).
"""

from __future__ import annotations

import signal

import pytest
from support.ota import make_bundle, random_model, run_agent_process
from support.programs import require_program

from edgepack.manifest import verify_bundle
from edgepack.ota.agent.journal import Journal
from edgepack.ota.agent.state import StateDir
from edgepack.ota.repo import init_repo

POINTS = [
    "after-refresh",  # metadata refreshed, nothing staged
    "fetching",  # journal written, staging begins
    "chunk-downloaded",  # during the download: one chunk in the cache
    "staged-file:model/model.gguf",  # the model assembled in staging, rest missing
    "assembled",  # every file staged, not yet verified or moved
    "staged",  # slots/2 complete and verified
    "health-started",  # the new server is starting (side by side)
    "health-passed",  # the gate passed, the switch not begun
    "switch-previous",  # previous -> 1 switched, current still 1
    "switch-current",  # current -> 2 switched, not committed
    "committed",  # committed, before garbage collection
    "gc",  # after garbage collection, before the journal is cleared
]


@pytest.fixture(scope="module")
def repo_url(tmp_path_factory):
    """Channel "base" has v1 only (to provision each device); "stable" has v1 and v2."""
    from support.nginx import start_nginx

    # A module fixture cannot use the function-scoped nginx fixture, so it asks itself:
    # without nginx every test here skips with the reason instead of erroring.
    require_program("nginx")
    tmp = tmp_path_factory.mktemp("crash")
    repo = init_repo(tmp / "repo")
    model = random_model(6 << 20, seed=21)
    b1 = make_bundle(tmp / "b1", 1, bytes(model))
    repo.publish(b1, "base")
    repo.publish(b1, "stable")
    model[5000:5010] = b"0123456789"
    repo.publish(make_bundle(tmp / "b2", 2, bytes(model)), "stable")
    server = start_nginx(repo.public, tmp / "nginx")
    yield repo, server.url
    server.stop()


def _state(repo, tmp_path) -> StateDir:
    state = StateDir(tmp_path / "state")
    state.init(repo.root_json().read_bytes(), "crash-dev")
    return state


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_step_leaves_a_verified_bundle(repo_url, tmp_path, point):
    repo, url = repo_url
    state = _state(repo, tmp_path)
    first = run_agent_process(state.root, url, channel="base")
    assert first.returncode == 0, first.stderr
    assert verify_bundle(state.current_slot())["bundle"]["version"] == 1

    killed = run_agent_process(state.root, url, crash_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # Right after the kill: current is a verified bundle (1 or 2).
    assert verify_bundle(state.current_slot())["bundle"]["version"] in (1, 2)

    again = run_agent_process(state.root, url)
    assert again.returncode == 0, again.stderr
    assert verify_bundle(state.current_slot())["bundle"]["version"] == 2
    assert Journal(state.journal_path).read() is None
    assert sorted(p.name for p in state.slots.iterdir()) == ["1", "2"]
    assert state.previous_slot().name == "1"


@pytest.mark.slow
def test_kill_9_during_rollback_finishes_the_rollback(tmp_path, nginx):
    repo = init_repo(tmp_path / "repo")
    server = nginx(repo.public)
    model = random_model(1 << 20, seed=4)
    repo.publish(make_bundle(tmp_path / "b1", 1, model), "stable")
    state = _state(repo, tmp_path)
    assert run_agent_process(state.root, server.url).returncode == 0
    repo.publish(make_bundle(tmp_path / "b2", 2, model,
                             server={"standin": {"answer": "Berlin"}}), "stable")
    killed = run_agent_process(state.root, server.url, crash_at="rollback")
    assert killed.returncode == -signal.SIGKILL
    assert verify_bundle(state.current_slot())["bundle"]["version"] == 1
    again = run_agent_process(state.root, server.url)
    assert again.returncode == 0 and again.stdout.strip() == "rolled-back"
    assert "2" in state.blocked() and not state.slot(2).exists()
    assert run_agent_process(state.root, server.url).stdout.strip() == "blocked"
