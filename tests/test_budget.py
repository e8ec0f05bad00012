"""Tests of compresskit.budget: per-model checks, model selection and the verdict text."""

from __future__ import annotations

import pytest

from compresskit import budget

MIB = 2**20


def _row(name, accuracy, p50_b1, size_mib, *, threads=1, p50_b64=None):
    latency = [{"batch_size": 1, "threads": threads, "threads_setting": threads, "p50_ms": p50_b1}]
    if p50_b64 is not None:
        latency.append({"batch_size": 64, "threads": threads, "p50_ms": p50_b64})
    return {
        "name": name,
        "accuracy": accuracy,
        "size_bytes": int(size_mib * MIB),
        "latency": latency,
    }


ROWS = [
    _row("teacher", 0.930, 20.0, 10.0),
    _row("student", 0.915, 4.0, 1.2),
    _row("ptq", 0.912, 2.0, 0.40),
    _row("qat", 0.914, 2.5, 0.40),
]
CANDIDATES = ["student", "ptq", "qat"]


def _by_budget(result):
    return {c["budget"]: c for c in result["checks"]}


def test_check_model_all_budgets_pass():
    budgets = {
        "min_accuracy": 0.9,
        "max_accuracy_drop": 0.02,
        "max_latency_ms": 3.0,
        "max_size_mb": 0.5,
    }
    result = budget.check_model(ROWS[2], budgets, reference_accuracy=0.930)
    assert result["model"] == "ptq" and result["passed"] is True
    checks = _by_budget(result)
    assert set(checks) == set(budgets)
    assert checks["max_accuracy_drop"]["value"] == pytest.approx(0.018)
    assert checks["max_latency_ms"]["value"] == 2.0
    assert checks["max_size_mb"]["value"] == pytest.approx(0.40, abs=1e-6)
    assert all(c["passed"] for c in result["checks"])


def test_check_model_failures_and_skips():
    budgets = {"min_accuracy": 0.913, "max_accuracy_drop": 0.01, "max_latency_ms": 1.5}
    result = budget.check_model(ROWS[2], budgets, reference_accuracy=0.930)
    assert result["passed"] is False
    checks = _by_budget(result)
    assert "max_size_mb" not in checks  # None budgets are skipped
    assert not checks["min_accuracy"]["passed"]
    assert "91.20% < 91.30%" in checks["min_accuracy"]["detail"]
    assert not checks["max_accuracy_drop"]["passed"]
    assert not checks["max_latency_ms"]["passed"]
    assert "2.000 ms > 1.5 ms" in checks["max_latency_ms"]["detail"]


def test_boundary_values_pass():
    row = _row("m", 0.9, 3.0, 0.5)
    result = budget.check_model(
        row, {"min_accuracy": 0.9, "max_latency_ms": 3.0, "max_size_mb": 0.5}, None
    )
    assert result["passed"] is True
    drop = budget.check_model(_row("m", 0.7, 1, 1), {"max_accuracy_drop": 0.2}, 0.9)
    assert drop["passed"] is True  # 0.9 - 0.7 is 0.20000000000000007 in floats


def test_missing_measurements_fail():
    row = {"name": "m", "accuracy": None, "latency": [], "size_bytes": None}
    budgets = {
        "min_accuracy": 0.5,
        "max_accuracy_drop": 0.1,
        "max_latency_ms": 10,
        "max_size_mb": 1,
    }
    result = budget.check_model(row, budgets, reference_accuracy=0.9)
    assert result["passed"] is False
    details = [c["detail"] for c in result["checks"]]
    assert all(not c["passed"] for c in result["checks"])
    assert "accuracy was not measured" in details[0]
    assert "no latency measured at batch 1" in details[2]
    no_ref = budget.check_model(ROWS[1], {"max_accuracy_drop": 0.1}, None)
    assert not no_ref["passed"]
    assert "reference model's accuracy" in no_ref["checks"][0]["detail"]


