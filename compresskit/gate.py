"""CI gate: compare a run's report with a baseline run's report, next to the budget re-check.

``compare_runs(current, baseline, limits)`` takes two report dicts (``report.json``) and checks,
per model present in both runs and for the deployed model:

- accuracy: a drop of more than ``max_accuracy_drop_pt`` percentage points fails;
- latency, per (batch size, thread setting) measured in both: judged on the timing samples each
  latency entry keeps (``samples_us``, see ``compresskit.bench.compact_samples``), not on two
  medians. The ratio of medians (current / baseline) gets a bootstrap confidence interval
  (``resamples`` moving-block resamples of each run, fixed ``seed``, numpy only); it covers the
  noise within each run, not a shift of the whole machine between runs, which the minimum
  effect must absorb (calibrate it by comparing two runs of the same commit). With t = 1 +
  ``max_latency_increase_pct`` / 100: **fail** when the interval lies above 1 (a significant
  slow-down) and the ratio is above t (larger than the minimum effect); **pass** when the
  interval's upper end is at most t (any slow-down is smaller than the minimum effect);
  otherwise **inconclusive**, as when samples are missing or too few, or when the two runs were
  timed on different CPUs or onnxruntime versions (unless ``any_machine``);
- size: growth of the model file by more than ``max_size_increase_pct`` percent fails.

The budget verdict (``compresskit.budget.decide``) can be passed in as well; the deployed model's
budget checks then become checks of the gate. "inconclusive" is a state, not a failure:
``GateResult.exit_code`` is 1 only for a failed check (or, with ``strict``, an inconclusive
one). ``to_junit``, ``to_markdown``, ``to_json`` and ``render_text`` write the outcome.
No torch, no onnxruntime.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from compresskit.budget import MIB, format_budget_value

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
STATUSES = (PASS, FAIL, INCONCLUSIVE)
GATE_SCHEMA = "compresskit.gate"
GATE_SCHEMA_VERSION = 1
SUITE_BUDGETS, SUITE_BASELINE = "budgets", "baseline"
_EPS = 1e-9


@dataclass(frozen=True)
class GateLimits:
    """How much worse than the baseline a run may be, and how latency evidence is weighed."""

    max_accuracy_drop_pt: float = 0.5  # percentage points (0.5 = 92.0% -> 91.5% still passes)
    max_latency_increase_pct: float = 5.0  # minimum effect: smaller slow-downs never fail
    max_size_increase_pct: float = 5.0  # percent of the baseline file size
    confidence: float = 0.95  # two-sided bootstrap interval of the ratio of medians
    resamples: int = 2000
    min_samples: int = 10  # fewer timing samples in either run: inconclusive
    seed: int = 0
    any_machine: bool = False  # judge latency even when the runs were timed on different machines
    strict: bool = False  # an inconclusive check fails the gate (exit 1)

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop_pt", "max_latency_increase_pct", "max_size_increase_pct"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence!r}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be >= 100, got {self.resamples!r}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples!r}")


@dataclass
class GateCheck:
    """One check: a JUnit testcase, a table row. ``change`` is in points (accuracy) or percent
    (latency, size); ``data`` holds the evidence (e.g. the latency interval)."""

    suite: str  # "budgets" or "baseline"
    model: str  # report row name; "deployed" when the deployed model changed between the runs
    name: str  # budget name, "accuracy_drop", "latency[batch=1,threads=1]", "size_increase"
    status: str  # pass, fail or inconclusive
    detail: str
    limit: float | None = None
    baseline: float | None = None
    current: float | None = None
    change: float | None = None
    data: dict = field(default_factory=dict)


@dataclass
class GateResult:
    checks: list[GateCheck]
    limits: GateLimits
    current: dict  # run, created, compresskit_version, deployed, machine
    baseline: dict | None
    notes: list[str] = field(default_factory=list)
    budget_verdict: dict | None = None

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    @property
    def status(self) -> str:
        """fail if any check failed, else inconclusive if any was, else pass."""
        counts = self.counts()
        return FAIL if counts[FAIL] else INCONCLUSIVE if counts[INCONCLUSIVE] else PASS

    @property
    def passed(self) -> bool:
        """No failed check (inconclusive ones allowed unless ``limits.strict``)."""
        return self.exit_code == 0

    @property
    def exit_code(self) -> int:
        counts = self.counts()
        return 1 if counts[FAIL] or (self.limits.strict and counts[INCONCLUSIVE]) else 0

    def to_dict(self) -> dict:
        return {
            "schema": GATE_SCHEMA,
            "schema_version": GATE_SCHEMA_VERSION,
            "status": self.status,
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "current": self.current,
            "baseline": self.baseline,
            "limits": asdict(self.limits),
            "checks": [asdict(c) for c in self.checks],
            "notes": list(self.notes),
            "budget_verdict": self.budget_verdict,
        }


# --------------------------------------------------------------------------- latency statistics


def _block_resample_medians(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``resamples`` moving-block bootstrap resamples of ``values`` (in run order).

    Consecutive runs are not independent (warm-up trends, bursts of load from other processes), so
    runs are drawn in blocks of about n^(1/3) consecutive ones (the usual order of the block length,
    Hall, Horowitz & Jing 1995), which widens the interval when the timings drift and changes
    little when they do not."""
    n = values.size
    block = max(1, round(n ** (1 / 3)))
    blocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=(resamples, blocks))
    idx = (starts[:, :, None] + np.arange(block)).reshape(resamples, -1)[:, :n]
    return np.median(values[idx], axis=1)


