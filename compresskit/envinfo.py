"""Describe the machine a measurement was taken on (CPU, ISA flags, library versions).

Latency numbers mean little without the CPU that produced them: INT8 only pays off where the
processor has integer dot-product instructions (x86 VNNI/AMX, ARM ``asimddp``/``i8mm``). This
module collects those facts for reports and stage records, and turns them into a theoretical
peak (``peak_macs``) so a measured latency can be read as a fraction of what the hardware could
do. It imports no torch (versions come from package metadata) and records no host name or user
name.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Literal

# Distribution names whose versions matter for reproducing a run.
TRACKED_PACKAGES: tuple[str, ...] = (
    "compresskit",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "torch",
    "torchvision",
    "torch-pruning",
    "torchao",
    "pydantic",
)

# ISA flags worth reporting, per architecture family, as spelled in /proc/cpuinfo.
X86_FLAGS: tuple[str, ...] = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
)
ARM_FLAGS: tuple[str, ...] = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")

# Flags that give fast INT8 dot products (the reason INT8 can beat FP32 on a CPU).
INT8_DOT_FLAGS: frozenset[str] = frozenset(
    {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}
)

_CPUINFO = Path("/proc/cpuinfo")
# Highest frequency the kernel's cpufreq driver allows for CPU 0, in kHz (absent in many VMs).
_CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")


def library_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` that are present, read from package metadata.

    Uses ``importlib.metadata`` so nothing is imported: asking for torch's version never loads
    torch, which keeps the torch-free modules torch-free.
    """
    versions: dict[str, str] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _arch_family(machine: str) -> str:
    m = machine.lower()
    if m in {"x86_64", "amd64", "i386", "i686", "x86"}:
        return "x86"
    if m.startswith(("arm", "aarch64")):
        return "arm"
    return "other"


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """``key: value`` pairs of /proc/cpuinfo, lower-cased keys, first value of every key.

    The first logical CPU is representative (on hybrid big.LITTLE chips it may be a small core).
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def parse_cpuinfo(text: str, machine: str) -> dict:
    """Extract the CPU vendor, model name and the ISA flags of interest from /proc/cpuinfo text.

    x86 kernels list features on ``flags`` lines and name the CPU on ``model name`` (vendor on
    ``vendor_id``); ARM kernels use ``Features`` and often have no model name (a Raspberry Pi has
    ``Model``; otherwise the implementer/part ids are the best there is).
    """
    fields = _cpuinfo_fields(text)
    flags = set(fields.get("flags", "").split()) | set(fields.get("features", "").split())
    family = _arch_family(machine)
    wanted = X86_FLAGS if family == "x86" else ARM_FLAGS if family == "arm" else ()
    model = fields.get("model name") or fields.get("model") or fields.get("hardware")
    if not model and "cpu implementer" in fields:
        model = f"implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    return {
        "model": model or None,
        "vendor": fields.get("vendor_id") or None,
        "isa": {flag: flag in flags for flag in wanted},
        "isa_flags": [flag for flag in wanted if flag in flags],
        "int8_dot": bool(flags & INT8_DOT_FLAGS),
    }


def _usable_cores() -> int | None:
    """CPUs this process may run on (the affinity mask), which a container can restrict."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


CLOCK_CPUFREQ = "cpufreq max"
CLOCK_CPUINFO = "cpuinfo MHz (current, may be below turbo)"


def cpu_clock(
    cpufreq_max_path: str | os.PathLike | None = None,
    cpuinfo_path: str | os.PathLike | None = None,
) -> tuple[float | None, str | None]:
    """(clock in GHz, where it came from) for the peak estimate, or (None, None) if unknown.

    First choice is the cpufreq driver's ``cpuinfo_max_freq`` (kHz): the highest clock the
    kernel will run CPU 0 at, i.e. the single-core turbo, which all-core loads may not sustain.
    VMs and containers often lack cpufreq; then the ``cpu MHz`` line of /proc/cpuinfo is used,
    which is the clock at the moment of reading (a hypervisor reports the nominal clock) and may
    be below turbo, so a peak from it can be exceeded. ARM kernels print no ``cpu MHz``.
    """
    freq_text = _read_text(Path(cpufreq_max_path) if cpufreq_max_path else _CPUFREQ_MAX).strip()
    try:
        khz = float(freq_text)
    except ValueError:
        khz = 0.0
    if khz > 0 and math.isfinite(khz):
        return khz / 1e6, CLOCK_CPUFREQ
    fields = _cpuinfo_fields(_read_text(Path(cpuinfo_path) if cpuinfo_path else _CPUINFO))
    try:
        mhz = float(fields.get("cpu mhz", ""))
    except ValueError:
        mhz = 0.0
    if mhz > 0 and math.isfinite(mhz):
        return mhz / 1e3, CLOCK_CPUINFO
    return None, None


