"""Fixtures for the update repository and agent tests: bundles, a repository, HTTP servers.

``static_http`` serves a folder with Python's http.server on 127.0.0.1 (no Range support,
which exercises the restart path); ``tests/support/nginx.py`` serves one with a real nginx.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgepack.bundle import BundleSpec, write_bundle

STANDIN = [sys.executable, str(Path(__file__).with_name("standin_server.py"))]
GOLDEN = ({"prompt": "What is the capital of France?", "expect": ["Paris"], "max_tokens": 16},)


def make_bundle(out: Path, version: int | str, model: bytes | Path, *,
                server: dict | None = None, golden=GOLDEN, name: str = "demo") -> Path:
    """Write a real bundle (edgepack.bundle.write_bundle) around ``model``."""
    if isinstance(model, (bytes, bytearray)):
        src = out.parent / f".{out.name}.src" / "model.gguf"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(model)
    else:
        src = model
    spec = BundleSpec(
        name=name, version=version, model_file=src, model_name="test/model",
        model_format="gguf", model_kind="chat", quant="Q4_1",
        plan={"ctx": 512, "threads": 1}, server=server or {"engine": {"ctx": 512}},
        source={"repo": "test/model", "revision": "0" * 40, "files": {}},
        device={"profile_id": "test"}, engine={"name": "llama.cpp"},
        validation={}, golden_prompts=tuple(golden),
    )
    write_bundle(spec, out)
    if isinstance(model, (bytes, bytearray)):
        src.unlink()
        src.parent.rmdir()
    return out


def random_model(size: int, seed: int) -> bytearray:
    import random

    return bytearray(random.Random(seed).randbytes(size))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def static_http() -> Iterator:
    """Start Python's http.server on a folder: ``url = static_http(folder)``."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_Quiet, directory=str(folder))
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def agent_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EDGEPACK_AGENT_CRASH_AT", None)
    env.update(extra)
    return env


AGENT_SCRIPT = """
import sys
sys.path.insert(0, {support!r})
from pathlib import Path
from edgepack.ota.agent.health import SubprocessLauncher
from edgepack.ota.agent.state import StateDir
from edgepack.ota.agent.config import AgentConfig
from edgepack.ota.agent.updater import Agent
launcher = SubprocessLauncher({launcher!r})
agent = Agent(StateDir(Path({state!r})), AgentConfig({url!r}, {channel!r}, health_window=20),
              launcher=launcher)
print(agent.run_once().result)
"""


def run_agent_process(state: Path, url: str, *, crash_at: str | None = None,
                      launcher: list[str] | None = None, channel: str = "stable",
                      timeout: float = 120):
    """Run one agent cycle in a child process (so it can be SIGKILLed at a journal step)."""
    import subprocess

    env = agent_env(**({"EDGEPACK_AGENT_CRASH_AT": crash_at} if crash_at else {}))
    code = AGENT_SCRIPT.format(support=str(Path(__file__).parent.parent), state=str(state),
                               url=url, channel=channel, launcher=launcher or STANDIN)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- real bundles for the real server (tests/test_agent_serve.py, bench/ota.py) ---------------

# The shape `edgepack build` writes (edgepack/build.py: {"prompt": ..., "expect": ...}).
# The shipped Q4_1 file answers the build's default "What is the capital of France?" with
# French gibberish ("L'Étoile, la Cité, la Nation, ...", greedy, llama-cpp-python 0.3.36),
# so its test bundles ask for one word, which it answers "The capital of France is Paris."
CAPITAL = "What is the capital of France? Answer in one word."
BUILT_GOLDEN = ({"prompt": CAPITAL, "expect": "Paris"},)


def real_bundle(dest: Path, version: int | str, gguf: Path | None = None, *,
                golden=BUILT_GOLDEN, quant: str = "Q4_1", memory: dict | None = None,
                server: dict | None = None) -> Path:
    """A bundle for the real `edgepack serve`: ``make_test_bundle`` (the shipped SmolLM2 Q4_1
    GGUF, hard-linked) with n_ctx 512 and one thread, then its manifest rewritten with
    ``version``, ``golden_prompts`` as the build writes them and, if given, ``plan.memory``
    (the manifest is not listed in itself, so the bundle still verifies)."""
    import json

    from edgepack.manifest import MANIFEST_NAME, canonical_json, verify_bundle
    from support.bundles import make_test_bundle

    make_test_bundle(dest, gguf, quant=quant, engine={"n_ctx": 512, "n_threads": 1},
                     server=server)
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    manifest["bundle"]["version"] = version
    manifest["golden_prompts"] = [dict(g) for g in golden]
    if memory is not None:
        manifest["plan"]["memory"] = dict(memory)
    (dest / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    verify_bundle(dest)
    return dest


def broken_gguf(dest: Path) -> Path:
    """A file with a GGUF magic and a header llama.cpp refuses (unsupported version 999):
    manifest-valid, unloadable."""
    import struct

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"GGUF" + struct.pack("<I", 999) + struct.pack("<QQ", 1, 1) + bytes(4096))
    return dest


class MainService:
    """The device's main server under a STAND-IN service manager
    (tests/support/service_manager.py): the real `edgepack serve STATE/current` on a fixed
    port, restarted by the agent through ``restart_command``."""

    def __init__(self, folder: Path, state: Path) -> None:
        from edgepack.ota.agent.health import free_port

        self.folder = folder
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.script = [sys.executable, str(Path(__file__).with_name("service_manager.py"))]

    def command(self, action: str = "restart") -> list[str]:
        return [*self.script, action, str(self.folder), "--state", str(self.state),
                "--port", str(self.port)]

    @property
    def restart_command(self) -> str:
        import shlex

        return shlex.join(self.command())

    def events(self) -> list[tuple[str, int, str]]:
        """(event, pid, bundle folder name) in order."""
        log = self.folder / "events.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [(e, int(pid), Path(b).name) for _, e, pid, b in (ln.split(" ", 3) for ln in lines)]

    def stop(self) -> None:
        import subprocess

        subprocess.run(self.command("stop"), check=False, timeout=120)
