"""The measurement side must work where torch is not installed (a Raspberry Pi, a CI runner).

Each check runs in a fresh interpreter whose import system refuses torch and its relatives,
so an indirect import anywhere in the chain fails the test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import compresskit

PACKAGE = Path(compresskit.__file__).resolve().parent
TORCH_FREE = [
    "compresskit",
    "compresskit.artifacts",
    "compresskit.envinfo",
    "compresskit.onnxutil",
    "compresskit.quantize.qdq",
    "compresskit.quantize.calibrate",
    "compresskit.bench",
    "compresskit.report",
    "compresskit.report.html",
    "compresskit.budget",
    "compresskit.quantize.search",
    "compresskit.stage",
    "compresskit.stages",
    "compresskit.pipeline",
    "compresskit.cli",
    "compresskit.gate",
    "compresskit.bundle",
    "compresskit.report.device",
    "compresskit.report.stage",
    "compresskit.quantize.stage",
]
# Torch-free by design, written elsewhere; checked once they exist.
OPTIONAL = {"compresskit.config": "config.py", "compresskit.quantize.ptq": "quantize/ptq.py"}

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"torch", "torchvision", "torchao", "torch_pruning"}

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"torch is blocked in this test: import of {name!r}")
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_blocker_blocks_torch():
    """The test would prove nothing if the blocker let torch through."""
    result = _run_blocked("import torch")
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr


def _import_blocked(modules: list[str]) -> None:
    code = f"""
    import importlib
    for name in {modules!r}:
        importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok", len({modules!r}))
    """
    result = _run_blocked(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", str(len(modules))]


def test_modules_import_without_torch():
    _import_blocked(TORCH_FREE)


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_optional_module_imports_without_torch(module):
    if not (PACKAGE / OPTIONAL[module]).is_file():
        pytest.skip(f"{module} does not exist yet")
    _import_blocked([module])


def test_functions_run_without_torch(tmp_path):
    """Environment, stage records, a report and a verdict: all without torch."""
    code = f"""
    from pathlib import Path
    from compresskit import artifacts, budget, envinfo, report

    env = envinfo.environment()
    assert "onnxruntime" in env["versions"]
    stage = Path({str(tmp_path)!r}) / "stage"
    stage.mkdir()
    (stage / "out.bin").write_bytes(b"x")
    artifacts.write_stage_record(stage, stage="s", config_hash="h", inputs={{}},
                                 outputs={{"out": stage / "out.bin"}}, wall_s=0.1)
    assert artifacts.stage_up_to_date(stage, "h", {{}})
    rows = [{{"name": "m", "accuracy": 0.9, "size_bytes": 10, "latency": []}}]
    verdict = budget.select_and_verdict(rows, ["m"], {{"min_accuracy": 0.5}}, None)
    rep = report.build_report(run="r", config={{}}, rows=rows, verdict=verdict,
                              environment=env, stages=[])
    report.write_report(stage / "report", rep)
    assert verdict["passed"]
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    print("ok")
    """
    result = _run_blocked(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert (tmp_path / "stage" / "report" / "report.md").is_file()
