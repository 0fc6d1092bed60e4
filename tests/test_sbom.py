"""The bundle's ML-BOM (sbom.cdx.json): CycloneDX 1.6, schema-valid, listing the model with its
card and lineage and every device-side package with its digest; reproducible."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.build.model_card import card_from_folder, describe_derivation
from edgepack.build.sbom import SBOM_NAME, sbom_dict, write_sbom
from edgepack.bundle import BundleSpec, write_bundle
from edgepack.cli.main import cli
from edgepack.manifest import describe_files, sha256_file, verify_bundle

CARD = """---
license: apache-2.0
datasets:
  - HuggingFaceTB/smollm-corpus
language: [en]
pipeline_tag: text-generation
base_model: HuggingFaceTB/SmolLM2-135M
---
"""


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def validate(doc: dict) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc))
    assert error is None, error


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A real wheel, built by pip from a one-module project (what a runtime pack holds)."""
    src = tmp_path_factory.mktemp("proj")
    (src / "tinypkg.py").write_text("VALUE = 1\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tiny-pkg"\nversion = "1.2.3"\n'
        '[tool.setuptools]\npy-modules = ["tinypkg"]\n')
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, timeout=300)
    return next(out.glob("*.whl"))


def spec_for(tmp_path: Path) -> BundleSpec:
    folder = tmp_path / "src"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(CARD)
    (folder / "LICENSE").write_text("Apache License 2.0 (test stand-in)\n")
    card = card_from_folder(folder)
    model = tmp_path / "smol-Q4_0.gguf"
    model.write_bytes(b"GGUF" + bytes(2048))
    source = {"ref": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "a" * 40,
              "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "requested_revision": "main",
              "files": {"config.json": "b" * 64, "model.safetensors": "c" * 64}}
    engine = {"name": "llama.cpp", "package": "llama-cpp-python", "built_with": "0.3.36",
              "version_range": ">=0.3.36,<0.4"}
    converter = {"name": "convert_hf_to_gguf.py", "version": "llama-cpp-python-0.3.36"}
    validation = {"metric": "top1_agreement", "value": 0.93, "threshold": 0.85, "passed": True,
                  "reference": "f16 GGUF",
                  "details": {"golden": [{"prompt": "What is the capital of France?",
                                          "passed": True}]}}
    return BundleSpec(
        name="smol-raspberry-pi-5-8gb", version=4, model_file=model, model_name="smol",
        model_format="gguf", model_kind="chat", quant="Q4_0",
        plan={"model": {"architecture": "LlamaForCausalLM", "model_type": "llama",
                        "n_params": 134515008}, "format": "gguf", "quant": "Q4_0"},
        server={"model": {"path": "m"}}, source=source,
        device={"profile_id": "raspberry-pi-5-8gb", "profile_digest": "sha256:" + "d" * 64},
        engine=engine, converter=converter, validation=validation,
        card=card.to_dict(),
        derivation=describe_derivation(card, source, "gguf", "Q4_0", converter, engine,
                                       validation),
        license_files=tuple((f.path, f.local) for f in card.license_files),
    )


def with_runtime_pack(spec: BundleSpec, wheel: Path):
    """A document writer that places a runtime pack first, then writes the SBOM (the order
    the build uses: the SBOM describes what is already in the bundle)."""
    def write(tmp: Path, files: list[dict]) -> list[str]:
        dest = tmp / "runtime" / "wheels" / wheel.name
        dest.parent.mkdir(parents=True)
        shutil.copyfile(wheel, dest)
        rel = f"runtime/wheels/{wheel.name}"
        files = files + [e.to_dict() for e in describe_files(tmp, [rel])]
        return [rel, *write_sbom(spec)(tmp, files)]
    return write


