"""CI budgets: check measured models against limits and pick the model to deploy.

Budgets arrive as a plain dict (the validated config dumped to data), rows as report rows
(accuracy as a fraction, ``size_bytes``, a ``latency`` list of per-(batch, threads) entries).
The deployed model is the fastest candidate that meets every budget; when none does, the verdict
still names the most accurate candidate, with ``passed`` false and the failing budgets spelled
out, so a failed run leaves a usable answer. Pure Python: no torch, no onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MIB = 2**20
_EPS = 1e-9  # float slack: 0.1 + 0.2 must not fail a 0.3 limit

BUDGET_DEFAULTS: dict = {
    "min_accuracy": None,
    "max_accuracy_drop": None,
    "max_latency_ms": None,
    "max_size_mb": None,
    "latency_batch_size": 1,
    "latency_threads": None,
}


def normalize_budgets(budgets: Mapping | None) -> dict:
    """Budgets with defaults filled in; unknown keys are an error (a typo must not pass CI)."""
    budgets = dict(budgets or {})
    unknown = set(budgets) - set(BUDGET_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown budget keys {sorted(unknown)}; known: {sorted(BUDGET_DEFAULTS)}")
    merged = {**BUDGET_DEFAULTS, **budgets}
    if merged["latency_batch_size"] is None:
        merged["latency_batch_size"] = 1
    return merged


def find_latency(row: Mapping, batch_size: int, threads: int | None = None) -> dict | None:
    """The latency entry of ``row`` at ``batch_size`` and ``threads`` (None: the first entry at
    that batch, i.e. the first thread setting measured). ``threads`` matches either the actual
    thread count or the requested setting (0 = all cores). None if not measured."""
    for entry in row.get("latency") or []:
        if entry.get("batch_size") != batch_size:
            continue
        if threads is None or threads in (entry.get("threads"), entry.get("threads_setting")):
            return entry
    return None


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.2f}%"


def _check(budget: str, limit, value, passed: bool, detail: str) -> dict:
    return {"budget": budget, "limit": limit, "value": value, "passed": passed, "detail": detail}


def _accuracy_checks(row: Mapping, b: Mapping, reference_accuracy: float | None) -> list[dict]:
    checks = []
    acc = row.get("accuracy")
    if b["min_accuracy"] is not None:
        limit = b["min_accuracy"]
        if acc is None:
            checks.append(_check("min_accuracy", limit, None, False, "accuracy was not measured"))
        else:
            ok = acc >= limit - _EPS
            sign = ">=" if ok else "<"
            detail = f"accuracy {_pct(acc)} {sign} {_pct(limit)}"
            checks.append(_check("min_accuracy", limit, acc, ok, detail))
    if b["max_accuracy_drop"] is not None:
        limit = b["max_accuracy_drop"]
        if acc is None or reference_accuracy is None:
            what = "accuracy" if acc is None else "the reference model's accuracy"
            checks.append(
                _check("max_accuracy_drop", limit, None, False, f"{what} was not measured")
            )
        else:
            drop = reference_accuracy - acc
            ok = drop <= limit + _EPS
            detail = (
                f"drop {drop * 100:.2f} pt ({_pct(reference_accuracy)} -> {_pct(acc)}) "
                f"{'<=' if ok else '>'} {limit * 100:.2f} pt"
            )
            checks.append(_check("max_accuracy_drop", limit, drop, ok, detail))
    return checks


def _cost_checks(row: Mapping, b: Mapping) -> list[dict]:
    checks = []
    if b["max_latency_ms"] is not None:
        limit = b["max_latency_ms"]
        batch, threads = b["latency_batch_size"], b["latency_threads"]
        entry = find_latency(row, batch, threads)
        where = f"batch {batch}, " + (
            "first thread setting" if threads is None else f"{threads} thread(s)"
        )
        if entry is None:
            checks.append(
                _check("max_latency_ms", limit, None, False, f"no latency measured at {where}")
            )
        else:
            p50 = entry["p50_ms"]
            ok = p50 <= limit + _EPS
            detail = f"p50 {p50:.3f} ms {'<=' if ok else '>'} {limit:g} ms ({where})"
            checks.append(_check("max_latency_ms", limit, p50, ok, detail))
    if b["max_size_mb"] is not None:
        limit = b["max_size_mb"]
        size = row.get("size_bytes")
        if size is None:
            checks.append(_check("max_size_mb", limit, None, False, "file size unknown"))
        else:
            mib = size / MIB
            ok = mib <= limit + _EPS
            detail = f"size {mib:.3f} MiB {'<=' if ok else '>'} {limit:g} MiB"
            checks.append(_check("max_size_mb", limit, mib, ok, detail))
    return checks


def check_model(row: Mapping, budgets: Mapping | None, reference_accuracy: float | None) -> dict:
    """Check one report row against every budget that is set (None budgets are skipped).

    A budget whose measurement is missing fails with a detail that says so: an unmeasured
    model must never pass CI by accident.
    """
    b = normalize_budgets(budgets)
    checks = _accuracy_checks(row, b, reference_accuracy) + _cost_checks(row, b)
    return {
        "model": row.get("name"),
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
    }


def _rows_by_name(rows: Sequence[Mapping]) -> dict[str, Mapping]:
    by_name: dict[str, Mapping] = {}
    for row in rows:
        name = row.get("name")
        if name is None:
            raise ValueError("every row needs a 'name'")
        by_name[name] = row
    return by_name


def select_and_verdict(
    rows: Sequence[Mapping],
    candidates: Sequence[str],
    budgets: Mapping | None,
    reference_model: str | None,
) -> dict:
    """Check every candidate and choose the model to deploy.

    Passing candidates are ranked by p50 latency at the budget's batch size and threads (then
    by accuracy, then by their order in ``candidates``); if none passes, the most accurate
    candidate is reported with ``passed`` false and its failed budgets named in ``reason``.
    """
    b = normalize_budgets(budgets)
    by_name = _rows_by_name(rows)
    if not candidates:
        raise ValueError("no candidate models to choose from")
    missing = [c for c in candidates if c not in by_name]
    if missing:
        raise ValueError(f"candidates {missing} have no measured row; rows: {sorted(by_name)}")
    reference_accuracy = None
    if reference_model is not None:
        if reference_model not in by_name:
            raise ValueError(f"reference model {reference_model!r} has no row: {sorted(by_name)}")
        reference_accuracy = by_name[reference_model].get("accuracy")

    results = [check_model(by_name[c], b, reference_accuracy) for c in candidates]
    batch, threads = b["latency_batch_size"], b["latency_threads"]

    def speed(i: int) -> tuple:
        entry = find_latency(by_name[candidates[i]], batch, threads)
        acc = by_name[candidates[i]].get("accuracy")
        p50 = entry["p50_ms"] if entry else math.inf
        return (p50, -(acc if acc is not None else -math.inf), i)

    def accuracy(i: int) -> tuple:
        acc = by_name[candidates[i]].get("accuracy")
        return (-(acc if acc is not None else -math.inf), speed(i)[0], i)

    passing = [i for i, r in enumerate(results) if r["passed"]]
    if passing:
        best = min(passing, key=speed)
        p50 = speed(best)[0]
        timing = f"p50 {p50:.3f} ms at batch {batch}" if math.isfinite(p50) else "no latency"
        reason = (
            f"{candidates[best]!r} is the fastest of {len(passing)} candidate(s) meeting all "
            f"budgets ({timing})"
        )
    else:
        best = min(range(len(candidates)), key=accuracy)
        failed = "; ".join(c["detail"] for c in results[best]["checks"] if not c["passed"])
        reason = (
            f"no candidate meets all budgets; the most accurate, {candidates[best]!r}, "
            f"fails: {failed}"
        )
    return {
        "passed": bool(passing),
        "model": candidates[best],
        "reason": reason,
        "checks": results,
        "budgets": b,
        "reference_model": reference_model,
        "reference_accuracy": reference_accuracy,
    }


def format_budget_value(budget: str, value) -> str:
    """A budget's limit or measured value with its unit (%, pt, ms, MiB)."""
    if value is None:
        return "-"
    if budget == "min_accuracy":
        return _pct(value)
    if budget == "max_accuracy_drop":
        return f"{value * 100:.2f} pt"
    if budget == "max_latency_ms":
        return f"{value:.3f} ms"
    if budget == "max_size_mb":
        return f"{value:.3f} MiB"
    return str(value)


