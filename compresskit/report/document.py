"""The run report document: one versioned JSON record (schema ``compresskit.report``, version 1).

One row per model with accuracy, size, MACs and latency (each latency entry with its achieved
GMAC/s and fraction of the CPU's theoretical peak), figures relative to the reference model,
the stages, the environment and the budget verdict. No torch and no onnxruntime needed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from compresskit import __version__
from compresskit.budget import find_latency

REPORT_SCHEMA = "compresskit.report"
REPORT_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- building


def _ratio(num, den) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _derive(row: dict, ref: Mapping | None) -> None:
    """Add the ``*_vs_teacher`` fields to ``row`` in place (None where not comparable)."""
    ref = ref or {}
    acc, ref_acc = row.get("accuracy"), ref.get("accuracy")
    row["delta_accuracy_vs_teacher"] = (
        (acc - ref_acc) * 100 if acc is not None and ref_acc is not None else None
    )
    row["size_ratio_vs_teacher"] = _ratio(row.get("size_bytes"), ref.get("size_bytes"))
    row["macs_ratio_vs_teacher"] = _ratio(row.get("macs"), ref.get("macs"))
    for entry in row.get("latency") or []:
        ref_entry = find_latency(ref, entry["batch_size"], entry.get("threads")) if ref else None
        row_p50 = entry.get("p50_ms")
        entry["speedup_vs_teacher"] = (
            _ratio(ref_entry["p50_ms"], row_p50) if ref_entry is not None else None
        )


def build_report(
    *,
    run: str,
    config: Mapping,
    rows: Sequence[Mapping],
    verdict: Mapping,
    environment: Mapping,
    stages: Sequence[Mapping],
    reference_model: str | None = "teacher",
    evidence: Mapping | None = None,
) -> dict:
    """Assemble the report dict, adding per-row comparisons with ``reference_model``.

    ``delta_accuracy_vs_teacher`` is in percentage points; ``speedup_vs_teacher`` (reference p50
    / row p50, > 1 is faster) is added to each latency entry at the same batch and threads;
    size and MACs ratios are row / reference. Without a reference row they are None.
    """
    names = [row.get("name") for row in rows]
    if None in names:
        raise ValueError("every report row needs a 'name'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate report rows: {duplicates}")
    out_rows = [copy.deepcopy(dict(row)) for row in rows]
    ref = next((r for r in rows if r["name"] == reference_model), None)
    ref = copy.deepcopy(dict(ref)) if ref is not None else None
    for row in out_rows:
        _derive(row, ref)
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "compresskit_version": __version__,
        "run": run,
        "reference_model": reference_model,
        "config": copy.deepcopy(dict(config)),
        "rows": out_rows,
        "verdict": copy.deepcopy(dict(verdict)),
        "environment": copy.deepcopy(dict(environment)),
        "stages": [copy.deepcopy(dict(s)) for s in stages],
        "evidence": copy.deepcopy(dict(evidence or {})),
    }


def load_report(path: str | os.PathLike) -> dict:
    """Read a ``report.json`` and check it is a compresskit report this version understands."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path} is not a compresskit report (schema != {REPORT_SCHEMA!r})")
    version = report.get("schema_version")
    if version != REPORT_SCHEMA_VERSION:
        raise ValueError(
            f"{path} has report schema_version {version!r}; this compresskit reads "
            f"version {REPORT_SCHEMA_VERSION}"
        )
    return report
