"""The quantize stage: INT8 by post-training quantization (the format chosen by measuring every
candidate here, see `search`) and by quantization-aware training (QAT takes the winner's
activation type and weight granularity unless the config names them). Torch is imported only
when the stage runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compresskit import stagekit as sk
from compresskit.budget import accuracy_loss_check
from compresskit.stage import StageContext, StageError, StageResult
from compresskit.stages import QuantizeJob


def _search(job: QuantizeJob, fp32: Path, out_dir: Path, calib, val_x, val_y, log) -> dict[str, Any]:
    """Quantize in every candidate format, measure each here, copy the winner to ptq.onnx."""
    from compresskit.quantize.search import candidates_for_host, search_ptq

    s = job.quantize.ptq.search
    rank = s.rank_batch_size or job.latency.batch_size
    try:
        candidates = candidates_for_host(activation_types=s.activation_types, per_channel=s.per_channel,
                                         calibrate_methods=s.calibrate_methods)
        result = search_ptq(fp32, out_dir / "candidates", calib, val_x, val_y, candidates=candidates,
                            max_accuracy_drop=s.max_accuracy_drop, batch_sizes=sorted(set(s.batch_sizes) | {rank}),
                            rank_batch_size=rank, threads=job.latency.threads, max_seconds=s.max_seconds,
                            fallback=s.fallback, max_excluded=s.max_excluded,
                            nodes_to_exclude=job.quantize.ptq.nodes_to_exclude, progress=log)
    except ValueError as err:
        raise StageError(f"quantize.ptq.search: {err}") from None
    shutil.copyfile(result["chosen_path"], out_dir / "ptq.onnx")
    winner = next(r for r in result["candidates"] if r["name"] == result["chosen"])
    result["winner_settings"] = winner["settings"]
    return {"search": result, "settings": winner["settings"]}


def _ptq(ctx: StageContext, job: QuantizeJob, float_model, data, example) -> dict[str, Any]:
    import numpy as np

    from compresskit.export import export_onnx
    from compresskit.quantize import ptq

    q = job.quantize.ptq
    calib_x = data.numpy_split("calib")[0].astype(np.float32)
    fp32 = export_onnx(float_model, ctx.dir / "float.onnx", example, opset=job.opset)
    if q.search.enabled:
        val_x, val_y = data.numpy_split("val")
        return _search(job, fp32, ctx.dir, calib_x, val_x, val_y, None if ctx.quiet else ctx.log)
    return ptq.quantize_ptq(fp32, ctx.dir / "ptq.onnx", calib_x, activation_type=q.activation_type,
                            weight_type=q.weight_type, per_channel=q.per_channel, calibrate_method=q.calibrate_method,
                            percentile=q.percentile, reduce_range=q.reduce_range, nodes_to_exclude=q.nodes_to_exclude)


def run(ctx: StageContext, job: QuantizeJob) -> StageResult:
    from compresskit.checkpoint import load_model, save_checkpoint

    q = job.quantize
    data, device = sk.data_of(ctx, job.data, job.seed), sk.device_of(job.device)
    float_model, ckpt = load_model(ctx.inputs["float"])
    float_model.eval()
    example = data.example_input(1)
    outputs: dict[str, Path] = {}
    metrics: dict[str, Any] = {}
    qat_activation = q.qat.activation_type if q.qat.activation_type != "auto" else "uint8"
    qat_per_channel = q.qat.per_channel if q.qat.per_channel != "auto" else True
    if q.ptq.enabled:
        metrics["ptq"] = _ptq(ctx, job, float_model, data, example)
        outputs["ptq"] = ctx.dir / "ptq.onnx"
        winner = metrics["ptq"].get("search", {}).get("winner_settings")
        if winner and q.qat.activation_type == "auto":
            qat_activation = winner["activation_type"]
        if winner and q.qat.per_channel == "auto":
            qat_per_channel = bool(winner["per_channel"])
    if q.qat.enabled:
        import torch

        from compresskit.quantize import qat

        calib_x = data.numpy_split("calib")[0]
        observer = [torch.from_numpy(calib_x[i:i + 64]) for i in range(0, min(len(calib_x), 256), 64)]
        metrics["qat_format"] = {"activation_type": qat_activation, "per_channel": qat_per_channel}
        qmodel = qat.prepare_qat(float_model, example, per_channel=qat_per_channel,
                                 activation_dtype=qat_activation, observer_batches=observer)
        epochs = q.qat.train.epochs
        res = sk.train(ctx, qmodel, q.qat.loss, q.qat.train, data=data, device=device, seed=job.seed, desc="qat",
                       teacher=float_model, teacher_key=sk.files_key([ctx.inputs["float"]]),
                       epoch_callback=qat.epoch_callback(epochs) if epochs > 0 else None)
        test_acc = sk.evaluate(qmodel, data, "test", device)
        out = ctx.dir / "qat.pt"
        save_checkpoint(out, qmodel.cpu(), ckpt["spec"], pruning=ckpt.get("pruning"), qat=qat.qat_state(qmodel),
                        meta={"stage": "quantize", "test_accuracy": test_acc}, preprocess=data.checkpoint_preprocess())
        outputs["qat"] = out
        metrics["qat"] = {"fit": res.to_json(), "val_accuracy": res.best_val_accuracy, "test_accuracy_torch": test_acc,
                          "accuracy_check": accuracy_loss_check(
                              "QAT", "float model", test_acc, (ckpt.get("meta") or {}).get("test_accuracy"),
                              q.qat.max_accuracy_loss, "quantize.qat.max_accuracy_loss")}
    sk.cleanup_resume(ctx.dir)
    return StageResult(outputs, metrics, _summary(job, metrics))


def _summary(job: QuantizeJob, metrics: dict[str, Any]) -> str:
    parts = []
    if "search" in metrics.get("ptq", {}):
        sr = metrics["ptq"]["search"]
        parts.append(f"PTQ {sr['chosen']} (fastest of {len(sr['candidates'])} measured"
                     + ("" if sr["met_budget"] else ", none met the accuracy budget") + ")")
    elif "ptq" in metrics:
        p = job.quantize.ptq
        parts.append(f"PTQ {p.activation_type[0].upper()}8{p.weight_type[0].upper()}8")
    if "qat" in metrics:
        parts.append(f"QAT test {metrics['qat']['test_accuracy_torch']:.2%} (fake-quant, torch)")
    warning = (metrics.get("qat") or {}).get("accuracy_check", {}).get("warning")
    return ", ".join(parts) + (f"; WARNING: {warning}" if warning else "")
