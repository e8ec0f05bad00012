"""The CI gate (compresskit.gate, `compresskit check --baseline`): synthetic reports, no models."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from compresskit import bench, budget, gate, report
from compresskit.cli import app

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
BUDGETS = {"min_accuracy": 0.9, "max_latency_ms": 5.0}
ENV = {"cpu": {"model": "Example CPU", "architecture": "x86_64"}, "versions": {"onnxruntime": "1.32.0"}}
runner = CliRunner()


def _samples(p50_ms: float, n: int = 200, noise: float = 0.03, seed: int = 0) -> list[float]:
    """Timing samples in us around ``p50_ms``: lognormal noise plus a few slow outliers."""
    rng = np.random.default_rng(seed)
    t = p50_ms * 1e3 * rng.lognormal(0.0, noise, n)
    t[rng.random(n) < 0.03] *= 1.5
    return [round(float(v), 1) for v in t]


def _lat(batch: int, p50: float, seed: int, noise: float = 0.03, samples: bool = True) -> dict:
    entry = {"batch_size": batch, "threads": 1, "threads_setting": 1, "p50_ms": p50, "p90_ms": p50 * 1.1,
             "mean_ms": p50 * 1.05, "throughput": batch * 1000 / p50}
    if samples:
        entry["samples_us"] = _samples(p50, noise=noise, seed=seed)
    return entry


def _rows(*, slow: float = 1.0, acc: float = 0.0, size: float = 1.0, seed: int = 0, noise: float = 0.03,
          samples: bool = True) -> list[dict]:
    """teacher, student, ptq (the deployed one); ``slow`` scales every latency, ``acc`` shifts
    every accuracy (fraction), ``size`` scales file sizes."""
    spec = [("teacher", "fp32", 0.92, 8 * MIB, 10.0, 400.0), ("student", "fp32", 0.915, 1 * MIB, 2.0, 50.0),
            ("ptq", "int8", 0.913, 300 * 1024, 1.6, 25.0)]
    rows = []
    for i, (name, precision, accuracy, size_bytes, p1, p64) in enumerate(spec):
        rows.append({"name": name, "stage": name, "precision": precision, "accuracy": accuracy + acc,
                     "size_bytes": int(size_bytes * size), "macs": 3_000_000, "params": 280_000,
                     "latency": [_lat(1, p1 * slow, seed * 100 + 2 * i, noise, samples),
                                 _lat(64, p64 * slow, seed * 100 + 2 * i + 1, noise, samples)]})
    return rows


def _report(rows: list[dict], run: str = "edge", env: dict = ENV) -> dict:
    verdict = budget.decide(rows, budget.resolve_budgets(BUDGETS, [1]), ["ptq", "student"])
    return report.build_report(run=run, config={"budgets": BUDGETS, "bench": {"threads": [1]}}, rows=rows,
                               verdict=verdict, environment=env, stages=[])


def _statuses(result: gate.GateResult, name_prefix: str = "") -> dict[tuple[str, str], str]:
    return {(c.model, c.name): c.status for c in result.checks if c.name.startswith(name_prefix)}


# --------------------------------------------------------------------------- compact samples


def test_compact_samples_keeps_order_and_caps():
    times = [1000 * (i + 1) for i in range(50)]
    assert bench.compact_samples(times) == [float(i + 1) for i in range(50)]
    many = list(range(10_000, 10_000 + 1000 * 1001, 1000))  # 1001 runs, increasing
    kept = bench.compact_samples(many, limit=200)
    assert len(kept) == 200 and kept[0] == 10.0 and kept[-1] == many[-1] / 1e3
    assert kept == sorted(kept)  # raw order kept (here increasing), evenly thinned
    assert bench.compact_samples([1234]) == [1.2]


def test_latency_summary_has_samples():
    summary = bench._latency_summary([2_000_000, 1_000_000, 3_000_000], batch_size=1)
    assert summary["samples_us"] == [2000.0, 1000.0, 3000.0]
    json.dumps(summary)


# --------------------------------------------------------------------------- compare_runs


def test_run_against_itself_passes():
    rep = _report(_rows())
    result = gate.compare_runs(rep, copy.deepcopy(rep), gate.GateLimits())
    assert result.status == gate.PASS and result.exit_code == 0 and result.passed
    names = {(c.model, c.name) for c in result.checks if c.suite == gate.SUITE_BASELINE}
    assert ("ptq", "accuracy_drop") in names and ("teacher", "latency[batch=64,threads=1]") in names
    assert len(names) == 3 * 4  # 3 models x (accuracy, 2 latencies, size)
    ptq = [c for c in result.checks if c.model == "ptq" and c.name == "latency[batch=1,threads=1]"][0]
    assert ptq.data["ratio"] == pytest.approx(1.0) and ptq.data["ci"][0] <= 1 <= ptq.data["ci"][1]


def test_independent_rerun_of_the_same_models_passes():
    result = gate.compare_runs(_report(_rows(seed=1)), _report(_rows(seed=0)))
    assert _statuses(result, "latency") and set(_statuses(result, "latency").values()) == {gate.PASS}
    assert result.status == gate.PASS


def test_lower_accuracy_fails():
    result = gate.compare_runs(_report(_rows(acc=-0.01)), _report(_rows()))
    acc = _statuses(result, "accuracy")
    assert set(acc.values()) == {gate.FAIL}
    assert result.status == gate.FAIL and result.exit_code == 1
    detail = next(c.detail for c in result.checks if c.model == "ptq" and c.name == "accuracy_drop")
    assert "-1.00 pt" in detail
    # a 0.3 pt drop is within the default 0.5 pt
    assert gate.compare_runs(_report(_rows(acc=-0.003)), _report(_rows())).status == gate.PASS
    tight = gate.GateLimits(max_accuracy_drop_pt=0.2)
    assert gate.compare_runs(_report(_rows(acc=-0.003)), _report(_rows()), tight).status == gate.FAIL


def test_30_percent_slower_fails():
    result = gate.compare_runs(_report(_rows(slow=1.3, seed=1)), _report(_rows()))
    lat = _statuses(result, "latency")
    assert set(lat.values()) == {gate.FAIL}
    check = next(c for c in result.checks if c.model == "ptq" and c.name == "latency[batch=1,threads=1]")
    assert check.data["ci"][0] > 1.05 and check.change == pytest.approx(30, abs=3)
    assert "slower" in check.detail
    assert set(_statuses(result, "accuracy").values()) == {gate.PASS}
    assert result.exit_code == 1


def test_2_percent_slower_inside_noise_is_not_a_failure():
    result = gate.compare_runs(_report(_rows(slow=1.02, seed=1, noise=0.08)), _report(_rows(noise=0.08)))
    lat = _statuses(result, "latency")
    assert set(lat.values()) <= {gate.PASS, gate.INCONCLUSIVE}
    assert result.exit_code == 0
    strict = gate.compare_runs(_report(_rows(slow=1.02, seed=1, noise=0.08)), _report(_rows(noise=0.08)),
                               gate.GateLimits(strict=True))
    assert strict.exit_code == (1 if gate.INCONCLUSIVE in lat.values() else 0)


def test_very_noisy_samples_are_inconclusive_not_failed():
    """A 10% slow-down measured with 20 very noisy runs: the interval spans the threshold."""
    cur, base = _rows(slow=1.1, seed=1), _rows()
    for rows, seed in ((cur, 5), (base, 6)):
        for row in rows:
            for e in row["latency"]:
                e["samples_us"] = _samples(e["p50_ms"], n=20, noise=0.4, seed=seed)
    result = gate.compare_runs(_report(cur), _report(base))
    assert gate.INCONCLUSIVE in _statuses(result, "latency").values()
    assert gate.FAIL not in _statuses(result, "latency").values()
    assert result.status == gate.INCONCLUSIVE and result.exit_code == 0


def test_missing_samples_are_inconclusive():
    result = gate.compare_runs(_report(_rows(slow=1.3)), _report(_rows(samples=False)))
    lat = _statuses(result, "latency")
    assert set(lat.values()) == {gate.INCONCLUSIVE}
    detail = next(c.detail for c in result.checks if c.name.startswith("latency"))
    assert "too few timing samples" in detail and "baseline has 0" in detail and "+30.0%" in detail
    assert result.status == gate.INCONCLUSIVE and result.exit_code == 0
    assert gate.compare_runs(_report(_rows(slow=1.3)), _report(_rows(samples=False)),
                             gate.GateLimits(strict=True)).exit_code == 1


def test_other_machine_latency_is_inconclusive_unless_asked():
    other = {**ENV, "cpu": {"model": "Other CPU", "architecture": "x86_64"}}
    cur, base = _report(_rows(slow=1.3, seed=1)), _report(_rows(), env=other)
    result = gate.compare_runs(cur, base)
    assert set(_statuses(result, "latency").values()) == {gate.INCONCLUSIVE}
    assert any("different machines" in n for n in result.notes)
    forced = gate.compare_runs(cur, base, gate.GateLimits(any_machine=True))
    assert set(_statuses(forced, "latency").values()) == {gate.FAIL}


def test_size_growth_fails():
    result = gate.compare_runs(_report(_rows(size=1.2)), _report(_rows()))
    assert set(_statuses(result, "size").values()) == {gate.FAIL}
    assert gate.compare_runs(_report(_rows(size=1.02)), _report(_rows())).status == gate.PASS


def test_deployed_model_change_is_compared():
    base_rows = _rows()
    base = _report(base_rows)
    cur_rows = _rows()
    cur_rows.append({**copy.deepcopy(cur_rows[2]), "name": "qat", "accuracy": 0.90})
    verdict = budget.decide(cur_rows, budget.resolve_budgets({}, [1]), ["qat", "ptq"])
    verdict["model"] = "qat"  # as if qat were chosen
    cur = report.build_report(run="edge", config={}, rows=cur_rows, verdict=verdict, environment=ENV, stages=[])
    result = gate.compare_runs(cur, base)
    deployed = {c.name: c.status for c in result.checks if c.model == "deployed"}
    assert deployed["accuracy_drop"] == gate.FAIL  # qat 90.0% vs the baseline's ptq 91.3%
    assert any("deployed model changed" in n for n in result.notes)
    assert any("new in this run" in n and "qat" in n for n in result.notes)


def test_budget_checks_join_the_gate():
    rows = _rows()
    rep = _report(rows)
    tight = budget.decide(rows, budget.resolve_budgets({"min_accuracy": 0.95}, [1]), ["ptq", "student"])
    result = gate.compare_runs(rep, None, budget_verdict=tight)
    assert [(c.suite, c.name, c.status) for c in result.checks] == [("budgets", "min_accuracy", gate.FAIL)]
    assert result.exit_code == 1
    ok = gate.compare_runs(rep, rep, budget_verdict=rep["verdict"])
    assert {c.suite for c in ok.checks} == {"budgets", "baseline"} and ok.exit_code == 0


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_accuracy_drop_pt"):
        gate.GateLimits(max_accuracy_drop_pt=-1)
    with pytest.raises(ValueError, match="confidence"):
        gate.GateLimits(confidence=1.0)


def test_ratio_of_medians_ci_is_deterministic():
    a, b = _samples(1.0, seed=1), _samples(1.2, seed=2)
    first = gate.ratio_of_medians_ci(b, a)
    assert first == gate.ratio_of_medians_ci(b, a)
    ratio, lo, hi = first
    assert lo < ratio < hi and 1.15 < ratio < 1.25


def test_drifting_timings_widen_the_interval():
    """Samples are resampled in blocks of consecutive runs: a warm-up trend (in run order) gives a
    wider interval than the same values in random order."""
    rng = np.random.default_rng(3)
    drift = list(100 * np.linspace(1.3, 1.0, 60) * rng.lognormal(0, 0.01, 60))
    shuffled = list(rng.permutation(drift))
    base = _samples(0.1, n=60, noise=0.01, seed=4)
    _, lo_d, hi_d = gate.ratio_of_medians_ci(drift, base)
    _, lo_s, hi_s = gate.ratio_of_medians_ci(shuffled, base)
    assert hi_d - lo_d > 1.2 * (hi_s - lo_s)


# --------------------------------------------------------------------------- outputs


def test_junit_xml_counts():
    limits = gate.GateLimits()
    cur = _rows(slow=1.3, seed=1)
    for e in cur[0]["latency"]:  # teacher: no samples -> 2 inconclusive
        del e["samples_us"]
    rep, base = _report(cur), _report(_rows())
    result = gate.compare_runs(rep, base, limits, budget_verdict=rep["verdict"])
    root = ET.fromstring(gate.to_junit(result))
    assert root.tag == "testsuites"
    cases = root.findall(".//testcase")
    assert len(cases) == int(root.get("tests")) == len(result.checks)
    assert len(root.findall(".//testcase/failure")) == int(root.get("failures")) == 4  # student, ptq x 2 latencies
    assert len(root.findall(".//testcase/skipped")) == int(root.get("skipped")) == 2
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"budgets", "baseline"}
    assert int(suites["budgets"].get("tests")) == 2  # min_accuracy, max_latency_ms of ptq
    assert int(suites["baseline"].get("failures")) == 4
    skipped = root.find(".//testcase/skipped")
    assert skipped.get("message").startswith("inconclusive: ")
    names = {(c.get("classname"), c.get("name")) for c in cases}
    assert ("compresskit.baseline.ptq", "latency[batch=1,threads=1]") in names


def test_json_and_markdown():
    rep, base = _report(_rows(acc=-0.01)), _report(_rows())
    result = gate.compare_runs(rep, base, budget_verdict=rep["verdict"])
    data = json.loads(gate.to_json(result))
    assert data["schema"] == "compresskit.gate" and data["status"] == "fail" and data["exit_code"] == 1
    assert data["counts"]["fail"] == 3 and len(data["checks"]) == len(result.checks)
    md = gate.to_markdown(result)
    assert md.startswith("## compresskit check")
    assert "### Budgets" in md and "### Against the baseline" in md and "**FAIL**" in md
    assert "ptq (deployed)" in md
    table = [line for line in md.splitlines() if line.startswith("| ptq (deployed) | accuracy_drop")]
    assert len(table) == 1 and table[0].count("|") == 9


# --------------------------------------------------------------------------- CLI


def _write(tmp_path: Path, name: str, rep: dict) -> Path:
    report.write_report(tmp_path / name, rep)
    return tmp_path / name


def test_cli_exit_codes_and_outputs(tmp_path):
    base = _write(tmp_path, "base", _report(_rows()))
    same = _write(tmp_path, "same", _report(_rows(seed=1)))
    worse = _write(tmp_path, "worse", _report(_rows(acc=-0.01)))
    nosamples = _write(tmp_path, "nosamples", _report(_rows(samples=False)))

    ok = runner.invoke(app, ["check", str(same), "--baseline", str(base / "report.json"),
                             "--junit", str(tmp_path / "out" / "gate.xml"), "--json", str(tmp_path / "gate.json"),
                             "--markdown", str(tmp_path / "gate.md")])
    assert ok.exit_code == 0, ok.output
    assert "check: PASS" in ok.output
    ET.parse(tmp_path / "out" / "gate.xml")
    assert json.loads((tmp_path / "gate.json").read_text())["status"] == "pass"
    assert (tmp_path / "gate.md").read_text().startswith("## compresskit check")

    bad = runner.invoke(app, ["check", str(worse), "--baseline", str(base), "--junit", str(tmp_path / "w.xml")])
    assert bad.exit_code == 1 and "FAIL" in bad.output
    assert ET.parse(tmp_path / "w.xml").getroot().get("failures") == "3"
    loose = runner.invoke(app, ["check", str(worse), "--baseline", str(base),
                                "--max-accuracy-drop-vs-baseline-pt", "1.5"])
    assert loose.exit_code == 0, loose.output

    inconclusive = runner.invoke(app, ["check", str(nosamples), "--baseline", str(base)])
    assert inconclusive.exit_code == 0 and "INCONCLUSIVE" in inconclusive.output
    assert runner.invoke(app, ["check", str(nosamples), "--baseline", str(base), "--strict"]).exit_code == 1

    # the budget re-check keeps working, and lands in the outputs too
    tight = runner.invoke(app, ["check", str(same), "--min-accuracy", "0.95", "--json", str(tmp_path / "b.json")])
    assert tight.exit_code == 1
    checks = json.loads((tmp_path / "b.json").read_text())["checks"]
    assert [(c["suite"], c["name"], c["status"]) for c in checks] == [("budgets", "min_accuracy", "fail"),
                                                                      ("budgets", "max_latency_ms", "pass")]

    # bad input: exit 2
    assert runner.invoke(app, ["check", str(same), "--baseline", str(tmp_path / "nope")]).exit_code == 2
    (tmp_path / "junk.json").write_text("{}")
    assert runner.invoke(app, ["check", str(same), "--baseline", str(tmp_path / "junk.json")]).exit_code == 2
    neg = runner.invoke(app, ["check", str(same), "--baseline", str(base), "--max-size-increase-vs-baseline-pct", "-1"])
    assert neg.exit_code == 2


def test_check_runs_without_torch(tmp_path):
    """A CI runner that only gates needs no torch: `check --baseline` in an interpreter that refuses it."""
    base = _write(tmp_path, "base", _report(_rows()))
    slow = _write(tmp_path, "slow", _report(_rows(slow=1.3, seed=1)))
    code = textwrap.dedent(f"""
        import importlib.abc, sys

        class BlockTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"torch", "torchvision", "torchao", "torch_pruning"}}:
                    raise ImportError(f"torch is blocked in this test: import of {{name!r}}")

        sys.meta_path.insert(0, BlockTorch())
        from typer.testing import CliRunner
        from compresskit.cli import app

        result = CliRunner().invoke(app, ["check", {str(slow)!r}, "--baseline", {str(base)!r}])
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
        print("exit", result.exit_code)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["exit", "1"]


