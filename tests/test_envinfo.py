"""Tests of the theoretical peak (envinfo.peak_macs) and the clock it uses, on hand-made CPUs."""

from __future__ import annotations

import pytest

from compresskit import envinfo

INTEL_SPR = {
    "model": "Intel(R) Xeon(R) Platinum 8480+",
    "vendor": "GenuineIntel",
    "architecture": "x86_64",
    "usable_cores": 4,
    "logical_cores": 8,
    "isa_flags": ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"],
    "clock_ghz": 3.0,
    "clock_source": envinfo.CLOCK_CPUFREQ,
}
AMD_GENOA = {
    "model": "AMD EPYC 9654 96-Core Processor",
    "vendor": "AuthenticAMD",
    "architecture": "x86_64",
    "usable_cores": 2,
    "isa_flags": ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"],
    "clock_ghz": 2.5,
    "clock_source": envinfo.CLOCK_CPUINFO,
}
AVX2_ONLY = {
    "model": "Intel(R) Core(TM) i7-4770",
    "architecture": "x86_64",
    "usable_cores": 4,
    "isa_flags": ["avx2", "fma"],
    "clock_ghz": 3.5,
    "clock_source": envinfo.CLOCK_CPUFREQ,
}
ALDER_LAKE = {**AVX2_ONLY, "model": "12th Gen Intel(R) Core(TM) i7-12700", "isa_flags": ["avx2", "fma", "avx_vnni"]}
PI5 = {
    "model": "implementer 0x41 part 0xd0b",
    "architecture": "aarch64",
    "usable_cores": 4,
    "isa_flags": ["asimd", "asimddp"],
    "clock_ghz": 2.4,
    "clock_source": envinfo.CLOCK_CPUFREQ,
}
GRAVITON3 = {**PI5, "isa_flags": ["asimd", "asimddp", "i8mm", "sve", "bf16"], "clock_ghz": 2.6}
PI4 = {**PI5, "isa_flags": ["asimd"], "clock_ghz": 1.8}


@pytest.mark.parametrize(
    ("cpu", "precision", "macs", "isa_word"),
    [
        (INTEL_SPR, "int8", 128, "AVX-512 VNNI"),
        (INTEL_SPR, "fp32", 32, "AVX-512 FMA"),
        (AMD_GENOA, "int8", 64, "AVX-512 VNNI"),
        (AMD_GENOA, "fp32", 16, "AVX-512 FMA"),
        (AVX2_ONLY, "int8", 32, "AVX2 without VNNI"),
        (AVX2_ONLY, "fp32", 16, "AVX2 FMA"),
        (ALDER_LAKE, "int8", 64, "AVX-VNNI"),
        (PI5, "int8", 32, "dot product"),
        (PI5, "fp32", 8, "NEON FMA"),
        (GRAVITON3, "int8", 64, "i8mm"),
        (PI4, "int8", 16, "NEON without dot product"),
    ],
)
def test_peak_table(cpu, precision, macs, isa_word):
    peak = envinfo.peak_macs(cpu, precision, 1)
    assert peak["macs_per_cycle_per_core"] == macs
    assert isa_word in peak["isa"]
    assert peak["cores"] == 1
    assert peak["clock_ghz"] == cpu["clock_ghz"] and peak["clock_source"] == cpu["clock_source"]
    assert peak["peak_gmacs"] == pytest.approx(cpu["clock_ghz"] * macs)
    assert peak["precision"] == precision
    assert peak["formula"] == "peak GMAC/s = cores x clock GHz x MACs/cycle/core"
    assert peak["calculation"].endswith(f"x {macs} = {cpu['clock_ghz'] * macs:.1f} GMAC/s")


def test_amd_avx512_is_halved_and_says_so():
    amd = envinfo.peak_macs(AMD_GENOA, "int8", 2)
    assert amd["macs_per_cycle_per_core"] == 64
    assert "halved" in amd["isa"] and "256-bit" in amd["isa"]
    assert amd["peak_gmacs"] == pytest.approx(2 * 2.5 * 64)
    # The vendor alone is enough, and an AMD CPU without AVX-512 (Zen 3) is not halved.
    by_vendor = {**AMD_GENOA, "model": "EPYC (virtual)"}
    assert envinfo.peak_macs(by_vendor, "int8", 1)["macs_per_cycle_per_core"] == 64
    zen3 = {**AMD_GENOA, "isa_flags": ["avx2", "fma"]}
    assert envinfo.peak_macs(zen3, "int8", 1)["macs_per_cycle_per_core"] == 32
    assert "halved" not in envinfo.peak_macs(zen3, "fp32", 1)["isa"]