def cpu_info(
    cpuinfo_path: str | os.PathLike | None = None,
    cpufreq_max_path: str | os.PathLike | None = None,
) -> dict:
    """Model name, core counts, architecture, INT8-relevant ISA flags and clock of this CPU.

    Works without /proc/cpuinfo (macOS, Windows): the flags are then unknown (empty), the model
    falls back to ``platform.processor()`` and the clock is None. The paths are for tests.
    """
    machine = platform.machine()
    text = _read_text(Path(cpuinfo_path) if cpuinfo_path else _CPUINFO)
    info = parse_cpuinfo(text, machine)
    if info["model"] is None:
        info["model"] = platform.processor() or None
    clock_ghz, clock_source = cpu_clock(cpufreq_max_path, cpuinfo_path)
    return {
        "model": info["model"],
        "vendor": info["vendor"],
        "architecture": machine,
        "logical_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "isa": info["isa"],
        "isa_flags": info["isa_flags"],
        "int8_dot": info["int8_dot"],
        "flags_source": "/proc/cpuinfo" if text else None,
        "clock_ghz": clock_ghz,
        "clock_source": clock_source,
    }


# --------------------------------------------------------------------------- theoretical peak

Precision = Literal["int8", "fp32"]
PEAK_FORMULA = "peak GMAC/s = cores x clock GHz x MACs/cycle/core"

# (flag that enables the path, MACs per cycle per core, how that number is made), best first.
# A MAC is one multiply-accumulate; every row assumes two vector pipes issuing the instruction
# every cycle, as on Intel server cores since Skylake-SP and on Cortex-A76/Neoverse-class cores.
_INT8_RATES: dict[str, tuple[tuple[str, int, str], ...]] = {
    "x86": (
        ("avx512_vnni", 128, "AVX-512 VNNI: a 512-bit VPDPBUSD does 64 u8 x s8 MACs, 2 ports x 64"),
        ("avx_vnni", 64, "AVX-VNNI: a 256-bit VPDPBUSD does 32 u8 x s8 MACs, 2 ports x 32"),
        ("avx512bw", 64, "AVX-512BW without VNNI: VPMADDUBSW + VPMADDWD, 2 ports x 64 / 2"),
        ("avx2", 32, "AVX2 without VNNI: VPMADDUBSW + VPMADDWD (256-bit), 2 ports x 32 / 2"),
    ),
    "arm": (
        ("i8mm", 64, "Arm i8mm: SMMLA/UMMLA does 32 int8 MACs (2x8 by 8x2), 2 pipes x 32"),
        ("asimddp", 32, "Arm dot product: SDOT/UDOT on 128-bit NEON does 16 MACs, 2 pipes x 16"),
        ("asimd", 16, "NEON without dot product: widening SMLAL/UMLAL on 8 lanes, 2 pipes x 8"),
    ),
}
_FP32_RATES: dict[str, tuple[tuple[str, int, str], ...]] = {
    "x86": (
        ("avx512f", 32, "AVX-512 FMA: 16 fp32 lanes, 2 ports x 16"),
        ("fma", 16, "AVX2 FMA: 8 fp32 lanes, 2 ports x 8"),
    ),
    "arm": (("asimd", 8, "NEON FMA: 4 fp32 lanes, 2 pipes x 4"),),
}
_AVX512_PATHS = frozenset({"avx512_vnni", "avx512bw", "avx512f"})


def _is_amd(cpu: Mapping) -> bool:
    vendor = str(cpu.get("vendor") or "")
    return vendor == "AuthenticAMD" or "AMD" in str(cpu.get("model") or "")


def _cores(cpu: Mapping, threads: int) -> int | None:
    usable = cpu.get("usable_cores") or cpu.get("logical_cores")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = all usable cores), got {threads}")
    if threads == 0:
        return int(usable) if usable else None
    return min(threads, int(usable)) if usable else threads