def ratio_of_medians_ci(
    current: Sequence[float],
    baseline: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """median(current) / median(baseline) and its percentile-bootstrap ``confidence`` interval:
    each run resampled on its own (moving blocks of consecutive runs, so give the samples in run
    order), ``resamples`` times, with a fixed seed, so the same two runs always give the same
    interval. The interval covers the noise within each run, not a shift of the whole machine
    between the two runs (see README: calibrate the minimum effect with an A/A comparison)."""
    cur = np.asarray(current, dtype=np.float64)
    base = np.asarray(baseline, dtype=np.float64)
    if cur.size == 0 or base.size == 0:
        raise ValueError("both runs need timing samples")
    if np.median(base) <= 0:
        raise ValueError("the baseline's median time must be positive")
    rng = np.random.default_rng(seed)
    cur_medians = _block_resample_medians(cur, resamples, rng)
    base_medians = _block_resample_medians(base, resamples, rng)
    ratios = cur_medians / np.maximum(base_medians, np.finfo(np.float64).tiny)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return float(np.median(cur) / np.median(base)), float(lo), float(hi)


def judge_latency(current: Mapping, baseline: Mapping, limits: GateLimits) -> tuple[str, str, dict]:
    """Status, detail and evidence for two latency entries at the same batch size and threads."""
    t = 1 + limits.max_latency_increase_pct / 100
    allowed = f"+{limits.max_latency_increase_pct:g}% allowed"
    p50_cur, p50_base = current.get("p50_ms"), baseline.get("p50_ms")
    p50s = f"p50 {_ms(p50_base)} -> {_ms(p50_cur)}"
    if p50_cur is not None and p50_base:
        p50s += f" ({_signed_pct(p50_cur / p50_base - 1)})"
    samples_cur, samples_base = current.get("samples_us") or [], baseline.get("samples_us") or []
    data = {"samples": [len(samples_base), len(samples_cur)], "threshold_ratio": t}
    short = [w for w, s in (("baseline", samples_base), ("this run", samples_cur)) if len(s) < limits.min_samples]
    if short:
        why = " and ".join(f"{w} has {len(s)}" for w, s in (("baseline", samples_base), ("this run", samples_cur))
                           if w in short)
        return INCONCLUSIVE, f"{p50s}; too few timing samples to judge ({why}, need {limits.min_samples})", data
    try:
        ratio, lo, hi = ratio_of_medians_ci(samples_cur, samples_base, confidence=limits.confidence,
                                            resamples=limits.resamples, seed=limits.seed)
    except (TypeError, ValueError) as err:  # a hand-edited report: zero or non-numeric samples
        return INCONCLUSIVE, f"{p50s}; timing samples unusable: {err}", data
    data.update(ratio=ratio, ci=[lo, hi], confidence=limits.confidence)
    ci = f"{limits.confidence:.0%} CI {_signed_pct(lo - 1)} .. {_signed_pct(hi - 1)}"
    text = f"median {_signed_pct(ratio - 1)} ({ci}; {p50s})"
    if lo > 1 and ratio > t + _EPS:
        return FAIL, f"slower: {text}, {allowed}", data
    if hi <= t + _EPS:
        return PASS, f"{text}, {allowed}", data
    if lo > 1:
        why = "significantly slower, but maybe by less than the minimum effect"
    else:
        why = "within noise, but a slow-down beyond the minimum effect is not ruled out"
    return INCONCLUSIVE, f"{why}: {text}, {allowed}", data


# --------------------------------------------------------------------------- comparisons


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _signed_pct(fraction: float) -> str:
    return f"{fraction * 100:+.1f}%"


def _rows(report: Mapping) -> dict[str, Mapping]:
    return {row["name"]: row for row in report.get("rows") or [] if row.get("name") is not None}


def _machine(report: Mapping) -> dict:
    env = report.get("environment") or {}
    cpu = env.get("cpu") or {}
    return {"cpu": cpu.get("model"), "architecture": cpu.get("architecture"),
            "onnxruntime": (env.get("versions") or {}).get("onnxruntime")}


def _run_info(report: Mapping, deployed: str | None) -> dict:
    return {"run": report.get("run"), "created": report.get("created"),
            "compresskit_version": report.get("compresskit_version"), "deployed": deployed,
            "machine": _machine(report)}


def _machine_differences(current: Mapping, baseline: Mapping) -> list[str]:
    """What differs between the machines (only fields both reports know)."""
    a, b = _machine(current), _machine(baseline)
    return [f"{k} {b[k]!r} vs {a[k]!r}" for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]


def _latency_key(entry: Mapping) -> tuple:
    threads = entry.get("threads_setting")
    return entry.get("batch_size"), entry.get("threads") if threads is None else threads


def _latency_name(key: tuple) -> str:
    batch, threads = key
    return f"latency[batch={batch},threads={'all' if threads == 0 else threads}]"


def _accuracy_check(model: str, cur: Mapping, base: Mapping, limits: GateLimits, data: dict) -> GateCheck:
    a_cur, a_base = cur.get("accuracy"), base.get("accuracy")
    limit = limits.max_accuracy_drop_pt
    check = GateCheck(SUITE_BASELINE, model, "accuracy_drop", INCONCLUSIVE, "", limit, a_base, a_cur, data=dict(data))
    if a_base is None:
        check.detail = "the baseline has no accuracy for this model"
    elif a_cur is None:
        check.status, check.detail = FAIL, "accuracy was not measured in this run"
    else:
        drop = (a_base - a_cur) * 100
        check.change = -drop
        ok = drop <= limit + _EPS
        check.status = PASS if ok else FAIL
        check.detail = (f"accuracy {a_base:.2%} -> {a_cur:.2%} ({-drop:+.2f} pt), "
                        f"drop {'<=' if ok else '>'} {limit:g} pt allowed")
    return check


def _size_check(model: str, cur: Mapping, base: Mapping, limits: GateLimits, data: dict) -> GateCheck:
    s_cur, s_base = cur.get("size_bytes"), base.get("size_bytes")
    limit = limits.max_size_increase_pct
    check = GateCheck(SUITE_BASELINE, model, "size_increase", INCONCLUSIVE, "", limit, s_base, s_cur, data=dict(data))
    if not s_base:
        check.detail = "the baseline has no file size for this model"
    elif s_cur is None:
        check.status, check.detail = FAIL, "file size unknown in this run"
    else:
        growth = (s_cur / s_base - 1) * 100
        check.change = growth
        ok = growth <= limit + _EPS
        check.status = PASS if ok else FAIL
        check.detail = (f"size {s_base / MIB:.3f} -> {s_cur / MIB:.3f} MiB ({growth:+.1f}%), "
                        f"{'<=' if ok else '>'} +{limit:g}% allowed")
    return check


def _latency_checks(model: str, cur: Mapping, base: Mapping, limits: GateLimits, data: dict,
                    other_machine: list[str]) -> list[GateCheck]:
    cur_entries = {_latency_key(e): e for e in cur.get("latency") or []}
    base_entries = {_latency_key(e): e for e in base.get("latency") or []}
    common = [k for k in base_entries if k in cur_entries]
    if not common:
        if not cur_entries and not base_entries:
            return []
        detail = "no latency measured at the same batch size and threads in both runs"
        return [GateCheck(SUITE_BASELINE, model, "latency", INCONCLUSIVE, detail, data=dict(data))]
    checks = []
    for key in common:
        c, b = cur_entries[key], base_entries[key]
        check = GateCheck(SUITE_BASELINE, model, _latency_name(key), INCONCLUSIVE, "",
                          limits.max_latency_increase_pct, b.get("p50_ms"), c.get("p50_ms"), data=dict(data))
        if c.get("p50_ms") is not None and b.get("p50_ms"):
            check.change = (c["p50_ms"] / b["p50_ms"] - 1) * 100
        if other_machine and not limits.any_machine:
            check.detail = (f"p50 {_ms(b.get('p50_ms'))} -> {_ms(c.get('p50_ms'))}, not compared: timed on "
                            f"different machines ({'; '.join(other_machine)})")
        else:
            check.status, check.detail, evidence = judge_latency(c, b, limits)
            check.data.update(evidence)
            if "ratio" in evidence:
                check.change = (evidence["ratio"] - 1) * 100
        checks.append(check)
    return checks


def compare_models(model: str, cur: Mapping, base: Mapping, limits: GateLimits, *,
                   other_machine: Sequence[str] = (), data: Mapping | None = None) -> list[GateCheck]:
    """Accuracy, latency and size checks of one model's row against its baseline row."""
    data = dict(data or {})
    return [_accuracy_check(model, cur, base, limits, data),
            *_latency_checks(model, cur, base, limits, data, list(other_machine)),
            _size_check(model, cur, base, limits, data)]


def budget_checks(verdict: Mapping) -> tuple[list[GateCheck], list[str]]:
    """The deployed model's budget checks as gate checks, and notes on the other candidates.

    Only the model the verdict names counts (as for ``compresskit run``): a candidate that is not
    deployed may miss a budget without failing the gate, so its misses are notes."""
    model = verdict.get("model")
    checks, notes = [], []
    for result in verdict.get("checks") or []:
        if result.get("model") == model:
            for c in result.get("checks") or []:
                checks.append(GateCheck(SUITE_BUDGETS, str(model), c["budget"], PASS if c["passed"] else FAIL,
                                        c.get("detail", ""), c.get("limit"), None, c.get("value"),
                                        data={"deployed": True}))
        else:
            failed = [c.get("detail", c["budget"]) for c in result.get("checks") or [] if not c["passed"]]
            if failed:
                notes.append(f"candidate {result.get('model')!r} (not deployed) misses: {'; '.join(failed)}")
    if verdict.get("reason"):
        notes.insert(0, f"budgets: {'PASS' if verdict.get('passed') else 'FAIL'}: {verdict['reason']}")
    return checks, notes


def compare_runs(
    current: Mapping,
    baseline: Mapping | None,
    limits: GateLimits | None = None,
    *,
    budget_verdict: Mapping | None = None,
) -> GateResult:
    """The gate: ``current`` report against ``baseline`` (None: budgets only) and, when given,
    the budget verdict (``budget.decide`` on ``current``'s rows, e.g. with tightened budgets).

    Compared: every model present in both reports, in the current report's order (the deployed
    one marked ``data["deployed"]``), plus a ``deployed`` entry when the deployed model changed
    between the runs (e.g. ``qat`` now, ``ptq`` in the baseline).
    """
    limits = limits or GateLimits()
    checks: list[GateCheck] = []
    notes: list[str] = []
    deployed = (budget_verdict or current.get("verdict") or {}).get("model")
    if budget_verdict is not None:
        checks, notes = budget_checks(budget_verdict)
        if not checks:
            notes.append("no budgets set")
    base_info = None
    if baseline is not None:
        cur_rows, base_rows = _rows(current), _rows(baseline)
        base_deployed = (baseline.get("verdict") or {}).get("model")
        base_info = _run_info(baseline, base_deployed)
        other_machine = _machine_differences(current, baseline)
        if other_machine:
            how = "judged anyway (--any-machine)" if limits.any_machine else "inconclusive"
            notes.append(f"latency was timed on different machines ({'; '.join(other_machine)}): {how}")
        common = [n for n in cur_rows if n in base_rows]
        for name in common:
            data = {"deployed": True} if name == deployed else {}
            checks += compare_models(name, cur_rows[name], base_rows[name], limits,
                                     other_machine=other_machine, data=data)
        if (deployed != base_deployed and deployed in cur_rows and base_deployed in base_rows):
            data = {"deployed": True, "current_model": deployed, "baseline_model": base_deployed}
            checks += compare_models("deployed", cur_rows[deployed], base_rows[base_deployed], limits,
                                     other_machine=other_machine, data=data)
            notes.append(f"the deployed model changed: {base_deployed!r} in the baseline, {deployed!r} now")
        if not common:
            checks.append(GateCheck(SUITE_BASELINE, "*", "models", INCONCLUSIVE,
                                    f"no model in both runs (baseline: {sorted(base_rows)}, this run: "
                                    f"{sorted(cur_rows)})"))
        only_base = [n for n in base_rows if n not in cur_rows]
        only_cur = [n for n in cur_rows if n not in base_rows]
        if only_base:
            notes.append(f"only in the baseline (not compared): {', '.join(only_base)}")
        if only_cur:
            notes.append(f"new in this run (not compared): {', '.join(only_cur)}")
    return GateResult(checks=checks, limits=limits, current=_run_info(current, deployed), baseline=base_info,
                      notes=notes, budget_verdict=dict(budget_verdict) if budget_verdict is not None else None)


# --------------------------------------------------------------------------- outputs


def _model_label(check: GateCheck) -> str:
    if check.model == "deployed" and "current_model" in check.data:
        return f"deployed ({check.data['current_model']} vs {check.data['baseline_model']})"
    if check.data.get("deployed") and check.suite == SUITE_BASELINE:
        return f"{check.model} (deployed)"
    return check.model


def _fmt_value(check: GateCheck, value) -> str:
    if value is None:
        return "-"
    if check.suite == SUITE_BUDGETS:
        return format_budget_value(check.name, value)
    if check.name == "accuracy_drop":
        return f"{value:.2%}"
    if check.name.startswith("latency"):
        return _ms(value)
    if check.name == "size_increase":
        return f"{value / MIB:.3f} MiB"
    return str(value)


def _fmt_change(check: GateCheck) -> str:
    if check.change is None:
        return "-"
    return f"{check.change:+.2f} pt" if check.name == "accuracy_drop" else f"{check.change:+.1f}%"


def _fmt_limit(check: GateCheck) -> str:
    if check.limit is None:
        return "-"
    if check.suite == SUITE_BUDGETS:
        return format_budget_value(check.name, check.limit)
    return f"-{check.limit:g} pt" if check.name == "accuracy_drop" else f"+{check.limit:g}%"


def _headline(result: GateResult) -> str:
    counts = result.counts()
    word = {PASS: "PASS", FAIL: "FAIL", INCONCLUSIVE: "INCONCLUSIVE"}[result.status]
    if result.status == INCONCLUSIVE:
        word += " (fails with --strict)" if not result.limits.strict else " (strict: fails)"
    return f"{word}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[INCONCLUSIVE]} inconclusive"


def _runs_line(result: GateResult) -> str:
    cur = result.current
    line = f"run {cur.get('run')!r} ({cur.get('created') or 'undated'}), deployed {cur.get('deployed')!r}"
    if result.baseline is not None:
        base = result.baseline
        line += (f"; baseline {base.get('run')!r} ({base.get('created') or 'undated'}), "
                 f"deployed {base.get('deployed')!r}")
    return line


def to_junit(result: GateResult) -> str:
    """JUnit XML: one testsuite per kind of check (budgets, baseline), one testcase per model x
    check; failed checks carry <failure>, inconclusive ones <skipped> with the reason."""
    counts = result.counts()
    root = ET.Element("testsuites", name="compresskit check", tests=str(len(result.checks)),
                      failures=str(counts[FAIL]), errors="0", skipped=str(counts[INCONCLUSIVE]), time="0")
    for suite in (SUITE_BUDGETS, SUITE_BASELINE):
        checks = [c for c in result.checks if c.suite == suite]
        if not checks:
            continue
        node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)),
                             failures=str(sum(c.status == FAIL for c in checks)), errors="0",
                             skipped=str(sum(c.status == INCONCLUSIVE for c in checks)), time="0")
        props = ET.SubElement(node, "properties")
        for key, info in (("run", result.current), ("baseline", result.baseline)):
            if info is not None:
                ET.SubElement(props, "property", name=key, value=str(info.get("run")))
        for c in checks:
            case = ET.SubElement(node, "testcase", classname=f"compresskit.{suite}.{c.model}", name=c.name, time="0")
            if c.status == FAIL:
                fail = ET.SubElement(case, "failure", message=c.detail, type=suite)
                fail.text = c.detail
            elif c.status == INCONCLUSIVE:
                ET.SubElement(case, "skipped", message=f"inconclusive: {c.detail}")
            else:
                ET.SubElement(case, "system-out").text = c.detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def to_json(result: GateResult) -> str:
    """The outcome as JSON (schema ``compresskit.gate``, version 1)."""
    return json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


