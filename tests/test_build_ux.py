"""`edgepack build` as a user meets it: refusals before any work, progress lines, a summary
per bundle with the next command, and a documented --json result."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from support.schemas import check_json

from edgepack.cli.main import cli
from edgepack.manifest import load_manifest

REPO = "edgepack-test/tiny-llama"


def _build(*args: str):
    return CliRunner().invoke(cli, ["build", *args])


@pytest.mark.parametrize("case", ["bundle-exists", "archive-exists", "out-is-a-file",
                                  "unknown-quant", "quant-for-other-device",
                                  "agreement-above-1", "negative-kl"])
def test_bad_options_and_outputs_exit_2_before_any_request(local_hub, tiny_llama_dir,
                                                          tmp_path, case):
    local_hub.add_repo(REPO, tiny_llama_dir)
    out = tmp_path / "out"
    args = [REPO, "--device", "laptop-x86-16gb", "--out", str(out), "--no-golden"]
    expect = ""
    if case == "bundle-exists":
        (out / "tiny-llama-laptop-x86-16gb").mkdir(parents=True)
        expect = "already exists"
    elif case == "archive-exists":
        out.mkdir()
        (out / "tiny-llama-laptop-x86-16gb.tar").write_bytes(b"x")
        args.append("--archive")
        expect = "tiny-llama-laptop-x86-16gb.tar"
    elif case == "out-is-a-file":
        out.write_text("x")
        expect = "is a file"
    elif case == "unknown-quant":
        args += ["--quant", "Q9_Z"]
        expect = "'Q9_Z' is not a known quantization"
    elif case == "quant-for-other-device":
        args += ["--quant", "raspberry-pi-5-8gb=Q4_0"]
        expect = "not among the --device values"
    elif case == "agreement-above-1":
        args += ["--min-agreement", "1.5"]
        expect = "--min-agreement 1.5 is outside 0.0..1.0"
    elif case == "negative-kl":
        args += ["--max-kl", "-1"]
        expect = "--max-kl -1.0 is outside"
    before = len(local_hub.requests)
    r = _build(*args)
    assert r.exit_code == 2, r.output
    assert expect in r.output
    # Refused before the first request to the hub: no metadata, no weights.
    assert len(local_hub.requests) == before


def test_a_repo_file_type_on_a_checkpoint_is_refused_before_any_weight(local_hub,
                                                                       tiny_llama_dir, tmp_path):
    """IQ4_XS passes the up-front check (a GGUF repo may hold it), but a checkpoint cannot be
    quantized to it: exit 2 naming what edgepack makes, after the metadata and before any
    weight byte."""
    local_hub.add_repo(REPO, tiny_llama_dir)
    r = _build(REPO, "--device", "laptop-x86-16gb", "--quant", "IQ4_XS",
               "--out", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "cannot quantize to 'IQ4_XS'" in r.output and "Q4_K_M" in r.output
    assert not any(q.path.endswith(".safetensors") and q.range is None
                   for q in local_hub.requests)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_summary_next_command_and_json(local_hub, tiny_llama_dir, tmp_path):
    local_hub.add_repo(REPO, tiny_llama_dir)
    out = tmp_path / "out"
    common = [REPO, "--device", "laptop-x86-16gb", "--out", str(out), "--no-golden",
              "--min-agreement", "0.5", "--quant", "Q8_0"]
    r = CliRunner().invoke(cli, ["build", *common], env={"COLUMNS": "100"})
    assert r.exit_code == 0, r.output
    bundle = out / "tiny-llama-laptop-x86-16gb"
    m = load_manifest(bundle)
    # Progress goes to stderr as plain lines when not a terminal (bench/build.py reads them).
    assert "· quantize: " in r.stderr and "· validate: " in r.stderr
    # The summary (stdout) names device, format, quant, size, validation, path, and what next.
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("laptop-x86"))
    assert "gguf" in row and "Q8_0" in row and "MiB" in row and "passed" in row
    assert m["validation"]["metric"] in row
    assert str(bundle) in r.stdout.replace("\n", "")
    assert f"next: edgepack chat {bundle}" in r.stdout

    q = CliRunner().invoke(cli, ["build", *common, "--overwrite", "--json", "-q"])
    assert q.exit_code == 0, q.output
    assert q.stderr == ""  # -q: no progress at all
    data = check_json("build", q.stdout)
    (b,) = data["bundles"]
    assert b["device"] == "laptop-x86-16gb" and b["path"] == str(bundle)
    assert b["format"] == "gguf" and b["quant"] == "Q8_0"
    assert b["size_bytes"] == sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert b["validation"]["passed"] is True and b["validation"]["threshold"] == 0.5
    assert b["archive"] is None
    assert b["step_up"] == []  # --quant Q8_0 shipped as asked: nothing was stepped up