def test_latency_batch_and_threads_selection():
    row = {
        "name": "m",
        "latency": [
            {"batch_size": 1, "threads": 1, "threads_setting": 1, "p50_ms": 5.0},
            {"batch_size": 1, "threads": 4, "threads_setting": 0, "p50_ms": 2.0},
            {"batch_size": 64, "threads": 1, "threads_setting": 1, "p50_ms": 50.0},
        ],
    }
    first = budget.check_model(row, {"max_latency_ms": 3.0}, None)
    assert first["checks"][0]["value"] == 5.0  # first thread setting
    four = budget.check_model(row, {"max_latency_ms": 3.0, "latency_threads": 4}, None)
    assert four["checks"][0]["value"] == 2.0 and four["passed"]
    all_cores = budget.check_model(row, {"max_latency_ms": 3.0, "latency_threads": 0}, None)
    assert all_cores["checks"][0]["value"] == 2.0
    big = budget.check_model(row, {"max_latency_ms": 60, "latency_batch_size": 64}, None)
    assert big["checks"][0]["value"] == 50.0


def test_select_fastest_passing():
    budgets = {"min_accuracy": 0.91, "max_size_mb": 1.0}
    verdict = budget.select_and_verdict(ROWS, CANDIDATES, budgets, "teacher")
    assert verdict["passed"] is True
    assert verdict["model"] == "ptq"  # student fails size; ptq is faster than qat
    assert "'ptq' is the fastest of 2" in verdict["reason"]
    assert [c["model"] for c in verdict["checks"]] == CANDIDATES
    assert verdict["reference_accuracy"] == 0.930
    assert verdict["budgets"]["latency_batch_size"] == 1


def test_accuracy_budget_changes_the_choice():
    verdict = budget.select_and_verdict(ROWS, CANDIDATES, {"min_accuracy": 0.913}, "teacher")
    assert verdict["model"] == "qat" and verdict["passed"]


def test_no_candidate_passes_reports_most_accurate():
    budgets = {"max_latency_ms": 1.0, "max_accuracy_drop": 0.01}
    verdict = budget.select_and_verdict(ROWS, CANDIDATES, budgets, "teacher")
    assert verdict["passed"] is False
    assert verdict["model"] == "student"  # most accurate candidate
    assert "no candidate meets all budgets" in verdict["reason"]
    assert "p50 4.000 ms > 1 ms" in verdict["reason"]
    assert "drop 1.50 pt" in verdict["reason"]
    headline = budget.render_verdict(verdict).splitlines()[0]
    assert headline.startswith("Verdict: FAIL: best candidate 'student'")


def test_no_budgets_picks_fastest():
    verdict = budget.select_and_verdict(ROWS, CANDIDATES, {}, None)
    assert verdict["passed"] and verdict["model"] == "ptq"
    assert all(r["checks"] == [] for r in verdict["checks"])


def test_selection_errors():
    with pytest.raises(ValueError, match="'pruned'"):
        budget.select_and_verdict(ROWS, ["pruned"], {}, "teacher")
    with pytest.raises(ValueError, match="reference model 'base'"):
        budget.select_and_verdict(ROWS, CANDIDATES, {}, "base")
    with pytest.raises(ValueError, match="no candidate"):
        budget.select_and_verdict(ROWS, [], {}, "teacher")
    with pytest.raises(ValueError, match="max_latency"):
        budget.check_model(ROWS[0], {"max_latency": 3}, None)


def test_render_verdict():
    verdict = budget.select_and_verdict(
        ROWS, CANDIDATES, {"min_accuracy": 0.913, "max_size_mb": 1.0}, "teacher"
    )
    text = budget.render_verdict(verdict)
    lines = text.splitlines()
    assert lines[0].startswith("Verdict: PASS: deploy 'qat'")
    assert lines[1].split() == ["model", "budget", "limit", "value", "result"]
    assert len(lines) == 3 + 2 * len(CANDIDATES)
    student_size = next(ln for ln in lines if ln.startswith("student") and "max_size_mb" in ln)
    assert student_size.split()[-1] == "FAIL"
    assert "91.30%" in text and "1.200 MiB" in text
    empty = budget.render_verdict(budget.select_and_verdict(ROWS, CANDIDATES, {}, None))
    assert "(no budgets set)" in empty


