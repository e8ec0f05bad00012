"""The number users feel: the default pipeline's deployed model vs the hand path, side by side.

    python benchmarks/deployed_vs_hand.py [--epochs N]

The hand path is what a user wires together without compresskit: the same student
architecture trained on the labels alone (no KD, same epochs and schedule as the pipeline's
distill stage, through the pipeline's distill stage with `loss: [ce]`), exported to ONNX and
quantized with onnxruntime's `quantize_static` - once with its defaults (S8 activations,
per-tensor S8 weights, QDQ) and once as a careful user would (U8 activations, per-channel
weights). The deployed model is `models/mobilenet_edge/report/deployed.onnx` (run `compresskit run
pipelines/mobilenet_edge.yaml` first). All models are evaluated on the test split and timed with
onnxruntime, one thread, batch 1 and 64, rounds interleaved (median of the rounds' p50).
Writes `benchmarks/results/deployed_vs_hand.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "mobilenet_edge.yaml")
    ap.add_argument("--run", type=Path, default=ROOT / "models" / "mobilenet_edge")
    ap.add_argument("--epochs", type=int, default=None, help="hand student epochs (default: distill.train.epochs)")
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
    from compresskit.quantize.calibrate import ArrayCalibrationReader

    deployed = args.run / "report" / "deployed.onnx"
    if not deployed.is_file():
        ap.error(f"{deployed} not found: run `compresskit run {args.config}` first")
    raw = apply_overrides(load_raw(args.config), args.overrides)
    hand = copy.deepcopy(raw) | {"name": "hand", "models_dir": str(args.workdir),
                                 "reports_dir": str(args.workdir / "reports")}
    hand["teacher"] = dict(hand["teacher"]) | {"checkpoint": str(args.run / "teacher" / "model.pt")}
    hand["distill"] = dict(hand["distill"]) | {"loss": [{"method": "ce", "weight": 1.0}], "baseline": False}
    if args.epochs is not None:
        hand["distill"]["train"] = dict(hand["distill"].get("train", {})) | {"epochs": args.epochs}
    cfg = validate_config(hand)
    print("training the hand-path student (labels only) ...", flush=True)
    run_pipeline(cfg, until="distill", quiet=True, log=lambda _: None)
    data = load_data(cfg.data, seed=cfg.seed)
    student = model_from_checkpoint(read_checkpoint(args.workdir / "hand" / "distill" / "model.pt")).eval()
    out_dir = args.workdir / "hand" / "onnx"
    fp32 = export_onnx(student, out_dir / "student.onnx", data.example_input(1))
    calib = data.numpy_split("calib")[0].astype(np.float32)
    name = onnx.load(str(fp32)).graph.input[0].name
    quantize_static(str(fp32), str(out_dir / "default.onnx"), ArrayCalibrationReader(calib, name, 32))
    quantize_static(str(fp32), str(out_dir / "u8s8.onnx"), ArrayCalibrationReader(calib, name, 32),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    meta = json.loads(read_metadata(deployed).get("compresskit.metrics", "{}"))
    models = {
        "hand path FP32 (student, no KD)": fp32,
        "hand path INT8, quantize_static defaults (S8S8 per-tensor)": out_dir / "default.onnx",
        "hand path INT8, U8S8 per-channel": out_dir / "u8s8.onnx",
        f"compresskit deployed ({meta.get('model', '?')})": deployed,
    }
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
        f"Hand student: {cfg.distill.student.arch} trained {cfg.distill.train.epochs} epochs on labels only. "
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