def verdict_rows(verdict: Mapping) -> list[list[str]]:
    """One row of strings per (candidate, budget): model, budget, limit, value, result."""
    table = []
    for result in verdict.get("checks", []):
        for c in result["checks"]:
            table.append(
                [
                    str(result["model"]),
                    c["budget"],
                    format_budget_value(c["budget"], c["limit"]),
                    format_budget_value(c["budget"], c["value"]),
                    "pass" if c["passed"] else "FAIL",
                ]
            )
    return table


def render_verdict(verdict: Mapping) -> str:
    """The verdict as plain text: a headline and a table of every check."""
    if verdict["passed"]:
        head = f"Verdict: PASS: deploy {verdict['model']!r}"
    else:
        head = f"Verdict: FAIL: best candidate {verdict['model']!r}"
    lines = [f"{head}: {verdict['reason']}"]
    header = ["model", "budget", "limit", "value", "result"]
    rows = verdict_rows(verdict)
    if not rows:
        lines.append("(no budgets set)")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- deployment policy

# Report order of the models a run can produce; the INT8 ones and the float model they were made
# from compete for deployment.
MODEL_ORDER = ("teacher", "student_baseline", "student", "pruned", "ptq", "qat")
INT8_MODELS = ("qat", "ptq")
FLOAT_SOURCES = ("pruned", "student", "teacher")


def resolve_budgets(budgets: Mapping | None, bench_threads: Sequence[int]) -> dict:
    """Budgets with defaults filled in and the latency thread count made explicit: the first
    benchmarked thread setting unless the budget names one."""
    b = normalize_budgets({k: v for k, v in dict(budgets or {}).items() if k != "reference_model"})
    if b["latency_threads"] is None:
        b["latency_threads"] = list(bench_threads)[0] if bench_threads else 1
    b["reference_model"] = (budgets or {}).get("reference_model", "student")
    return b


def deployment_candidates(names: Sequence[str]) -> list[str]:
    """The models that compete for deployment: every INT8 model, and the float model they were
    quantized from (the first present of pruned, student, teacher), so an INT8 model slower than
    its float source on this machine never ships unnoticed."""
    present = set(names)
    return [n for n in INT8_MODELS if n in present] + [n for n in FLOAT_SOURCES if n in present][:1]


def decide(rows: Sequence[Mapping], budgets: Mapping, candidates: Sequence[str] | None = None) -> dict:
    """Check the candidates against resolved budgets (:func:`resolve_budgets`) and choose the model
    to deploy. The reference of ``max_accuracy_drop`` falls back to the first float model present
    when the named one was not produced (e.g. no distillation: the teacher)."""
    b = dict(budgets)
    reference = b.pop("reference_model", "student")
    names = [r["name"] for r in rows]
    if reference not in names:
        reference = next((n for n in ("student", *FLOAT_SOURCES) if n in names), None)
    if candidates is None:
        candidates = deployment_candidates(names)
    return select_and_verdict(rows, candidates, b, reference_model=reference)