# ------------------------------------------------------------------ choice under latency noise


def _ci_row(name, accuracy, p50, ci, size_mib=0.4):
    row = _row(name, accuracy, p50, size_mib)
    row["latency"][0]["ci95_ms"] = list(ci) if ci is not None else None
    return row


def test_latencies_within_the_ci_are_ranked_by_accuracy():
    rows = [_ci_row("ptq", 0.910, 1.00, (0.97, 1.03)), _ci_row("qat", 0.914, 1.02, (0.99, 1.05)),
            _ci_row("pruned", 0.916, 1.40, (1.35, 1.45), size_mib=1.0)]
    verdict = budget.select_and_verdict(rows, ["qat", "ptq", "pruned"], {"min_accuracy": 0.9}, None)
    assert verdict["passed"] and verdict["model"] == "qat"  # as fast as ptq within the noise, more accurate
    assert verdict["latency_ties"] == ["qat", "ptq"]  # pruned is slower beyond its interval: not tied
    assert "'qat' is the most accurate of 2 candidate(s) equally fast within the noise" in verdict["reason"]
    assert "ranked by accuracy, then file size" in verdict["reason"]
    assert "ptq p50 1.000 ms, 95% CI 0.970-1.030; qat p50 1.020 ms" in verdict["reason"]


def test_choice_is_stable_when_noise_swaps_the_order():
    """The two INT8 models swap places between runs by noise: the deployed model does not."""
    for ptq_p50, qat_p50 in ((1.00, 1.02), (1.02, 1.00), (1.01, 1.01)):
        rows = [_ci_row("ptq", 0.910, ptq_p50, (ptq_p50 - 0.03, ptq_p50 + 0.03)),
                _ci_row("qat", 0.914, qat_p50, (qat_p50 - 0.03, qat_p50 + 0.03))]
        assert budget.select_and_verdict(rows, ["ptq", "qat"], {}, None)["model"] == "qat"


def test_ties_then_size_and_clear_differences_by_speed():
    rows = [_ci_row("ptq", 0.91, 1.00, (0.97, 1.03), size_mib=0.5),
            _ci_row("qat", 0.91, 1.01, (0.98, 1.04), size_mib=0.3)]
    assert budget.select_and_verdict(rows, ["ptq", "qat"], {}, None)["model"] == "qat"  # same accuracy: smaller
    rows[1] = _ci_row("qat", 0.99, 1.20, (1.15, 1.25))
    verdict = budget.select_and_verdict(rows, ["ptq", "qat"], {}, None)
    assert verdict["model"] == "ptq" and verdict["latency_ties"] == []
    assert "'ptq' is the fastest of 2" in verdict["reason"] and "no other's 95% CI overlaps it" in verdict["reason"]
    # without intervals (fewer than 8 runs) only exactly equal medians tie
    rows = [_ci_row("ptq", 0.91, 1.00, None), _ci_row("qat", 0.92, 1.001, None)]
    assert budget.select_and_verdict(rows, ["ptq", "qat"], {}, None)["model"] == "ptq"
    rows[1] = _ci_row("qat", 0.92, 1.00, None)
    assert budget.select_and_verdict(rows, ["ptq", "qat"], {}, None)["model"] == "qat"


def test_budget_checks_only_among_passing_and_name_the_drop_reference():
    rows = [_ci_row("student", 0.92, 2.0, (1.9, 2.1), size_mib=1.0), _ci_row("ptq", 0.915, 1.0, (0.9, 1.1)),
            _ci_row("qat", 0.89, 1.0, (0.9, 1.1))]
    verdict = budget.select_and_verdict(rows, ["ptq", "qat"], {"max_accuracy_drop": 0.01}, "student")
    assert verdict["model"] == "ptq" and verdict["latency_ties"] == []  # qat fails the drop budget
    drop = next(c for c in verdict["checks"][0]["checks"] if c["budget"] == "max_accuracy_drop")
    assert drop["reference"] == "student" and drop["detail"].startswith("drop 0.50 pt vs student (92.00% -> 91.50%)")
