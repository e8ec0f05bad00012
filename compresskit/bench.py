"""Latency and accuracy of ONNX models through onnxruntime, with numpy only.

This is the measurement half of the pipeline and must run on the deployment target itself (a
Raspberry Pi, a CI runner) where torch is absent: it imports only numpy, onnx and onnxruntime.
Latency is wall time of ``InferenceSession.run`` on a fixed random input, reported as
percentiles, because the median is what survives noisy shared machines. Timing can stop as soon
as the median is known to a requested precision (a distribution-free confidence interval), and
each measurement is set against the CPU's theoretical peak (``envinfo.peak_macs``) so a number
says how close to the hardware the model runs.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from compresskit.envinfo import cpu_info, peak_macs
from compresskit.onnxutil import check_model_path, model_stats

Optimization = Literal["all", "extended", "basic", "none"]
StoppedBy = Literal["precision", "time", "runs"]
ProgressFn = Callable[[str], None]

_OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_ORT_LOAD_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
)
# onnxruntime input type strings -> numpy dtypes for the inputs we can synthesise.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def usable_cores() -> int:
    """CPUs this process may use (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def make_session(
    path: str | os.PathLike,
    threads: int,
    optimization: Optimization = "all",
    providers: Sequence[str] | None = None,
) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads (0 = all usable cores), one inter-op
    thread and sequential execution, so thread counts compare cleanly between models.

    ``providers``: onnxruntime execution providers in priority order (default CPU only); one
    this onnxruntime build lacks is a ValueError naming the available ones.
    Accepts ``.onnx`` and ``.ort`` files. Raises FileNotFoundError/ValueError naming the path.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = all cores), got {threads}")
    if optimization not in _OPT_LEVELS:
        raise ValueError(f"optimization must be one of {sorted(_OPT_LEVELS)}, got {optimization!r}")
    path = check_model_path(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else usable_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _OPT_LEVELS[optimization]
    opts.log_severity_level = 3
    providers = list(providers or ["CPUExecutionProvider"])
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise ValueError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                         f"{ort.__version__} (available: {', '.join(ort.get_available_providers())})")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except _ORT_LOAD_ERRORS as err:
        raise ValueError(f"onnxruntime cannot load {path} as a model: {err}") from err


def _session(path_or_session: str | os.PathLike | ort.InferenceSession, threads: int):
    if isinstance(path_or_session, ort.InferenceSession):
        return path_or_session
    return make_session(path_or_session, threads)


def _session_threads(session: ort.InferenceSession) -> int:
    return int(session.get_session_options().intra_op_num_threads)


def _input_shape(node_arg, batch_size: int) -> tuple[int, ...]:
    """The input's shape with the batch dim set; other non-fixed dims are an error."""
    shape = list(node_arg.shape)
    if not shape:
        raise ValueError(f"input {node_arg.name!r} is a scalar; cannot add a batch dimension")
    first = shape[0]
    if isinstance(first, int) and first > 0 and first != batch_size:
        raise ValueError(
            f"input {node_arg.name!r} has a fixed batch of {first}; cannot run batch {batch_size}"
        )
    symbolic = [f"dim {i} ({d!r})" for i, d in enumerate(shape[1:], 1) if not isinstance(d, int)]
    if symbolic:
        raise ValueError(
            f"input {node_arg.name!r} has non-fixed dims {', '.join(symbolic)}: pass input_data "
            "or export the model with fixed spatial dims"
        )
    return (batch_size, *shape[1:])


def random_inputs(
    session: ort.InferenceSession, batch_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic random feeds for every model input (standard normal for floats)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"cannot synthesise input {arg.name!r} of type {arg.type}")
        shape = _input_shape(arg, batch_size)
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            feeds[arg.name] = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(
                dtype
            )
    return feeds


def _feeds_from(session, input_data, batch_size: int) -> dict[str, np.ndarray]:
    names = [arg.name for arg in session.get_inputs()]
    if isinstance(input_data, Mapping):
        feeds = dict(input_data)
    elif len(names) == 1:
        feeds = {names[0]: input_data}
    else:
        raise ValueError(f"the model has inputs {names}: pass input_data as a dict")
    missing = set(names) - set(feeds)
    if missing:
        raise ValueError(f"input_data lacks model inputs {sorted(missing)}")
    for name, arr in feeds.items():
        if np.shape(arr)[:1] != (batch_size,):
            raise ValueError(
                f"input_data[{name!r}] has shape {np.shape(arr)}, expected batch {batch_size}"
            )
    return feeds


