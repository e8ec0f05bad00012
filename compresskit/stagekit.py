"""Torch-side helpers the training stages share (teacher, distill, prune, quantize, export).

Each takes what it needs explicitly: a stage's job values, its context (for the run-scoped
memo, its directory and resume key) and plain objects. Nothing here reads a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compresskit.artifacts import config_hash
from compresskit.stage import StageContext


def data_of(ctx: StageContext, data_cfg, seed: int):
    """The data bundle for a data config and seed, loaded once per run (memoised by its key)."""
    from compresskit.data import load_data

    key = "data:" + config_hash({"data": data_cfg.model_dump(mode="json"), "seed": seed})
    if key not in ctx.memo:
        ctx.memo[key] = load_data(data_cfg, seed=seed)
    return ctx.memo[key]


def device_of(name: str):
    from compresskit.train import resolve_device

    return resolve_device(name)


def model_spec(arch, data) -> dict[str, Any]:
    """A buildable spec: the architecture config plus the data's classes and channels."""
    return arch.model_dump(mode="json") | {"num_classes": data.num_classes, "in_channels": data.in_channels}


def evaluate(model, data, split: str, device) -> float:
    """Top-1 accuracy of `model` on a split of the data bundle."""
    from compresskit.train import evaluate as _evaluate

    model.to(device)
    return _evaluate(model, data.loader(split, device=device))["accuracy"]


def dump_terms(terms) -> list[dict[str, Any]]:
    return [t.model_dump(mode="json") if hasattr(t, "model_dump") else dict(t) for t in terms]


def train(ctx: StageContext, model, terms, train_cfg, *, data, device, seed: int, desc: str,
          teacher=None, teacher_key: str | None = None, epoch_callback=None):
    """Train `model` with the loss `terms` (teacher terms learn from `teacher`) through the one
    training loop, resuming from this stage's resume file when its key matches. Teacher logits
    are memoised for the run when the inputs repeat exactly (no augmentation, logit-only terms)."""
    from compresskit.distill.cache import CachedTeacher
    from compresskit.distill.objective import build_objective
    from compresskit.distill.registry import TERMS
    from compresskit.train import fit, loaders_for

    dumped = dump_terms(terms)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
        repeatable = not data.hflip and not data.crop_padding
        if (train_cfg.cache_teacher and repeatable and teacher_key
                and all(TERMS[t["method"]].teacher_logits_only for t in dumped)):
            store = ctx.memo.setdefault("teacher_logits", {}).setdefault(teacher_key, {})
            teacher = CachedTeacher(teacher, store)
    objective = build_objective(dumped, student=model, teacher=teacher,
                                example_input=data.example_input(2).to(device))
    try:
        train_loader, val_loader = loaders_for(data, train_cfg, device=device, seed=seed)
        result = fit(model, objective, train_loader, val_loader, cfg=train_cfg, device=device, seed=seed,
                     desc=desc, resume_file=ctx.dir / f"resume-{desc}.pt", resume_key=f"{ctx.key}:{desc}",
                     epoch_callback=epoch_callback, quiet=ctx.quiet, log=ctx.log)
    finally:
        objective.close()
    if isinstance(teacher, CachedTeacher):
        result.teacher_cache = {"hits": teacher.hits, "misses": teacher.misses}
    return result


def files_key(paths) -> str:
    """One key for a set of files: the sha256 of their sha256s (memoised teacher logits)."""
    import hashlib

    from compresskit.artifacts import sha256_file

    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def cleanup_resume(stage_dir: Path) -> None:
    """Resume points are useless once a stage finished."""
    for f in Path(stage_dir).glob("resume-*.pt"):
        f.unlink()
