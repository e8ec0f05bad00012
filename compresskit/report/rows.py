"""Report rows and evidence from what the stages measured, as plain functions on plain data, so
a report can be built from a user's own measurements too. No torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compresskit.budget import INT8_MODELS, MODEL_ORDER

# The stage that produces each model a run can have.
STAGE_OF = {"teacher": "teacher", "student": "distill", "student_baseline": "distill",
            "pruned": "prune", "ptq": "quantize", "qat": "quantize"}


def model_rows(measured: Mapping[str, Mapping], stage_metrics: Mapping[str, Mapping] | None = None) -> list[dict]:
    """One report row per measured model (a ``bench.bench_model`` result keyed by model name), in
    report order, with its stage, precision, file and the wall time of the stage that made it."""
    stage_metrics = stage_metrics or {}
    rows = []
    for name in sorted(measured, key=lambda n: MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER)):
        stage = STAGE_OF.get(name, name)
        row = dict(measured[name])
        row.update(name=name, stage=stage, precision="int8" if name in INT8_MODELS else "fp32",
                   path=f"export/{name}.onnx", stage_wall_s=(stage_metrics.get(stage) or {}).get("wall_s"))
        rows.append(row)
    return rows


def evidence(stage_metrics: Mapping[str, Mapping]) -> dict[str, Any]:
    """What the report shows beside the model table: the INT8 format search, pruning latency,
    and the training throughput of every training run."""
    out: dict[str, Any] = {}
    quantize, prune = stage_metrics.get("quantize") or {}, stage_metrics.get("prune") or {}
    search = (quantize.get("ptq") or {}).get("search")
    if search:
        out["int8_search"] = {k: v for k, v in search.items() if k != "sensitivity"}
    if prune.get("latency"):
        out["pruning"] = prune["latency"]
    distill = stage_metrics.get("distill") or {}
    fits = [("teacher", "teacher", (stage_metrics.get("teacher") or {}).get("fit")),
            ("distill", "student", (distill.get("student") or {}).get("fit")),
            ("distill", "baseline", (distill.get("baseline") or {}).get("fit")),
            ("prune", "fine-tune", prune.get("fit")),
            ("quantize", "QAT", (quantize.get("qat") or {}).get("fit"))]
    training = []
    for stage, what, fit in fits:
        if fit:
            cache = fit.get("teacher_cache")
            training.append({"stage": stage, "what": what, "images_per_s": fit.get("images_per_s"),
                             "wall_s": fit.get("wall_s"),
                             "teacher_cache": f"{cache['hits']}/{cache['misses']}" if cache else None})
    if training:
        out["training"] = training
    return out
