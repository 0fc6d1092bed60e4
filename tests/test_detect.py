"""``profiles detect``: flag parsing on stored cpuinfo texts, board matching, and a real
detection of the machine the tests run on.

tests/data/cpuinfo/ holds /proc/cpuinfo texts: raspberry-pi-4.txt and raspberry-pi-5.txt are
the 64-bit Raspberry Pi OS format with the boards' real Features lines (serial numbers zeroed);
x86-avx512-epyc.txt is the first two CPUs of the AMD EPYC (Zen 4) VM edgepack was built on;
jetson-orin-nano.txt is a FAKE for the Jetson path (Cortex-A78AE part number and its Features
line), because no Jetson can run here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from edgepack.cli.main import cli
from edgepack.device.detect import (
    GIB,
    HostFacts,
    build_profile,
    measure_bandwidth,
    normalise_arch,
    parse_cpuinfo,
)
from edgepack.device.profile import X86_ISA, SoftwareSpec
from edgepack.device.resolve import load_profile
from edgepack.device.software import software_facts
from edgepack.device.validation import parse_profile_dict
from edgepack.errors import ProfileError, UsageError

DATA = Path(__file__).parent / "data" / "cpuinfo"
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def test_pi4_flags_are_neon_only():
    info = parse_cpuinfo(_text("raspberry-pi-4.txt"), "aarch64")
    assert info.isa == ("neon",)
    assert info.model == "4x Cortex-A72"


def test_pi5_flags_have_dotprod_and_fp16_but_no_i8mm():
    info = parse_cpuinfo(_text("raspberry-pi-5.txt"), "aarch64")
    assert info.isa == ("neon", "fp16", "dotprod")
    assert info.model == "4x Cortex-A76"


def test_x86_avx512_flags():
    info = parse_cpuinfo(_text("x86-avx512-epyc.txt"), "x86_64")
    assert {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"} <= set(info.isa)
    assert "avx_vnni" not in info.isa and "amx" not in info.isa
    assert info.model == "AMD EPYC"
    assert info.mhz == pytest.approx(2596.142)


def test_flags_are_the_intersection_over_cores():
    # A big.LITTLE system where one core lacks asimddp must not claim dotprod.
    a = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0b\n"
    b = "processor\t: 1\nFeatures\t: fp asimd\nCPU part\t: 0xd05\n"
    info = parse_cpuinfo(a + "\n" + b, "aarch64")
    assert info.isa == ("neon",)
    assert info.model == "1x Cortex-A76 + 1x Cortex-A55"


def test_unsupported_arch_is_a_profile_error():
    assert normalise_arch("AMD64") == "x86_64"
    with pytest.raises(ProfileError, match="armv7l"):
        normalise_arch("armv7l")


# /etc/os-release of Raspberry Pi OS Bookworm (64-bit) and of JetPack 6 (Ubuntu 22.04).
PI_OS_RELEASE = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""
JETPACK6_OS_RELEASE = """PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
ID=ubuntu
ID_LIKE=debian
"""


def _pi5_facts(total_gib: float = 7.86, **software: str | None) -> HostFacts:
    return HostFacts(
        hostname="pi5", arch="aarch64", cpuinfo=_text("raspberry-pi-5.txt"),
        total_bytes=int(total_gib * GIB), available_bytes=int((total_gib - 0.5) * GIB),
        physical_cores=4, logical_cpus=4, max_mhz=2400.0,
        device_tree_model="Raspberry Pi 5 Model B Rev 1.0", storage_kind="microsd",
        **software,  # type: ignore[arg-type]
    )  # fmt: skip


def test_software_comes_from_os_release_python_and_glibc():
    spec, sources = software_facts(PI_OS_RELEASE, "3.11", "glibc 2.36", "stamp")
    assert spec == SoftwareSpec(os="debian-12", python="3.11", libc="glibc-2.36")
    assert "ID=debian VERSION_ID=12" in sources["software.os"]
    assert "'glibc 2.36'" in sources["software.libc"] and sources["software.python"]
    spec, _ = software_facts(JETPACK6_OS_RELEASE, "3.10", "glibc 2.35", "stamp")
    assert spec == SoftwareSpec(os="ubuntu-22.04", python="3.10", libc="glibc-2.35")


@pytest.mark.parametrize("os_release, python, libc", [
    ("ID=debian\nPRETTY_NAME=\"Debian GNU/Linux trixie/sid\"\n", "3.13", "glibc 2.41"),  # sid
    (PI_OS_RELEASE, "3.11", None),  # musl: confstr has no answer, libc_ver() none
    (PI_OS_RELEASE, "3.11", "musl 1.2.4"),
    (None, "3.11", "glibc 2.36"),  # no os-release at all
])  # fmt: skip
def test_software_is_left_out_whole_when_a_fact_is_unknown(os_release, python, libc):
    assert software_facts(os_release, python, libc, "stamp") == (None, {})
    p = build_profile(_pi5_facts(os_release=os_release, python=python, libc=libc), now=WHEN)
    assert p.software is None and not any(k.startswith("software.") for k in p.sources)


def test_a_detected_pi5_says_what_it_runs_and_round_trips():
    facts = _pi5_facts(os_release=PI_OS_RELEASE, python="3.11", libc="glibc 2.36")
    p = build_profile(facts, now=WHEN)
    assert p.software == SoftwareSpec(os="debian-12", python="3.11", libc="glibc-2.36")
    assert p.software.glibc == (2, 36)
    assert "detected on pi5 at 2025-01-02T03:04:05Z" in p.sources["software.os"]
    data = p.to_dict()
    assert data["software"] == {"os": "debian-12", "python": "3.11", "libc": "glibc-2.36"}
    assert parse_profile_dict(data, origin="round trip") == p


def test_a_pi5_reuses_the_shipped_pi5_figures():
    p = build_profile(_pi5_facts(), now=WHEN)
    assert p.device_class == "sbc"
    assert p.cpu.isa == ("neon", "fp16", "dotprod")
    assert p.memory.bandwidth_gbps == 17.07
    assert p.memory.measured_bandwidth_gbps == 11.1
    assert p.memory.os_reserve_gib == pytest.approx(0.5, abs=0.001)
    assert p.cpu.peak_gflops_fp32 == 153.6
    assert "raspberry-pi-5-8gb" in p.sources["memory.bandwidth_gbps"]
    assert "detected on pi5 at 2025-01-02T03:04:05Z" in p.sources["memory.total_gib"]


def test_a_4gb_pi5_does_not_borrow_the_8gb_measurement():
    p = build_profile(_pi5_facts(total_gib=3.9), now=WHEN)
    assert p.memory.bandwidth_gbps == 17.07
    assert p.memory.measured_bandwidth_gbps is None


def test_fake_jetson_orin_nano_gets_cuda_from_the_shipped_profile():
    # FAKE: the facts of a Jetson Orin Nano, which cannot run here.
    facts = HostFacts(
        hostname="orin", arch="aarch64", cpuinfo=_text("jetson-orin-nano.txt"),
        total_bytes=int(7.4 * GIB), available_bytes=int(5.9 * GIB), physical_cores=6,
        logical_cpus=6, max_mhz=1510.0,
        device_tree_model="NVIDIA Jetson Orin Nano Developer Kit",
        tegra_release="# R36 (release), REVISION: 4.0", storage_kind="unknown",
    )  # fmt: skip
    p = build_profile(facts, now=WHEN)
    assert p.device_class == "jetson"
    assert (p.accelerator.kind, p.accelerator.compute_capability) == ("cuda", "8.7")
    assert p.cpu.model.endswith("6x Cortex-A78AE")
    assert p.storage.kind == "microsd"  # root device not classified: the dev kit's default


def test_fake_unknown_jetson_is_cpu_only_and_says_why():
    facts = HostFacts(
        hostname="xavier", arch="aarch64", cpuinfo=_text("jetson-orin-nano.txt"),
        total_bytes=16 * GIB, available_bytes=14 * GIB, physical_cores=6, logical_cpus=6,
        device_tree_model="NVIDIA Jetson Xavier NX Developer Kit",
        tegra_release="# R32 (release), REVISION: 7.1",
    )  # fmt: skip
    p = build_profile(facts, now=WHEN)
    assert p.accelerator.kind == "none"
    assert "matches no shipped profile" in p.sources["accelerator.kind"]
    assert p.memory.bandwidth_gbps == 12.8  # the documented default, not a guess


def test_detect_json_matches_this_machine():
    result = CliRunner().invoke(cli, ["profiles", "detect", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    total = psutil.virtual_memory().total / GIB
    assert data["memory"]["total_gib"] == pytest.approx(total, rel=0.01)
    assert data["cpu"]["threads"] == psutil.cpu_count(logical=True)
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    if data["cpu"]["arch"] == "x86_64":
        flags = set(
            next(ln for ln in cpuinfo.splitlines() if ln.startswith("flags")).split(":")[1].split()
        )
        expected = [f for f in X86_ISA if (f if f != "amx" else "amx_tile") in flags]
    else:
        flags = set(
            next(ln for ln in cpuinfo.splitlines() if ln.startswith("Features"))
            .split(":")[1]
            .split()
        )
        arm = {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2"}
        expected = [f for f, k in arm.items() if k in flags]
        if "asimdhp" in flags or "fphp" in flags:
            expected.insert(1, "fp16")
    assert data["cpu"]["isa"] == expected
    assert "detected on" in data["sources"]["memory.total_gib"]
    release = dict(
        ln.split("=", 1) for ln in Path("/etc/os-release").read_text().splitlines() if "=" in ln
    )
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    assert data["software"] == {
        "os": f"{release['ID']}-{release['VERSION_ID'].strip(chr(34))}",
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "libc": "glibc-" + ".".join(libc.split()[1].split(".")[:2]),
    }
    assert all(f"software.{k}" in data["sources"] for k in ("os", "python", "libc"))


def test_detect_save_round_trips_through_load_profile(tmp_path: Path):
    path = tmp_path / "lab-box.toml"
    result = CliRunner().invoke(cli, ["profiles", "detect", "--json", "--save", str(path)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    printed.pop("derived")
    loaded = load_profile(str(path))
    assert loaded.id == "lab-box"
    assert loaded.to_dict() == printed
    shown = CliRunner().invoke(cli, ["profiles", "show", str(path)])
    assert shown.exit_code == 0 and "lab-box" in shown.output


def test_detect_save_rejects_a_name_that_cannot_be_an_id(tmp_path: Path):
    result = CliRunner().invoke(
        cli, ["profiles", "detect", "--save", str(tmp_path / "Lab Box.toml")]
    )
    assert result.exit_code == 2
    assert "Lab Box.toml" in result.output


def test_measure_bandwidth_returns_a_positive_figure():
    gbps = measure_bandwidth(seconds=0.2, size_bytes=32 * 1024 * 1024)
    assert gbps > 0
    with pytest.raises(UsageError):
        measure_bandwidth(seconds=0)


def test_local_ref_detects_this_machine():
    p = load_profile("local")
    assert p.id == "local" and p.memory.usable_gib > 0


def test_local_ref_measures_bandwidth_once_and_caches_it(tmp_path, monkeypatch):
    import json

    from edgepack.device.profile import effective_bandwidth_gbps

    monkeypatch.setenv("EDGEPACK_HOME", str(tmp_path))
    first = load_profile("local")
    if first.memory.measured_bandwidth_gbps is None:  # pragma: no cover - a Pi with a profile
        pytest.skip("a shipped profile of this board carries a published measurement")
    assert first.memory.measured_bandwidth_gbps > 0
    if (tmp_path / "bandwidth.json").exists():
        (entry,) = json.loads((tmp_path / "bandwidth.json").read_text()).values()
        assert first.memory.measured_bandwidth_gbps == round(entry["value"], 2)
    assert effective_bandwidth_gbps(first) == first.memory.measured_bandwidth_gbps
    assert "measured now" in first.sources["memory.measured_bandwidth_gbps"]
    second = load_profile("local")
    if "while busy" in first.sources["memory.measured_bandwidth_gbps"]:
        # other jobs held the CPUs: the figure was used once and not stored
        assert not (tmp_path / "bandwidth.json").exists()
        assert "measured now" in second.sources["memory.measured_bandwidth_gbps"]
        return
    assert second.memory.measured_bandwidth_gbps == first.memory.measured_bandwidth_gbps
    assert "cached in" in second.sources["memory.measured_bandwidth_gbps"]


def test_local_ref_measures_decode_compute_once_and_caches_it(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("EDGEPACK_HOME", str(tmp_path))
    first = load_profile("local")
    source = first.sources["cpu.measured_decode_gflops"]
    assert first.cpu.measured_decode_gflops > 0, source
    assert "measured now with llama-cpp-python" in source
    second = load_profile("local")
    if "while busy" in source:
        # other jobs held the CPUs: the figure was used once and not stored
        assert not (tmp_path / "compute.json").exists()
        assert "measured now" in second.sources["cpu.measured_decode_gflops"]
        return
    (entry,) = json.loads((tmp_path / "compute.json").read_text()).values()
    stored = entry["value"][str(first.cpu.cores)]
    assert stored["gflops"] == first.cpu.measured_decode_gflops
    assert (stored["low"], stored["high"]) == first.cpu.measured_decode_gflops_range
    assert stored["prompt"]["gflops"] == first.cpu.measured_prompt_gflops
    assert second.cpu == first.cpu  # the stored figures, not a second measurement
    assert "cached in" in second.sources["cpu.measured_decode_gflops"]


def test_bandwidth_cache_expires_and_is_keyed_by_machine(tmp_path):
    from edgepack.device.detect import gather_host_facts
    from edgepack.device.measure_cache import MAX_AGE_SECONDS, cached_bandwidth

    env = {"EDGEPACK_HOME": str(tmp_path)}
    facts = gather_host_facts()
    calls = []

    def measure(seconds):  # records calls; the real measurement is tested above
        calls.append(seconds)
        return 10.0 + len(calls)

    def bw(f, now, busy=None):
        return cached_bandwidth(f, measure, environ=env, now=now, busy=lambda: busy)

    assert bw(facts, 1000.0) == (11.0, "measured now (2 s copy test)")
    assert bw(facts, 2000.0)[0] == 11.0 and "cached in" in bw(facts, 2000.0)[1]
    assert bw(facts, 1001.0 + MAX_AGE_SECONDS)[0] == 12.0
    other = dataclasses.replace(facts, total_bytes=facts.total_bytes * 2)
    assert bw(other, 2000.0 + MAX_AGE_SECONDS)[0] == 13.0
    (tmp_path / "bandwidth.json").write_text("not json")
    assert bw(facts, 0.0)[0] == 14.0
    # measured while other jobs hold the CPUs: used once, not stored
    value, how = bw(facts, 10 * MAX_AGE_SECONDS, busy="load average 9.0 on 2 CPUs")
    assert value == 15.0 and "while busy (load average 9.0 on 2 CPUs): not cached" in how
    assert bw(facts, 10 * MAX_AGE_SECONDS)[0] == 16.0
