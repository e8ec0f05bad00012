"""The export stage: every float checkpoint (and the QAT model) to ONNX with the data's
preprocessing and labels in its metadata, each checked against PyTorch, a diverged model refused
before export; the PTQ model is copied, labelled and checked against its float source."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from compresskit import stagekit as sk
from compresskit.checkpoint import load_model
from compresskit.export import (
    divergence_problem,
    export_onnx,
    export_ort_format,
    labels_metadata,
    logit_stats,
    parity_check,
    parity_problem,
    preprocess_metadata,
)
from compresskit.onnxutil import write_metadata
from compresskit.quantize import qat
from compresskit.stage import StageContext, StageError, StageResult
from compresskit.stages import ExportJob


def run(ctx: StageContext, job: ExportJob) -> StageResult:
    """The export stage: every float checkpoint (and the QAT model) to ONNX with the data's
    preprocessing and labels in its metadata, each checked against PyTorch; the PTQ model is
    copied, labelled and checked against the float model it was quantized from."""
    cfg = job.export
    for stale in [*ctx.dir.glob("*.onnx"), *ctx.dir.glob("*.ort")]:
        stale.unlink()  # models of disabled stages must not be benchmarked or deployed
    data = sk.data_of(ctx, job.data, job.seed)
    meta = preprocess_metadata(data.mean, data.std, channels=data.in_channels,
                               size=list(data.image_size)) | labels_metadata(data.class_names)
    x = torch.from_numpy(data.numpy_split("test", limit=cfg.parity_samples)[0])
    example = data.example_input(1)
    outputs: dict[str, Path] = {}
    parity: dict[str, dict] = {}
    float_models = {}
    for name, src in ctx.inputs.items():
        if name == "ptq":
            continue
        model, _ = load_model(src)
        model.eval()
        diverged = divergence_problem(logit_stats(model, x), cfg.max_abs_logit)
        if diverged is not None:
            raise StageError(f"export: the {name} model looks diverged on {len(x)} test images, not exported: "
                             f"{diverged}; retrain it (lower lr, grad_clip) or check its checkpoint")
        path = ctx.dir / f"{name}.onnx"
        if name == "qat":
            qat.export_qat_onnx(model, path, example, opset=cfg.opset, metadata=meta)
        else:
            export_onnx(model, path, example, opset=cfg.opset, metadata=meta)
            float_models[name] = model
        parity[name] = parity_check(model, path, x)
        if name == "qat":
            agree = parity[name]["top1_agreement"]
            if agree < cfg.min_qat_top1_agreement:
                raise StageError(f"export: qat.onnx picks the fake-quant model's class on only {agree:.1%} of "
                                 f"{parity[name]['n']} test images (< export.min_qat_top1_agreement="
                                 f"{cfg.min_qat_top1_agreement:g}): the INT8 export does not reproduce QAT for this "
                                 "model; set quantize.qat.enabled: false (PTQ is unaffected)")
        else:
            problem = parity_problem(parity[name], max_abs_diff=cfg.max_abs_diff, max_rel_diff=cfg.max_rel_diff,
                                     min_top1_agreement=cfg.min_top1_agreement)
            if problem is not None:
                raise StageError(f"export: {name}.onnx does not match its PyTorch model: {problem}")
        outputs[name] = path
    if "ptq" in ctx.inputs:
        path = ctx.dir / "ptq.onnx"
        shutil.copyfile(ctx.inputs["ptq"], path)
        write_metadata(path, meta)
        source = next(n for n in ("pruned", "student", "teacher") if n in float_models)
        parity["ptq"] = parity_check(float_models[source], path, x)
        outputs["ptq"] = path
    if cfg.ort_format:
        for name in list(outputs):
            outputs[f"{name}_ort"] = export_ort_format(outputs[name], ctx.dir)
    fp32 = [p for n, p in parity.items() if n in float_models]
    worst = max((p["max_abs_diff"] for p in fp32), default=0.0)
    worst_rel = max((p["max_rel_diff"] for p in fp32), default=0.0)
    agree = min((p["top1_agreement"] for p in fp32), default=1.0)
    count = len([o for o in outputs if not o.endswith("_ort")])
    return StageResult(outputs, {"parity": parity}, f"{count} ONNX models, FP32 max |diff| {worst:.1e} "
                       f"(rel {worst_rel:.1e}), top-1 agreement >= {agree:.1%}")
