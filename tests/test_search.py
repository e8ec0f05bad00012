"""Student search (compresskit.search): latency first, resume, workers, records, latency tables.

Tiny synthetic data (8x8 grayscale, 3 classes) and a tiny plain-conv space whose candidates are
known in advance, so a latency table can name them all."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from compresskit.config import load_config, validate_config  # noqa: E402
from compresskit.search import SearchSpace, pareto_front, run_search, spec_key  # noqa: E402

SHAPE, CLASSES = (1, 8, 8), 3
CHANNELS = (8, 16)


def _spec(a: int, b: int) -> dict:
    return {"arch": "plainconv", "channels": [a, b], "strides": [2, 1], "kernel": 3}


def _raw(tmp_path: Path, *, recipes=None, budgets=None, **search) -> dict:
    return {
        "name": "search_test", "seed": 0, "device": "cpu",
        "models_dir": str(tmp_path / "models"), "reports_dir": str(tmp_path / "reports"),
        "data": {"dataset": "synthetic", "calib_size": 16, "batch_size": 32, "eval_batch_size": 64,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": CLASSES, "image_size": 8,
                               "channels": 1}},
        "teacher": {"model": {"arch": "resnet", "blocks": [1], "width": 8, "stem_stride": 1},
                    "train": {"epochs": 1, "lr": 0.05}},
        "distill": {"student": _spec(8, 16), "train": {"epochs": 1, "lr": 0.05}},
        "prune": {"enabled": False},
        "quantize": {"ptq": {"search": {"activation_types": ["uint8"], "per_channel": [False], "max_seconds": 0.05,
                                        "fallback": False}},
                     "qat": {"enabled": False}},
        "bench": {"batch_sizes": [1], "threads": [1], "warmup": 2, "min_runs": 5, "max_seconds": 0.05},
        "budgets": budgets or {},
        "search": {"proxy_epochs": 2, "proxy_max_batches": 4, "full_epochs": 1, "top_k": 1, "calib_images": 8,
                   "screen_max_seconds": 0.05, "recipes": recipes or [[{"method": "ce", "weight": 1.0}]],
                   "families": {"mbnet": {"enabled": False},
                                "plainconv": {"depth": [2], "channels": list(CHANNELS), "stride_patterns": [[2, 1]]}},
                   **search},
    }


def _table(tmp_path: Path, slow: tuple[int, int] = (16, 16)) -> Path:
    """Every candidate of the space at 0.01-0.03 ms, `slow` at 1 ms."""
    entries = {}
    for i, a in enumerate(CHANNELS):
        for j, b in enumerate(CHANNELS):
            entries[spec_key(_spec(a, b), SHAPE, CLASSES)] = 1.0 if (a, b) == slow else 0.01 * (1 + i + j)
    path = tmp_path / "latency_table.json"
    path.write_text(json.dumps({"batch_size": 1, "threads": 1, "p50_ms": entries}))
    return path


@pytest.fixture
def fit_calls(monkeypatch):
    """The `desc` of every call of the one training loop."""
    import compresskit.train as train

    calls: list[str] = []
    real = train.fit

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc", "train"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "fit", counting)
    return calls


def _trained(calls: list[str]) -> set[int]:
    return {int(d.split("-")[1]) for d in calls if d.startswith("proxy-")}


def test_latency_first_drops_before_training(tmp_path, fit_calls):
    """A latency budget no candidate meets: every candidate is measured, dropped, never trained."""
    raw = _raw(tmp_path, budgets={"max_latency_ms": 1e-6})
    res = run_search(validate_config(raw), n_trials=3, log=None, raw=raw)
    assert len(res.trials) == 3
    assert fit_calls == []  # neither a candidate nor a teacher was trained
    for t in res.trials:
        assert t["status"] in ("dropped", "duplicate"), t
        assert t["latency_source"] in ("measured", "cache") and t["p50_ms"] > 0
    assert any("latency" in (t["reason"] or "") for t in res.trials)
    assert not res.met_budgets and res.chosen is None and res.best is None
    assert any(m.startswith("latency budget failed") for m in res.failed_budgets)
    assert "chosen_yaml" not in res.files


def test_latency_table_replaces_measuring(tmp_path, fit_calls, monkeypatch):
    """With a latency table nothing is timed here; the slow candidate is dropped untrained."""
    import compresskit.bench

    def no_timing(*_a, **_k):
        raise AssertionError("timed on this machine despite the latency table")

    monkeypatch.setattr(compresskit.bench, "measure_latency", no_timing)
    raw = _raw(tmp_path, budgets={"max_latency_ms": 0.5}, latency_table=str(_table(tmp_path)), top_k=1)
    res = run_search(validate_config(raw), n_trials=6, log=None, raw=raw)
    slow_key = spec_key(_spec(16, 16), SHAPE, CLASSES)
    trained = _trained(fit_calls)
    for t in res.trials:
        assert t["latency_source"] == "table"
        if t["key"] == slow_key:
            assert t["status"] in ("dropped", "duplicate") and t["number"] not in trained
        elif t["status"] == "complete":
            assert t["number"] in trained
    assert res.chosen is not None and res.chosen["latency_source"] == "table"
    assert res.chosen["spec_key"] != slow_key


def test_resume_records_and_chosen_yaml(tmp_path, fit_calls):
    """2 trials, then n_trials=4: 4 in all, the first two not re-run; then the records."""
    raw = _raw(tmp_path, latency_table=str(_table(tmp_path, slow=(0, 0))),
               recipes=[[{"method": "ce", "weight": 1.0}],
                        [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9, "temperature": 4.0}]])
    cfg = validate_config(raw)
    first = run_search(cfg, n_trials=2, log=None, raw=raw)
    assert len(first.trials) == 2
    before = {t["number"]: t["started"] for t in first.trials}
    fit_calls.clear()
    res = run_search(cfg, n_trials=4, log=None, raw=raw)
    assert [t["number"] for t in res.trials] == [0, 1, 2, 3]
    assert {t["number"]: t["started"] for t in res.trials[:2]} == before
    assert _trained(fit_calls) <= {2, 3}

    doc = json.loads((res.workdir / "trials.json").read_text())
    assert doc["schema"] == "compresskit.search" and len(doc["trials"]) == 4
    assert doc["process_s"] > 0 and doc["teacher_s"] >= 0
    for t in doc["trials"]:
        assert {"spec", "recipe", "p50_ms", "proxy_val_accuracy", "seconds", "status"} <= set(t)
    assert doc["pareto"] and set(doc["pareto"]) <= {t["number"] for t in doc["trials"] if t["status"] == "complete"}
    assert doc["finals"] and doc["finals"][0]["int8_test_accuracy"] is not None
    md = (res.workdir / "trials.md").read_text()
    assert "Pareto front" in md and "Finalists" in md
    assert res.chosen is not None and (res.workdir / "best" / "model.onnx").is_file()

    chosen = load_config(res.files["chosen_yaml"])
    assert chosen.search is None
    assert chosen.distill.student.model_dump(mode="json") == res.chosen["spec"]
    assert [t.model_dump(mode="json") for t in chosen.distill.loss] == res.chosen["recipe"]
    assert chosen.name == cfg.name and chosen.data == cfg.data


KD = [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9, "temperature": 4.0}]


def test_kd_finalist_gets_a_labels_only_baseline(tmp_path, fit_calls):
    """A finalist with a KD recipe is also trained on labels alone (same architecture, epochs and
    seed): both are measured, reported side by side, and the more accurate one is chosen."""
    raw = _raw(tmp_path, latency_table=str(_table(tmp_path, slow=(0, 0))), recipes=[KD], n_trials=2)
    res = run_search(validate_config(raw), log=None, raw=raw)
    assert len(res.finals) == 2
    kd, lo = res.finals
    assert kd["baseline_of"] is None and lo["baseline_of"] == kd["number"] and lo["id"] == f"{kd['number']}-labels"
    assert kd["spec"] == lo["spec"] and [t["method"] for t in kd["recipe"]] == ["ce", "kd"]
    assert [(t["method"], t["weight"]) for t in lo["recipe"]] == [("ce", 1.0)]
    assert f"full-{kd['number']}-labels" in fit_calls
    better = max(res.finals, key=lambda r: r["int8_val_accuracy"])
    assert res.chosen is not None and res.chosen["recipe"] == better["recipe"]
    md = (res.workdir / "trials.md").read_text()
    assert "Does KD help?" in md and f"{kd['number']}-labels" in md

    # when another finalist already is that net on labels alone, it is not trained twice
    one_net = {"mbnet": {"enabled": False},
               "plainconv": {"depth": [2], "channels": [8], "stride_patterns": [[2, 1]]}}
    raw_one = _raw(tmp_path / "one", latency_table=str(_table(tmp_path)), n_trials=6, top_k=2, sampler="random",
                   recipes=[KD, [{"method": "ce", "weight": 1.0}]], families=one_net)
    fit_calls.clear()
    finals = run_search(validate_config(raw_one), log=None, raw=raw_one).finals
    assert len(finals) == 2 and {r["baseline_of"] for r in finals} == {None}
    assert sorted(len(r["recipe"]) for r in finals) == [1, 2]
    assert not [c for c in fit_calls if c.endswith("-labels")]

    raw_off = _raw(tmp_path / "off", latency_table=str(_table(tmp_path, slow=(0, 0))), recipes=[KD], n_trials=2,
                   labels_only_baseline=False)
    assert len(run_search(validate_config(raw_off), log=None, raw=raw_off).finals) == 1


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from compresskit.config import validate_config
    from compresskit.search import run_search
    from compresskit.search.space import SearchSpace
    real = SearchSpace.suggest
    SearchSpace.suggest = lambda self, trial: (time.sleep(0.3), real(self, trial))[1]  # trials overlap
    raw, barrier = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    (barrier / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    run_search(validate_config(raw), n_trials=6, worker=True, log=None, raw=raw)
""")