def test_amx_is_not_in_the_int8_peak():
    no_amx = {**INTEL_SPR, "isa_flags": [f for f in INTEL_SPR["isa_flags"] if not f.startswith("amx")]}
    assert envinfo.peak_macs(INTEL_SPR, "int8", 1) == envinfo.peak_macs(no_amx, "int8", 1)


def test_cores_follow_threads_capped_at_usable():
    assert envinfo.peak_macs(INTEL_SPR, "int8", 2)["cores"] == 2
    assert envinfo.peak_macs(INTEL_SPR, "int8", 16)["cores"] == 4  # only 4 usable
    everything = envinfo.peak_macs(INTEL_SPR, "fp32", 0)
    assert everything["cores"] == 4
    assert everything["peak_gmacs"] == pytest.approx(4 * 3.0 * 32)
    with pytest.raises(ValueError, match="threads"):
        envinfo.peak_macs(INTEL_SPR, "int8", -1)
    with pytest.raises(ValueError, match="precision"):
        envinfo.peak_macs(INTEL_SPR, "int4", 1)


def test_unknown_clock_or_isa_gives_no_peak():
    no_clock = envinfo.peak_macs({**INTEL_SPR, "clock_ghz": None, "clock_source": None}, "int8", 1)
    assert no_clock["macs_per_cycle_per_core"] == 128
    assert no_clock["clock_ghz"] is None and no_clock["clock_source"] is None
    assert no_clock["peak_gmacs"] is None and no_clock["calculation"] is None
    no_flags = envinfo.peak_macs({**INTEL_SPR, "isa_flags": []}, "int8", 1)
    assert no_flags["macs_per_cycle_per_core"] is None and no_flags["isa"] is None
    assert no_flags["peak_gmacs"] is None
    riscv = envinfo.peak_macs({**PI5, "architecture": "riscv64"}, "fp32", 1)
    assert riscv["peak_gmacs"] is None


def test_flags_from_the_isa_dict_count_too():
    """A cpu_info dict has both 'isa' (flag -> bool) and 'isa_flags'; either is enough."""
    cpu = {**PI5, "isa_flags": [], "isa": {"asimd": True, "asimddp": True, "i8mm": False}}
    assert envinfo.peak_macs(cpu, "int8", 1)["macs_per_cycle_per_core"] == 32


# --------------------------------------------------------------------------- clock

X86_TEXT = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.152\n"
ARM_TEXT = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"


def test_clock_prefers_cpufreq_max(tmp_path):
    freq = tmp_path / "cpuinfo_max_freq"
    freq.write_text("3500000\n")  # kHz
    info = tmp_path / "cpuinfo"
    info.write_text(X86_TEXT)
    assert envinfo.cpu_clock(freq, info) == (pytest.approx(3.5), "cpufreq max")


def test_clock_falls_back_to_cpuinfo_mhz(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(X86_TEXT)
    ghz, source = envinfo.cpu_clock(tmp_path / "missing", info)
    assert ghz == pytest.approx(2.596152)
    assert source == "cpuinfo MHz (current, may be below turbo)"
    junk = tmp_path / "junk_freq"
    junk.write_text("unknown\n")
    assert envinfo.cpu_clock(junk, info)[1] == envinfo.CLOCK_CPUINFO


def test_clock_unknown(tmp_path):
    arm = tmp_path / "cpuinfo"
    arm.write_text(ARM_TEXT)  # ARM kernels print no cpu MHz
    assert envinfo.cpu_clock(tmp_path / "missing", arm) == (None, None)
    assert envinfo.cpu_clock(tmp_path / "missing", tmp_path / "also_missing") == (None, None)


def test_cpu_info_reads_injected_files(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(X86_TEXT)
    freq = tmp_path / "cpuinfo_max_freq"
    freq.write_text("3700000\n")
    cpu = envinfo.cpu_info(cpuinfo_path=info, cpufreq_max_path=freq)
    assert cpu["clock_ghz"] == pytest.approx(3.7) and cpu["clock_source"] == "cpufreq max"
    assert cpu["flags_source"] == "/proc/cpuinfo"
    cpu = envinfo.cpu_info(cpuinfo_path=info, cpufreq_max_path=tmp_path / "missing")
    assert cpu["clock_ghz"] == pytest.approx(2.596152)
    assert cpu["clock_source"] == envinfo.CLOCK_CPUINFO
    nothing = envinfo.cpu_info(cpuinfo_path=tmp_path / "none", cpufreq_max_path=tmp_path / "none")
    assert nothing["clock_ghz"] is None and nothing["flags_source"] is None
    assert envinfo.peak_macs(nothing, "fp32", 1)["peak_gmacs"] is None


def test_parse_cpuinfo_vendor():
    assert envinfo.parse_cpuinfo(X86_TEXT, "x86_64")["vendor"] == "AuthenticAMD"
    assert envinfo.parse_cpuinfo(ARM_TEXT, "aarch64")["vendor"] is None
