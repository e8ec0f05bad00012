"""Runs the stages in order, skips the ones that are up to date, records lineage.

Each stage reads the artifacts of the stages before it from `models/<run>/<stage>/`, writes its
own there atomically, and leaves `stage.json` (config hash, input/output sha256, versions, wall
time) and `metrics.json`. A stage is skipped when its config hash and input hashes match its
record and its outputs are intact. `preflight` checks everything that can be checked before any
file is written.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compresskit.artifacts import (
    RunLayout,
    config_hash,
    read_metrics,
    read_stage_record,
    sha256_file,
    stage_up_to_date,
    write_metrics,
    write_stage_record,
)
from compresskit.config import STAGES, ConfigError, PipelineConfig


class StageError(Exception):
    """A stage failed for a reason the user can act on."""


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | cached | skipped
    wall_s: float = 0.0
    summary: str = ""
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    cfg: PipelineConfig
    layout: RunLayout
    log: Callable[[str], None]
    quiet: bool = False
    traceback: bool = False
    stage_key: str = ""
    teacher_cache: dict[str, dict] = field(default_factory=dict)  # teacher file sha -> memoised logits
    outcomes: list[StageOutcome] = field(default_factory=list)
    _data: Any = None
    _device: Any = None

    @property
    def data(self):
        if self._data is None:
            from compresskit.data import load_data

            self._data = load_data(self.cfg.data, seed=self.cfg.seed)
        return self._data

    @property
    def device(self):
        if self._device is None:
            from compresskit.train import resolve_device

            self._device = resolve_device(self.cfg.device)
        return self._device

    def stage_dir(self, stage: str) -> Path:
        return self.layout.stage_dir(stage)


# ------------------------------------------------------------------ preflight

def preflight(cfg: PipelineConfig) -> None:
    """Check inputs that exist outside the config (files, data, module paths) before writing."""
    from compresskit.data import check_data_available

    problems: list[tuple[str, str]] = []
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(("device", "cuda was asked for but CUDA is not available here (use auto or cpu)"))
    msg = check_data_available(cfg.data)
    if msg:
        problems.append(("data", msg))
    ckpt = cfg.teacher.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        problems.append(("teacher.checkpoint", f"file not found: {ckpt}"))
    if not problems:
        problems += _check_models(cfg)
    if problems:
        raise ConfigError(problems)


def _check_models(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """Build teacher and student once (cheap, untrained) to check factories, feature-tap paths and
    that every loss term accepts the shapes it would pair (one dry forward, as training does)."""
    from compresskit.nets import build_model

    channels, classes, size = _shape_hint(cfg)
    problems: list[tuple[str, str]] = []
    built = {}
    specs = [("teacher.model", cfg.teacher.model), ("distill.student", cfg.distill.student)]
    specs += [(f"teacher.ensemble.{i}.model", m.model) for i, m in enumerate(cfg.teacher.ensemble) if m.model]
    for key, spec in specs:
        try:
            built[key] = build_model(spec.model_dump(mode="json") | {"num_classes": classes, "in_channels": channels})
        except (ValueError, TypeError, KeyError, ImportError) as err:
            problems.append((key, str(err)))
    loss_lists = [("distill.loss", cfg.distill.loss)]
    if cfg.prune.enabled:
        loss_lists.append(("prune.finetune.loss", cfg.prune.finetune.loss))
    if cfg.quantize.qat.enabled:
        loss_lists.append(("quantize.qat.loss", cfg.quantize.qat.loss))
    for where, terms in loss_lists:
        for i, term in enumerate(terms):
            for field_name, side, path in term.module_paths():
                key = "teacher.model" if side == "teacher" else "distill.student"
                if where == "quantize.qat.loss" and side == "teacher":
                    key = "distill.student"  # QAT's teacher is the float student
                if key not in built:
                    continue
                names = dict(built[key].named_modules())
                if path not in names:
                    near = [n for n in names if n and n.split(".")[0] == path.split(".")[0]][:8]
                    problems.append((f"{where}.{i}.{field_name}",
                                     f"no module {path!r} in the {side} model"
                                     + (f" (e.g. {', '.join(near)})" if near else "")))
    sp = cfg.teacher.specialists
    if sp.enabled and (sp.count * sp.size > classes or sp.size >= classes):
        problems.append(("teacher.specialists", f"{sp.count} specialists of {sp.size} classes need at least "
                         f"{max(sp.count * sp.size, sp.size + 1)} classes; the data has {classes}"))
    if not problems and "teacher.model" in built and "distill.student" in built:
        problems += _dry_run_objectives(cfg, built, loss_lists[:2], (channels, size, size))
    if cfg.prune.enabled and "distill.student" in built:
        from compresskit.prune import expand_paths

        try:
            paths = expand_paths(built["distill.student"], cfg.prune.pruner.ignored_layers)
        except ValueError as err:
            problems.append(("prune.pruner.ignored_layers", str(err)))
        else:
            names = dict(built["distill.student"].named_modules())
            for path in paths:
                if path not in names:
                    problems.append(("prune.pruner.ignored_layers", f"no module {path!r} in the student model"))
    return problems


def _dry_run_objectives(cfg: PipelineConfig, built: dict, loss_lists, shape: tuple[int, int, int]):
    """Build each stage's objective on the untrained models: shape pairings are checked before
    any training (the stage builds it again on the trained models)."""
    import torch

    from compresskit.distill.objective import build_objective
    from compresskit.distill.registry import TERMS

    teacher = built["teacher.model"]
    if cfg.teacher.ensemble:
        from compresskit.distill.ensemble import TeacherEnsemble

        members = [built.get(f"teacher.ensemble.{i}.model", teacher) for i in range(len(cfg.teacher.ensemble))]
        teacher = TeacherEnsemble([teacher, *members])
    problems = []
    example = torch.zeros(2, *shape)
    for where, terms in loss_lists:
        dumped = [t.model_dump(mode="json") for t in terms]
        needs_teacher = any(TERMS[t["method"]].needs_teacher for t in dumped)
        if where == "distill.loss" and not cfg.distill.enabled:
            needs_teacher = False
        try:
            build_objective(dumped, student=built["distill.student"], teacher=teacher if needs_teacher else None,
                            example_input=example).close()
        except ValueError as err:
            found = re.match(r"terms\[(\d+)\]:? (?:\(\w+\):? )?(.*)", str(err), re.DOTALL)
            problems.append((f"{where}.{found[1]}", found[2]) if found else (where, str(err)))
    return problems


def _shape_hint(cfg: PipelineConfig) -> tuple[int, int, int]:
    """(channels, classes, image side) the data will have, from the config alone."""
    d = cfg.data
    if d.dataset == "synthetic":
        return d.synthetic.channels, d.synthetic.num_classes, d.synthetic.image_size
    if d.dataset == "fashion-mnist":
        return 1, 10, 28
    if d.dataset == "cifar10":
        return 3, 10, 32
    return d.channels or 3, len(d.class_names) if d.class_names else 2, d.image_size or 32


# ------------------------------------------------------------------ runner

def _check_stage_range(from_stage: str | None, until: str | None) -> None:
    for name in (from_stage, until):
        if name is not None and name not in STAGES:
            raise ConfigError([("--from/--until", f"unknown stage {name!r}; stages: {', '.join(STAGES)}")])
    if from_stage and until and STAGES.index(until) < STAGES.index(from_stage):
        raise ConfigError([("--until", f"stage {until!r} comes before --from {from_stage!r}")])


def run_pipeline(cfg: PipelineConfig, *, force: set[str] | None = None, from_stage: str | None = None,
                 until: str | None = None, quiet: bool = False, traceback: bool = False,
                 log: Callable[[str], None] = print) -> tuple[list[StageOutcome], dict[str, Any] | None]:
    """Run every stage (or up to `until`); returns the outcomes and the report (None if not reached)."""
    from compresskit import stages as st

    _check_stage_range(from_stage, until)
    order = list(STAGES)
    force = set(force or ())
    bad = force - set(STAGES)
    if bad:
        raise ConfigError([("--force", f"unknown stage(s) {sorted(bad)}; stages: {', '.join(STAGES)}")])
    if from_stage:
        force |= set(order[order.index(from_stage):])
    preflight(cfg)
    _seed_everything(cfg)
    layout = RunLayout(Path(cfg.models_dir), Path(cfg.reports_dir), cfg.name)
    outcomes: list[StageOutcome] = []
    ctx = RunContext(cfg=cfg, layout=layout, log=log, quiet=quiet, traceback=traceback, outcomes=outcomes)
    funcs = {"teacher": st.teacher, "distill": st.distill, "prune": st.prune, "quantize": st.quantize,
             "export": st.export, "bench": st.bench, "report": st.report}
    report = None
    for name in order:
        outcome = _run_stage(ctx, name, funcs[name], force=name in force)
        outcomes.append(outcome)
        if name == "report":
            report = outcome.metrics.get("report")
        if until and name == until:
            break
    return outcomes, report


def _seed_everything(cfg: PipelineConfig) -> None:
    import random

    import numpy as np
    import torch

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def _run_stage(ctx: RunContext, name: str, fn, *, force: bool) -> StageOutcome:
    """Plan the stage (hash + inputs), reuse it when up to date, else run and record it."""
    plan = fn.plan(ctx)  # -> (config dict, inputs dict) or None when the stage is disabled
    stage_dir = ctx.stage_dir(name)
    if plan is None:
        return StageOutcome(name, "skipped", summary="disabled")
    conf, inputs = plan
    chash = config_hash({"stage": name, "config": conf, "code": STAGE_CODE_VERSION})
    if not force and stage_up_to_date(stage_dir, chash, inputs):
        record = read_stage_record(stage_dir) or {}
        metrics = read_metrics(stage_dir) or {}
        ctx.log(f"[{name}] up to date, skipped")
        return StageOutcome(name, "cached", record.get("wall_s", 0.0), metrics.get("summary", ""),
                            metrics=metrics)
    ctx.layout.ensure_stage_dir(name)
    ctx.log(f"[{name}] running")
    # resume files are only trusted for exactly this config and these inputs
    ctx.stage_key = config_hash({"config": chash, "inputs": {k: sha256_file(v) for k, v in inputs.items()}})
    t0 = time.perf_counter()
    try:
        outputs, metrics = fn.run(ctx)
    except (StageError, KeyboardInterrupt):
        raise
    except (ValueError, RuntimeError, OSError) as err:
        if ctx.traceback:
            raise
        raise StageError(f"{name}: {type(err).__name__}: {err}") from err
    wall = time.perf_counter() - t0
    metrics["wall_s"] = wall
    write_metrics(stage_dir, metrics)
    outputs = {**outputs, "metrics": stage_dir / "metrics.json"}
    write_stage_record(stage_dir, stage=name, config_hash=chash, inputs=inputs, outputs=outputs,
                       wall_s=wall, extra={"summary": metrics.get("summary", "")})
    ctx.log(f"[{name}] done in {wall:.1f}s: {metrics.get('summary', '')}")
    return StageOutcome(name, "ran", wall, metrics.get("summary", ""), outputs, metrics)


# Bump when a stage's behaviour changes, so old artifacts are not reused.
STAGE_CODE_VERSION = 1