def test_two_workers_share_one_study(tmp_path):
    raw = _raw(tmp_path, latency_table=str(_table(tmp_path)), budgets={"min_accuracy": 0.99},
               sampler="random")
    cfg_file = tmp_path / "raw.json"
    cfg_file.write_text(json.dumps(raw))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(cfg_file), str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    pids = {str(p.pid) for p in procs}
    doc = json.loads((tmp_path / "models" / "search_test" / "search" / "trials.json").read_text())
    numbers = [t["number"] for t in doc["trials"]]
    assert len(numbers) == len(set(numbers)) >= 6
    workers = {t["worker"].rsplit(":", 1)[1] for t in doc["trials"]}
    assert workers == pids  # both contributed

    # the main process runs no more trials (the budget is used) and trains the finalist; an
    # accuracy floor nobody meets is named, and the best model found is kept
    res = run_search(validate_config(raw), n_trials=6, log=None, raw=raw)
    assert [t["number"] for t in res.trials] == numbers
    assert res.chosen is None and res.best is not None and not res.met_budgets
    assert any(m.startswith("accuracy budget failed by 1 of 1") for m in res.failed_budgets)
    assert (res.workdir / "best" / "model.onnx").is_file()
    assert "does NOT meet the budgets" in res.files["chosen_yaml"].read_text()