def median_ci95(sorted_values: Sequence[float]) -> tuple[float, float] | None:
    """Distribution-free 95% confidence interval of the median of ``sorted_values`` (ascending).

    The number of samples below the true median is Binomial(n, 1/2); its normal approximation
    puts the interval between the order statistics of ranks ``floor(n/2 - 1.96 sqrt(n)/2)`` and
    ``ceil(n/2 + 1 + 1.96 sqrt(n)/2)`` (1-based), whatever the latency distribution (J.-Y. Le
    Boudec, *Performance Evaluation of Computer and Communication Systems*, EPFL Press 2010,
    Theorem 2.1 and its large-n formula). None when n is too small for those ranks (n < 8).
    """
    n = len(sorted_values)
    half = 1.96 * math.sqrt(n) / 2
    lo_rank = math.floor(n / 2 - half)
    hi_rank = math.ceil(n / 2 + 1 + half)
    if lo_rank < 1 or hi_rank > n:
        return None
    return float(sorted_values[lo_rank - 1]), float(sorted_values[hi_rank - 1])


def _median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return float(sorted_values[mid]) if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


def _precise(sorted_values: Sequence[float], target_rel_ci: float) -> bool:
    """Whether the median's 95% interval lies within +-``target_rel_ci`` of the median."""
    ci = median_ci95(sorted_values)
    if ci is None:
        return False
    med = _median(sorted_values)
    return ci[0] >= med * (1 - target_rel_ci) and ci[1] <= med * (1 + target_rel_ci)


def _timed_runs(
    run: Callable[..., object],
    args: tuple,
    *,
    min_runs: int,
    max_runs: int,
    max_seconds: float,
    target_rel_ci: float | None,
) -> tuple[list[int], StoppedBy]:
    """Call ``run(*args)`` and time each call (ns) until, after ``min_runs``, the median is
    precise enough (``target_rel_ci``), ``max_seconds`` have passed, or ``max_runs`` are done.

    ``run`` and its arguments are passed apart so no wrapper frame lands inside the timed
    window. Returns the times in call order and what stopped the loop. The clock is looked up at
    call time so tests can replace ``time.perf_counter_ns``.
    """
    clock = time.perf_counter_ns
    budget_ns = int(max_seconds * 1e9)
    times: list[int] = []
    ordered: list[int] = []  # the same times kept sorted, for the median's interval
    start = clock()
    while len(times) < max_runs:
        t0 = clock()
        run(*args)
        t1 = clock()
        times.append(t1 - t0)
        if target_rel_ci is not None:
            bisect.insort(ordered, t1 - t0)
        if len(times) < min_runs:
            continue
        if target_rel_ci is not None and _precise(ordered, target_rel_ci):
            return times, "precision"
        if t1 - start >= budget_ns:
            return times, "time"
    return times, "runs"


MAX_KEPT_SAMPLES = 200  # timing samples kept per measurement (``samples_us``)


def compact_samples(times_ns: Sequence[int], limit: int = MAX_KEPT_SAMPLES) -> list[float]:
    """The per-run times in microseconds, rounded to 0.1 us, in the order they were measured;
    more than ``limit`` runs are thinned by taking ``limit`` evenly spaced runs (first and last
    kept), so drift stays visible and a later rank test or bootstrap sees the whole run.
    (0.1 us, not whole microseconds: a 20 us model would otherwise move in 5% steps.)"""
    n = len(times_ns)
    idx = range(n) if n <= limit else np.linspace(0, n - 1, limit).round().astype(int)
    return [round(int(times_ns[i]) / 1e3, 1) for i in idx]


def _latency_summary(times_ns: list[int], batch_size: int) -> dict:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    p10, p25, p50, p75, p90, p99 = (float(v) for v in np.percentile(ms, [10, 25, 50, 75, 90, 99]))
    ci = median_ci95(np.sort(ms))
    return {
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "ci95_ms": list(ci) if ci is not None else None,
        "ci95_rel": max(p50 - ci[0], ci[1] - p50) / p50 if ci is not None and p50 > 0 else None,
        "iqr_ms": p75 - p25,
        "spread": (p90 - p10) / p50 if p50 > 0 else None,
        "runs": len(times_ns),
        "total_s": float(ms.sum() / 1e3),
        "per_sample_ms": p50 / batch_size,
        "throughput": batch_size * 1000.0 / p50 if p50 > 0 else float("inf"),
        "samples_us": compact_samples(times_ns),
    }


