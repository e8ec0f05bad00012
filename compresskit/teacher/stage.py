"""The teacher stage: train (or load) the teacher, its ensemble members and its specialists, and
build the combined teacher the later stages learn from (:func:`load_teacher`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compresskit import stagekit as sk
from compresskit.stage import StageContext, StageError, StageResult
from compresskit.stages import TeacherJob, TeacherUse


def load_teacher(files: dict[str, Path], use: TeacherUse):
    """The teacher the distill and prune stages learn from, rebuilt from the teacher stage's
    files (:func:`compresskit.stages.teacher_files`): the teacher model, an ensemble of it and
    its members, or generalist + specialists."""
    from compresskit.checkpoint import load_model

    model, _ = load_model(files["teacher"])
    if use.members:
        from compresskit.teacher.ensemble import TeacherEnsemble

        members = [load_model(files[f"teacher_member_{i + 1}"])[0] for i in range(use.members)]
        return TeacherEnsemble([model, *members])
    if use.specialists is not None:
        from compresskit.teacher.specialists import GeneralistSpecialists

        groups = json.loads(Path(files["teacher_specialists"]).read_text())["groups"]
        specialists = [load_model(files[f"teacher_specialist_{i + 1}"])[0] for i in range(len(groups))]
        return GeneralistSpecialists(model, specialists, groups, top_k=use.specialists.top_k,
                                     steps=use.specialists.combine_steps)
    return model


def _one_teacher(ctx: StageContext, job: TeacherJob, data, device, model_cfg, checkpoint: Path | None,
                 seed: int, desc: str, where: str):
    """Train (or load) one teacher: returns (model, spec, pruning, qat, metrics).

    A checkpoint must fit the architecture and the data (classes, channels, recorded
    preprocessing; `teacher.preprocess_mismatch` says what a different normalisation does): the
    same checks as `compresskit.preflight`, which refuses it before the run starts."""
    import torch

    from compresskit.checkpoint import load_for_data
    from compresskit.nets import build_model

    spec = sk.model_spec(model_cfg, data)
    metrics: dict[str, Any] = {}
    if checkpoint is not None:
        try:
            model, ckpt, notes = load_for_data(Path(checkpoint), spec, data.checkpoint_preprocess(),
                                               job.teacher.preprocess_mismatch)
        except (ValueError, OSError) as err:
            raise StageError(f"{where}: {err}") from None
        spec = ckpt.get("spec") or spec
        metrics["loaded_from"] = str(checkpoint)
        metrics |= notes
        return model, spec, ckpt.get("pruning"), ckpt.get("qat"), metrics
    train_cfg = job.teacher.train
    torch.manual_seed(seed)
    model = build_model(spec)
    res = sk.train(ctx, model, [{"method": "ce", "weight": 1.0, "label_smoothing": train_cfg.label_smoothing}],
                   train_cfg, data=data, device=device, seed=seed, desc=desc)
    metrics["fit"] = res.to_json()
    return model, spec, None, None, metrics


def run(ctx: StageContext, job: TeacherJob) -> StageResult:
    from compresskit.checkpoint import save_checkpoint
    from compresskit.nets import count_params
    from compresskit.stages import teacher_files

    cfg = job.teacher
    data, device = sk.data_of(ctx, job.data, job.seed), sk.device_of(job.device)
    out = ctx.dir / "model.pt"
    model, spec, pruning, qat, metrics = _one_teacher(ctx, job, data, device, cfg.model, cfg.checkpoint, job.seed,
                                                      "teacher", "teacher.checkpoint")
    metrics["val_accuracy"] = sk.evaluate(model, data, "val", device)
    metrics["test_accuracy"] = sk.evaluate(model, data, "test", device)
    metrics["params"] = count_params(model)
    save_checkpoint(out, model.cpu(), spec, pruning=pruning, qat=qat, preprocess=data.checkpoint_preprocess(),
                    meta={"stage": "teacher", "test_accuracy": metrics["test_accuracy"]})
    outputs = {"model": out}
    summary = f"test {metrics['test_accuracy']:.2%}, {metrics['params'] / 1e6:.2f}M params"
    use = TeacherUse(members=len(cfg.ensemble), specialists=cfg.specialists if cfg.specialists.enabled else None)
    files = teacher_files(use, ctx.dir)
    if cfg.ensemble:
        members = []
        for i, member in enumerate(cfg.ensemble):
            seed = member.seed if member.seed is not None else job.seed + i + 1
            m_model, m_spec, m_pruning, m_qat, m_metrics = _one_teacher(
                ctx, job, data, device, member.model or cfg.model, member.checkpoint, seed, f"member{i + 1}",
                f"teacher.ensemble.{i}.checkpoint")
            m_metrics["test_accuracy"] = sk.evaluate(m_model, data, "test", device)
            path = ctx.dir / f"member_{i + 1}.pt"
            save_checkpoint(path, m_model.cpu(), m_spec, pruning=m_pruning, qat=m_qat,
                            preprocess=data.checkpoint_preprocess(),
                            meta={"stage": "teacher", "test_accuracy": m_metrics["test_accuracy"]})
            outputs[f"member_{i + 1}"] = path
            members.append(m_metrics)
        combined = sk.evaluate(load_teacher(files, use), data, "test", device)
        metrics["ensemble"] = {"members": members, "test_accuracy": combined}
        summary += f"; ensemble of {len(members) + 1}: test {combined:.2%}"
    if cfg.specialists.enabled:
        metrics["specialists"] = _train_specialists(ctx, job, data, device, model, spec, files, use)
        for i in range(cfg.specialists.count):
            outputs[f"specialist_{i + 1}"] = ctx.dir / f"specialist_{i + 1}.pt"
        outputs["specialists"] = ctx.dir / "specialists.json"
        summary += (f"; generalist + {cfg.specialists.count} specialists: "
                    f"test {metrics['specialists']['test_accuracy']:.2%}")
    sk.cleanup_resume(ctx.dir)
    return StageResult(outputs, metrics, summary)


def _train_specialists(ctx: StageContext, job: TeacherJob, data, device, generalist, spec, files, use) -> dict:
    """Group the classes the generalist confuses, train one specialist per group, save them."""
    from compresskit.artifacts import atomic_write_json
    from compresskit.checkpoint import save_checkpoint
    from compresskit.teacher import specialists as sp

    cfg = job.teacher.specialists
    generalist.to(device)
    conf = sp.confusion_matrix(generalist, data.loader("val", device=device), data.num_classes, device=device)
    try:
        groups = sp.group_confused_classes(conf, count=cfg.count, size=cfg.size)
    except ValueError as err:
        raise StageError(f"teacher.specialists: {err}") from None
    info: dict[str, Any] = {"groups": groups, "specialists": []}
    for i, group in enumerate(groups):
        model = sp.train_specialist(generalist, spec, group, data, cfg.train, temperature=cfg.temperature,
                                    soft_weight=cfg.soft_weight, device=device, seed=job.seed + i,
                                    quiet=ctx.quiet, log=ctx.log)
        classes = [data.class_names[c] for c in group] + ["(dustbin: every other class)"]
        save_checkpoint(ctx.dir / f"specialist_{i + 1}.pt", model.cpu(), sp.specialist_spec(spec, group),
                        preprocess=data.preprocess() | {"class_names": classes},
                        meta={"stage": "teacher", "specialist_classes": group})
        info["specialists"].append({"classes": group})
    atomic_write_json(ctx.dir / "specialists.json", {"groups": groups})
    info["generalist_test_accuracy"] = sk.evaluate(generalist, data, "test", device)
    info["test_accuracy"] = sk.evaluate(load_teacher(files, use), data, "test", device)
    return info