def test_space_draws_every_family_and_recipe():
    optuna = pytest.importorskip("optuna")
    raw = _raw(Path("."), temperatures=[2.0, 4.0],
               recipes=[[{"method": "ce", "weight": 1.0}],
                        [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9, "temperature": 4.0}]],
               families={"mbnet": {"width_mult": [0.35], "blocks": [0, 1], "expand": [3.0], "kernel": [5],
                                   "last_channel": [64]},
                         "plainconv": {"enabled": False},
                         "factories": [{"name": "tv", "model": {"arch": "torchvision", "name": "resnet18"},
                                        "space": {"width_per_group": [32, 64],
                                                  "zero_init_residual": {"low": 0, "high": 1, "integer": True}}}]})
    space = SearchSpace.from_config(validate_config(raw).search)
    mb = space.suggest(optuna.trial.FixedTrial({"family": "mbnet", "mb_width": 0.35, "mb_stem_stride": 2,
                                                **{f"mb_b{i}": 0 for i in range(7)}, "mb_expand": 3.0,
                                                "mb_kernel": 5, "mb_head": 64, "recipe": 1, "temperature": 2.0}))
    # stride-2 stages keep a block; the first stage keeps expansion 1
    assert mb.spec["blocks"] == [0, 0, 1, 1, 0, 1, 0] and mb.spec["expand"][:2] == [1.0, 3.0]
    assert mb.recipe[1] == {"method": "kd", "weight": 0.9, "temperature": 2.0}
    assert mb.recipe_label == "ce0.1+kd0.9@T2"
    tv = space.suggest(optuna.trial.FixedTrial({"family": "tv", "f_tv_width_per_group": 32,
                                                "f_tv_zero_init_residual": 1, "recipe": 0}))
    assert tv.spec["kwargs"] == {"width_per_group": 32, "zero_init_residual": 1} and tv.recipe_label == "ce"
    assert spec_key(mb.spec, SHAPE, CLASSES) == spec_key(validate_config(
        {"name": "x", "distill": {"student": mb.spec}}).distill.student.model_dump(mode="json"), SHAPE, CLASSES)


