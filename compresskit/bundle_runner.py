#!/usr/bin/env python3
"""Standalone benchmark of a compresskit device bundle: latency, accuracy, memory and the device.

This file is copied into every bundle as ``bench.py`` and runs on the device itself (a Raspberry
Pi, an x86 box) with nothing but Python 3.9+, numpy and onnxruntime:

    python3 bench.py --json result.json
    python3 bench.py --model ptq --batch-sizes 1,8 --threads 1,0 --max-seconds 5 --json result.json

For every model (by default every model listed in the bundle's ``bundle.json``) and every
(thread count x batch size): warm-up runs, then timed ``InferenceSession.run`` calls until
``--max-seconds`` have passed (at least ``--min-runs``), summarised as p50/p90/p99. Accuracy is
measured on ``samples.npz`` (x: preprocessed float32 NCHW, y: labels) and the argmax predictions
are compared with the ones the host computed when it made the bundle. The result is one JSON
document, schema ``compresskit.device-result`` version 1, that ``compresskit report RUN
--add-device result.json`` merges into the run's report.

It must import only numpy, onnxruntime and the standard library (no compresskit, no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULT_SCHEMA = "compresskit.device-result"
RESULT_SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
SAMPLES = "samples.npz"
REF_PREFIX = "ref_pred__"  # samples.npz arrays with the host's argmax predictions per model

X86_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")

# /proc/cpuinfo "CPU part" of cores by Arm Ltd (implementer 0x41).
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2", "0xd4b": "Cortex-A78C", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720", "0xd82": "Cortex-X4",
}


class UsageError(Exception):
    """Bad arguments or files: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- the device


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cpuinfo_fields(text: str) -> dict:
    fields: dict = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _family(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    if m.startswith(("arm", "aarch64")):
        return "arm"
    return "other"


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _clock_ghz(fields: dict):
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    try:
        if float(khz) > 0:
            return float(khz) / 1e6, "cpufreq max"
    except ValueError:
        pass
    try:
        mhz = float(fields.get("cpu mhz", ""))
        if mhz > 0:
            return mhz / 1e3, "cpuinfo MHz (current, may be below turbo)"
    except ValueError:
        pass
    return None, None


def short_name(board, cpu_model, machine: str) -> str:
    """A short device name for report rows (``ptq@rpi5``): the Raspberry Pi generation, else
    the CPU model made into a slug, else the machine architecture."""
    if board:
        m = re.search(r"Raspberry Pi (Zero ?2|Compute Module (\d+)|(\d+))", board)
        if m:
            if m.group(2):
                return f"rpicm{m.group(2)}"
            if m.group(3):
                return f"rpi{m.group(3)}"
            return "rpizero2"
    text = cpu_model or ""
    text = re.sub(r"\((R|TM|tm|r)\)|@.*$|\bCPU\b|\bProcessor\b|\d+-Core", " ", text)
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if slug:
        return slug[:32].rstrip("-")
    return re.sub(r"[^a-z0-9_]+", "-", machine.lower()) or "device"


def device_info(device_name=None, cpuinfo_text=None, board_text=None, machine=None) -> dict:
    """CPU model, board, cores, ISA flags, clock, OS and Python of this machine (no host name,
    no user name). The text arguments replace /proc/cpuinfo and /proc/device-tree/model (tests)."""
    machine = machine or platform.machine()
    text = _read("/proc/cpuinfo") if cpuinfo_text is None else cpuinfo_text
    fields = _cpuinfo_fields(text)
    family = _family(machine)
    flags = set(fields.get("flags", "").split()) | set(fields.get("features", "").split())
    wanted = X86_FLAGS if family == "x86" else ARM_FLAGS if family == "arm" else ()
    board = (_read("/proc/device-tree/model") if board_text is None else board_text).strip("\x00 \n")
    board = board or fields.get("model") or None
    if board and board.isdigit():  # x86 cpuinfo has "model : 17", a number, not a board
        board = None
    cpu_model = fields.get("model name")
    part = fields.get("cpu part")
    if not cpu_model and part:
        implementer = fields.get("cpu implementer", "?")
        core = ARM_PARTS.get(part.lower()) if implementer.lower() == "0x41" else None
        cpu_model = core or f"implementer {implementer} part {part}"
    if not cpu_model:
        cpu_model = fields.get("hardware") or platform.processor() or None
    clock, clock_source = _clock_ghz(fields)
    isa = {flag: flag in flags for flag in wanted}
    return {
        "name": device_name or short_name(board, cpu_model, machine),
        "name_source": "--device-name" if device_name else "derived",
        "board": board,
        "cpu": {
            "model": cpu_model,
            "vendor": fields.get("vendor_id") or None,
            "hardware": fields.get("hardware") or None,
            "cpu_part": part,
            "architecture": machine,
            "logical_cores": os.cpu_count(),
            "usable_cores": usable_cores(),
            "isa": isa,
            "isa_flags": [f for f in wanted if f in flags],
            "int8_dot": bool(flags & set(INT8_DOT_FLAGS)),
            "amx": bool(flags & {"amx_tile", "amx_int8"}),
            "flags_source": "/proc/cpuinfo" if text else None,
            "clock_ghz": clock,
            "clock_source": clock_source,
            "processor": platform.processor() or None,
        },
        "os": platform.system(),
        "os_release": platform.release(),
        "platform": platform.platform(),
        "machine": machine,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }


def _busy_jiffies():
    """Total non-idle CPU time of the machine in seconds from /proc/stat (None elsewhere)."""
    line = _read("/proc/stat").split("\n", 1)[0].split()
    if not line or line[0] != "cpu":
        return None
    v = [int(x) for x in line[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(v[:8]) - idle) / hz


class QuietCheck:
    """Other processes' CPU time while we measure: latency taken on a busy machine is wrong, not
    noisy. ``other_cores_busy`` is that time over the wall time (0.5 = half a core was busy)."""

    def __init__(self):
        self.busy0, self.own0, self.t0 = _busy_jiffies(), sum(os.times()[:4]), time.perf_counter()
        self.load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def done(self) -> dict:
        busy1, own1, wall = _busy_jiffies(), sum(os.times()[:4]), time.perf_counter() - self.t0
        other = None if self.busy0 is None or busy1 is None else max(0.0, (busy1 - self.busy0) - (own1 - self.own0))
        return {"wall_s": wall, "other_cpu_s": other,
                "other_cores_busy": None if other is None or wall <= 0 else other / wall,
                "loadavg_1min_before": self.load0,
                "loadavg_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def peak_rss_mib():
    """Peak resident memory of this process so far (getrusage maxrss), MiB; None where the
    resource module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------- models and data


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not readable as JSON ({err})") from None


def select_models(bundle: Path, manifest: dict, wanted) -> list:
    """[(name, path)]: the manifest's models (all by default), or those named in ``wanted``
    (manifest names or file paths)."""
    listed = [(m["name"], bundle / m["file"]) for m in manifest.get("models", [])]
    if not listed:
        listed = [(p.stem, p) for p in sorted(bundle.glob("*.onnx"))]
    if not wanted:
        if not listed:
            raise UsageError(f"no models in {bundle}: pass --model FILE.onnx")
        return listed
    by_name = dict(listed)
    for m in manifest.get("models", []):
        if m.get("ort_file"):
            by_name.setdefault(m["name"] + ".ort", bundle / m["ort_file"])
    out = []
    for item in wanted:
        if item in by_name:
            out.append((item, by_name[item]))
            continue
        path = Path(item)
        if not path.is_file() and (bundle / item).is_file():
            path = bundle / item
        if not path.is_file():
            raise UsageError(f"--model {item}: no such model in the bundle ({', '.join(by_name) or 'none'}) "
                             "and no such file")
        name = next((n for n, p in listed if p.resolve() == path.resolve()), None)
        out.append((name or (path.stem if path.suffix == ".onnx" else path.name), path))
    return out


def load_samples(path):
    import numpy as np

    if path is None or not Path(path).is_file():
        return None
    with np.load(path) as npz:
        if "x" not in npz or "y" not in npz:
            raise UsageError(f"{path}: needs arrays 'x' and 'y'")
        refs = {k[len(REF_PREFIX):]: npz[k] for k in npz.files if k.startswith(REF_PREFIX)}
        return npz["x"].astype("float32", copy=False), npz["y"].astype("int64", copy=False), refs


def check_providers(requested, available, known) -> list:
    """The providers to ask for, in order; an unknown or unavailable one is a UsageError."""
    for p in requested:
        if p not in known:
            raise UsageError(f"--providers: {p!r} is not an onnxruntime execution provider "
                             f"(this build has: {', '.join(available)})")
        if p not in available:
            raise UsageError(f"--providers: {p} is not available in this onnxruntime build "
                             f"(onnxruntime {_ort_version()}; available: {', '.join(available)})")
    return list(requested)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def make_session(path, threads: int, providers):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else usable_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))


def _batch_input(session, batch: int, x, seed: int = 0):
    """The timing input: the first ``batch`` samples (repeated if there are fewer), else
    standard-normal noise of the model's input shape."""
    import numpy as np

    arg = session.get_inputs()[0]
    if x is not None and len(x):
        reps = -(-batch // len(x))
        data = np.concatenate([x] * reps)[:batch] if reps > 1 else x[:batch]
        return {arg.name: np.ascontiguousarray(data)}
    shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape[1:]]
    dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
    return {arg.name: np.random.default_rng(seed).standard_normal(shape).astype(dtype)}


def fixed_batch(session):
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else None


def time_runs(session, feeds, *, warmup: int, min_runs: int, max_runs: int, max_seconds: float) -> list:
    outputs = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(outputs, feeds)
    clock = time.perf_counter_ns
    budget = int(max_seconds * 1e9)
    times = []
    start = clock()
    while len(times) < max_runs:
        t0 = clock()
        session.run(outputs, feeds)
        t1 = clock()
        times.append(t1 - t0)
        if len(times) >= min_runs and t1 - start >= budget:
            break
    return times


def summarise(times_ns, batch: int) -> dict:
    import numpy as np

    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    p10, p25, p50, p75, p90, p99 = (float(v) for v in np.percentile(ms, [10, 25, 50, 75, 90, 99]))
    return {
        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
        "iqr_ms": p75 - p25, "spread": (p90 - p10) / p50 if p50 > 0 else None,
        "runs": len(times_ns), "total_s": float(ms.sum() / 1e3),
        "per_sample_ms": p50 / batch, "throughput": batch * 1000.0 / p50 if p50 > 0 else None,
    }


def predict(session, x, batch_size: int = 64):
    """Argmax of the first output for all of ``x`` (float32 NCHW), batched; a fixed-batch model
    gets zero-padded last batches. Ties go to the lowest class (numpy argmax)."""
    import numpy as np

    arg = session.get_inputs()[0]
    out_name = session.get_outputs()[0].name
    fixed = fixed_batch(session)
    step = fixed or batch_size
    preds, top5 = [], []
    classes = None
    for i in range(0, len(x), step):
        batch = x[i:i + step]
        real = len(batch)
        if fixed and real < fixed:
            batch = np.concatenate([batch, np.zeros((fixed - real, *batch.shape[1:]), batch.dtype)])
        logits = np.asarray(session.run([out_name], {arg.name: batch})[0])[:real]
        if logits.ndim != 2:
            raise UsageError(f"output {out_name!r} has shape {logits.shape}; expected (N, classes)")
        classes = logits.shape[1]
        preds.append(np.argmax(logits, axis=1))
        if classes >= 5:
            top5.append(np.argsort(-logits, axis=1, kind="stable")[:, :5])
    return (np.concatenate(preds).astype(np.int64), np.concatenate(top5) if top5 else None, classes)


def accuracy_of(session, x, y, ref) -> tuple:
    import numpy as np

    start = time.perf_counter()
    pred, top5, classes = predict(session, x)
    out = {
        "accuracy": float(np.mean(pred == y)),
        "top5": float(np.mean(np.any(top5 == y[:, None], axis=1))) if top5 is not None else None,
        "n": int(len(y)),
        "classes": int(classes),
        "wall_s": time.perf_counter() - start,
        "reference_agreement": None,
        "reference_accuracy": None,
    }
    if ref is not None and len(ref) == len(pred):
        out["reference_agreement"] = float(np.mean(ref == pred))
        out["reference_accuracy"] = float(np.mean(ref == y))
        out["reference_mismatches"] = int(np.sum(ref != pred))
    return out, pred


# --------------------------------------------------------------------------- the benchmark


def bench_one(name, path, *, batch_sizes, threads, providers, warmup, min_runs, max_runs, max_seconds,
              samples, log) -> tuple:
    entry = {"name": name, "file": path.name, "format": "ort" if path.suffix == ".ort" else "onnx",
             "size_bytes": path.stat().st_size, "sha256": sha256(path)}
    latency, skipped, loads = [], [], []
    pred = None
    x = samples[0] if samples else None
    for n_threads in threads:
        t0 = time.perf_counter()
        session = make_session(path, n_threads, providers)
        loads.append((time.perf_counter() - t0) * 1e3)
        entry.setdefault("providers_used", session.get_providers())
        fixed = fixed_batch(session)
        for batch in batch_sizes:
            if fixed and fixed != batch:
                skipped.append({"batch_size": batch, "threads": n_threads,
                                "reason": f"model input has fixed batch {fixed}"})
                continue
            log(f"{name}: batch {batch}, {n_threads or 'all'} thread(s)")
            feeds = _batch_input(session, batch, x)
            times = time_runs(session, feeds, warmup=warmup, min_runs=min_runs, max_runs=max_runs,
                              max_seconds=max_seconds)
            lat = {"batch_size": batch,
                   "threads": int(session.get_session_options().intra_op_num_threads),
                   "threads_setting": n_threads, "warmup": warmup,
                   "input": "samples" if x is not None else "random"}
            lat.update(summarise(times, batch))
            latency.append(lat)
        if samples and pred is None:
            log(f"{name}: accuracy on {len(samples[1])} samples")
            ref = samples[2].get(name)
            if ref is None and name.endswith(".ort"):
                ref = samples[2].get(name[:-4])  # the .ort of a bundled model: the host's .onnx predictions
            entry["eval"], pred = accuracy_of(session, samples[0], samples[1], ref)
        del session
    entry["load_ms"] = loads[0] if loads else None
    entry["load_ms_all"] = loads
    entry["latency"] = latency
    entry["latency_skipped"] = skipped
    entry["accuracy"] = entry["eval"]["accuracy"] if "eval" in entry else None
    entry["top5"] = entry["eval"]["top5"] if "eval" in entry else None
    entry["peak_rss_mib_after"] = peak_rss_mib()
    return entry, pred


def _ints(text: str, what: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0 or (what == "--batch-sizes" and min(values) < 1):
        raise UsageError(f"{what}: expected comma-separated integers >= {1 if what == '--batch-sizes' else 0}")
    return values


def parse_args(argv=None):
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="Benchmark the models of a compresskit bundle with onnxruntime.")
    p.add_argument("--model", action="append", default=None,
                   help="Model name from bundle.json or a .onnx/.ort file; repeatable or comma-separated "
                        "(default: every model of the bundle).")
    p.add_argument("--batch-sizes", default=None, help="Comma-separated batch sizes (default: the bundle's, else 1).")
    p.add_argument("--threads", default=None,
                   help="Comma-separated intra-op thread counts, 0 = all usable cores (default: the bundle's, else 1).")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="Comma-separated onnxruntime execution providers, in priority order.")
    p.add_argument("--max-seconds", type=float, default=2.0, help="Timed seconds per (model, threads, batch).")
    p.add_argument("--warmup", type=int, default=10, help="Untimed runs before timing.")
    p.add_argument("--min-runs", type=int, default=10, help="Timed runs at least (even past --max-seconds).")
    p.add_argument("--max-runs", type=int, default=100000, help="Timed runs at most.")
    p.add_argument("--samples", default=str(here / SAMPLES),
                   help="npz with x (preprocessed float32 NCHW) and y; 'none' to skip accuracy.")
    p.add_argument("--device-name", default=None,
                   help="Short device name for report rows (default: derived, e.g. rpi5 or the CPU model).")
    p.add_argument("--predictions", default=None,
                   help="Save argmax predictions on the samples: FILE.npy (one model) or FILE.npz "
                        "(one array per model).")
    p.add_argument("--json", dest="json_out", default=None, help="Write the result JSON here.")
    p.add_argument("--quiet", "-q", action="store_true", help="Print only the summary.")
    return p.parse_args(argv)


def run(args) -> dict:
    import numpy as np
    import onnxruntime as ort

    started = time.perf_counter()
    here = Path(__file__).resolve().parent
    manifest = load_manifest(here)
    defaults = manifest.get("defaults", {})
    batch_sizes = (_ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes
                   else list(defaults.get("batch_sizes") or [1]))
    threads = _ints(args.threads, "--threads") if args.threads else list(defaults.get("threads") or [1])
    if args.max_seconds <= 0 or args.warmup < 0 or args.min_runs < 1 or args.max_runs < args.min_runs:
        raise UsageError("need --max-seconds > 0, --warmup >= 0 and 1 <= --min-runs <= --max-runs")
    available = list(ort.get_available_providers())
    known = list(ort.get_all_providers()) if hasattr(ort, "get_all_providers") else available
    requested = [p.strip() for p in args.providers.split(",") if p.strip()]
    providers = check_providers(requested, available, known)
    wanted = [w.strip() for item in (args.model or []) for w in item.split(",") if w.strip()]
    models = select_models(here, manifest, wanted)
    if args.samples.lower() != "none" and not Path(args.samples).is_file() and args.samples != str(here / SAMPLES):
        raise UsageError(f"--samples {args.samples}: file not found")
    samples = None if args.samples.lower() == "none" else load_samples(args.samples)
    if args.predictions and not samples:
        raise UsageError("--predictions needs samples (samples.npz or --samples FILE)")
    if args.predictions and args.predictions.endswith(".npy") and len(models) != 1:
        raise UsageError(f"--predictions {args.predictions}: .npy holds one model's predictions, "
                         f"{len(models)} models run: use a .npz file or --model NAME")
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    rss_start = peak_rss_mib()
    quiet = QuietCheck()
    known = {m["name"]: m for m in manifest.get("models", [])}
    results, preds = [], {}
    for name, path in models:
        if not path.is_file():
            raise UsageError(f"model {name}: {path} not found")
        entry, pred = bench_one(name, path, batch_sizes=batch_sizes, threads=threads, providers=providers,
                                warmup=args.warmup, min_runs=args.min_runs, max_runs=args.max_runs,
                                max_seconds=args.max_seconds, samples=samples, log=log)
        listed = known.get(name) or {}
        entry["matches_bundle"] = (entry["sha256"] == listed["sha256"]) if listed.get("sha256") else None
        entry["bundle_source"] = listed.get("source") if entry["format"] == "onnx" else None
        results.append(entry)
        if pred is not None:
            preds[name] = pred
    if args.predictions:
        if args.predictions.endswith(".npy"):
            np.save(args.predictions, next(iter(preds.values())))
        else:
            np.savez(args.predictions, **preds)
    return {
        "schema": RESULT_SCHEMA,
        "schema_version": RESULT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": {k: manifest.get(k) for k in ("run", "target", "created", "deployed", "compresskit_version")},
        "device": device_info(args.device_name),
        "onnxruntime": {"version": ort.__version__, "available_providers": available,
                        "requested_providers": providers, "numpy": np.__version__},
        "settings": {"batch_sizes": batch_sizes, "threads": threads, "max_seconds": args.max_seconds,
                     "warmup": args.warmup, "min_runs": args.min_runs, "max_runs": args.max_runs,
                     "samples": None if samples is None else len(samples[1])},
        "models": results,
        "memory": {"peak_rss_mib_before_models": rss_start, "peak_rss_mib": peak_rss_mib(),
                   "source": "resource.getrusage(RUSAGE_SELF).ru_maxrss"},
        "quiet": quiet.done(),
        "predictions_file": args.predictions,
        "wall_s": time.perf_counter() - started,
    }


def _summary(result: dict) -> str:
    dev = result["device"]
    flags = ", ".join(dev["cpu"]["isa_flags"]) or "no ISA flags known"
    lines = [f"device {dev['name']}: {dev['cpu']['model'] or '?'} ({dev['machine']}, "
             f"{dev['cpu']['usable_cores']} cores, {flags}); onnxruntime {result['onnxruntime']['version']}"]
    for m in result["models"]:
        acc = m.get("eval")
        acc_text = "" if not acc else f", accuracy {acc['accuracy']:.2%} on {acc['n']}" + (
            "" if acc.get("reference_agreement") is None else f" ({acc['reference_agreement']:.1%} same as host)")
        lines.append(f"{m['name']}: load {m['load_ms']:.1f} ms, providers {','.join(m['providers_used'])}{acc_text}")
        for lat in m["latency"]:
            lines.append(f"  batch {lat['batch_size']:>3}, {lat['threads']} thread(s): p50 {lat['p50_ms']:.3f} ms, "
                         f"p90 {lat['p90_ms']:.3f}, p99 {lat['p99_ms']:.3f} ({lat['runs']} runs)")
    lines.append(f"peak memory {result['memory']['peak_rss_mib'] or 0:.1f} MiB")
    busy = result["quiet"].get("other_cores_busy")
    if busy is not None and busy > 0.1:
        lines.append(f"warning: other processes kept {busy:.2f} core(s) busy while this ran: the latencies are "
                     "not trustworthy; measure again on a quiet machine")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: {err} (pip install numpy onnxruntime)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # onnxruntime's own errors (a model it cannot load or run): one line
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"error: {type(err).__name__}: {first}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if args.json_out:
        tmp = args.json_out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json_out)
    print(_summary(result))
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
