"""CI budgets: check measured models against limits and pick the model to deploy.

Budgets arrive as a plain dict (the validated config dumped to data), rows as report rows
(accuracy as a fraction, ``size_bytes``, a ``latency`` list of per-(batch, threads) entries).
The deployed model is the fastest candidate that meets every budget (candidates equally fast
within the confidence intervals of their medians are ranked by accuracy, then size, so noise
does not flip the choice); when none does, the verdict
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

    Passing candidates are ranked by p50 latency at the budget's batch size and threads, but
    latency differences inside the measurement noise do not decide: the candidates whose 95%
    confidence intervals of the median (``ci95_ms``; a point without one) overlap the fastest's
    are taken as equally fast, and among them the most accurate is chosen, then the smallest
    file, then the first in ``candidates`` (``latency_ties`` names them; ``reason`` says so). If
    none passes, the most accurate candidate is reported with ``passed`` false and its failed
    budgets named in ``reason``. ``max_accuracy_drop`` checks name ``reference_model`` (in
    ``reference`` and in their detail).
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

    def interval(i: int) -> tuple[float, float, float]:
        """(p50, low, high) of the 95% CI of the median; a point without one; inf unmeasured."""
        entry = find_latency(by_name[candidates[i]], batch, threads)
        if entry is None or entry.get("p50_ms") is None:
            return (math.inf, math.inf, math.inf)
        p50, ci, rel = entry["p50_ms"], entry.get("ci95_ms"), entry.get("ci95_rel")
        if ci:
            lo, hi = ci
        elif rel is not None:
            lo, hi = p50 * (1 - rel), p50 * (1 + rel)
        else:
            lo = hi = p50
        return p50, min(lo, p50), max(hi, p50)

    def accuracy_then_size(i: int) -> tuple:
        row = by_name[candidates[i]]
        acc, size = row.get("accuracy"), row.get("size_bytes")
        return (-(acc if acc is not None else -math.inf), size if size is not None else math.inf, i)

    for r in results:  # name the accuracy-drop reference wherever the check is shown
        for c in r["checks"]:
            if c["budget"] == "max_accuracy_drop":
                c["reference"] = reference_model
                if reference_model is not None and c["detail"].startswith("drop "):
                    c["detail"] = c["detail"].replace(" pt (", f" pt vs {reference_model} (", 1)

    passing = [i for i, r in enumerate(results) if r["passed"]]
    ties: list[str] = []
    if passing:
        fastest = min(passing, key=speed)
        f_p50, _, f_hi = interval(fastest)
        tied = [i for i in passing if math.isfinite(f_p50) and interval(i)[1] <= f_hi]
        best = min(tied, key=accuracy_then_size) if len(tied) > 1 else fastest
        ties = [candidates[i] for i in tied] if len(tied) > 1 else []

        def timing(i: int) -> str:
            p50, lo, hi = interval(i)
            if not math.isfinite(p50):
                return "no latency"
            return f"p50 {p50:.3f} ms" + (f", 95% CI {lo:.3f}-{hi:.3f}" if hi > lo else "")

        if len(tied) > 1:
            listed = "; ".join(f"{candidates[i]} {timing(i)}" for i in sorted(tied, key=speed))
            reason = (
                f"{candidates[best]!r} is the most accurate of {len(tied)} candidate(s) equally fast within "
                f"the noise at batch {batch} (their 95% confidence intervals of the median overlap: {listed}), "
                f"of {len(passing)} meeting all budgets; latencies within each other's confidence interval "
                "are ranked by accuracy, then file size"
            )
        else:
            reason = (
                f"{candidates[best]!r} is the fastest of {len(passing)} candidate(s) meeting all "
                f"budgets ({timing(best)} at batch {batch}"
                + ("; no other's 95% CI overlaps it)" if len(passing) > 1 and math.isfinite(f_p50) else ")")
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
        "latency_ties": ties,
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


def accuracy_loss_check(what: str, source: str, accuracy: float | None, source_accuracy: float | None,
                        max_loss: float, setting: str) -> dict:
    """Did a model lose more test accuracy against the model it was made from than `max_loss`
    (a fraction) allows? A dict for the stage's metrics: the figures, ``exceeded`` and, when
    exceeded, a one-line ``warning`` the stage summary and the report show (`what`: "QAT",
    "pruning"; `source`: what it was made from; `setting`: the config key of `max_loss`).
    Without the source's accuracy (a checkpoint from elsewhere) nothing is judged."""
    known = accuracy is not None and source_accuracy is not None
    loss = source_accuracy - accuracy if known else None
    exceeded = known and loss > max_loss + _EPS
    out = {"source": source, "accuracy": accuracy, "source_accuracy": source_accuracy, "loss": loss,
           "max_loss": max_loss, "exceeded": bool(exceeded)}
    if exceeded:
        out["warning"] = (f"{what} lost {loss * 100:.1f} pt test accuracy against the {source} "
                          f"({_pct(source_accuracy)} -> {_pct(accuracy)}), more than {setting}="
                          f"{max_loss:g} ({max_loss * 100:.1f} pt)")
    return out


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
