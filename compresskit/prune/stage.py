"""The prune stage: shrink the student (structured pruning, the ratio given or chosen by measured
latency; or magnitude pruning), then recover accuracy by fine-tuning with the teacher."""

from __future__ import annotations

import tempfile
from pathlib import Path

from compresskit import stagekit as sk
from compresskit.budget import accuracy_loss_check
from compresskit.stage import StageContext, StageError, StageResult
from compresskit.stages import LatencySetting, PruneJob


def latency_probe(work_dir: Path, example, latency: LatencySetting):
    """`model -> p50 ms` of its FP32 ONNX export with onnxruntime, at the latency budget's batch
    size and thread count (what the deployed model is judged on)."""
    from compresskit.bench import measure_latency
    from compresskit.export import export_onnx

    def measure(model) -> float:
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="probe-") as tmp:
            path = export_onnx(model, Path(tmp) / "probe.onnx", example)
            return measure_latency(path, latency.batch_size, threads=latency.threads, warmup=latency.warmup,
                                   min_runs=latency.min_runs, max_seconds=latency.max_seconds)["p50_ms"]

    return measure


def _structured(ctx: StageContext, job: PruneJob, student, data, example):
    import torch

    from compresskit import prune as pr

    p = job.prune.pruner
    taylor_batches = None
    if p.importance == "taylor":
        loader = data.loader("calib", batch_size=64)
        taylor_batches = [batch for _, batch in zip(range(4), loader, strict=False)]
    options = dict(importance=p.importance, global_pruning=p.global_pruning, iterative_steps=p.iterative_steps,
                   round_to=p.round_to, ignored_layers=p.ignored_layers, max_layer_ratio=p.max_layer_ratio,
                   taylor_batches=taylor_batches, loss_fn=torch.nn.functional.cross_entropy)
    measure = latency_probe(ctx.dir, example, job.latency)
    if p.target_latency_ms is not None or p.target_speedup is not None:
        return pr.search_ratio(student, example, measure, ratios=p.search_ratios, target_latency_ms=p.target_latency_ms,
                               target_speedup=p.target_speedup, **options)
    result = pr.prune_structured(student, example, ratio=p.ratio, **options)
    before, after = measure(student), measure(result.model)
    return result, {"base_latency_ms": before, "tried": [{
        "ratio": p.ratio, "macs": result.macs_after, "params": result.params_after,
        "mac_ratio": result.macs_after / result.macs_before, "latency_ms": after, "latency_ratio": after / before}]}


def run(ctx: StageContext, job: PruneJob) -> StageResult:
    from compresskit import prune as pr
    from compresskit.checkpoint import load_model, save_checkpoint
    from compresskit.teacher.stage import load_teacher

    p = job.prune.pruner
    data, device = sk.data_of(ctx, job.data, job.seed), sk.device_of(job.device)
    student, ckpt = load_model(ctx.inputs["student"])
    teacher_inputs = {k: v for k, v in ctx.inputs.items() if k.startswith("teacher")}
    teacher = load_teacher(teacher_inputs, job.teacher)
    example = data.example_input(1)
    latency_info = None
    try:
        if p.method == "structured":
            result, latency_info = _structured(ctx, job, student, data, example)
        else:
            result = pr.prune_magnitude(student, sparsity=p.sparsity, example_inputs=example,
                                        ignored_layers=p.ignored_layers)
    except ValueError as err:
        raise StageError(f"prune: {err}") from None
    model = result.model
    val_before = sk.evaluate(model, data, "val", device)
    ft = job.prune.finetune
    res = sk.train(ctx, model, ft.loss, ft.train, data=data, device=device, seed=job.seed, desc="finetune",
                   teacher=teacher, teacher_key=sk.files_key(teacher_inputs.values()))
    pruning_state = None
    if p.method == "magnitude":
        model = pr.finalize_magnitude(model)
    else:
        pruning_state = pr.pruning_state(model)
    test_acc = sk.evaluate(model, data, "test", device)
    out = ctx.dir / "model.pt"
    save_checkpoint(out, model.cpu(), ckpt["spec"], pruning=pruning_state,
                    meta={"stage": "prune", "test_accuracy": test_acc}, preprocess=data.checkpoint_preprocess())
    sk.cleanup_resume(ctx.dir)
    info = result.to_json()
    metrics = {"prune": info, "val_accuracy_before_finetune": val_before, "fit": res.to_json(),
               "val_accuracy": res.best_val_accuracy, "test_accuracy": test_acc,
               "accuracy_check": accuracy_loss_check(
                   "pruning", "student", test_acc, (ckpt.get("meta") or {}).get("test_accuracy"),
                   ft.max_accuracy_loss, "prune.finetune.max_accuracy_loss")}
    if latency_info is not None:
        metrics["latency"] = latency_info
        row = latency_info["tried"][-1]
        summary = (f"ratio {row['ratio']}: MACs {info['macs_before'] / 1e6:.2f}M -> {info['macs_after'] / 1e6:.2f}M "
                   f"(x{row['mac_ratio']:.2f}), FP32 latency x{row['latency_ratio']:.2f}, params "
                   f"{info['params_before'] / 1e3:.0f}k -> {info['params_after'] / 1e3:.0f}k, test {test_acc:.2%}")
        if info["settings"].get("kept_layers"):  # what Torch-Pruning cannot handle, with reasons in the metrics
            summary += f"; {len(info['settings']['kept_layers'])} layer(s) kept whole (prune.settings.kept_layers)"
    else:
        summary = f"sparsity {info['sparsity']:.1%} (dense kernels: no speed-up), test {test_acc:.2%}"
    if metrics["accuracy_check"].get("warning"):
        summary += f"; WARNING: {metrics['accuracy_check']['warning']}"
    return StageResult({"model": out}, metrics, summary)
