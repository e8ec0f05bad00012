"""The distill stage: train the student from the combined teacher with the configured loss terms
(and, with `baseline`, the same student on labels alone beside it)."""

from __future__ import annotations

from typing import Any

from compresskit import stagekit as sk
from compresskit.stage import StageContext, StageResult
from compresskit.stages import DistillJob


def run(ctx: StageContext, job: DistillJob) -> StageResult:
    import torch

    from compresskit.checkpoint import save_checkpoint
    from compresskit.distill.registry import TERMS
    from compresskit.nets import build_model, count_params
    from compresskit.teacher.stage import load_teacher

    cfg = job.distill
    data, device = sk.data_of(ctx, job.data, job.seed), sk.device_of(job.device)
    teacher_inputs = {k: v for k, v in ctx.inputs.items() if k.startswith("teacher")}
    teacher = load_teacher(teacher_inputs, job.teacher)
    teacher_key = sk.files_key(teacher_inputs.values())
    spec = sk.model_spec(cfg.student, data)
    outputs, metrics = {}, {}
    runs: list[tuple[str, list[Any]]] = [("student", list(cfg.loss))]
    if cfg.baseline:
        runs.append(("baseline", [{"method": "ce", "weight": 1.0, "label_smoothing": cfg.train.label_smoothing}]))
    for name, terms in runs:
        torch.manual_seed(job.seed)
        model = build_model(spec)
        uses_teacher = any(TERMS[t["method"]].needs_teacher for t in sk.dump_terms(terms))
        res = sk.train(ctx, model, terms, cfg.train, data=data, device=device, seed=job.seed, desc=name,
                       teacher=teacher if uses_teacher else None, teacher_key=teacher_key)
        test_acc = sk.evaluate(model, data, "test", device)
        path = ctx.dir / ("model.pt" if name == "student" else "baseline.pt")
        save_checkpoint(path, model.cpu(), spec, meta={"stage": "distill", "test_accuracy": test_acc},
                        preprocess=data.checkpoint_preprocess())
        outputs[name] = path
        metrics[name] = {"fit": res.to_json(), "val_accuracy": res.best_val_accuracy,
                         "test_accuracy": test_acc, "params": count_params(model)}
    sk.cleanup_resume(ctx.dir)
    s = metrics["student"]
    summary = f"student test {s['test_accuracy']:.2%}, {s['params'] / 1e6:.3f}M params"
    if "baseline" in metrics:
        summary += f" (no-KD baseline {metrics['baseline']['test_accuracy']:.2%})"
    return StageResult(outputs, metrics, summary)
