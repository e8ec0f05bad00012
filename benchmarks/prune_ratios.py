"""Channel pruning ratios: MAC ratio vs measured latency ratio vs accuracy after fine-tuning.

    python benchmarks/prune_ratios.py [--ratios 0.25,0.5,0.75] [--epochs 2]

Starts from the default pipeline's distilled student (`models/mobilenet_edge/distill/model.pt`;
run `compresskit run pipelines/mobilenet_edge.yaml --until distill` first) and prunes it with the
pipeline's pruner settings at each ratio. Each pruned model is exported to ONNX (FP32) and
quantized (U8S8, per-channel QDQ); the unpruned and pruned models are timed side by side in one
process with onnxruntime (one thread, batch 1 and 64, rounds interleaved so that machine noise
hits every model alike; the median of the rounds' p50s is reported). Each pruned model is then
fine-tuned with KD from the teacher (the pipeline's fine-tune settings) and its FP32 test
accuracy measured. Writes `benchmarks/results/prune_ratios.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "models" / "mobilenet_edge"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "mobilenet_edge.yaml")
    ap.add_argument("--run", type=Path, default=RUN, help="run directory with teacher/ and distill/ model.pt")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: the config's)")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=0.4, help="per model, batch and round")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune_ratios.md")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from compresskit.bench import measure_latency
    from compresskit.checkpoint import model_from_checkpoint, read_checkpoint
    from compresskit.config import load_config
    from compresskit.data import load_data
    from compresskit.distill.train import distill
    from compresskit.envinfo import environment
    from compresskit.export import export_onnx
    from compresskit.prune import prune_structured
    from compresskit.quantize.ptq import quantize_ptq
    from compresskit.train import evaluate, loaders_for

    cfg = load_config(args.config, args.overrides)
    ratios = [float(r) for r in args.ratios.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    data = load_data(cfg.data, seed=cfg.seed)
    student = model_from_checkpoint(read_checkpoint(args.run / "distill" / "model.pt")).eval()
    teacher = model_from_checkpoint(read_checkpoint(args.run / "teacher" / "model.pt")).eval()
    example = data.example_input(1)
    p = cfg.prune.pruner
    calib, _ = data.numpy_split("calib")
    tmp = Path(tempfile.mkdtemp(prefix="prune-ratios-"))
    models = {0.0: student}
    stats = {0.0: {"macs": None}}
    for ratio in ratios:
        res = prune_structured(student, example, importance=p.importance, ratio=ratio, round_to=p.round_to,
                               ignored_layers=p.ignored_layers, global_pruning=p.global_pruning,
                               max_layer_ratio=p.max_layer_ratio)
        models[ratio] = res.model.eval()
        stats[ratio] = {"macs": res.macs_after, "params": res.params_after}
        stats[0.0] = {"macs": res.macs_before, "params": res.params_before}
    files = {}
    for ratio, model in models.items():
        fp32 = export_onnx(model, tmp / f"r{ratio}.onnx", example)
        int8 = tmp / f"r{ratio}-int8.onnx"
        quantize_ptq(fp32, int8, calib.astype(np.float32), activation_type="uint8", per_channel=True)
        files[ratio] = {"fp32": fp32, "int8": int8}
    # interleaved timing rounds
    lat: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for ratio in models:
            for kind in ("fp32", "int8"):
                for b in batch_sizes:
                    p50 = measure_latency(files[ratio][kind], b, threads=1, warmup=3, min_runs=5,
                                          max_seconds=args.max_seconds)["p50_ms"]
                    lat.setdefault((ratio, kind, b), []).append(p50)
    med = {k: statistics.median(v) for k, v in lat.items()}
    # fine-tune each pruned model with KD and measure FP32 test accuracy
    ft = cfg.prune.finetune
    train_cfg = ft.train if args.epochs is None else ft.train.model_copy(update={"epochs": args.epochs})
    acc = {0.0: evaluate(student, data.loader("test"))["accuracy"]}
    for ratio in ratios:
        model = models[ratio].train()
        cpu = torch.device("cpu")
        distill(model, teacher, *loaders_for(data, train_cfg, device=cpu, seed=cfg.seed), terms=ft.loss,
                cfg=train_cfg, device=cpu, seed=cfg.seed, example_input=data.example_input(2),
                desc=f"ratio {ratio}", quiet=True)
        acc[ratio] = evaluate(model, data.loader("test"))["accuracy"]
        print(f"ratio {ratio}: test {acc[ratio]:.2%}", flush=True)
    env = environment()
    b0, b1 = batch_sizes[0], batch_sizes[-1]
    lines = [
        "# Pruning ratio: MAC ratio vs measured latency ratio vs accuracy",
        "",
        f"Machine: {env['cpu']['model']} ({env['cpu']['usable_cores']} usable cores), onnxruntime "
        f"{env['versions'].get('onnxruntime')}, one intra-op thread.",
        "",
        f"Command: `python benchmarks/prune_ratios.py --ratios {args.ratios}"
        + (f" --epochs {args.epochs}" if args.epochs is not None else "") + "`. "
        f"Pruner: {p.importance}, round_to {p.round_to}, ignored {p.ignored_layers}; fine-tune "
        f"{train_cfg.epochs} epochs (lr {train_cfg.lr}) with {[t.method for t in ft.loss]}. Latency: median "
        f"over {args.rounds} interleaved rounds of each model's p50. Ratios are pruned / unpruned.",
        "",
        f"| ratio | MACs | MAC ratio | FP32 latency ratio b{b0} / b{b1} | INT8 latency ratio b{b0} / b{b1} | "
        f"INT8 p50 b{b0} / b{b1} (ms) | test acc (FP32, fine-tuned) |",
        "|---|---|---|---|---|---|---|",
    ]
    base_macs = stats[0.0]["macs"]
    for ratio in models:
        r = {k: med[(ratio, *k)] / med[(0.0, *k)] for k in [("fp32", b0), ("fp32", b1), ("int8", b0), ("int8", b1)]}
        lines.append(
            f"| {ratio:g}{' (unpruned)' if ratio == 0 else ''} | {stats[ratio]['macs'] / 1e6:.2f}M | "
            f"{stats[ratio]['macs'] / base_macs:.2f} | {r[('fp32', b0)]:.2f} / {r[('fp32', b1)]:.2f} | "
            f"{r[('int8', b0)]:.2f} / {r[('int8', b1)]:.2f} | {med[(ratio, 'int8', b0)]:.3f} / "
            f"{med[(ratio, 'int8', b1)]:.2f} | {acc[ratio]:.2%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
