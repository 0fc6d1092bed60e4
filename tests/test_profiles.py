"""Device profiles: every shipped profile is valid and sourced; invalid ones are rejected
with messages that name the field; the CLI lists, shows and errors with exit code 3."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgepack.cli.main import cli
from edgepack.device.catalog import (
    list_profiles,
    parse_profile_toml,
    shipped_ids,
)
from edgepack.device.profile import (
    BANDWIDTH_DERATING,
    SOURCED_FIELDS,
    effective_bandwidth_gbps,
    flatten_profile,
    profile_digest,
    profile_to_toml,
)
from edgepack.device.resolve import load_profile
from edgepack.device.validation import parse_profile_dict
from edgepack.errors import ProfileError

REQUIRED_IDS = {
    "raspberry-pi-4-4gb", "raspberry-pi-4-8gb", "raspberry-pi-5-8gb", "raspberry-pi-5-16gb",
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "laptop-x86-16gb",
    "intel-n100-16gb",
}  # fmt: skip


def _pi5() -> dict[str, Any]:
    return copy.deepcopy(load_profile("raspberry-pi-5-8gb").to_dict())


def _reject(data: dict[str, Any]) -> str:
    with pytest.raises(ProfileError) as info:
        parse_profile_dict(data, origin="test.toml")
    text = info.value.render()
    assert "test.toml" in text
    return text


def test_shipped_profiles_validate_and_cover_the_required_devices():
    profiles = list_profiles()
    assert REQUIRED_IDS <= {p.id for p in profiles}
    assert [p.id for p in profiles] == sorted(p.id for p in profiles) == shipped_ids()
    for p in profiles:
        assert p.memory.usable_gib > 0
        assert p.cpu.threads >= p.cpu.cores > 0


def test_every_numeric_field_of_every_shipped_profile_has_a_source():
    for p in list_profiles():
        for key, value in flatten_profile(p).items():
            if key == "schema":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert p.sources.get(key, "").strip(), f"{p.id}: {key} has no source"
        for key in SOURCED_FIELDS:
            if key in flatten_profile(p):
                assert key in p.sources, f"{p.id}: {key}"


def test_isa_facts_of_the_cores():
    # Cortex-A72 is Armv8.0 (NEON only); A76 and A78AE are Armv8.2 with dotprod + fp16,
    # none has i8mm; the N100 has AVX2 and no AVX-512.
    by_id = {p.id: p for p in list_profiles()}
    assert by_id["raspberry-pi-4-8gb"].cpu.isa == ("neon",)
    for pid in ("raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb"):
        assert by_id[pid].cpu.has("dotprod") and by_id[pid].cpu.has("fp16")
        assert not by_id[pid].cpu.has("i8mm")
    n100 = by_id["intel-n100-16gb"].cpu
    assert n100.has("avx2") and not n100.has("avx512f")
    for pid in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"):
        acc = by_id[pid].accelerator
        assert (acc.kind, acc.compute_capability, acc.memory) == ("cuda", "8.7", "shared")


@pytest.mark.parametrize("pid", sorted(REQUIRED_IDS))
def test_toml_round_trip(pid):
    p = load_profile(pid)
    again = parse_profile_toml(profile_to_toml(p), origin="round-trip", expected_id=pid)
    assert again == p
    assert profile_digest(again) == profile_digest(p)


def test_digest_pins_the_figures():
    data = _pi5()
    digest = profile_digest(parse_profile_dict(data))
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    data["memory"]["bandwidth_gbps"] = 17.0
    assert profile_digest(parse_profile_dict(data)) != digest


def test_effective_bandwidth_prefers_the_measurement():
    assert effective_bandwidth_gbps(load_profile("raspberry-pi-5-8gb")) == 11.1
    nx = load_profile("jetson-orin-nx-16gb")
    assert nx.memory.measured_bandwidth_gbps is None
    assert effective_bandwidth_gbps(nx) == pytest.approx(102.4 * BANDWIDTH_DERATING)


def test_missing_field_is_named():
    data = _pi5()
    del data["memory"]["total_gib"]
    text = _reject(data)
    assert "memory.total_gib" in text and "missing" in text


@pytest.mark.parametrize("bad", ["4", 4.0, True, 0, -2])
def test_wrong_type_or_range_is_named(bad):
    data = _pi5()
    data["cpu"]["cores"] = bad
    assert "cpu.cores" in _reject(data)


def test_unknown_isa_flag_is_named():
    data = _pi5()
    data["cpu"]["isa"] = ["neon", "avx9"]
    text = _reject(data)
    assert "cpu.isa" in text and "avx9" in text


def test_x86_flag_on_an_arm_cpu_is_rejected():
    data = _pi5()
    data["cpu"]["isa"] = ["neon", "avx2"]
    assert "avx2" in _reject(data)


def test_usable_memory_must_be_positive():
    data = _pi5()
    data["memory"]["os_reserve_gib"] = 8.0
    assert "memory.os_reserve_gib" in _reject(data)


def test_cuda_needs_a_compute_capability():
    data = _pi5()
    data["accelerator"] = {"kind": "cuda", "memory": "shared"}
    text = _reject(data)
    assert "accelerator.compute_capability" in text and "missing" in text


def test_dedicated_gpu_memory_needs_its_size():
    data = _pi5()
    data["accelerator"] = {"kind": "cuda", "compute_capability": "8.9", "memory": "dedicated"}
    data["sources"]["accelerator.compute_capability"] = "datasheet"
    assert "accelerator.memory_gib" in _reject(data)


def test_unknown_field_and_unsourced_figure_and_source_typo():
    data = _pi5()
    data["memory"]["speed"] = 3
    assert "memory.speed" in _reject(data)
    data = _pi5()
    del data["sources"]["memory.bandwidth_gbps"]
    assert "sources.memory.bandwidth_gbps" in _reject(data)
    data = _pi5()
    data["sources"]["memory.bandwith_gbps"] = "typo"
    text = _reject(data)
    assert "memory.bandwith_gbps" in text and "memory.bandwidth_gbps" in text


def test_id_must_equal_the_file_name(tmp_path: Path):
    text = profile_to_toml(load_profile("raspberry-pi-5-8gb"))
    path = tmp_path / "my-pi.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = info.value.render()
    assert str(path) in message and "'id'" in message and "my-pi" in message
    path.write_text(text.replace('id = "raspberry-pi-5-8gb"', 'id = "my-pi"'), encoding="utf-8")
    assert load_profile(str(path)).id == "my-pi"


def test_toml_syntax_error_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.toml"
    path.write_text("schema = 1\nid = \n", encoding="utf-8")
    with pytest.raises(ProfileError, match="broken.toml"):
        load_profile(str(path))


def test_unknown_id_suggests_close_matches():
    with pytest.raises(ProfileError) as info:
        load_profile("raspberry-pi-5")
    assert "raspberry-pi-5-8gb" in info.value.render()
    assert "edgepack profiles list" in info.value.render()


def test_cli_show_unknown_exits_3_and_suggests_ids():
    result = CliRunner().invoke(cli, ["profiles", "show", "nope"])
    assert result.exit_code == 3
    assert "unknown device profile 'nope'" in result.output
    assert "raspberry-pi-5-8gb" in result.output


def test_cli_show_prints_sourced_figures():
    result = CliRunner().invoke(cli, ["profiles", "show", "raspberry-pi-5-8gb"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    i = lines.index("  memory.bandwidth_gbps = 17.07")
    assert lines[i + 1].strip().startswith("source: 4267 MT/s x 4 bytes")
    assert "memory.measured_bandwidth_gbps = 11.1" in result.output
    assert "https://github.com/raspberrypi/firmware/issues/1876" in result.output


def test_cli_show_json_is_the_profile_plus_derived_figures():
    result = CliRunner().invoke(cli, ["profiles", "show", "jetson-agx-orin-64gb", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    derived = data.pop("derived")
    assert parse_profile_dict(data) == load_profile("jetson-agx-orin-64gb")
    assert derived["usable_gib"] == 62.5
    assert derived["digest"] == profile_digest(load_profile("jetson-agx-orin-64gb"))


def test_cli_list_table_and_json():
    runner = CliRunner()
    table = runner.invoke(cli, ["profiles", "list"])
    assert table.exit_code == 0, table.output
    for pid in REQUIRED_IDS:
        assert pid in table.output
    listed = json.loads(runner.invoke(cli, ["profiles", "list", "--json"]).output)
    assert [p["id"] for p in listed["profiles"]] == shipped_ids()
    assert all("effective_bandwidth_gbps" in p["derived"] for p in listed["profiles"])


# The runtime pack picks wheels and the compiler target from these facts (issue #11).
@pytest.mark.parametrize(("pid", "target", "os_id", "python", "libc"), [
    ("raspberry-pi-4-4gb", "cortex-a72", "debian-12", "3.11", "glibc-2.36"),
    ("raspberry-pi-5-8gb", "cortex-a76", "debian-12", "3.11", "glibc-2.36"),
    ("jetson-orin-nano-8gb", "cortex-a78ae", "ubuntu-22.04", "3.10", "glibc-2.35"),
])
def test_device_software_facts(pid, target, os_id, python, libc):
    p = load_profile(pid)
    assert p.cpu.target == target
    assert p.software is not None
    assert (p.software.os, p.software.python, p.software.libc) == (os_id, python, libc)
    for field_name in ("cpu.target", "software.os", "software.python", "software.libc"):
        assert "https://" in p.sources[field_name]


def test_every_arm_profile_knows_its_software():
    for p in list_profiles():
        if p.cpu.arch == "aarch64":
            assert p.software is not None and p.cpu.target, p.id


@pytest.mark.parametrize(("field_name", "bad", "says"), [
    ("os", "Debian 12", "software.os"),
    ("python", "3", "software.python"),
    ("libc", "musl-1.2", "software.libc"),
])
def test_bad_software_facts_are_named(field_name, bad, says):
    data = _pi5()
    data["software"][field_name] = bad
    assert says in _reject(data)


def test_software_facts_need_sources_and_all_three():
    data = _pi5()
    del data["sources"]["software.libc"]
    assert "software.libc" in _reject(data)
    data = _pi5()
    del data["software"]["python"]
    assert "software.python" in _reject(data)
    data = _pi5()
    data["cpu"]["target"] = "Cortex A76"
    assert "cpu.target" in _reject(data)
