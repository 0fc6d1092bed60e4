"""The runtime pack (``build --runtime``): wheels for the device's platform from the registry,
listed in the manifest like every other file, and a Jetson pack that says it is CPU-only."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.ota import make_bundle, random_model

from edgepack.build.cross_compile import check_aarch64_wheel
from edgepack.build.runtime_pack import (
    DEVICE_EXTRAS,
    build_edgepack_wheel,
    build_runtime_pack,
    platform_tags,
)
from edgepack.bundle import write_bundle
from edgepack.cli.main import cli
from edgepack.device.resolve import load_profile
from edgepack.errors import BuildError
from edgepack.manifest import verify_bundle


def test_platform_tags_follow_the_device_glibc():
    tags = platform_tags("aarch64", (2, 36))
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert "manylinux_2_37_aarch64" not in tags and tags[-2:] == [
        "manylinux2014_aarch64", "linux_aarch64"]


def _without_marker(text: str) -> str:
    from packaging.requirements import Requirement

    req = Requirement(text)
    req.marker = None
    return str(req)


def test_the_packs_device_requirements_are_pyprojects_extras(tmp_path):
    """The pack installs edgepack's own wheel with DEVICE_EXTRAS: what that wheel requires
    for each extra must be pyproject.toml's list, and the agent extra must bring what checking
    ed25519 signatures needs (securesystemslib's crypto extra: pyca/cryptography)."""
    from packaging.requirements import Requirement

    from edgepack.device.catalog import tomllib  # tomli on 3.10

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    agent = [Requirement(r) for r in extras["agent"]]
    assert any(r.name == "securesystemslib" and "crypto" in r.extras for r in agent), agent
    wheel = build_edgepack_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    requires = [line.split(":", 1)[1].strip() for line in meta.decode().splitlines()
                if line.startswith("Requires-Dist:")]
    for fmt, names in DEVICE_EXTRAS.items():
        for extra in names:
            assert extra in extras, (fmt, extra)
            in_wheel = {_without_marker(r) for r in requires
                        if (m := Requirement(r).marker) is not None
                        and m.evaluate({"extra": extra})}
            assert in_wheel == {_without_marker(r) for r in extras[extra]}, (fmt, extra)


def test_a_profile_without_software_facts_is_refused_before_any_work(tmp_path):
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "nowhere"), "--device",
                                   "laptop-x86-16gb", "--runtime", "--out", str(tmp_path)])
    assert res.exit_code == 3, res.output
    assert "laptop-x86-16gb" in res.output and "[software]" in res.output


def test_a_host_library_is_not_an_arm_wheel(tmp_path):
    import llama_cpp

    lib = next((Path(llama_cpp.__file__).parent / "lib").glob("libllama*.so*"))
    whl = tmp_path / "fake-0-py3-none-linux_aarch64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(lib, "llama_cpp/lib/libllama.so")
    with pytest.raises(BuildError, match="not an AArch64 library"):
        check_aarch64_wheel(whl)


@pytest.mark.slow
def test_jetson_onnx_pack_is_cpu_only_listed_and_verified(tmp_path):
    """A real pack from PyPI for JetPack 6 (CPython 3.10, glibc 2.35), in a bundle written by
    the real bundle writer: every wheel in the manifest, CPU-only said in the manifest and by
    `inspect`, a damaged wheel caught by `verify`."""
    profile = load_profile("jetson-orin-nano-8gb")
    pack = build_runtime_pack(profile, "onnx", tmp_path / "cache")
    try:
        assert pack.info["python"] == "3.10" and pack.info["accelerator"] == "cpu-only"
        assert "CPU-ONLY" in pack.info["warning"] and pack.notes
        ort = [w for w in pack.info["wheels"] if w.startswith("onnxruntime-")]
        assert ort and "cp310" in ort[0] and "aarch64" in ort[0]
        src = make_bundle(tmp_path / "plain", 1, random_model(1000, 1))
        spec = json.loads((src / "manifest.json").read_text())
        from edgepack.bundle import BundleSpec

        bundle = write_bundle(BundleSpec(
            name="jetson", version=1, model_file=src / "model" / "model.gguf",
            model_name="m", model_format="onnx", model_kind="embedding", quant="int8",
            plan={}, server={"engine": {}}, source=spec["source"], device=spec["device"],
            engine={}, validation={}, runtime_files=pack.files, runtime=pack.info,
        ), tmp_path / "jetson")
    finally:
        pack.cleanup()
    m = verify_bundle(bundle)
    listed = {f["path"] for f in m["files"]}
    assert {"install.sh", "runtime/requirements.txt"} <= listed
    assert {f"runtime/wheels/{w}" for w in m["runtime"]["wheels"]} <= listed
    req = (bundle / "runtime" / "requirements.txt").read_text()
    assert "edgepack[serve,agent,onnx]==" in req and "--hash=sha256:" in req
    shown = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert shown.exit_code == 0 and "!!  CPU-ONLY RUNTIME" in shown.output
    wheel = bundle / "runtime" / "wheels" / ort[0]
    data = bytearray(wheel.read_bytes())
    data[-100] ^= 1
    wheel.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert res.exit_code == 6 and ort[0] in res.output
