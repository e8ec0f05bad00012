"""CLI: help texts, bad input (exit 2, one line per problem, nothing written), bench and check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compresskit.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny_synthetic.yaml"
runner = CliRunner()


def _dirs(tmp_path):
    return ["--set", f"models_dir={tmp_path / 'models'}", "--set", f"reports_dir={tmp_path / 'reports'}"]


@pytest.mark.parametrize("cmd", [[], ["run"], ["validate"], ["bench"], ["check"], ["methods", "distill"]])
def test_help(cmd):
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "compresskit", "--help"], capture_output=True, text=True, check=True)
    assert "run" in out.stdout and "validate" in out.stdout


BAD_CASES = {
    "unknown key": (["--set", "distill.train.epochz=3"], "distill.train.epochz: unknown key"),
    "wrong type": (["--set", "teacher.train.lr=fast"], "teacher.train.lr"),
    "out of range": (["--set", "prune.pruner.ratio=1.5"], "prune.pruner.ratio"),
    "missing checkpoint": (["--set", "teacher.checkpoint=/nonexistent/t.pt"], "teacher.checkpoint: file not found"),
    "missing dataset": (["--set", "data.dataset=fashion-mnist", "--set", "data.root=/nonexistent"],
                        "data: Fashion-MNIST not found"),
    "bad module path": (["--set", "distill.loss.2.student=features.99"], "distill.loss.2.student: no module"),
    "bad path in a list": (["--set", "distill.loss.2={method: fsp, student: [features.1, features.77], "
                            "teacher: [layers.0, layers.1]}"], "distill.loss.2.student: no module 'features.77'"),
    "impossible pairing": (["--set", "distill.loss.2={method: nst, student: classifier, teacher: layers.1}"],
                           "distill.loss.2: nst cannot pair student 'classifier'"),
    "ensemble without members": (["--set", "distill.loss.1={method: ensemble}"],
                                 "'ensemble' term but teacher.ensemble lists no extra teachers"),
    "unknown method": (["--set", "distill.loss.1.method=kdd"], "distill.loss.1"),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_config_exit_2_nothing_written(tmp_path, case, command):
    args, expected = BAD_CASES[case]
    result = runner.invoke(app, [command, str(TINY), *_dirs(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("content,expected", [("", "the pipeline file is empty"),
                                              ("name: x\ndata: [1\n", "YAML syntax error"),
                                              ("- 1\n- 2\n", "expected a mapping")])
def test_bad_files(tmp_path, content, expected):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and expected in result.output


def test_missing_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "file not found" in result.output


def test_several_problems_one_line_each(tmp_path):
    result = runner.invoke(app, ["validate", str(TINY), "--set", "seed=x", "--set", "bench.warmup=-1"])
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error")]
    assert result.exit_code == 2 and len(lines) == 2


def test_methods_distill_lists_terms():
    result = runner.invoke(app, ["methods", "distill"])
    assert result.exit_code == 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    from compresskit.distill import methods

    # one line per method, in the registry's order, each with a description
    assert [ln.split()[0] for ln in lines] == [name for name, _ in methods()]
    assert all(len(ln.split()) > 2 for ln in lines)


def test_bench_any_onnx(tmp_path):
    import torch

    from compresskit.export import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    result = runner.invoke(app, ["bench", str(path), "--batch-sizes", "1,4", "--max-seconds", "0.1",
                                 "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "p50" in result.output and (tmp_path / "b.json").is_file()
    bad = runner.invoke(app, ["bench", str(tmp_path / "none.onnx")])
    assert bad.exit_code == 2


def test_check_missing_report(tmp_path):
    result = runner.invoke(app, ["check", str(tmp_path / "report.json")])
    assert result.exit_code == 2


def test_cuda_without_cuda_is_a_config_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = runner.invoke(app, ["run", str(TINY), *_dirs(tmp_path), "--set", "device=cuda"])
    assert result.exit_code == 2 and "device: cuda" in result.output
    assert not (tmp_path / "models").exists()


def test_bad_ignored_layer_pattern(tmp_path):
    result = runner.invoke(app, ["validate", str(TINY), "--set", "prune.pruner.ignored_layers=[nothing.*]"])
    assert result.exit_code == 2 and "prune.pruner.ignored_layers" in result.output


def test_from_after_until_is_rejected(tmp_path):
    result = runner.invoke(app, ["run", str(TINY), *_dirs(tmp_path), "--from", "bench", "--until", "distill"])
    assert result.exit_code == 2 and "--until" in result.output
    assert not (tmp_path / "models").exists()
