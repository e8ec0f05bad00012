"""Runs the stages of :data:`compresskit.stages.STAGES` in order, skips the up-to-date ones and
records lineage.

For each stage the runner builds its job from the config, lists its input files, computes its
cache key (:func:`compresskit.stage.cache_key`: job, input sha256, code, and the machine for
stages that measure speed) and compares it with the stage's `stage.json`. An up-to-date stage
is skipped; otherwise `compresskit.<stage>.run(ctx, job)` runs and its outputs, `metrics.json`
and `stage.json` are written. Seeds and torch's global settings are set here, once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compresskit.artifacts import (
    RunLayout,
    read_metrics,
    read_stage_record,
    sha256_file,
    stage_up_to_date,
    write_metrics,
    write_stage_record,
)
from compresskit.config import ConfigError, PipelineConfig
from compresskit.stage import InputError, Stage, StageContext, StageError, StageOutcome, cache_key
from compresskit.stages import STAGE_NAMES, STAGES

__all__ = ["RunLocked", "StageError", "StageOutcome", "environment_key", "plan_stage", "run_pipeline"]


class RunLocked(Exception):
    """Another compresskit process is running in the same run folder."""


@contextlib.contextmanager
def run_lock(run_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold `run_dir/.lock` for the whole run, so two runs never mix their artifacts. Without
    `wait`, a held lock is an error naming the holder's PID. The OS releases the lock when the
    holder dies (flock), so a killed run never leaves the folder locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RunLocked(f"{run_dir} is in use by another compresskit run (PID {holder}); wait for it to "
                            "finish, or pass --wait to queue behind it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def describe_write_error(err: BaseException, where: Path) -> str | None:
    """Words for a failure to write artifacts (full disk, read-only or forbidden folder), or None
    when `err` is something else. torch.save reports a full disk as a RuntimeError without errno,
    so the free space is checked too."""
    free_mib = None
    with contextlib.suppress(OSError):
        probe = where
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_mib = shutil.disk_usage(probe).free / 2**20
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or (
            isinstance(err, RuntimeError) and free_mib is not None and free_mib < 64):
        return f"no space left on the device holding {where} ({free_mib or 0:.0f} MiB free)"
    if code == errno.EROFS:
        return f"{where} is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write to {getattr(err, 'filename', None) or where}"
    return None


def _check_stage_names(force: set[str], from_stage: str | None, until: str | None) -> None:
    known = ", ".join(STAGE_NAMES)
    for opt, name in (("--from", from_stage), ("--until", until)):
        if name is not None and name not in STAGE_NAMES:
            raise ConfigError([(opt, f"unknown stage {name!r}; stages: {known}")])
    if from_stage and until and STAGE_NAMES.index(until) < STAGE_NAMES.index(from_stage):
        raise ConfigError([("--until", f"stage {until!r} comes before --from {from_stage!r}")])
    bad = force - set(STAGE_NAMES)
    if bad:
        raise ConfigError([("--force", f"unknown stage(s) {sorted(bad)}; stages: {known}")])


def environment_key(stage: Stage, job) -> dict[str, Any] | None:
    """The machine part of a stage's key, for stages that measure or choose by speed."""
    threads = stage.measures(job)
    if threads is None:
        return None
    from compresskit.envinfo import machine_key

    return machine_key(threads)


def plan_stage(stage: Stage, cfg: PipelineConfig, layout: RunLayout):
    """(job, inputs, key) of a stage for this config, or None when the stage is disabled. The
    inputs must exist (the stages before wrote them)."""
    job = stage.select(cfg)
    if job is None:
        return None
    inputs = stage.inputs(cfg, layout)
    missing = [f"{name} ({path})" for name, path in inputs.items() if not Path(path).is_file()]
    if missing:
        raise StageError(f"{stage.name}: missing input(s) {', '.join(missing)}; re-run the earlier stages")
    hashes = {name: sha256_file(path) for name, path in inputs.items()}
    return job, inputs, cache_key(stage, job, hashes, environment_key(stage, job))


