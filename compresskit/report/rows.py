"""Report rows and evidence from what the stages measured, as plain functions on plain data, so
a report can be built from a user's own measurements too. No torch."""

from __future__ import annotations

import re
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
    """What the report shows beside the model table: warnings (`accuracy_warnings`, and the bench
    stage's busy-machine warning), the bench pass's machine load (`bench_load`), the INT8 format
    search and pruning latency (each measured in its own stage's pass: the report shows them as
    ratios within that pass, `measured_in`), and the training throughput of every training run."""
    out: dict[str, Any] = {}
    quantize, prune = stage_metrics.get("quantize") or {}, stage_metrics.get("prune") or {}
    bench = stage_metrics.get("bench") or {}
    warnings = accuracy_warnings(stage_metrics) + ([bench["warning"]] if bench.get("warning") else [])
    if warnings:
        out["warnings"] = warnings
    if bench.get("load"):
        out["bench_load"] = dict(bench["load"])
    search = (quantize.get("ptq") or {}).get("search")
    if search:
        out["int8_search"] = {k: v for k, v in search.items() if k != "sensitivity"}
        out["int8_search"]["measured_in"] = "the quantize stage's format search"
    if prune.get("latency"):
        out["pruning"] = dict(prune["latency"], measured_in="the prune stage's latency probe")
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
                             "teacher_cache": f"{cache['hits']}/{cache['misses']}" if cache else None,
                             # the per-epoch curve, compact: what the HTML report plots
                             "history": [{"epoch": h.get("epoch"), "train_loss": h.get("train_loss"),
                                          "val_accuracy": h.get("val_accuracy")} for h in fit.get("history") or []]})
    if training:
        out["training"] = training
    return out


def accuracy_warnings(stage_metrics: Mapping[str, Mapping]) -> list[str]:
    """One line for each stage whose model lost more test accuracy against its source than the
    config allows: pruning vs the student (``prune.finetune.max_accuracy_loss``), QAT vs its
    float model (``quantize.qat.max_accuracy_loss``); the stages judge it (`accuracy_check`)."""
    checks = [(stage_metrics.get("prune") or {}).get("accuracy_check"),
              ((stage_metrics.get("quantize") or {}).get("qat") or {}).get("accuracy_check")]
    return [c["warning"] for c in checks if c and c.get("exceeded") and c.get("warning")]


# What a stage summary's figures are, where they differ from the report's tables.
PARAMS_NOTE = ("parameter counts in stage summaries are PyTorch's (every trainable tensor, BatchNorm included); the "
               "report's tables count the ONNX graph's weights after BatchNorm folding, which is what ships")
_SUMMARY_QUALIFIERS = (
    (re.compile(r"\bparams\b(?! \(torch count\))"), "params (torch count)"),
    (re.compile(r"\bFP32 latency x(\d+(?:\.\d+)?)"), r"FP32 latency x\1 (prune stage's probe, not the bench pass)"),
)


def stage_summary(summary: str | None) -> str:
    """A stage's one-line summary as the report shows it: its parameter counts marked as PyTorch's
    (`PARAMS_NOTE`) and the prune stage's latency ratio marked as its own probe's, so neither reads
    as a figure of the report's tables."""
    text = summary or ""
    for pattern, replacement in _SUMMARY_QUALIFIERS:
        text = pattern.sub(replacement, text)
    return text
