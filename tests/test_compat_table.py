"""The README's compatibility table, produced here: every family, saved by transformers 4 and
by transformers 5, built to GGUF and to ONNX by the real pipeline, validated, and served by the
real server app (chat completion or embeddings through its HTTP routes, in process).

Run with ``EDGEPACK_WRITE_COMPAT_TABLE=1`` to write the table into README.md; otherwise the
test fails when the README's table differs from what the builds show, so it cannot drift.
``EDGEPACK_COMPAT_FAMILIES=llama,qwen2`` limits a run to some families (the README is then
neither written nor checked).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from edgepack.errors import EdgepackError

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- compat-table:start -->", "<!-- compat-table:end -->"
DEVICE = "laptop-x86-16gb"
QUANT = {"gguf": "Q8_0", "onnx": "int8"}


def _serve(bundle: Path, kind: str) -> str:
    """'served' when the server app answers a request for the bundle, else why not."""
    import time

    from edgepack.runtimes.app import create_app
    from edgepack.runtimes.serve import ServeOptions, make_engine, prepare
    from starlette.testclient import TestClient

    cfg = prepare(bundle, ServeOptions(), {})
    with TestClient(create_app(cfg, make_engine(cfg), {})) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            if time.monotonic() > deadline:
                return "not ready"
            time.sleep(0.2)
        if kind == "embedding":
            r = client.post("/v1/embeddings", json={"model": cfg.model_name, "input": ["hi"]})
            ok = r.status_code == 200 and len(r.json()["data"][0]["embedding"]) > 0
        else:
            r = client.post("/v1/chat/completions", json={
                "model": cfg.model_name, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello"}]})
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    return "served" if ok else f"HTTP {r.status_code}"


def _cell(folder: Path, family: str, generation: int, fmt: str, out: Path) -> str:
    from edgepack.build.pipeline import BuildRequest, run_build
    from edgepack.manifest import verify_bundle

    req = BuildRequest(
        model=str(folder), devices=(DEVICE,), fmt=fmt, quant=QUANT[fmt], out=out,
        name=f"{family}-tf{generation}-{fmt}", golden=(),
        # Random weights: near-flat logits make top-token agreement a coin toss between
        # near-ties, so the bar is lowered explicitly (the manifest records it).
        min_agreement=0.5,
    )
    try:
        bundle = run_build(req).bundles[0]
    except EdgepackError as e:
        return f"fails: {e.message.splitlines()[0][:80]}"
    m = verify_bundle(bundle)
    if not m["validation"]["passed"]:
        return "built, not validated"
    wc = " (working copy)" if m["source"].get("working_copy") else ""
    return f"built, validated, {_serve(bundle, m['model']['kind'])}{wc}"


def render(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| family | saved by | GGUF (Q8_0) | ONNX (int8) |", "|---|---|---|---|"]
    lines += [f"| {f} | {g} | {a} | {b} |" for f, g, a, b in rows]
    return "\n".join(lines)


def test_every_family_from_both_transformers_generations(tmp_path):
    from support.families import (
        FAMILIES,
        Transformers5Unavailable,
        family_checkpoints,
        transformers5_python,
    )

    wanted = [f for f in os.environ.get("EDGEPACK_COMPAT_FAMILIES", "").split(",") if f]
    families = [f for f in FAMILIES if not wanted or f in wanted]
    try:
        roots = {4: family_checkpoints(4), 5: family_checkpoints(5)}
    except Transformers5Unavailable as e:
        pytest.skip(f"transformers 5 cannot be installed here: {e}")
    import transformers

    versions = {4: transformers.__version__, 5: _version(transformers5_python())}
    rows = []
    for family in families:
        for gen in (4, 5):
            cells = [_cell(roots[gen] / family, family, gen, fmt, tmp_path / "out")
                     for fmt in ("gguf", "onnx")]
            rows.append((family, f"transformers {versions[gen]}", *cells))
    table = render(rows)
    print(table)
    failed = [r for r in rows if any("validated, served" not in c for c in r[2:])]
    if wanted:
        assert not failed, table
        return
    if os.environ.get("EDGEPACK_WRITE_COMPAT_TABLE"):
        text = README.read_text(encoding="utf-8")
        new = re.sub(re.escape(START) + ".*?" + re.escape(END),
                     f"{START}\n{table}\n{END}", text, flags=re.S)
        README.write_text(new, encoding="utf-8")
    current = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END),
                        README.read_text(encoding="utf-8"), flags=re.S)
    assert current is not None, f"README.md lacks the {START} block"
    assert current.group(1) == table, "README's compatibility table is stale: rerun with " \
        "EDGEPACK_WRITE_COMPAT_TABLE=1\n" + table
    assert not failed, table


def _version(python: Path) -> str:
    import subprocess

    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('transformers'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
