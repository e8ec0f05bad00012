"""The stage contract: one list, one name in four places, keys computed from what a stage
receives, and no import cycle in the package. No training here (see test_pipeline.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import compresskit
from compresskit import envinfo
from compresskit.artifacts import RunLayout
from compresskit.config import PipelineConfig, load_config
from compresskit.pipeline import environment_key
from compresskit.stage import cache_key
from compresskit.stages import STAGE_NAMES, STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(compresskit.__file__).resolve().parent


def _cfg(*overrides: str) -> PipelineConfig:
    return load_config(ROOT / "pipelines" / "tiny_synthetic.yaml", list(overrides))


def _key(name: str, cfg: PipelineConfig) -> str:
    """A stage's key with every input file standing in by its name (the file part of the key is
    tested end to end in test_pipeline.py)."""
    stage = next(s for s in STAGES if s.name == name)
    job = stage.select(cfg)
    inputs = stage.inputs(cfg, RunLayout(Path("m"), Path("r"), cfg.name))
    return cache_key(stage, job, {k: "sha-of-" + k for k in inputs}, environment_key(stage, job))


def test_one_name_in_four_places():
    """YAML section, module, CLI word and run directory are the same word, from one list."""
    assert STAGE_NAMES == ("teacher", "distill", "prune", "quantize", "export", "bench", "report")
    sections = set(PipelineConfig.model_fields)
    for stage in STAGES:
        # the report stage has no section of its own: it judges the `budgets`
        assert stage.name in sections or stage.name == "report", stage.name
        assert callable(stage.runner()), stage.name
        assert stage.source_files() and all(f.is_file() for f in stage.source_files())


def test_cli_stage_options_come_from_the_list():
    from typer.testing import CliRunner

    from compresskit.cli import app

    out = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"}).output.split())
    assert ", ".join(STAGE_NAMES) in out
    assert all(f"{s.name}: {s.help}" in out for s in STAGES)  # each stage explained, in order


def test_changing_a_budget_reruns_the_choices_made_by_speed_only():
    base, other = _cfg(), _cfg("budgets.latency_batch_size=8")
    for name in ("prune", "quantize"):  # pruning ratio probe and INT8 format search read the budget
        assert _key(name, base) != _key(name, other), name
    for name in ("teacher", "distill", "export", "bench"):
        assert _key(name, base) == _key(name, other), name


def test_unrelated_sections_do_not_change_a_key():
    base = _cfg()
    for override, unchanged in [("bench.max_seconds=0.3", ("teacher", "distill", "export")),
                                ("export.parity_samples=32", ("teacher", "distill", "prune", "quantize", "bench")),
                                ("data.eval_batch_size=64", ("teacher", "distill", "prune", "quantize", "export")),
                                ("distill.train.epochs=2", ("teacher", "export", "bench"))]:
        other = _cfg(override)
        for name in unchanged:
            assert _key(name, base) == _key(name, other), (override, name)
    assert _key("distill", base) != _key("distill", _cfg("distill.train.epochs=2"))
    assert _key("bench", base) != _key("bench", _cfg("bench.max_seconds=0.3"))


def test_a_different_machine_remeasures(monkeypatch):
    cfg = _cfg()
    before = {s.name: _key(s.name, cfg) for s in STAGES}
    real = envinfo.machine_key
    monkeypatch.setattr(envinfo, "machine_key", lambda threads: {**real(threads), "cpu": "another CPU"})
    after = {s.name: _key(s.name, cfg) for s in STAGES}
    assert {n for n in before if before[n] != after[n]} == {"prune", "quantize", "bench"}


def test_code_of_a_stage_is_in_its_key(monkeypatch):
    cfg = _cfg()
    stage = next(s for s in STAGES if s.name == "export")
    before = _key("export", cfg)
    monkeypatch.setattr(type(stage), "code_key", lambda self: "edited")
    assert _key("export", cfg) != before


def test_library_versions_are_in_every_key(monkeypatch):
    import compresskit.stage as stage_module

    cfg = _cfg()
    before = {s.name: _key(s.name, cfg) for s in STAGES}
    real = stage_module.library_versions
    monkeypatch.setattr(stage_module, "library_versions", lambda pkgs: {**real(pkgs), "torch": "9.9.9"})
    after = {s.name: _key(s.name, cfg) for s in STAGES}
    assert all(before[n] != after[n] for n in before)


def test_disabled_stages_have_no_job():
    cfg = _cfg("distill.enabled=false", "prune.enabled=false", "quantize.ptq.enabled=false",
               "quantize.qat.enabled=false")
    jobs = {s.name: s.select(cfg) for s in STAGES}
    assert {n for n, j in jobs.items() if j is None} == {"distill", "prune", "quantize"}
    export = next(s for s in STAGES if s.name == "export").inputs(cfg, RunLayout(Path("m"), Path("r"), "x"))
    assert set(export) == {"teacher"}  # without distillation, the teacher itself is compressed


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(path: Path, module: str) -> set[str]:
    """compresskit modules imported when `module` is imported (statements at module level)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c imports a and a.b first
                found.add(".".join(parts[:i]))
    return {n for n in found if n.startswith("compresskit")}


def test_no_import_cycle_in_the_package():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {d for d in _top_level_imports(p, m) if d in files and d != m} for m, p in files.items()}
    for m in graph:  # a submodule's package runs first, but the package importing it is not a cycle
        graph[m] -= {d for d in graph[m] if m.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]) if d in path
                            else f"import cycle through {d}")
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
