"""Latency first: what a candidate costs at inference, known before it is trained.

Latency and size of an INT8 model depend on its graph, not on its weights, so an untrained
candidate tells them: :func:`screen_model` exports it (`compresskit.export.export_onnx`),
quantizes it U8S8 per-tensor with MinMax ranges from a few images
(`compresskit.quantize.ptq.quantize_ptq`) and times it with onnxruntime
(`compresskit.bench.measure_latency`) at the budget's batch size and threads. U8S8 per-tensor is
the screening format because it was the fastest at batch 1 on the x86 CPUs measured (field
notes) and is one fixed format for all candidates, so their latencies compare; the finalists'
format is then chosen by measuring (`compresskit.quantize.search.search_ptq`).

A :class:`LatencyTable` (a JSON file: spec key -> p50 ms, e.g. measured on the target device by
the bundle runner) stands in for timing here. :class:`LatencyCache` keeps what was measured,
per machine, in the search folder, shared by worker processes (file lock), so a candidate drawn
twice (or by two workers) is timed once.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from compresskit.artifacts import atomic_write_json

__all__ = ["LatencyCache", "LatencyTable", "file_lock", "screen_model", "SCREEN_FORMAT"]

SCREEN_FORMAT = {"activation_type": "uint8", "weight_type": "int8", "per_channel": False,
                 "calibrate_method": "minmax"}


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for the block: several processes
    of one search (workers) serialise on it. No-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class LatencyTable:
    """p50 latencies measured elsewhere, by spec key (`compresskit.search.space.spec_key`).

    Accepted layouts: ``{key: ms}``, ``{key: {"p50_ms": ms, ...}}``, or
    ``{"p50_ms": {key: ms}, "batch_size": 1, "threads": 1, "device": "..."}``; with
    `batch_size` / `threads` given, they must be the budget's."""

    def __init__(self, entries: Mapping[str, float], *, path: str = "", device: str | None = None) -> None:
        self.entries = {str(k): float(v) for k, v in entries.items()}
        self.path = path
        self.device = device

    @classmethod
    def load(cls, path: str | os.PathLike, *, batch_size: int | None = None,
             threads: int | None = None) -> LatencyTable:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"search.latency_table: {path} not found") from None
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"search.latency_table: cannot read {path}: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"search.latency_table: {path} must hold a JSON object")
        device = None
        if isinstance(doc.get("p50_ms"), dict):
            for name, want in (("batch_size", batch_size), ("threads", threads)):
                if want is not None and doc.get(name) is not None and int(doc[name]) != int(want):
                    raise ValueError(f"search.latency_table: {path} was measured at {name} {doc[name]}, "
                                     f"the latency budget is at {want}")
            device = doc.get("device")
            doc = doc["p50_ms"]
        entries = {}
        for key, value in doc.items():
            ms = value.get("p50_ms") if isinstance(value, dict) else value
            if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not ms > 0:
                raise ValueError(f"search.latency_table: {path}: entry {key[:60]!r} has no positive p50 in ms")
            entries[key] = float(ms)
        return cls(entries, path=str(path), device=device)

    def get(self, key: str) -> float | None:
        return self.entries.get(key)


class LatencyCache:
    """Screening results by machine and spec key, in one JSON file shared by the workers."""

    def __init__(self, path: str | os.PathLike, machine: str) -> None:
        self.path = Path(path)
        self.machine = machine

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def get(self, key: str) -> dict | None:
        return self._read().get(self.machine, {}).get(key)

    def put(self, key: str, row: Mapping[str, Any]) -> None:
        with file_lock(self.path.with_suffix(".lock")):
            doc = self._read()
            doc.setdefault(self.machine, {})[key] = dict(row)
            atomic_write_json(self.path, doc)


def screen_model(spec: Mapping[str, Any], input_shape: Sequence[int], calib, *, batch_size: int, threads: int,
                 max_seconds: float = 0.5, warmup: int = 10, min_runs: int = 20,
                 target_rel_ci: float | None = 0.02, time_it: bool = True, repeats: int = 1,
                 keep_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Export the untrained model of `spec` (a full spec: `num_classes`, `in_channels`), quantize
    it U8S8 per-tensor (:data:`SCREEN_FORMAT`) on `calib` (N, C, H, W float32), and time it.

    Returns ``p50_ms`` (None without `time_it`), ``ci95_rel``, ``busy_fraction`` (other
    processes' CPU use while timing, in cores), ``size_bytes`` of the INT8 file, ``params``,
    ``macs``, ``ops`` (operators of the graph onnxruntime runs) and ``ops_fp32``. The files go
    to a temporary folder (or `keep_dir`). `repeats` > 1: one discarded timing first (the first
    session of a process runs cold), then the median of `repeats` timings' p50 (``p50_runs_ms``
    lists them): for a figure that others are judged against, such as the latency reference."""
    import torch

    from compresskit import bench
    from compresskit.export import export_onnx
    from compresskit.nets import build_model
    from compresskit.onnxutil import model_stats
    from compresskit.quantize.ptq import quantize_ptq

    torch.manual_seed(0)
    model = build_model(dict(spec))
    with tempfile.TemporaryDirectory(prefix="compresskit-screen-") as tmp:
        folder = Path(keep_dir) if keep_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
        export_onnx(model, fp32, torch.zeros(1, *[int(v) for v in input_shape]))
        info = quantize_ptq(fp32, int8, calib, **SCREEN_FORMAT)
        stats = model_stats(int8)
        row: dict[str, Any] = {"p50_ms": None, "ci95_rel": None, "busy_fraction": None,
                               "size_bytes": int8.stat().st_size, "params": stats["params"], "macs": stats["macs"],
                               "ops": sum(info["ops_int8_optimized"].values()),
                               "ops_fp32": sum(info["ops_fp32"].values())}
        if time_it:
            def timed() -> dict[str, Any]:
                return bench.measure_latency(int8, batch_size, threads=threads, max_seconds=max_seconds,
                                             warmup=warmup, min_runs=min_runs, target_rel_ci=target_rel_ci)

            if repeats > 1:
                timed()
            load = bench.CpuLoad()
            load.start()
            runs = [timed() for _ in range(max(1, repeats))]
            load.stop()
            m = sorted(runs, key=lambda r: r["p50_ms"])[len(runs) // 2]
            row.update(p50_ms=float(m["p50_ms"]), ci95_rel=m.get("ci95_rel"),
                       busy_fraction=load.summary()["busy_fraction"])
            if repeats > 1:
                row["p50_runs_ms"] = [float(r["p50_ms"]) for r in runs]
    return row
