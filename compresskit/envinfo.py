"""Describe the machine a measurement was taken on (CPU, ISA flags, library versions).

Latency numbers mean little without the CPU that produced them: INT8 only pays off where the
processor has integer dot-product instructions (x86 VNNI/AMX, ARM ``asimddp``/``i8mm``). This
module collects those facts for reports and stage records. It imports no torch (versions come
from package metadata) and records no host name or user name.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

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


def parse_cpuinfo(text: str, machine: str) -> dict:
    """Extract the CPU model name and the ISA flags of interest from /proc/cpuinfo text.

    x86 kernels list features on ``flags`` lines and name the CPU on ``model name``; ARM kernels
    use ``Features`` and often have no model name (a Raspberry Pi has ``Model``; otherwise the
    implementer/part ids are the best there is).
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        # The first logical CPU is representative; keep the first value of every key.
        fields.setdefault(key, value.strip())

    flags = set(fields.get("flags", "").split()) | set(fields.get("features", "").split())
    family = _arch_family(machine)
    wanted = X86_FLAGS if family == "x86" else ARM_FLAGS if family == "arm" else ()
    model = fields.get("model name") or fields.get("model") or fields.get("hardware")
    if not model and "cpu implementer" in fields:
        model = f"implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    return {
        "model": model or None,
        "isa": {flag: flag in flags for flag in wanted},
        "isa_flags": [flag for flag in wanted if flag in flags],
        "int8_dot": bool(flags & INT8_DOT_FLAGS),
    }


def _usable_cores() -> int | None:
    """CPUs this process may run on (the affinity mask), which a container can restrict."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def cpu_info() -> dict:
    """Model name, core counts, architecture and INT8-relevant ISA flags of this CPU.

    Works without /proc/cpuinfo (macOS, Windows): the flags are then unknown (empty) and the
    model falls back to ``platform.processor()``.
    """
    machine = platform.machine()
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    info = parse_cpuinfo(text, machine)
    if info["model"] is None:
        info["model"] = platform.processor() or None
    return {
        "model": info["model"],
        "architecture": machine,
        "logical_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "isa": info["isa"],
        "isa_flags": info["isa_flags"],
        "int8_dot": info["int8_dot"],
        "flags_source": "/proc/cpuinfo" if text else None,
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
