"""GGUF repos as input (issue 12, item 2): plan over a repo's .gguf files from their headers
read with HTTP Range through the real huggingface_hub client and the local hub, pull only the
chosen file (and the higher-precision reference it is validated against), bundle, serve.

The repo is SmolLM2-135M-Instruct as F16, Q8_0 and Q4_0 (support.gguf_repo), the same
shape as the ``...-GGUF`` repos on the hub.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from support.gguf_repo import FILES, repo_file, smollm2_gguf_repo
from support.schemas import check_json

from edgepack.cli.main import cli
from edgepack.manifest import verify_bundle

REPO = "edgepack-test/SmolLM2-135M-Instruct-GGUF"
pytestmark = pytest.mark.slow


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def _file_traffic(local_hub, name: str) -> tuple[list, int]:
    reqs = local_hub.file_requests(name)
    return reqs, sum(r.bytes_sent for r in reqs)


def test_plan_reads_only_headers_over_range(local_hub):
    folder = smollm2_gguf_repo()
    sha = local_hub.add_repo(REPO, folder)
    code, out = run("plan", REPO, "--device", "raspberry-pi-5-8gb", "--json")
    assert code == 0, out
    plan = json.loads(out)
    assert plan["source"] == {"ref": REPO, "repo_id": REPO, "sha": sha}
    assert plan["format"] == "gguf" and plan["quant"] == "Q8_0"
    assert plan["gguf_file"]["path"] == FILES["Q8_0"]
    assert plan["card"]["license"] == "apache-2.0"
    # F16 passed over for Q8_0 (same quality class, half the bytes), Q4_0 for quality
    why = {r["file"]: r["reason"] for r in plan["rejected"]}
    assert "--quant F16" in why[FILES["F16"]] and why[FILES["Q4_0"]] == "lower quality than Q8_0"
    # exact weights from the header: the file minus its header (vocabulary, merges, template)
    size = (folder / FILES["Q8_0"]).stat().st_size
    assert 0.97 * size < plan["memory"]["weights_bytes"] < size
    assert plan["model"]["n_layer"] == 30 and plan["model"]["max_context"] == 8192
    for name in FILES.values():
        reqs, sent = _file_traffic(local_hub, name)
        assert reqs and all(r.method == "GET" and r.range for r in reqs), reqs
        assert sent < 4 * 1024 * 1024 < (folder / name).stat().st_size, (name, sent)


def test_build_pulls_only_the_chosen_file_and_its_reference(local_hub, tmp_path):
    folder = smollm2_gguf_repo()
    sha = local_hub.add_repo(REPO, folder)
    out_dir = tmp_path / "out"
    code, out = run("build", REPO, "--device", "raspberry-pi-5-8gb", "--out", str(out_dir))
    assert code == 0, out
    bundle = out_dir / "smollm2-135m-instruct-gguf-raspberry-pi-5-8gb"
    m = verify_bundle(bundle)
    assert m["model"]["quant"] == "Q8_0" and m["model"]["kind"] == "chat"
    assert m["model"]["path"] == f"model/{FILES['Q8_0']}"
    assert (bundle / m["model"]["path"]).read_bytes() == (folder / FILES["Q8_0"]).read_bytes()
    details = m["model"]["gguf_repo"]
    assert details["chosen"] == FILES["Q8_0"] and details["reference"] == FILES["F16"]
    assert {c["path"] for c in details["candidates"]} == set(FILES.values())
    assert any("highest-quality option" in line for line in details["why"])
    # This file's golden answer changes with flash attention ("L'Étoile…"): validated, and so
    # planned and served, without it; the manifest says what was tried.
    assert m["plan"]["flash_attn"] is False and m["validation"]["details"]["flash_attn"] is False
    assert [(a["quant"], a["flash_attn"], a["failed"]) for a in m["plan"]["step_up"]] == \
        [("Q8_0", True, ["golden"])]
    assert "validating Q8_0 without it" in out
    code, shown = run("inspect", str(bundle))
    assert code == 0 and "kernels     without flash attention: with it (golden): " in shown, shown
    assert m["source"]["revision"] == sha and list(m["source"]["files"]) == [FILES["Q8_0"]]
    # the same documents as a checkpoint build: the ML-BOM names the shipped file's digest
    sbom = json.loads((bundle / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    assert FILES["Q8_0"] in json.dumps(sbom)
    # validated against the repo's F16: agreement/KL and the golden prompt through the file's
    # own chat template
    v = m["validation"]
    assert v["passed"] and v["metric"] == "top1_agreement" and v["reference"] == FILES["F16"]
    assert v["details"]["mean_kl"] < 0.015
    assert [g["passed"] for g in v["details"]["golden"]] == [True]
    # the hub log: Q4_0 was only ever read through Range requests of its header
    reqs, sent = _file_traffic(local_hub, FILES["Q4_0"])
    assert reqs and all(r.range for r in reqs) and sent < 4 * 1024 * 1024
    for name in (FILES["Q8_0"], FILES["F16"]):
        _, sent = _file_traffic(local_hub, name)
        assert sent >= (folder / name).stat().st_size  # downloaded whole
    # served with the tokenizer and chat template from the GGUF metadata (no tokenizer/)
    from support.bundles import served_answer

    assert not (bundle / "tokenizer").exists()
    assert "Paris" in served_answer(bundle, "smollm2-135m-instruct-gguf",
                                    "What is the capital of France?")


def _slow_board(tmp_path):
    """A Pi 4 with a tenth of its memory bandwidth: SmolLM2 decodes below the sbc floor (5
    tok/s) at every quant, so the planner picks the fastest Q4-class file of the repo."""
    import dataclasses

    from edgepack.device.catalog import load_profile_ref
    from edgepack.device.profile import profile_to_toml

    pi4 = load_profile_ref("raspberry-pi-4-4gb")
    sources = {**pi4.sources, "memory.measured_bandwidth_gbps": "test: a tenth of a Pi 4's"}
    slow = dataclasses.replace(pi4, id="slow-board", sources=sources, memory=dataclasses.replace(
        pi4.memory, measured_bandwidth_gbps=0.5))
    path = tmp_path / "slow-board.toml"
    path.write_text(profile_to_toml(slow))
    return path


def test_a_planned_file_that_fails_validation_steps_up_to_the_next_file_of_the_repo(
    local_hub, tmp_path
):
    """No --quant: the planner picks Q4_1 (the fastest Q4-class file on a slow board), whose
    greedy answer to the default golden prompt misses Paris; the build re-plans the repo's next
    file up, Q5_K_M, from its header, downloads it only then, validates it against the repo's
    F16 and ships it, with the failed Q4_1 in the plan's step_up (manifest and build --json).
    Q8_0, above the file that passed and not the reference, stays header reads."""
    repo = "edgepack-test/SmolLM2-135M-Instruct-step-up-GGUF"
    folder = smollm2_gguf_repo(step_up=True)
    local_hub.add_repo(repo, folder)
    r = CliRunner().invoke(cli, ["build", repo, "--device", str(_slow_board(tmp_path)),
                                 "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    log = " ".join(r.stderr.split())
    assert f"plan for slow-board: Q4_1 from {repo_file('Q4_1')}" in log, log
    failed_at = log.index("Q4_1 failed validation: ")
    assert "golden prompt 'What is the capital of France?' answered" in log[failed_at:], log
    assert "trying Q5_K_M (fits: " in log[failed_at:], log
    (b,) = check_json("build", r.stdout)["bundles"]
    m = verify_bundle(b["path"])
    assert m["model"]["quant"] == b["quant"] == "Q5_K_M"
    details = m["model"]["gguf_repo"]
    assert details["chosen"] == repo_file("Q5_K_M") and details["reference"] == FILES["F16"]
    assert list(m["source"]["files"]) == [repo_file("Q5_K_M")]
    # Q4_1 failed with flash attention (as served) and without it, then the build stepped up
    attempts = m["plan"]["step_up"]
    assert [(a["quant"], a["flash_attn"]) for a in attempts] == [
        ("Q4_1", True), ("Q4_1", False)], attempts
    for a in attempts:
        assert "golden" in a["failed"] and "without 'Paris'" in a["message"], a
    assert b["step_up"] == m["plan"]["step_up"]
    assert any("stepped up by the build from the planner's Q4_1" in x for x in details["why"])
    golden = m["validation"]["details"]["golden"]
    assert golden[0]["passed"] and "Paris" in golden[0]["answer"], golden
    # the hub log: Q8_0 only ever read through Range requests of its header; the others whole
    reqs, sent = _file_traffic(local_hub, repo_file("Q8_0"))
    assert reqs and all(x.method == "GET" and x.range for x in reqs) and sent < 4 * 1024 * 1024
    for name in (repo_file("Q4_1"), repo_file("Q5_K_M"), FILES["F16"]):
        _, sent = _file_traffic(local_hub, name)
        assert sent >= (folder / name).stat().st_size, name  # downloaded whole
    # Q5_K_M was pulled after Q4_1 failed, not with the planned file
    assert "pulling 1 GGUF file(s) for Q5_K_M" in log[failed_at:], log
    # asked for by name, the failing file fails the build (exit 5), as a forced quant does
    code, out = run("build", repo, "--device", str(_slow_board(tmp_path)), "--quant", "Q4_1",
                    "--out", str(tmp_path / "forced"))
    assert code == 5 and "trying" not in out and "without 'Paris'" in out, out


def test_split_file_chosen_with_quant_ships_every_part(local_hub, tmp_path):
    folder = smollm2_gguf_repo(split=True)
    local_hub.add_repo(REPO, folder)
    parts = sorted(p.name for p in folder.glob("*-of-00002.gguf"))
    out_dir = tmp_path / "out"
    code, out = run("build", REPO, "--device", "raspberry-pi-4-4gb", "--quant", "Q4_0",
                    "--out", str(out_dir))
    assert code == 0, out
    bundle = out_dir / "smollm2-135m-instruct-gguf-raspberry-pi-4-4gb"
    m = verify_bundle(bundle)
    assert m["model"]["path"] == f"model/{parts[0]}"
    assert {f["path"] for f in m["files"]} >= {f"model/{p}" for p in parts}
    assert sorted(m["model"]["gguf_repo"]["files"]) == parts
    assert m["validation"]["passed"] and m["validation"]["reference"] == FILES["F16"]
    # Q8_0 (not chosen, not the reference) stayed a header read
    reqs, sent = _file_traffic(local_hub, FILES["Q8_0"])
    assert reqs and all(r.range for r in reqs) and sent < 4 * 1024 * 1024
    from llama_cpp import Llama

    llm = Llama(str(bundle / m["model"]["path"]), n_ctx=256, verbose=False)
    try:
        answer = llm.create_chat_completion(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert "Paris" in answer


def test_quant_the_repo_lacks_is_a_usage_error_listing_its_files(local_hub, tmp_path):
    local_hub.add_repo(REPO, smollm2_gguf_repo())
    code, out = run("plan", REPO, "--device", "raspberry-pi-5-8gb", "--quant", "Q5_K_M")
    assert code == 2, out
    assert "no such GGUF file" in out and FILES["Q4_0"] in out
    assert not any(r.range is None and r.origin == "cdn" for r in local_hub.requests)


def test_a_damaged_gguf_in_the_repo_is_named(local_hub, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    (repo / "model-Q4_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    local_hub.add_repo("edgepack-test/broken-GGUF", repo)
    code, out = run("plan", "edgepack-test/broken-GGUF", "--device", "raspberry-pi-5-8gb")
    assert code == 5, out
    assert "model-Q4_0.gguf" in out


def test_a_local_folder_of_gguf_files_plans_from_its_headers():
    folder = smollm2_gguf_repo(split=True)
    code, out = run("plan", str(folder), "--device", "raspberry-pi-4-4gb", "--quant", "Q4_0",
                    "--json")
    assert code == 0, out
    plan = json.loads(out)
    assert plan["source"]["sha"] is None and plan["quant"] == "Q4_0"
    assert len(plan["gguf_file"]["files"]) == 2
    assert plan["gguf_file"]["path"].endswith("-00001-of-00002.gguf")
    # both parts' tensors count: the whole model's weights, not the first part's
    size = sum(p.stat().st_size for p in folder.glob("*-of-00002.gguf"))
    assert 0.95 * size < plan["memory"]["weights_bytes"] < size


def test_golden_only_validation_sizes_its_context_from_the_prompts():
    """Without a reference file the golden prompts alone validate the file, at a context
    counted from the prompts with the file's own tokenizer (as a checkpoint build's), not a
    fixed 512: a ~1,150-token question fits and is answered."""
    from edgepack.build.gguf_repo_build import golden_only
    from edgepack.build.gguf_validate import GoldenPrompt

    model = smollm2_gguf_repo() / FILES["Q8_0"]
    notes = " ".join(f"Note {i}: the meeting moved to room {i}." for i in range(80))
    golden = [GoldenPrompt(notes + " Ignore the notes above. What is the capital of France?",
                           "Paris")]
    v = golden_only(model, golden, 2, "no higher-precision file", "chat")
    assert v["passed"] and v["metric"] == "golden_prompts" and v["value"] == 1.0
    assert "Paris" in v["details"]["golden"][0]["answer"]
    assert 1024 < v["details"]["n_ctx"] <= 8192  # above the old 512, within the model's limit


def _go_offline(local_hub, monkeypatch) -> None:
    """Stop the hub and set HF_HUB_OFFLINE (and huggingface_hub's copy, read at import)."""
    from huggingface_hub import constants

    local_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_offline_build_from_the_cache_and_a_missing_file_is_named(
    local_hub, tmp_path, monkeypatch
):
    """Built once online, the same GGUF repo builds again with the hub stopped and
    HF_HUB_OFFLINE=1, from the files the first build pulled; a quantization that was never
    pulled is refused naming it, what the cache holds, and how to get it."""
    sha = local_hub.add_repo(REPO, smollm2_gguf_repo())
    args = ["build", REPO, "--device", "raspberry-pi-4-4gb", "--quant", "Q4_0"]
    code, out = run(*args, "--out", str(tmp_path / "online"))
    assert code == 0, out
    _go_offline(local_hub, monkeypatch)
    code, out = run(*args, "--out", str(tmp_path / "offline"))
    assert code == 0, out
    said = " ".join(out.split())  # the log wraps at the terminal's width
    assert "offline: planning over the 2 file(s) in the local cache" in said, said
    online = verify_bundle(tmp_path / "online" / "smollm2-135m-instruct-gguf-raspberry-pi-4-4gb")
    m = verify_bundle(tmp_path / "offline" / "smollm2-135m-instruct-gguf-raspberry-pi-4-4gb")
    assert m["model"]["gguf_repo"]["chosen"] == FILES["Q4_0"] and m["source"]["revision"] == sha
    assert m["validation"]["reference"] == FILES["F16"] and m["validation"]["passed"]
    assert m["source"]["files"] == online["source"]["files"]
    assert m["card"]["license"] == "apache-2.0"  # the model card came from the cache too
    assert any("offline: planned over the 2 GGUF file(s) in the local cache" in w
               for w in m["plan"]["warnings"]), m["plan"]["warnings"]
    # plan says the same, and that online the choice may differ
    code, out = run("plan", REPO, "--device", "raspberry-pi-5-8gb", "--json")
    assert code == 0, out
    plan = json.loads(out)
    # online a Pi 5 gets Q8_0 (test_plan_reads_only_headers_over_range), which is not cached
    assert plan["gguf_file"]["path"] in (FILES["Q4_0"], FILES["F16"])
    assert any("online the choice may differ" in w for w in plan["warnings"])
    # Q8_0 was only ever read by its header: it is not in the cache
    code, out = run("build", REPO, "--device", "raspberry-pi-4-4gb", "--quant", "Q8_0",
                    "--out", str(tmp_path / "missing"))
    assert code == 4, out
    said = " ".join(out.split())
    assert "'Q8_0'" in said and "local cache" in said and "HF_HUB_OFFLINE=1" in said, said
    assert FILES["Q4_0"] in said and FILES["F16"] in said and "unset HF_HUB_OFFLINE" in said
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("quant", [FILES["Q4_0"], "q4-0"])
def test_quant_names_a_file_of_the_repo_or_its_label_in_any_spelling(local_hub, quant):
    local_hub.add_repo(REPO, smollm2_gguf_repo())
    code, out = run("plan", REPO, "--device", "raspberry-pi-5-8gb", "--quant", quant, "--json")
    assert code == 0, out
    plan = json.loads(out)
    assert plan["quant"] == "Q4_0" and plan["gguf_file"]["path"] == FILES["Q4_0"]


def test_a_file_type_edgepack_cannot_make_reaches_the_repo_listing(local_hub, tmp_path):
    """IQ4_XS is no quantization edgepack makes, but a GGUF repo may hold it: the build reads
    the repo and says which files it has instead of refusing the name up front."""
    local_hub.add_repo(REPO, smollm2_gguf_repo())
    code, out = run("build", REPO, "--device", "raspberry-pi-5-8gb", "--quant", "IQ4_XS",
                    "--out", str(tmp_path / "out"))
    assert code == 2, out
    assert "'IQ4_XS': the repo holds no such GGUF file" in out
    assert all(name in out for name in FILES.values())