def test_check_help_documents_exit_codes():
    result = runner.invoke(app, ["check", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "0 every check passed" in text and "2 bad input" in text
    assert "1 a budget, baseline or device check failed" in text


# --------------------------------------------------------------------------- the example workflow


def _options(command: str) -> set[str]:
    params = get_command(app).commands[command].params
    return {opt for param in params for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--")}


def _invocations(script: str, command: str) -> list[set[str]]:
    """The --options of each `compresskit COMMAND` call in a shell script (continuation lines joined)."""
    calls, lines = [], script.replace("\\\n", " ").splitlines()
    for line in lines:
        if f"compresskit {command} " in line:
            words = line[line.index(f"compresskit {command} "):].split()
            calls.append({w.split("=")[0] for w in words if w.startswith("--")})
    return calls


def test_example_workflow_is_valid_and_uses_real_options():
    workflow = yaml.safe_load((ROOT / "examples" / "github-actions.yml").read_text())
    assert isinstance(workflow, dict) and workflow["jobs"]
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "pull_request" in triggers
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    assert all(("uses" in s) != ("run" in s) for s in steps)
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache"))
    assert cache["with"]["path"] == "models/" and "hashFiles(env.PIPELINE)" in cache["with"]["key"]
    assert "steps.version.outputs.version" in cache["with"]["key"]
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
    script = "\n".join(s.get("run", "") for s in steps)
    runs, checks = _invocations(script, "run"), _invocations(script, "check")
    assert len(runs) == 1 and len(checks) == 1
    assert runs[0] <= _options("run"), runs[0] - _options("run")
    assert {"--junit", "--json", "--markdown"} <= checks[0]
    assert checks[0] <= _options("check"), checks[0] - _options("check")
    assert 'baseline=(--baseline "baseline/reports/$RUN_NAME")' in script and "--baseline" in _options("check")