_MARK = {PASS: "✅ pass", FAIL: "❌ **FAIL**", INCONCLUSIVE: "⚠️ inconclusive"}


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(result: GateResult) -> str:
    """Markdown for ``$GITHUB_STEP_SUMMARY`` or a pull-request comment."""
    icon = {PASS: "✅", FAIL: "❌", INCONCLUSIVE: "⚠️"}[result.status]
    lines = [f"## compresskit check {icon} {_headline(result)}", "", _runs_line(result) + ".", ""]
    budgets = [c for c in result.checks if c.suite == SUITE_BUDGETS]
    if budgets:
        lines += [f"### Budgets (deployed model `{result.current.get('deployed')}`)", ""]
        lines += _md_table(["model", "budget", "limit", "value", "result", "detail"],
                           [[c.model, c.name, _fmt_limit(c), _fmt_value(c, c.current), _MARK[c.status], c.detail]
                            for c in budgets])
        lines.append("")
    base = [c for c in result.checks if c.suite == SUITE_BASELINE]
    if base:
        lim = result.limits
        lines += ["### Against the baseline", "",
                  f"Limits: accuracy -{lim.max_accuracy_drop_pt:g} pt, latency +{lim.max_latency_increase_pct:g}% "
                  f"(judged on the timing samples, {lim.confidence:.0%} bootstrap CI of the ratio of medians), "
                  f"size +{lim.max_size_increase_pct:g}%.", ""]
        lines += _md_table(["model", "check", "baseline", "current", "change", "limit", "result", "detail"],
                           [[_model_label(c), c.name, _fmt_value(c, c.baseline), _fmt_value(c, c.current),
                             _fmt_change(c), _fmt_limit(c), _MARK[c.status], c.detail] for c in base])
        lines.append("")
    if not result.checks:
        lines += ["No checks: no budgets set and no baseline given.", ""]
    if result.notes:
        lines += ["Notes:", ""] + [f"- {_md_cell(n)}" for n in result.notes] + [""]
    return "\n".join(lines)


def render_text(result: GateResult, suites: Sequence[str] = (SUITE_BUDGETS, SUITE_BASELINE)) -> str:
    """Plain text for a terminal: the checks of ``suites`` as an aligned table, then the headline."""
    header = ["model", "check", "baseline", "current", "change", "result", "detail"]
    rows = [[_model_label(c), c.name, _fmt_value(c, c.baseline), _fmt_value(c, c.current), _fmt_change(c),
             c.status if c.status != FAIL else "FAIL", c.detail] for c in result.checks if c.suite in suites]
    lines = []
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        for r in [header, ["-" * w for w in widths] + ["-" * 6], *rows]:
            cells = [cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)] + [r[-1]]
            lines.append("  ".join(cells).rstrip())
    lines += [f"note: {n}" for n in result.notes if not n.startswith("budgets: ")]
    lines.append(f"check: {_headline(result)}")
    return "\n".join(lines)