def test_sbom_is_cyclonedx_1_6_and_lists_model_lineage_and_runtime_wheels(tmp_path, wheel):
    spec = spec_for(tmp_path)
    bundle = write_bundle(spec, tmp_path / "b", documents=with_runtime_pack(spec, wheel))
    m = verify_bundle(bundle)
    assert SBOM_NAME in {f["path"] for f in m["files"]}  # listed, so signed with the manifest
    doc = json.loads((bundle / SBOM_NAME).read_text())
    validate(doc)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    assert doc["metadata"]["component"]["name"] == "smol-raspberry-pi-5-8gb"
    tools = {t["name"]: t["version"] for t in doc["metadata"]["tools"]["components"]}
    assert tools["convert_hf_to_gguf.py"] == "llama-cpp-python-0.3.36"
    assert tools["llama-cpp-python"] == "0.3.36" and "edgepack" in tools
    comps = {c["bom-ref"]: c for c in doc["components"]}
    model = comps["model"]
    assert model["type"] == "machine-learning-model"
    assert model["hashes"] == [{"alg": "SHA-256", "content": m["model"]["sha256"]}]
    assert model["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    card = model["modelCard"]
    assert card["modelParameters"]["task"] == "text-generation"
    assert card["modelParameters"]["modelArchitecture"] == "LlamaForCausalLM"
    assert card["modelParameters"]["datasets"] == [
        {"type": "dataset", "name": "HuggingFaceTB/smollm-corpus"}]
    metrics = card["quantitativeAnalysis"]["performanceMetrics"]
    assert {"type": "top1_agreement", "value": "0.93", "slice": "against f16 GGUF"} in metrics
    assert {"name": "edgepack:quantization", "value": "Q4_0"} in card["properties"]
    ancestor = model["pedigree"]["ancestors"][0]
    assert ancestor["purl"] == "pkg:huggingface/huggingfacetb/SmolLM2-135M-Instruct@" + "a" * 40
    assert {c["name"]: c["hashes"][0]["content"] for c in ancestor["components"]} == {
        "config.json": "b" * 64, "model.safetensors": "c" * 64}
    assert "quantized to Q4_0" in model["pedigree"]["notes"]
    # The runtime pack's wheel, with the digest of the file in the bundle.
    runtime = comps["runtime:tiny-pkg"]
    assert runtime["version"] == "1.2.3" and runtime["scope"] == "required"
    assert runtime["purl"] == "pkg:pypi/tiny-pkg@1.2.3"
    assert runtime["hashes"][0]["content"] == sha256_file(
        bundle / "runtime" / "wheels" / wheel.name)
    deps = {d["ref"]: d.get("dependsOn", []) for d in doc["dependencies"]}
    assert set(deps["bundle"]) == {"model", "runtime:tiny-pkg"}
    # `inspect --sbom` prints exactly the file.
    code, text = run("inspect", str(bundle), "--sbom")
    assert code == 0 and text == (bundle / SBOM_NAME).read_text()


def test_without_a_runtime_pack_the_engine_requirements_are_listed(tmp_path):
    doc = sbom_dict(spec_for(tmp_path), [{"path": "model/smol-Q4_0.gguf", "sha256": "e" * 64,
                                          "size": 1}])
    validate(doc)
    comps = {c["name"]: c for c in doc["components"]}
    ranges = {p["name"]: p["value"] for p in comps["llama-cpp-python"]["properties"]}
    assert ranges["edgepack:version_range"] == "==0.3.36"
    assert {"starlette", "uvicorn", "tuf", "cryptography", "edgepack"} <= set(comps)
    assert "torch" not in comps and "huggingface-hub" not in comps  # build side only


def test_the_schema_check_is_real(tmp_path):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    doc = sbom_dict(spec_for(tmp_path), [{"path": "model/x.gguf", "sha256": "e" * 64,
                                          "size": 1}])
    next(c for c in doc["components"] if c["bom-ref"] == "model")["modelCard"]["bogus"] = 1
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc)) is not None