def run_pipeline(cfg: PipelineConfig, *, force: set[str] | None = None, from_stage: str | None = None,
                 until: str | None = None, quiet: bool = False, traceback: bool = False, wait: bool = False,
                 log: Callable[[str], None] = print) -> tuple[list[StageOutcome], dict[str, Any] | None]:
    """Run every stage (or up to `until`) under the run folder's lock; returns the outcomes and
    the report (None if not reached). Nothing is written before the config and its inputs passed
    the preflight checks."""
    from compresskit.preflight import preflight

    force = set(force or ())
    _check_stage_names(force, from_stage, until)
    if from_stage:
        force |= set(STAGE_NAMES[STAGE_NAMES.index(from_stage):])
    preflight(cfg)
    _setup_torch(cfg.seed, cfg.threads)
    layout = RunLayout(Path(cfg.models_dir), Path(cfg.reports_dir), cfg.name)
    memo: dict[str, Any] = {}
    outcomes: list[StageOutcome] = []
    fresh = [d for d in (layout.models_root, layout.run_dir) if not d.exists()]
    try:
        lock = run_lock(layout.run_dir, wait=wait)
        lock.__enter__()
    except OSError as err:
        raise StageError(f"models_dir: cannot use {layout.run_dir}: "
                         f"{describe_write_error(err, layout.run_dir) or err}") from None
    tracker = None
    finished = False
    try:
        tracker = _tracker(cfg)  # inside: a tracking failure still releases the lock
        for stage in STAGES:
            outcome = _run_stage(stage, cfg, layout, force=stage.name in force, memo=memo,
                                 history=tuple(outcomes), log=log, quiet=quiet, traceback=traceback)
            outcomes.append(outcome)
            if tracker is not None:
                tracker.stage(outcome)
            if until and stage.name == until:
                break
        finished = True
    finally:
        lock.__exit__(None, None, None)
        if tracker is not None:
            tracker.close(ok=finished)
        if not finished and layout.run_dir in fresh:
            _remove_if_only_lock(layout.run_dir, fresh)
    report = outcomes[-1].metrics.get("report") if outcomes[-1].name == "report" else None
    return outcomes, report


def _remove_if_only_lock(run_dir: Path, fresh: list[Path]) -> None:
    """A run that failed before writing anything leaves no folder behind (its lock included)."""
    if [p.name for p in run_dir.iterdir()] != [".lock"]:
        return
    with contextlib.suppress(OSError):
        (run_dir / ".lock").unlink()
        for d in reversed(fresh):
            d.rmdir()


def _tracker(cfg: PipelineConfig):
    """The run's experiment tracker, or None when the config asks for none."""
    t = cfg.tracking
    if not (t.mlflow_uri or t.tensorboard_dir):
        return None
    from compresskit.track import RunTracker

    return RunTracker(cfg.name, cfg.model_dump(mode="json"), mlflow_uri=t.mlflow_uri,
                      mlflow_experiment=t.mlflow_experiment, tensorboard_dir=t.tensorboard_dir)


def _setup_torch(seed: int, threads: int | None) -> None:
    """The one place that seeds the random generators and sets torch's global flags."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def _run_stage(stage: Stage, cfg: PipelineConfig, layout: RunLayout, *, force: bool, memo: dict,
               history: tuple[StageOutcome, ...], log, quiet: bool, traceback: bool) -> StageOutcome:
    planned = plan_stage(stage, cfg, layout)
    if planned is None:
        log(f"[{stage.name}] disabled, skipped")
        return StageOutcome(stage.name, "skipped", summary="disabled in the config")
    job, inputs, key = planned
    stage_dir = layout.stage_dir(stage.name)
    if not force and stage_up_to_date(stage_dir, key, inputs):
        record = read_stage_record(stage_dir) or {}
        metrics = read_metrics(stage_dir) or {}
        log(f"[{stage.name}] up to date, skipped")
        return StageOutcome(stage.name, "cached", record.get("wall_s", 0.0), metrics.get("summary", ""), metrics)
    created = not stage_dir.exists()
    log(f"[{stage.name}] running")
    ctx = StageContext(name=stage.name, dir=stage_dir, inputs=inputs, key=key, log=log, quiet=quiet,
                       memo=memo, history=history)
    t0 = time.perf_counter()
    try:
        layout.ensure_stage_dir(stage.name)
        result = stage.runner()(ctx, job)
        wall = time.perf_counter() - t0
        metrics = {**result.metrics, "summary": result.summary, "wall_s": wall}
        write_metrics(stage_dir, metrics)
        outputs = {**result.outputs, "metrics": stage_dir / "metrics.json"}
        write_stage_record(stage_dir, stage=stage.name, config_hash=key, inputs=inputs, outputs=outputs,
                           wall_s=wall, extra={"summary": result.summary})
    except BaseException as err:
        if created and stage_dir.is_dir() and not any(stage_dir.iterdir()):
            stage_dir.rmdir()  # a failed stage leaves no empty folder behind
        if isinstance(err, (StageError, ConfigError, InputError)) or not isinstance(err, Exception) or traceback:
            raise
        words = describe_write_error(err, stage_dir)
        if words:
            raise StageError(f"{stage.name}: {words}; earlier artifacts are kept") from err
        raise StageError(f"{stage.name}: {type(err).__name__}: {err}") from err
    log(f"[{stage.name}] done in {wall:.1f}s: {result.summary}")
    return StageOutcome(stage.name, "ran", wall, result.summary, metrics)
