"""`pip install compresskit` is the torch-free core: in a fresh venv without torch, `bench` and
`check` work, and the commands that train say in one line which extra to install (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compresskit import budget, report

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _linear_model(path: Path) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _report(path: Path) -> Path:
    rows = [{"name": "student", "accuracy": 0.9, "size_bytes": 1000,
             "latency": [{"batch_size": 1, "threads": 1, "p50_ms": 0.1}]},
            {"name": "ptq", "accuracy": 0.89, "size_bytes": 400,
             "latency": [{"batch_size": 1, "threads": 1, "p50_ms": 0.05}]}]
    budgets = budget.resolve_budgets({"min_accuracy": 0.85}, [1])
    rep = report.build_report(run="light", config={"budgets": {"min_accuracy": 0.85}, "bench": {"threads": [1]}},
                              rows=rows, verdict=budget.decide(rows, budgets), environment={}, stages=[])
    report.write_report(path, rep)
    return path / "report.json"


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(pip + [str(ROOT)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"cannot install the core here (no package index?): {done.stderr.strip()[-300:]}")
    return venv


def _cli(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "compresskit"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_core_has_no_torch(light_venv):
    probe = subprocess.run([str(light_venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0


def test_bench_and_check_work_without_torch(light_venv, tmp_path):
    model = _linear_model(tmp_path / "m.onnx")
    out = _cli(light_venv, "bench", str(model), "--batch-sizes", "1", "--max-seconds", "0.2",
               "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "b.json").read_text())["latency"][0]["p50_ms"] > 0
    rep = _report(tmp_path / "rep")
    ok = _cli(light_venv, "check", str(rep), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _cli(light_venv, "check", str(rep), "--min-accuracy", "0.95", cwd=tmp_path)
    assert bad.returncode == 1


@pytest.mark.parametrize("command", [["run"], ["validate"]])
def test_training_commands_name_the_extra(light_venv, tmp_path, command):
    out = _cli(light_venv, *command, str(ROOT / "pipelines" / "tiny_synthetic.yaml"), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "compresskit[train]" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "models").exists()
