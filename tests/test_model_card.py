"""Licence and model-card facts: read at the pinned commit before any weight byte, shown by
``plan``, enforced by ``--allow-license`` (exit 3), recorded in the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.build.model_card import LicensePolicy, card_from_folder, parse_front_matter
from edgepack.cli.main import cli
from edgepack.errors import ConfigError

CARD = """---
license: other
license_name: llama3.1
license_link: https://example.invalid/llama3.1/LICENSE
base_model:
  - meta-llama/Llama-3.1-8B
datasets: [HuggingFaceTB/smollm-corpus]
language: en
pipeline_tag: text-generation
---
# tiny llama

A test model.
"""
LICENSE_TEXT = "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT (test stand-in)\n"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def carded_model(tiny_llama_dir: Path, dest: Path, card: str = CARD) -> Path:
    folder = shutil.copytree(tiny_llama_dir, dest)
    (folder / "README.md").write_text(card)
    (folder / "LICENSE").write_text(LICENSE_TEXT)
    (folder / "USE_POLICY.md").write_text("Acceptable use policy (test stand-in)\n")
    return folder


def weight_requests(hub) -> list:
    return [r for r in hub.requests if r.path.endswith(".safetensors")]


def test_front_matter_fields_and_policy(tmp_path):
    (tmp_path / "README.md").write_text(CARD)
    (tmp_path / "LICENSE.txt").write_text("x")
    (tmp_path / "config.json").write_text("{}")
    card = card_from_folder(tmp_path)
    assert card.license == "other" and card.license_name == "llama3.1"
    assert card.base_model == ("meta-llama/Llama-3.1-8B",) and card.language == ("en",)
    assert card.datasets == ("HuggingFaceTB/smollm-corpus",)
    assert card.pipeline_tag == "text-generation"
    assert [f.path for f in card.license_files] == ["LICENSE.txt"]
    assert LicensePolicy.parse(["apache-2.0, LLAMA3.1"]).permits(card)  # type: ignore[union-attr]
    assert not LicensePolicy.parse(["apache-2.0", "mit"]).permits(card)  # type: ignore[union-attr]
    assert LicensePolicy.parse(["", " "]) is None
    assert parse_front_matter("# no front matter\n") == {}
    with pytest.raises(ConfigError, match="never closed"):
        parse_front_matter("---\nlicense: mit\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_front_matter("---\nlicense: [mit\n---\n")


def test_a_card_without_a_licence_is_refused_by_any_policy(tmp_path):
    (tmp_path / "README.md").write_text("---\npipeline_tag: text-generation\n---\n")
    card = card_from_folder(tmp_path)
    policy = LicensePolicy.parse(["apache-2.0"])
    assert policy is not None
    with pytest.raises(ConfigError, match=r"unknown \(the model card declares none\)"):
        policy.check(card, "some/model")


def test_plan_shows_the_card_and_refuses_a_disallowed_licence_before_weights(
    local_hub, tiny_llama_dir, tmp_path
):
    folder = carded_model(tiny_llama_dir, tmp_path / "m")
    sha = local_hub.add_repo("edgepack-test/carded", folder)
    code, text = run("plan", "edgepack-test/carded", "--device", "laptop-x86-16gb", "--json",
                     "--allow-license", "apache-2.0,llama3.1")
    assert code == 0, text
    card = json.loads(text)["card"]
    assert card["license"] == "other" and card["license_name"] == "llama3.1"
    assert card["license_link"] == "https://example.invalid/llama3.1/LICENSE"
    assert card["base_model"] == ["meta-llama/Llama-3.1-8B"] and card["gated"] is None
    assert [f["path"] for f in card["license_files"]] == ["LICENSE", "USE_POLICY.md"]
    # The card came from the pinned commit, not from a moving branch.
    readme_gets = [r for r in local_hub.requests if r.path.endswith("/README.md")]
    assert readme_gets and all(f"/resolve/{sha}/" in r.path for r in readme_gets)

    code, text = run("plan", "edgepack-test/carded", "--device", "laptop-x86-16gb")
    assert code == 0 and "licence: other (llama3.1)" in text, text

    local_hub.clear_log()
    code, text = run("plan", "edgepack-test/carded", "--device", "laptop-x86-16gb",
                     "--allow-license", "apache-2.0", "--allow-license", "mit")
    assert code == 3, text
    assert "other (llama3.1)" in text and "apache-2.0, mit" in text
    assert weight_requests(local_hub) == []


def test_build_refused_by_licence_requests_no_weight_byte_and_leaves_nothing(
    local_hub, tiny_llama_dir, tmp_path
):
    folder = carded_model(tiny_llama_dir, tmp_path / "m", CARD.replace(
        "license: other\nlicense_name: llama3.1\n", "license: cc-by-nc-4.0\n"))
    local_hub.add_repo("edgepack-test/carded", folder)
    out = tmp_path / "out"
    code, text = run("build", "edgepack-test/carded", "--device", "laptop-x86-16gb",
                     "--no-golden", "--out", str(out), "--allow-license", "apache-2.0,mit")
    assert code == 3, text
    assert "cc-by-nc-4.0" in text and "nothing was downloaded" in text
    assert local_hub.requests, "the card must have been read from the hub"
    assert weight_requests(local_hub) == []  # not even a header range
    assert not out.exists() or list(out.iterdir()) == []


def test_gated_models_are_flagged(local_hub, tiny_llama_dir, tmp_path, monkeypatch):
    folder = carded_model(tiny_llama_dir, tmp_path / "m")
    local_hub.add_repo("edgepack-test/gated", folder)
    local_hub.mark_gated("edgepack-test/gated", allowed_tokens=["hf_granted"])
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    code, text = run("plan", "edgepack-test/gated", "--device", "laptop-x86-16gb", "--json")
    assert code == 0, text
    assert json.loads(text)["card"]["gated"] == "manual"
    code, text = run("plan", "edgepack-test/gated", "--device", "laptop-x86-16gb")
    assert code == 0 and "gated: yes (manual)" in text, text


@pytest.mark.slow
def test_allowed_build_records_the_card_ships_the_licence_and_says_what_changed(
    local_hub, tiny_llama_dir, tmp_path
):
    from edgepack.manifest import sha256_file, verify_bundle

    folder = carded_model(tiny_llama_dir, tmp_path / "m")
    sha = local_hub.add_repo("edgepack-test/carded", folder)
    out = tmp_path / "out"
    code, text = run("build", "edgepack-test/carded", "--device", "laptop-x86-16gb",
                     "--no-golden", "--out", str(out), "--allow-license", "llama3.1")
    assert code == 0, text
    bundle = out / "carded-laptop-x86-16gb"
    m = verify_bundle(bundle)
    assert m["card"]["license_name"] == "llama3.1"
    assert m["card"]["readme_sha256"] == sha256_file(folder / "README.md")
    # The licence texts travel with the derived model, byte for byte.
    assert (bundle / "license" / "LICENSE").read_text() == LICENSE_TEXT
    assert {"license/LICENSE", "license/USE_POLICY.md"} <= {f["path"] for f in m["files"]}
    d = m["derivation"]
    assert d["derived_from"] == f"edgepack-test/carded@{sha}"
    assert d["license_name"] == "llama3.1"
    assert any(c.startswith(f"quantized to {m['model']['quant']}") for c in d["changes"])
    assert any(c.startswith("validated against") for c in d["changes"])
    code, text = run("inspect", str(bundle))
    assert code == 0 and "licence     other (llama3.1)" in text and "changed     " in text


def test_a_policy_file_lists_allowed_licences(tmp_path):
    policy_file = tmp_path / "licences.txt"
    policy_file.write_text("# what legal approved\napache-2.0\nmit  # permissive\n")
    policy = LicensePolicy.parse([f"@{policy_file}", "bsd-3-clause"])
    assert policy is not None and policy.allowed == {"apache-2.0", "mit", "bsd-3-clause"}
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="allows no licence"):
        LicensePolicy.parse([f"@{tmp_path / 'empty.txt'}"])
    with pytest.raises(ConfigError, match="cannot read licence policy file"):
        LicensePolicy.parse([f"@{tmp_path / 'missing.txt'}"])


def test_an_oversized_licence_file_is_refused_from_the_listing_without_download(
    local_hub, tiny_llama_dir, tmp_path
):
    from edgepack.build.model_card import MAX_LICENSE_BYTES

    folder = carded_model(tiny_llama_dir, tmp_path / "m")
    (folder / "LICENSE").write_bytes(b"x" * (MAX_LICENSE_BYTES + 1))
    local_hub.add_repo("edgepack-test/huge-licence", folder)
    code, text = run("plan", "edgepack-test/huge-licence", "--device", "laptop-x86-16gb")
    assert code == 3 and "LICENSE is 1048577 bytes" in text, text
    assert local_hub.file_requests("/LICENSE") == []
