"""PTQ of one FP32 ONNX model: compresskit's measured format search vs onnxruntime's
`quantize_static` defaults vs NNCF, side by side in one process.

    python benchmarks/ptq_compare.py [--model models/mobilenet_edge/quantize/float.onnx]

The FP32 model defaults to the float model the default pipeline's quantize stage starts from
(the pruned student; run `compresskit run pipelines/mobilenet_edge.yaml` first). All three
quantizers get the same 512 calibration images from the training split. compresskit's search
(`compresskit.quantize.search.search_ptq`) picks its format on the validation split; every model
is then evaluated on the test split and timed with onnxruntime (one thread, batch 1 and 64,
interleaved rounds, median of the rounds' p50). NNCF is optional (`pip install nncf`); without
it its row says so. Writes `benchmarks/results/ptq_compare.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ort_defaults(fp32: Path, out: Path, calib) -> None:
    """What a user gets from the documented call with no options: QDQ, S8 activations, S8
    per-tensor weights, MinMax calibration, no pre-processing."""
    from onnxruntime.quantization import quantize_static

    from compresskit.onnxutil import load_model
    from compresskit.quantize.calibrate import ArrayCalibrationReader

    name = load_model(fp32).graph.input[0].name
    quantize_static(str(fp32), str(out), ArrayCalibrationReader(calib, name, 32))


def _nncf(fp32: Path, out: Path, calib) -> str | None:
    """NNCF's ONNX post-training quantization with its defaults; None if NNCF is missing."""
    try:
        import nncf
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda x: {name: x})
    quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    onnx.save(quantized, str(out))
    return getattr(nncf, "__version__", "?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "mobilenet_edge.yaml")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "mobilenet_edge" / "quantize" / "float.onnx")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=0.5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ptq_compare.md")
    args = ap.parse_args(argv)

    import numpy as np

    from compresskit.bench import evaluate, measure_latency
    from compresskit.config import load_config
    from compresskit.data import load_data
    from compresskit.envinfo import environment
    from compresskit.quantize.search import candidates_for_host, search_ptq

    cfg = load_config(args.config, args.overrides)
    data = load_data(cfg.data, seed=cfg.seed)
    calib = data.numpy_split("calib")[0].astype(np.float32)
    val_x, val_y = data.numpy_split("val")
    test_x, test_y = data.numpy_split("test")
    tmp = Path(tempfile.mkdtemp(prefix="ptq-compare-"))
    models: dict[str, Path | None] = {"FP32": args.model}
    seconds: dict[str, float] = {}

    s = cfg.quantize.ptq.search
    t0 = time.perf_counter()
    result = search_ptq(args.model, tmp / "search", calib, val_x, val_y,
                        candidates=candidates_for_host(activation_types=s.activation_types, per_channel=s.per_channel,
                                                       calibrate_methods=s.calibrate_methods),
                        max_accuracy_drop=s.max_accuracy_drop, batch_sizes=s.batch_sizes, rank_batch_size=1,
                        max_seconds=s.max_seconds, fallback=s.fallback, max_excluded=s.max_excluded)
    seconds["compresskit"] = time.perf_counter() - t0
    models[f"compresskit search ({result['chosen']})"] = Path(result["chosen_path"])
    t0 = time.perf_counter()
    _ort_defaults(args.model, tmp / "ort_default.onnx", calib)
    seconds["onnxruntime"] = time.perf_counter() - t0
    models["onnxruntime quantize_static defaults (S8S8, per-tensor, QDQ)"] = tmp / "ort_default.onnx"
    t0 = time.perf_counter()
    nncf_version = _nncf(args.model, tmp / "nncf.onnx", calib)
    seconds["nncf"] = time.perf_counter() - t0
    models[f"NNCF {nncf_version} quantize (defaults)" if nncf_version else "NNCF (not installed)"] = (
        tmp / "nncf.onnx" if nncf_version else None)

    lat: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, path in models.items():
            if path is None:
                continue
            for b in (1, 64):
                p50 = measure_latency(path, b, threads=1, warmup=5, min_runs=10,
                                      max_seconds=args.max_seconds)["p50_ms"]
                lat.setdefault((name, b), []).append(p50)
    med = {k: statistics.median(v) for k, v in lat.items()}
    env = environment()
    shown = args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
    lines = [
        "# PTQ of one FP32 ONNX model: compresskit vs onnxruntime defaults vs NNCF",
        "",
        f"Machine: {env['cpu']['model']} ({env['cpu']['usable_cores']} usable cores), onnxruntime "
        f"{env['versions'].get('onnxruntime')}, one intra-op thread.",
        "",
        f"Command: `python benchmarks/ptq_compare.py --model {shown}`. "
        f"{len(calib)} calibration images (train split); compresskit's search chose on {len(val_y)} validation "
        f"images; accuracy on the {len(test_y)} test images; latency: median of {args.rounds} interleaved rounds' p50.",
        "",
        "| model | test acc | p50 b1 (ms) | p50 b64 (ms) | vs FP32 b1 / b64 | size (KiB) | quantize time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, path in models.items():
        if path is None:
            lines.append(f"| {name} | | | | | | |")
            continue
        acc = evaluate(path, test_x, test_y, threads=0)["accuracy"]
        key = "compresskit" if name.startswith("compresskit") else (
            "onnxruntime" if name.startswith("onnxruntime") else ("nncf" if name.startswith("NNCF") else None))
        b1, b64 = med[(name, 1)], med[(name, 64)]
        took = f"{seconds[key]:.1f}" if key else ""
        lines.append(f"| {name} | {acc:.2%} | {b1:.3f} | {b64:.2f} | {med[('FP32', 1)] / b1:.2f}x / "
                     f"{med[('FP32', 64)] / b64:.2f}x | {path.stat().st_size / 1024:.0f} | {took} |")
    lines += ["", "compresskit's candidates (validation accuracy, p50 at batch 1 and 64, speed-up vs FP32):", ""]
    lines += ["| candidate | val acc | p50 b1 | p50 b64 | vs FP32 b1 / b64 |", "|---|---|---|---|---|"]
    for r in result["candidates"]:
        sp, p50 = r["speedup_vs_fp32"], r["latency_p50_ms"]
        chosen = " (chosen)" if r["name"] == result["chosen"] else ""
        lines.append(f"| {r['name']}{chosen} | {r['val_accuracy']:.2%} | {p50['1']:.3f} | {p50['64']:.2f} | "
                     f"{sp['1']:.2f}x / {sp['64']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
