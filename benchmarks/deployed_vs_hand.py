"""The number users feel: the default pipeline's deployed model vs the hand path, side by side.

    python benchmarks/deployed_vs_hand.py [--epochs N] [--hand-student JSON]

The hand path is what a careful user wires together without compresskit: the pipeline's original
student (MobileNetV2, width 0.35, stride-2 stem, 256-channel head; `--hand-student` names
another) trained on the labels alone (no KD) for as many epochs as the pipeline's student gets in
all (distillation, pruning fine-tune and QAT, rounded up; `--epochs` sets it) with the pipeline's
schedule, through the pipeline's distill stage with `loss: [ce]`, exported to ONNX and quantized
with onnxruntime's `quantize_static` - once with its defaults (S8 activations, per-tensor S8
weights, QDQ) and once as a careful user would (U8 activations, per-channel weights). The
deployed model is `models/mobilenet_edge/report/deployed.onnx` (run `compresskit run
pipelines/mobilenet_edge.yaml` first), shown beside the FP32 model it was quantized from. All
models are evaluated on the test split and timed with onnxruntime, one thread, batch 1 and 64,
rounds interleaved (median of the rounds' p50). Wall times: the pipeline's stages (from its
`stage.json` records) and the hand path's training + export + quantization, timed here.
Writes `benchmarks/results/deployed_vs_hand.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAND_STUDENT = {"arch": "mobilenetv2", "width_mult": 0.35, "stem_stride": 2,
                "stage_strides": [1, 1, 2, 2, 1, 2, 1], "last_channel": 256}


def _rel(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (no machine paths in results)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def student_epochs(cfg, n_train: int) -> tuple[int, str]:
    """Epochs of training the pipeline's student gets in all (rounded up), and how they add up;
    `n_train`: training images per epoch (what `max_batches_per_epoch` is a fraction of)."""
    def frac(train) -> float:
        if train.max_batches_per_epoch is None:
            return float(train.epochs)
        bs = train.batch_size or cfg.data.batch_size
        return train.epochs * min(1.0, train.max_batches_per_epoch * bs / n_train)

    parts = {}
    if cfg.distill.enabled:
        parts["distill"] = frac(cfg.distill.train)
    if cfg.prune.enabled and cfg.prune.finetune.train.epochs:
        parts["prune fine-tune"] = frac(cfg.prune.finetune.train)
    if cfg.quantize.qat.enabled:
        parts["QAT"] = frac(cfg.quantize.qat.train)
    total = sum(parts.values())
    return max(1, math.ceil(total - 1e-9)), " + ".join(f"{k} {v:.2g}" for k, v in parts.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "mobilenet_edge.yaml")
    ap.add_argument("--run", type=Path, default=ROOT / "models" / "mobilenet_edge")
    ap.add_argument("--epochs", type=int, default=None,
                    help="hand student epochs (default: the pipeline student's epochs in all, rounded up)")
    ap.add_argument("--hand-student", type=json.loads, default=HAND_STUDENT,
                    help="the hand path's student spec as JSON (default: MobileNetV2-0.35, the original student)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=ROOT / "models" / "bench-hand")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deployed_vs_hand.md")
    args = ap.parse_args(argv)

    import numpy as np
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static

    from compresskit.bench import evaluate, measure_latency
    from compresskit.checkpoint import model_from_checkpoint, read_checkpoint
    from compresskit.config import apply_overrides, load_raw, validate_config
    from compresskit.data import load_data
    from compresskit.envinfo import environment
    from compresskit.export import export_onnx
    from compresskit.onnxutil import model_stats, read_metadata
    from compresskit.pipeline import run_pipeline
    from compresskit.artifacts import RunLayout, read_stage_record
    from compresskit.quantize.calibrate import ArrayCalibrationReader
    from compresskit.stages import STAGE_NAMES, exported_models, float_file

    deployed = args.run / "report" / "deployed.onnx"
    if not deployed.is_file():
        ap.error(f"{deployed} not found: run `compresskit run {args.config}` first")
    raw = apply_overrides(load_raw(args.config), args.overrides)
    run_cfg = validate_config(copy.deepcopy(raw))
    data = load_data(run_cfg.data, seed=run_cfg.seed)  # the hand path's data too (same data section)
    epochs, epoch_parts = (args.epochs, "set by --epochs") if args.epochs is not None else \
        student_epochs(run_cfg, len(data.train))
    hand = copy.deepcopy(raw) | {"name": "hand", "models_dir": str(args.workdir),
                                 "reports_dir": str(args.workdir / "reports")}
    hand["teacher"] = dict(hand["teacher"]) | {"checkpoint": str(args.run / "teacher" / "model.pt")}
    hand["distill"] = dict(hand["distill"]) | {"student": args.hand_student, "enabled": True,
                                               "loss": [{"method": "ce", "weight": 1.0}], "baseline": False}
    hand["distill"]["train"] = dict(hand["distill"].get("train", {})) | {"epochs": epochs}
    cfg = validate_config(hand)
    print(f"training the hand-path student ({cfg.distill.student.arch}, labels only, {epochs} epochs) ...",
          flush=True)
    t0 = time.perf_counter()
    run_pipeline(cfg, until="distill", quiet=True, log=lambda _: None)
    t1 = time.perf_counter()
    student = model_from_checkpoint(read_checkpoint(args.workdir / "hand" / "distill" / "model.pt")).eval()
    out_dir = args.workdir / "hand" / "onnx"
    fp32 = export_onnx(student, out_dir / "student.onnx", data.example_input(1))
    calib = data.numpy_split("calib")[0].astype(np.float32)
    name = onnx.load(str(fp32)).graph.input[0].name
    quantize_static(str(fp32), str(out_dir / "default.onnx"), ArrayCalibrationReader(calib, name, 32))
    quantize_static(str(fp32), str(out_dir / "u8s8.onnx"), ArrayCalibrationReader(calib, name, 32),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    distill_rec = read_stage_record(args.workdir / "hand" / "distill") or {}
    # the training's own record (a re-run reuses it), plus export and quantization timed here
    hand_s = distill_rec.get("wall_s", t1 - t0) + time.perf_counter() - t1
    meta = json.loads(read_metadata(deployed).get("compresskit.metrics", "{}"))
    deployed_name = meta.get("model", "?")
    layout = RunLayout(run_cfg.models_dir, run_cfg.reports_dir, run_cfg.name)
    float_name = float_file(run_cfg, layout).parent.name
    float_onnx = {"prune": "pruned", "distill": "student", "teacher": "teacher"}.get(float_name, float_name)
    float_path = exported_models(run_cfg, layout).get(float_onnx)
    models = {
        "hand path FP32 (student, no KD)": fp32,
        "hand path INT8, quantize_static defaults (S8S8 per-tensor)": out_dir / "default.onnx",
        "hand path INT8, U8S8 per-channel": out_dir / "u8s8.onnx",
    }
    if deployed_name in ("ptq", "qat") and float_path is not None and float_path.is_file():
        models[f"compresskit FP32 ({float_onnx}, what the deployed model was quantized from)"] = float_path
    models[f"compresskit deployed ({deployed_name})"] = deployed
    stage_s = {}
    for stage in STAGE_NAMES:
        rec = read_stage_record(layout.stage_dir(stage))
        if rec is not None:
            stage_s[stage] = rec["wall_s"]
    test_x, test_y = data.numpy_split("test")
    lat: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for label, path in models.items():
            for b in (1, 64):
                p50 = measure_latency(path, b, threads=1, warmup=5, min_runs=10,
                                      max_seconds=args.max_seconds)["p50_ms"]
                lat.setdefault((label, b), []).append(p50)
    med = {k: statistics.median(v) for k, v in lat.items()}
    acc = {label: evaluate(path, test_x, test_y, threads=0)["accuracy"] for label, path in models.items()}
    ref = "hand path INT8, U8S8 per-channel"
    env = environment()
    lines = [
        "# The deployed model vs the hand path",
        "",
        f"Machine: {env['cpu']['model']} ({env['cpu']['usable_cores']} usable cores), onnxruntime "
        f"{env['versions'].get('onnxruntime')}, one intra-op thread.",
        "",
        "Command: `python benchmarks/deployed_vs_hand.py"
        + (f" --epochs {args.epochs}" if args.epochs is not None else "") + "`. "
        f"Hand student: `{json.dumps(args.hand_student)}` trained {epochs} epochs on labels only "
        f"(the pipeline's student: {epoch_parts}). "
        f"Latency: median of {args.rounds} interleaved rounds' p50; ratios are model / `{ref}` (lower is faster).",
        "",
        "| model | test acc | p50 b1 (ms) | p50 b64 (ms) | latency vs hand U8S8 b1 / b64 | size (KiB) | params "
        "| MACs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, path in models.items():
        st = model_stats(path)
        lines.append(
            f"| {label} | {acc[label]:.2%} | {med[(label, 1)]:.3f} | {med[(label, 64)]:.2f} | "
            f"{med[(label, 1)] / med[(ref, 1)]:.2f} / {med[(label, 64)] / med[(ref, 64)]:.2f} | "
            f"{path.stat().st_size / 1024:.0f} | {st.get('params') or 0:,} | {st.get('macs') or 0:,} |")
    dep = f"compresskit deployed ({deployed_name})"
    verdict = [
        "",
        f"- Deployed vs hand U8S8: test accuracy {100 * (acc[dep] - acc[ref]):+.2f} pt; batch-1 latency "
        f"{med[(dep, 1)] / med[(ref, 1)]:.2f}x (target <= 0.5x), batch 64 {med[(dep, 64)] / med[(ref, 64)]:.2f}x.",
    ]
    fl = next((k for k in models if k.startswith("compresskit FP32")), None)
    if fl is not None:
        verdict.append(f"- Deployed INT8 vs its own FP32 model: {med[(fl, 64)] / med[(dep, 64)]:.2f}x faster at "
                       f"batch 64 (target >= 2x), {med[(fl, 1)] / med[(dep, 1)]:.2f}x at batch 1.")
    if stage_s:
        verdict.append(f"- Wall time: the pipeline's stages {sum(stage_s.values()) / 60:.1f} min ("
                       + ", ".join(f"{k} {v:.0f} s" for k, v in stage_s.items())
                       + f"; from `{_rel(args.run)}/*/stage.json`); the hand path here (student training, export, "
                         f"two quantizations; its teacher is not needed) {hand_s / 60:.1f} min.")
    lines += verdict
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