def peak_macs(cpu: Mapping, precision: Precision, threads: int) -> dict:
    """Theoretical peak multiply-accumulates per second of ``threads`` cores of ``cpu``.

    ``cpu`` is a ``cpu_info()`` dict (``architecture``, ``isa_flags``, ``usable_cores``,
    ``clock_ghz``, ``clock_source``, ``model``/``vendor``). The peak is
    ``cores x clock GHz x MACs/cycle/core``, with MACs per cycle per core from the best
    instruction family the ISA flags offer (first match wins):

    int8, x86   AVX-512 VNNI: a 512-bit VPDPBUSD does 64 u8 x s8 MACs, 2 ports x 64    128
                AVX-VNNI: a 256-bit VPDPBUSD does 32 MACs, 2 ports x 32                  64
                AVX-512BW without VNNI: VPMADDUBSW + VPMADDWD, 2 ports x 64 / 2          64
                AVX2 without VNNI: VPMADDUBSW + VPMADDWD, 2 ports x 32 / 2               32
    int8, Arm   i8mm: SMMLA does 32 int8 MACs (2x8 by 8x2), 2 pipes x 32                 64
                dot product (asimddp): SDOT on 128-bit NEON does 16 MACs, 2 pipes x 16   32
                NEON only: widening SMLAL/UMLAL on 8 lanes, 2 pipes x 8                  16
    fp32, x86   AVX-512 FMA: 2 ports x 16 lanes                                          32
                AVX2 + FMA: 2 ports x 8 lanes                                            16
    fp32, Arm   NEON FMA: 2 pipes x 4 lanes                                               8

    Assumptions, stated so the figure can be judged: two vector ports/pipes per core issuing
    one such instruction per cycle (Intel Xeon parts with a single 512-bit FMA unit and small
    Arm cores have half); the clock of ``cpu["clock_ghz"]`` sustained on all cores (turbo
    drops with load and with AVX-512); ``cores`` counts logical CPUs, so SMT siblings sharing
    one core's vector units are counted twice. AMX (``amx_int8``) is not in the int8 peak:
    onnxruntime's CPU kernels do not use it for these models. MLAS (onnxruntime 1.31) has an AMX
    kernel only for its general u8s8 GEMM, which falls back to AVX-512 VNNI for small matrices,
    while QLinearConv with symmetric int8 weights (the quantizer's default) runs MLAS's
    symmetric-conv and depthwise kernels, written for AVX-512 VNNI/AVX2. An achieved fraction
    above 1 would be the sign that AMX did run. AMD Zen 4 executes 512-bit instructions as two
    256-bit halves, so on an AMD CPU with an AVX-512 path the MACs per cycle are halved (this
    also halves Zen 5 server/desktop parts that have full 512-bit pipes: the flags cannot tell
    them apart). SVE wider than 128 bits is not modelled. x86 CPUs without AVX2, and unknown
    architectures or flags, give an unknown peak.

    Returns ``macs_per_cycle_per_core``, ``clock_ghz``, ``clock_source``, ``cores`` (threads
    capped at the usable cores; 0 = all usable cores), ``peak_gmacs`` (None when the clock or
    the ISA is unknown), ``isa`` (the instruction family assumed), ``precision``, ``formula``
    and ``calculation`` (the formula with the numbers put in).
    """
    if precision not in ("int8", "fp32"):
        raise ValueError(f"precision must be 'int8' or 'fp32', got {precision!r}")
    family = _arch_family(str(cpu.get("architecture") or ""))
    flags = set(cpu.get("isa_flags") or ()) | {k for k, v in (cpu.get("isa") or {}).items() if v}
    table = (_INT8_RATES if precision == "int8" else _FP32_RATES).get(family, ())
    if precision == "fp32" and family == "x86" and "avx2" not in flags:
        table = tuple(row for row in table if row[0] != "fma")  # MLAS uses FMA3 only with AVX2
    match = next((row for row in table if row[0] in flags), None)
    macs = isa = None
    if match is not None:
        flag, macs, isa = match
        if flag in _AVX512_PATHS and _is_amd(cpu):
            macs //= 2
            isa += f"; halved to {macs}: AMD splits 512-bit ops into two 256-bit halves"
    clock = cpu.get("clock_ghz")
    cores = _cores(cpu, threads)
    peak = cores * clock * macs if cores and clock and macs else None
    calculation = (
        f"{cores} x {clock:.2f} GHz x {macs} = {peak:.1f} GMAC/s" if peak is not None else None
    )
    return {
        "precision": precision,
        "macs_per_cycle_per_core": macs,
        "clock_ghz": clock,
        "clock_source": cpu.get("clock_source") if clock else None,
        "cores": cores,
        "peak_gmacs": peak,
        "isa": isa,
        "formula": PEAK_FORMULA,
        "calculation": calculation,
    }


def _ort_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def environment() -> dict:
    """Everything a report needs to say where numbers were measured; no personal information.

    ``platform.platform()`` gives OS, kernel and libc but not the host name, unlike
    ``platform.uname()`` or ``platform.node()``, which are deliberately not used.
    """
    return {
        "cpu": cpu_info(),
        "os": platform.system(),
        "os_release": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": library_versions(),
        "onnxruntime_providers": _ort_providers(),
    }


def machine_key(threads: int) -> dict:
    """What a latency measured here depends on: CPU model, ISA flags, usable cores, the thread
    setting and the onnxruntime build. Stages that measure or choose by speed put it in their
    cache key, so results measured on one machine are never reused on another."""
    cpu = cpu_info()
    return {
        "cpu": cpu["model"],
        "architecture": cpu["architecture"],
        "isa_flags": sorted(cpu["isa_flags"] or []),
        "usable_cores": cpu["usable_cores"],
        "threads": threads,
        "onnxruntime": library_versions().get("onnxruntime"),
        "providers": _ort_providers(),
    }
