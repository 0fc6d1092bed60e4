"""The Python API: edgepack.plan / build / serve, on the real planner, build and server."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgepack
from edgepack.errors import RuntimeHealthError, UsageError


def test_import_edgepack_stays_light_and_the_api_names_resolve():
    code = ("import sys, edgepack; f = (edgepack.plan, edgepack.build, edgepack.serve); "
            "assert all(map(callable, f)); "
            "heavy = [m for m in ('torch', 'transformers', 'optimum', 'huggingface_hub') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_plan_returns_the_planners_plan(tiny_llama_dir):
    p = edgepack.plan(str(tiny_llama_dir), device="raspberry-pi-5-8gb", quant="Q8_0")
    assert p.format == "gguf" and p.quant == "Q8_0" and p.device["id"] == "raspberry-pi-5-8gb"
    assert p.estimate.required_bytes > 0 and p.rationale


def test_build_refuses_an_unknown_threshold_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="min_agreemnt"):
        edgepack.build("org/model", ["laptop-x86-16gb"], out=tmp_path, min_agreemnt=0.5)


@pytest.mark.slow
def test_build_after_importing_the_build_package(local_hub, tiny_llama_dir, tmp_path):
    import edgepack.build.pipeline  # noqa: F401 - the subpackage must not hide the function

    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    lines: list[str] = []
    result = edgepack.build("edgepack-test/tiny-llama", ["laptop-x86-16gb"], out=tmp_path,
                            quant="Q8_0", golden=[], min_agreement=0.5, log=lines.append)
    (s,) = result.summaries
    assert s.device == "laptop-x86-16gb" and s.quant == "Q8_0" and s.validation["passed"]
    assert s.path == tmp_path / "tiny-llama-laptop-x86-16gb"
    assert (s.path / "manifest.json").is_file()
    assert any("plan for laptop-x86-16gb" in line for line in lines)


@pytest.mark.slow
def test_serve_starts_a_real_server_and_chats(chat_bundle):
    with edgepack.serve(chat_bundle, api_key="k") as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.model == "smollm2-135m-instruct"
        answer = server.chat("What is the capital of France? Answer in one word.",
                             temperature=0, max_tokens=16)
        assert "Paris" in answer
    assert server._local.proc.poll() is not None  # stopped on leaving the block


def test_serve_reports_a_bundle_that_cannot_start(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(RuntimeHealthError) as e:
        edgepack.serve(tmp_path / "b", timeout=60)
    assert str(tmp_path / "b") in str(e.value)