def test_pareto_front():
    rows = [{"number": 0, "proxy_val_accuracy": 0.9, "p50_ms": 0.10, "size_bytes": 100},
            {"number": 1, "proxy_val_accuracy": 0.8, "p50_ms": 0.05, "size_bytes": 100},
            {"number": 2, "proxy_val_accuracy": 0.8, "p50_ms": 0.06, "size_bytes": 100},  # beaten by 1
            {"number": 3, "proxy_val_accuracy": 0.9, "p50_ms": 0.10, "size_bytes": 100},  # equal to 0
            {"number": 4, "proxy_val_accuracy": 0.7, "p50_ms": 0.08, "size_bytes": 50}]
    assert pareto_front(rows) == [1, 4, 0]


def test_new_architectures():
    import torch

    from compresskit.nets import build_model, count_params

    mb = build_model({"arch": "mbnet", "num_classes": 10, "in_channels": 1, "width_mult": 0.35, "last_channel": 256,
                      "strides": [1, 1, 2, 2, 1, 2, 1]})
    v2 = build_model({"arch": "mobilenetv2", "num_classes": 10, "in_channels": 1, "width_mult": 0.35,
                      "last_channel": 256, "stage_strides": [1, 1, 2, 2, 1, 2, 1]})
    assert count_params(mb) == count_params(v2)  # mbnet's defaults are MobileNetV2's layout
    pc = build_model({"arch": "plainconv", "num_classes": 10, "in_channels": 1})
    assert pc(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count_params(pc) == 98682  # 16(s2)-32-64(s2)-128: the field notes' 99k-parameter net


KILLED = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import compresskit.search.engine as e
    e.HEARTBEAT_S, e.GRACE_S = 1, 2
    real = e.SearchSpace.suggest

    def stuck(self, trial):
        cand = real(self, trial)
        if trial.number == 1:
            time.sleep(120)  # killed here, its candidate drawn
        return cand

    e.SearchSpace.suggest = stuck
    from compresskit.config import validate_config
    raw = json.loads(Path(sys.argv[1]).read_text())
    e.run_search(validate_config(raw), n_trials=3, worker=True, log=None, raw=raw)
""")


def test_killed_search_resumes(tmp_path, monkeypatch):
    """A process killed mid-trial: its trial is found stale (heartbeat), marked failed and run
    again with the same candidate; the study ends with n_trials finished trials."""
    import time

    import optuna

    import compresskit.search.engine as engine

    raw = _raw(tmp_path, latency_table=str(_table(tmp_path)), sampler="random")
    cfg_file = tmp_path / "raw.json"
    cfg_file.write_text(json.dumps(raw))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(cfg_file)])
    url = f"sqlite:///{(tmp_path / 'models' / 'search_test' / 'search' / 'study.db').resolve()}"
    deadline, stuck = time.monotonic() + 90, False
    try:
        while time.monotonic() < deadline and not stuck and proc.poll() is None:
            time.sleep(0.3)
            try:
                study = optuna.load_study(study_name="search_test", storage=url)
                stuck = any(t.number == 1 and t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False))
            except Exception:  # noqa: BLE001 - the study does not exist yet
                pass
        time.sleep(1.5)  # a heartbeat was recorded
    finally:
        proc.kill()
        proc.wait()
    assert stuck, "trial 1 never started"
    monkeypatch.setattr(engine, "HEARTBEAT_S", 1)
    monkeypatch.setattr(engine, "GRACE_S", 2)
    res = run_search(validate_config(raw), n_trials=3, log=None, raw=raw)
    rows = {t["number"]: t for t in res.trials}
    assert rows[1]["state"] == "FAIL" and "no heartbeat" in rows[1]["reason"]
    retry = next(t for t in res.trials if t["retry_of"] == 1)
    assert retry["params_drawn"] == rows[1]["params_drawn"] and retry["state"] == "COMPLETE"
    assert sum(t["state"] in ("COMPLETE", "PRUNED") for t in res.trials) == 3


def test_search_command(tmp_path):
    """The CLI: a tiny search ends with chosen.yaml (exit 0) or the failed budgets (exit 1)."""
    import yaml
    from typer.testing import CliRunner

    from compresskit.cli import app

    pipeline = tmp_path / "search.yaml"
    pipeline.write_text(yaml.safe_dump(_raw(tmp_path)))
    ok = CliRunner().invoke(app, ["search", str(pipeline), "--trials", "2", "-q"])
    assert ok.exit_code == 0, ok.output
    assert "chosen" in ok.output and (tmp_path / "models" / "search_test" / "search" / "chosen.yaml").is_file()
    impossible = CliRunner().invoke(app, ["search", str(pipeline), "--trials", "2", "-q",
                                          "--set", "budgets.min_accuracy=1.0"])
    assert impossible.exit_code == 1 and "no candidate meets the budgets" in impossible.output, impossible.output
    missing = CliRunner().invoke(app, ["search", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2


def test_reference_is_timed_after_a_discarded_cold_run(monkeypatch):
    """The latency reference (what max_latency_ratio multiplies): one discarded timing, then the
    median of three; a cold first timing does not inflate the budget."""
    import numpy as np

    import compresskit.bench
    from compresskit.search.latency import screen_model

    seq = iter([0.30, 0.11, 0.10, 0.12])  # cold first run, then three warm ones
    monkeypatch.setattr(compresskit.bench, "measure_latency",
                        lambda *a, **k: {"p50_ms": next(seq), "ci95_rel": 0.01})
    calib = np.zeros((4, *SHAPE), dtype=np.float32)
    row = screen_model(_spec(8, 16) | {"num_classes": CLASSES, "in_channels": 1}, SHAPE, calib,
                       batch_size=1, threads=1, repeats=3)
    assert row["p50_ms"] == 0.11 and row["p50_runs_ms"] == [0.11, 0.10, 0.12]
    seq = iter([0.30])
    once = screen_model(_spec(8, 16) | {"num_classes": CLASSES, "in_channels": 1}, SHAPE, calib,
                        batch_size=1, threads=1)
    assert once["p50_ms"] == 0.30 and "p50_runs_ms" not in once