def test_same_inputs_same_sbom_and_only_the_timestamp_follows_source_date_epoch(
    tmp_path, monkeypatch
):
    files = [{"path": "model/smol-Q4_0.gguf", "sha256": "e" * 64, "size": 1}]
    a = sbom_dict(spec_for(tmp_path / "a"), files)
    b = sbom_dict(spec_for(tmp_path / "b"), files)
    assert a == b and "timestamp" not in a["metadata"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    c = sbom_dict(spec_for(tmp_path / "c"), files)
    assert c["metadata"].pop("timestamp") == "2026-01-01T00:00:00Z"
    assert c == a


@pytest.mark.slow
def test_a_build_writes_a_valid_sbom_and_twice_gives_the_same_bytes(local_hub, tiny_llama_dir,
                                                                   tmp_path):
    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    sboms = []
    for out in ("a", "b"):
        code, text = run("build", "edgepack-test/tiny-llama", "--device", "laptop-x86-16gb",
                         "--no-golden", "--out", str(tmp_path / out))
        assert code == 0, text
        bundle = tmp_path / out / "tiny-llama-laptop-x86-16gb"
        verify_bundle(bundle)
        sboms.append((bundle / SBOM_NAME).read_bytes())
    assert sboms[0] == sboms[1]
    doc = json.loads(sboms[0])
    validate(doc)
    model = next(c for c in doc["components"] if c["type"] == "machine-learning-model")
    assert model["modelCard"]["modelParameters"]["modelArchitecture"] == "LlamaForCausalLM"


def test_the_update_repository_publishes_sbom_and_provenance_beside_each_version(tmp_path):
    from tuf.api.metadata import Metadata

    from edgepack.keys import generate_keypair
    from edgepack.ota.release import provenance_target, sbom_target, stored_target_path
    from edgepack.ota.repo import init_repo
    from edgepack.ota.retention import collect_garbage
    from edgepack.signature import sign_bundle

    repo = init_repo(tmp_path / "repo")
    key, _pub = generate_keypair(tmp_path / "k")
    published = {}
    for version in (1, 2):
        spec = spec_for(tmp_path / f"v{version}")
        spec = BundleSpec(**{**spec.__dict__, "version": version})
        bundle = write_bundle(spec, tmp_path / f"b{version}", documents=write_sbom(spec))
        sign_bundle(bundle, key)
        repo.publish(bundle, "stable")
        published[version] = bundle
    targets = Metadata.from_file(str(max((repo.public / "metadata").glob("*.targets.json"),
                                         key=lambda p: int(p.name.split(".")[0]))))
    for version, bundle in published.items():
        for target, name in ((sbom_target("stable", version), SBOM_NAME),
                             (provenance_target("stable", version), "provenance.intoto.jsonl")):
            info = targets.signed.targets[target]
            data = (bundle / name).read_bytes()
            assert info.length == len(data)
            stored = repo.public / "targets" / stored_target_path(target, info.hashes["sha256"])
            assert stored.read_bytes() == data
    # Dropping a version drops its SBOM and provenance too.
    collect_garbage(repo, keep=1)
    targets = Metadata.from_file(str(max((repo.public / "metadata").glob("*.targets.json"),
                                         key=lambda p: int(p.name.split(".")[0]))))
    assert sbom_target("stable", 1) not in targets.signed.targets
    assert provenance_target("stable", 1) not in targets.signed.targets
    assert sbom_target("stable", 2) in targets.signed.targets


def test_a_missing_sbom_library_fails_the_build_before_any_request(local_hub, tiny_llama_dir,
                                                                   tmp_path, monkeypatch):
    import sys

    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    monkeypatch.setitem(sys.modules, "cyclonedx.output.json", None)  # import raises
    code, text = run("build", "edgepack-test/tiny-llama", "--device", "laptop-x86-16gb",
                     "--no-golden", "--out", str(tmp_path / "out"))
    assert code == 5 and "ML-BOM" in text and "edgepack[build]" in text, text
    assert local_hub.requests == []


@pytest.mark.slow
def test_a_real_runtime_pack_is_listed_wheel_by_wheel_with_digests(tmp_path):
    """The runtime pack the build makes (real wheels from PyPI for a Jetson's CPython 3.10),
    written by the bundle writer with the SBOM: every wheel is a required component with the
    version from its file name and the sha256 of the file in the bundle."""
    from edgepack.build.runtime_pack import build_runtime_pack
    from edgepack.device.resolve import load_profile

    base = spec_for(tmp_path / "spec")
    pack = build_runtime_pack(load_profile("jetson-orin-nano-8gb"), "onnx", tmp_path / "cache")
    try:
        spec = BundleSpec(**{**base.__dict__, "model_format": "onnx", "quant": "int8",
                             "runtime_files": pack.files, "runtime": pack.info})
        bundle = write_bundle(spec, tmp_path / "b", documents=write_sbom(spec))
    finally:
        pack.cleanup()
    m = verify_bundle(bundle)
    doc = json.loads((bundle / SBOM_NAME).read_text())
    validate(doc)
    digests = {f["path"]: f["sha256"] for f in m["files"]}
    runtime = {c["properties"][0]["value"]: c for c in doc["components"]
               if c["bom-ref"].startswith("runtime:")}
    wheels = {f"runtime/wheels/{w}" for w in m["runtime"]["wheels"]}
    assert wheels and set(runtime) == wheels  # every wheel, and nothing else
    for path, comp in runtime.items():
        assert comp["hashes"] == [{"alg": "SHA-256", "content": digests[path]}]
        assert comp["scope"] == "required" and comp["purl"].startswith("pkg:pypi/")
        assert comp["version"] in path
    assert any(c["name"] == "onnxruntime" for c in runtime.values())
