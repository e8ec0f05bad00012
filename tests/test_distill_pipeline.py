"""Every distillation method runs through the pipeline (teacher + distill stages) by changing
only the distill section (and the teacher section for ensemble / specialists), driven by the
benchmark script that measures them on the default pair."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module paths of tiny_synthetic.yaml's models on 16x16 images
TINY_PATHS = {"s_map": "features.3", "t_map": "layers.1", "s_pair": ["features.1", "features.3"],
              "t_pair": ["layers.0", "layers.1"], "s_emb": "pool", "t_emb": "pool",
              "byot_heads": ["features.3", "features.6"]}


def _bench():
    spec = importlib.util.spec_from_file_location("distill_methods", ROOT / "benchmarks" / "distill_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_method_runs_through_the_pipeline(tmp_path: Path) -> None:
    bench = _bench()
    out = tmp_path / "table"
    rc = bench.main(["--config", str(ROOT / "pipelines" / "tiny_synthetic.yaml"),
                     "--teacher", str(tmp_path / "missing.pt"), "--epochs", "1", "--max-batches", "6",
                     "--member-epochs", "1", "--specialist-epochs", "1",
                     "--paths", json.dumps(TINY_PATHS), "--set", "data.synthetic.num_train=384",
                     "--set", "teacher.specialists.size=2",
                     "--out", str(out), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    from compresskit.distill import methods

    every = {name for name, _ in methods()} - {"ce"}
    ran = {r["method"] for r in rows}
    assert every <= ran | {"kd"} and "student alone" in ran
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_s"] > 0, r
    assert rows[-2]["method"] == "ensemble" and 0 < rows[-2]["teacher_accuracy"] <= 1
    assert rows[-1]["method"] == "specialists" and 0 < rows[-1]["teacher_accuracy"] <= 1
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(rows) + 1


def test_recipes_fit_the_default_pair() -> None:
    """Every benchmark recipe is a valid config whose module paths exist in the default teacher
    and the benchmark's student and whose shapes every term accepts (the pre-flight check, on untrained models)."""
    from compresskit.config import load_raw, validate_config
    from compresskit.preflight import _check_models

    bench = _bench()
    for name, recipe in bench.recipes().items():
        raw = load_raw(ROOT / "pipelines" / "mobilenet_edge.yaml")
        raw["distill"]["loss"] = recipe["loss"]
        raw["distill"]["student"] = bench.STUDENT
        for key, value in recipe.get("teacher", {}).items():
            raw["teacher"][key] = value
        cfg = validate_config(raw)  # raises ConfigError naming the key on a bad recipe
        assert _check_models(cfg) == [], name