# --------------------------------------------------------------------------- machine load

BUSY_WARN_FRACTION = 0.10  # other processes' average CPU use (in cores) above which timing is flagged
_MIN_LOAD_WALL_S = 0.5  # shorter windows: the 10 ms clock tick makes the figure meaningless


def _proc_stat_busy_s(cpus: set[int] | None = None) -> float | None:
    """Busy CPU seconds since boot of the CPUs in ``cpus`` (all when None), from /proc/stat:
    user + nice + system + irq + softirq + steal (idle and iowait are not busy; guest time is
    inside user already). None where /proc/stat is missing (not Linux) or unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    ticks, found = 0, False
    for parts in lines:
        label = parts[0][3:]
        if not label.isdigit() or (cpus is not None and int(label) not in cpus):
            continue  # the aggregate "cpu" line, or a CPU this process may not use
        v = [int(t) for t in parts[1:9]] + [0] * 8
        ticks += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


def _cpu_snapshot() -> tuple[float, float | None, float]:
    """(wall s, busy CPU s of the CPUs this process may use, this process's own CPU s)."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    t = os.times()
    return time.monotonic(), _proc_stat_busy_s(cpus), t.user + t.system


class CpuLoad:
    """Other processes' CPU use during timing windows (``start()`` ... ``stop()``, repeatable):
    the busy time of the CPUs this process may use (/proc/stat) minus this process's own CPU time
    (``os.times``), over wall time. ``busy_fraction`` is in cores: 0.25 = a quarter of one core
    busy on average with other work. Linux only: elsewhere it is None."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.other_cpu_s = 0.0
        self.known = True
        self._start: tuple[float, float | None, float] | None = None

    def start(self) -> None:
        self._start = _cpu_snapshot()

    def stop(self) -> float | None:
        """End a window; its busy fraction (None when unknown or the window was too short)."""
        if self._start is None:
            raise RuntimeError("CpuLoad.stop() without start()")
        (w0, b0, o0), (w1, b1, o1) = self._start, _cpu_snapshot()
        self._start = None
        if b0 is None or b1 is None:
            self.known = False
            return None
        wall, other = w1 - w0, max(0.0, (b1 - b0) - (o1 - o0))
        self.wall_s += wall
        self.other_cpu_s += other
        return other / wall if wall >= _MIN_LOAD_WALL_S else None

    def summary(self) -> dict:
        """``busy_fraction`` over all windows (None: not Linux, or under 0.5 s timed), ``busy``
        (above ``BUSY_WARN_FRACTION``), the windows' wall time and the others' CPU seconds."""
        frac = self.other_cpu_s / self.wall_s if self.known and self.wall_s >= _MIN_LOAD_WALL_S else None
        return {"busy_fraction": frac, "busy": frac is not None and frac > BUSY_WARN_FRACTION,
                "threshold": BUSY_WARN_FRACTION, "wall_s": self.wall_s,
                "other_cpu_s": self.other_cpu_s if self.known else None}


def busy_warning(load: Mapping | None) -> str | None:
    """One line when other processes used more than ``BUSY_WARN_FRACTION`` of a core while timing."""
    if not load or not load.get("busy") or load.get("busy_fraction") is None:
        return None
    return (f"the machine was busy: other processes used {load['busy_fraction']:.0%} of a CPU core on average "
            f"while timing (more than {load.get('threshold', BUSY_WARN_FRACTION):.0%}); latencies may be "
            "inflated and noisy: measure on an idle machine")


def measure_latency(
    path_or_session: str | os.PathLike | ort.InferenceSession,
    batch_size: int,
    *,
    threads: int = 1,
    warmup: int = 10,
    min_runs: int = 20,
    max_runs: int = 1000,
    max_seconds: float = 3.0,
    target_rel_ci: float | None = None,
    input_data: np.ndarray | Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict:
    """Time ``session.run`` on one fixed input: ``warmup`` untimed runs, then timed runs until,
    after ``min_runs``, the median is known to +-``target_rel_ci`` (a fraction, e.g. 0.01; None:
    no precision rule), ``max_seconds`` have passed, or ``max_runs`` are done.

    Returns milliseconds (mean, std, min, max, p50, p90, p99), the 95% confidence interval of the
    median ``ci95_ms`` ([lo, hi], distribution-free, see ``median_ci95``; None below 8 runs) and
    its larger half-width relative to p50 ``ci95_rel``, the interquartile range ``iqr_ms``, the
    relative ``spread`` (p90 - p10) / p50, the run count, ``stopped_by`` ("precision", "time" or
    "runs"), p50-based per-sample time and throughput (samples/s), and ``samples_us``: the run
    times themselves (see ``compact_samples``, at most 200) for comparing runs later
    (``compresskit.gate``). ``threads`` applies only
    when a path is given; ``threads`` in the result is the session's actual intra-op count,
    ``threads_setting`` the value asked for (0 = all cores; None when a session was passed in).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if warmup < 0 or min_runs < 1 or max_runs < min_runs:
        raise ValueError(
            f"need warmup >= 0 and 1 <= min_runs <= max_runs, got {warmup}, {min_runs}, {max_runs}"
        )
    if target_rel_ci is not None and not 0 < target_rel_ci < 1:
        raise ValueError(f"target_rel_ci must be a fraction in (0, 1), got {target_rel_ci}")
    session = _session(path_or_session, threads)
    if input_data is None:
        feeds = random_inputs(session, batch_size, seed)
    else:
        feeds = _feeds_from(session, input_data, batch_size)
    outputs = [out.name for out in session.get_outputs()]
    for _ in range(warmup):
        session.run(outputs, feeds)
    times, stopped_by = _timed_runs(
        session.run,
        (outputs, feeds),
        min_runs=min_runs,
        max_runs=max_runs,
        max_seconds=max_seconds,
        target_rel_ci=target_rel_ci,
    )
    given = isinstance(path_or_session, ort.InferenceSession)
    result = {
        "batch_size": batch_size,
        "threads": _session_threads(session),
        "threads_setting": None if given else threads,
        "warmup": warmup,
        "target_rel_ci": target_rel_ci,
        "stopped_by": stopped_by,
    }
    result.update(_latency_summary(times, batch_size))
    return result


def achieved_vs_peak(
    entry: Mapping, macs: int | None, precision: str | None, cpu: Mapping
) -> dict:
    """``gmacs``, ``peak`` and ``peak_fraction`` of one latency entry.

    ``gmacs`` = MACs per sample x batch / p50 seconds / 1e9 (None without MACs; a lower bound
    when onnxutil could not resolve every op's MACs). ``peak`` is ``envinfo.peak_macs`` for the
    entry's actual thread count and the model's precision (int8 models against the int8 peak,
    everything else against fp32); ``peak_fraction`` = gmacs / peak GMAC/s, None when unknown.
    """
    p50_ms = entry.get("p50_ms")
    if not macs or not p50_ms or p50_ms <= 0:
        return {"gmacs": None, "peak": None, "peak_fraction": None}
    gmacs = macs * entry["batch_size"] / (p50_ms / 1e3) / 1e9
    peak = peak_macs(cpu, "int8" if precision == "int8" else "fp32", int(entry.get("threads") or 0))
    fraction = gmacs / peak["peak_gmacs"] if peak["peak_gmacs"] else None
    return {"gmacs": gmacs, "peak": peak, "peak_fraction": fraction}


PREPROCESS_KEY = "compresskit.preprocess"  # what the export stage records (compresskit.export)
_RAW_HINT = "write a preprocessed one with `compresskit npz PIPELINE.yaml -o test.npz`"


def _fmt_values(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def check_preprocessed(x: np.ndarray, preprocess: Mapping | str | None) -> str | None:
    """One line when ``x`` does not look like the model's input after its recorded preprocessing
    ``(pixel * scale - mean) / std`` per channel (the ``compresskit.preprocess`` metadata, as a
    dict or its JSON); None when it looks right or nothing usable is recorded.

    Flagged: an integer array (raw pixels); values that, mapped back to pixels, fall far outside
    0..255 (e.g. raw 0-255 pixels in a float array); per-channel mean / std far from the ~0 / ~1
    that normalising with the data's own mean and std gives (|mean| > 1, std outside 0.4..2.5:
    e.g. pixels scaled to 0..1 but not normalised).
    """
    if isinstance(preprocess, str):
        try:
            preprocess = json.loads(preprocess)
        except ValueError:
            return None
    if not isinstance(preprocess, Mapping):
        return None
    try:
        scale = float(preprocess.get("scale", 1 / 255))
        mean = np.asarray(preprocess["mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(preprocess["std"], dtype=np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        return None
    x = np.asarray(x)
    axis = -1 if preprocess.get("layout") == "NHWC" else 1
    if x.ndim < 2 or x.size == 0 or len(mean) != len(std) or x.shape[axis] != len(mean) or not (std > 0).all():
        return None
    expect = f"(pixel * {scale:.6g} - mean {_fmt_values(mean)}) / std {_fmt_values(std)}"
    if not np.issubdtype(x.dtype, np.floating):
        return (f"x is {x.dtype} (raw pixels?) but the model expects float input preprocessed as {expect}; "
                f"{_RAW_HINT}")
    step = max(1, x.size // 2_000_000)  # every step-th sample: enough for the statistics
    channels = np.moveaxis(x[::step], axis, 1).reshape(len(x[::step]), len(mean), -1)
    channels = np.moveaxis(channels, 1, 0).reshape(len(mean), -1).astype(np.float64)
    lo, hi = (0.0 - mean) / std, (255.0 * scale - mean) / std  # what preprocessing gives for 0..255
    x_min, x_max = float(channels.min()), float(channels.max())
    pixels = (channels * std[:, None] + mean[:, None]) / scale
    if pixels.min() < -0.1 * 255 or pixels.max() > 1.1 * 255:
        what = ("looks like raw 0-255 pixels" if x_min >= 0 and 1.5 < x_max <= 255.5 else
                "is outside the range the preprocessing gives")
        return (f"x {what} (min {x_min:.3g}, max {x_max:.3g}) but the model expects {expect}, i.e. values in "
                f"{_fmt_values(lo)}..{_fmt_values(hi)} per channel: accuracy will be meaningless; {_RAW_HINT}")
    ch_mean, ch_std = channels.mean(axis=1), channels.std(axis=1)
    if (np.abs(ch_mean) > 1.0).any() or (ch_std < 0.4).any() or (ch_std > 2.5).any():
        return (f"x's per-channel mean {_fmt_values(ch_mean)} and std {_fmt_values(ch_std)} are far from the ~0 "
                f"and ~1 that the model's preprocessing {expect} gives (scaled to 0..1 but not normalised?); "
                f"{_RAW_HINT}")
    return None


def _check_eval_data(x: np.ndarray, y: np.ndarray, arg) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a float array (N, C, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be an int array of shape ({len(x)},), got {y.dtype} {y.shape}")
    expected = list(arg.shape[1:])
    if len(expected) != x.ndim - 1 or any(
        isinstance(d, int) and d != s for d, s in zip(expected, x.shape[1:], strict=True)
    ):
        raise ValueError(
            f"x has sample shape {tuple(x.shape[1:])} but input {arg.name!r} expects {expected}"
        )
    dtype = _ORT_TYPES.get(arg.type, np.float32)
    return x.astype(dtype, copy=False), y


def _predict_logits(session, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits for all of ``x``, batched; a fixed-batch model gets zero-padded last batches."""
    arg = session.get_inputs()[0]
    out_name = session.get_outputs()[0].name
    fixed = arg.shape[0] if isinstance(arg.shape[0], int) and arg.shape[0] > 0 else None
    step = fixed or batch_size
    chunks = []
    for i in range(0, len(x), step):
        batch = x[i : i + step]
        real = len(batch)
        if fixed and real < fixed:
            pad = np.zeros((fixed - real, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, pad])
        logits = session.run([out_name], {arg.name: batch})[0]
        chunks.append(np.asarray(logits)[:real])
    logits = np.concatenate(chunks)
    if logits.ndim != 2:
        raise ValueError(f"output {out_name!r} has shape {logits.shape}; expected (N, classes)")
    return logits


def evaluate(
    path_or_session: str | os.PathLike | ort.InferenceSession,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    threads: int = 0,
) -> dict:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy of the model's first output
    on ``x`` (N, C, H, W float) with integer labels ``y``; fractions in 0..1. Ties resolve to
    the lowest class index, so results are deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    session = _session(path_or_session, threads)
    x, y = _check_eval_data(x, y, session.get_inputs()[0])
    if len(x) == 0:
        raise ValueError("x is empty: nothing to evaluate")
    start = time.perf_counter()
    logits = _predict_logits(session, x, batch_size)
    wall_s = time.perf_counter() - start
    classes = logits.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got [{y.min()}, {y.max()}]")
    top1 = np.argmax(logits, axis=1)
    result = {
        "accuracy": float(np.mean(top1 == y)),
        "top5": None,
        "n": len(y),
        "classes": int(classes),
        "batch_size": batch_size,
        "threads": _session_threads(session),
        "wall_s": wall_s,
    }
    if classes >= 5:
        # Stable sort of -logits keeps the lowest index first among ties, like argmax.
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        result["top5"] = float(np.mean(np.any(top5 == y[:, None], axis=1)))
    return result


def bench_model(
    path: str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: Sequence[int] = (1,),
    warmup: int = 10,
    min_runs: int = 20,
    max_runs: int = 1000,
    max_seconds: float = 3.0,
    target_rel_ci: float | None = None,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    eval_threads: int = 0,
    eval_batch_size: int = 256,
    optimization: Optimization = "all",
    progress: ProgressFn | None = None,
    cpu: Mapping | None = None,
    providers: Sequence[str] | None = None,
) -> dict:
    """Static statistics, latency for every (threads, batch size) pair and, when ``x``/``y`` are
    given, accuracy: one JSON-able dict that is the core of a report row (``bench_models`` for one
    model: the same protocol, so one model's figures and a pass's compare).

    Each latency entry (see ``measure_latency``; threads 0 = all usable cores) also carries
    ``gmacs``, ``peak`` and ``peak_fraction`` (see ``achieved_vs_peak``) against ``cpu``, the
    ``envinfo.cpu_info()`` of this machine unless given. ``.ort`` files are timed too, with only
    their size as statistics (so no MACs and no peak fraction). A fixed-batch model is timed
    only at its own batch; the other pairs are listed under ``latency_skipped`` with the reason.
    ``progress`` receives a short message per step. ``providers`` (see ``make_session``) are
    recorded with the ones the sessions actually used (``providers_used``).
    """
    name = Path(path).name
    return bench_models({name: path}, batch_sizes=batch_sizes, threads=threads, warmup=warmup,
                        min_runs=min_runs, max_runs=max_runs, max_seconds=max_seconds,
                        target_rel_ci=target_rel_ci, x=x, y=y, eval_threads=eval_threads,
                        eval_batch_size=eval_batch_size, optimization=optimization, progress=progress,
                        cpu=cpu, providers=providers)[name]


def _static_stats(path: Path) -> dict:
    """``model_stats`` and the precision; ORT-format files (which onnx cannot read) only their size."""
    if path.suffix == ".ort":
        return {"size_bytes": path.stat().st_size, "format": "ort", "int8": None, "precision": None}
    result = model_stats(path)
    result["precision"] = "int8" if result["int8"] else "fp32"
    return result


MAX_BURST = 50  # timed runs of one model in a row at most, in an interleaved pass


def _interleaved_runs(
    sessions: Mapping[str, ort.InferenceSession],
    batch_size: int,
    *,
    warmup: int,
    min_runs: int,
    max_runs: int,
    max_seconds: float,
    target_rel_ci: float | None,
    burst_ms: float,
    seed: int = 0,
) -> tuple[dict[str, list[int]], dict[str, StoppedBy]]:
    """Time several sessions in alternation (round-robin) on fixed random inputs.

    Each model gets ``warmup`` untimed runs, then the models take turns: per turn one untimed
    run (to bring its weights back into the caches the others used, while the previous model's
    worker threads stop spinning) and a burst of timed runs
    lasting about ``burst_ms`` (1 to ``MAX_BURST`` runs, from its median so far). A model leaves
    the rotation when, after ``min_runs``, its median is known to +-``target_rel_ci``
    ("precision"), at ``max_runs`` ("runs"), or when the pass has used ``max_seconds`` per model
    ("time"; models short of ``min_runs`` go on until they have them). Returns the times (ns) per
    model in call order and what stopped each. The clock is looked up at call time (tests).
    """
    feeds = {n: random_inputs(s, batch_size, seed) for n, s in sessions.items()}
    outputs = {n: [o.name for o in s.get_outputs()] for n, s in sessions.items()}
    for n, s in sessions.items():
        for _ in range(warmup):
            s.run(outputs[n], feeds[n])
    clock = time.perf_counter_ns
    budget_ns = int(max_seconds * len(sessions) * 1e9)
    burst_ns = burst_ms * 1e6
    times: dict[str, list[int]] = {n: [] for n in sessions}
    ordered: dict[str, list[int]] = {n: [] for n in sessions}
    burst = dict.fromkeys(sessions, 1)
    stopped: dict[str, StoppedBy] = {}
    rewarm = len(sessions) > 1
    start = now = clock()
    while len(stopped) < len(sessions):
        for n, s in sessions.items():
            if n in stopped:
                continue
            run, args = s.run, (outputs[n], feeds[n])
            if rewarm:
                run(*args)
            for _ in range(min(burst[n], max_runs - len(times[n]))):
                t0 = clock()
                run(*args)
                now = clock()
                times[n].append(now - t0)
                bisect.insort(ordered[n], now - t0)
            k = len(times[n])
            if k >= max_runs:
                stopped[n] = "runs"
            elif k >= min_runs and target_rel_ci is not None and _precise(ordered[n], target_rel_ci):
                stopped[n] = "precision"
            else:
                burst[n] = max(1, min(MAX_BURST, int(burst_ns / max(1.0, _median(ordered[n])))))
        if now - start >= budget_ns:
            for n in sessions:
                if n not in stopped and len(times[n]) >= min_runs:
                    stopped[n] = "time"
    return times, stopped


def bench_models(
    paths: Mapping[str, str | os.PathLike],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: Sequence[int] = (1,),
    warmup: int = 10,
    min_runs: int = 20,
    max_runs: int = 1000,
    max_seconds: float = 3.0,
    target_rel_ci: float | None = None,
    burst_ms: float = 20.0,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    eval_threads: int = 0,
    eval_batch_size: int = 256,
    optimization: Optimization = "all",
    progress: ProgressFn | None = None,
    cpu: Mapping | None = None,
    providers: Sequence[str] | None = None,
) -> dict[str, dict]:
    """``bench_model`` for several models measured together in ONE pass, so their latencies
    compare: every session is built first, then per (threads, batch size) the models are timed
    in alternation (see ``_interleaved_runs``: short bursts of each in turn, until each median is
    known to ``target_rel_ci`` or the pass has spent ``max_seconds`` per model), so drift, turbo
    and other processes' load fall on all of them alike. Accuracy is evaluated afterwards, once
    per model.

    Returns name -> a result shaped like ``bench_model``'s; each latency entry also names the
    models it was timed with (``interleaved_with``) and the pass's ``busy_fraction`` (other
    processes' CPU use in cores, see ``CpuLoad``); ``load`` / ``busy_fraction`` of a result
    cover the whole pass. ``progress`` gets one line when each (threads, batch) pass starts and
    one with its results.
    """
    if (x is None) != (y is None):
        raise ValueError("give both x and y for accuracy, or neither")
    if not paths:
        raise ValueError("no models to measure")
    if any(b < 1 for b in batch_sizes) or any(t < 0 for t in threads):
        raise ValueError(f"batch sizes must be >= 1 and threads >= 0, got {list(batch_sizes)}, {list(threads)}")
    if warmup < 0 or min_runs < 1 or max_runs < min_runs:
        raise ValueError(
            f"need warmup >= 0 and 1 <= min_runs <= max_runs, got {warmup}, {min_runs}, {max_runs}"
        )
    if target_rel_ci is not None and not 0 < target_rel_ci < 1:
        raise ValueError(f"target_rel_ci must be a fraction in (0, 1), got {target_rel_ci}")
    if not max_seconds > 0 or not burst_ms > 0:
        raise ValueError(f"max_seconds and burst_ms must be > 0, got {max_seconds}, {burst_ms}")
    note = progress or (lambda _msg: None)
    checked = {name: check_model_path(p) for name, p in paths.items()}
    results = {name: _static_stats(path) for name, path in checked.items()}
    cpu = cpu_info() if cpu is None else cpu
    # every session first: no model is loaded (no memory allocated) between another's timed runs
    sessions = {(name, t): make_session(path, t, optimization, providers)
                for t in threads for name, path in checked.items()}
    for name, result in results.items():
        result["providers"] = list(providers or ["CPUExecutionProvider"])
        result["providers_used"] = sessions[name, threads[0]].get_providers()
        result["latency"], result["latency_skipped"] = [], []
    load = CpuLoad()
    for n_threads in threads:
        for batch in batch_sizes:
            present = {}
            for name in checked:
                session = sessions[name, n_threads]
                fixed = session.get_inputs()[0].shape[0]
                if isinstance(fixed, int) and fixed > 0 and fixed != batch:
                    results[name]["latency_skipped"].append(
                        {"batch_size": batch, "threads": n_threads, "reason": f"model input has fixed batch {fixed}"})
                else:
                    present[name] = session
            if not present:
                continue
            where = f"batch {batch}, {n_threads or 'all'} thread(s)"
            note(f"timing {', '.join(present)} in alternation at {where} "
                 f"(up to {max_seconds * len(present):.0f} s)")
            load.start()
            times, stopped = _interleaved_runs(present, batch, warmup=warmup, min_runs=min_runs, max_runs=max_runs,
                                               max_seconds=max_seconds, target_rel_ci=target_rel_ci,
                                               burst_ms=burst_ms)
            busy = load.stop()
            done = []
            for name, session in present.items():
                entry = {"batch_size": batch, "threads": _session_threads(session), "threads_setting": n_threads,
                         "warmup": warmup, "target_rel_ci": target_rel_ci, "stopped_by": stopped[name]}
                entry.update(_latency_summary(times[name], batch))
                entry.update(optimization=optimization, interleaved_with=[n for n in present if n != name],
                             busy_fraction=busy)
                entry.update(achieved_vs_peak(entry, results[name].get("macs"), results[name]["precision"], cpu))
                results[name]["latency"].append(entry)
                rel = entry["ci95_rel"]
                done.append(f"{name} {entry['p50_ms']:.3f} ms" + ("" if rel is None else f" ±{rel:.1%}")
                            + f" ({entry['runs']} runs, {entry['stopped_by']})")
            busy_text = "" if busy is None else f"; other processes: {busy:.0%} of a core"
            note(f"{where}: " + "; ".join(done) + busy_text)
    summary = load.summary()
    for name, result in results.items():
        result["load"] = dict(summary)
        result["busy_fraction"] = summary["busy_fraction"]
        result["accuracy"] = result["top5"] = None
        if x is not None:
            note(f"{name}: accuracy on {len(x)} samples")
            metrics = evaluate(make_session(checked[name], eval_threads, providers=providers), x, y,
                               batch_size=eval_batch_size)
            result.update(accuracy=metrics["accuracy"], top5=metrics["top5"], eval=metrics)
    return results


# --------------------------------------------------------------------------- the bench stage


def run(ctx, job):
    """The bench stage: latency of every exported model, all measured together in one
    interleaved pass per (threads, batch size) (``bench_models``), so every latency in the report
    compares with every other; accuracy on the test split; other processes' CPU use meanwhile."""
    from compresskit import stagekit as sk
    from compresskit.stage import StageResult

    cfg = job.bench
    x = y = None
    if cfg.accuracy:
        x, y = sk.data_of(ctx, job.data, job.seed).numpy_split("test")
    rows = bench_models(dict(ctx.inputs), batch_sizes=tuple(cfg.batch_sizes), threads=tuple(cfg.threads),
                        warmup=cfg.warmup, min_runs=cfg.min_runs, max_seconds=cfg.max_seconds,
                        target_rel_ci=cfg.target_rel_ci, x=x, y=y, progress=lambda m: ctx.log(f"[bench] {m}"))
    load = next(iter(rows.values()))["load"]
    metrics = {"models": rows, "load": load, "busy_fraction": load["busy_fraction"]}
    summary = ", ".join(f"{n} {r['accuracy']:.2%}" if r.get("accuracy") is not None else n for n, r in rows.items())
    warning = busy_warning(load)
    if warning:
        metrics["warning"] = warning
        summary += f"; WARNING: {warning}"
    return StageResult({}, metrics, summary)
