"""Distillation step throughput vs student-only step throughput, side by side in one process.

    python benchmarks/distill_throughput.py [--steps 60] [--rounds 3]

Times training steps (forward, backward, optimizer step) of the default student on Fashion-MNIST
batches with the training loop's objective, for:

- the student alone (cross-entropy);
- naive KD: the teacher runs on every step (in `torch.no_grad`, eval mode);
- KD with the teacher's outputs memoised per image (`train.cache_teacher`, the pipeline's
  default when inputs repeat exactly): after the first epoch every step is a cache hit, so the
  cache is warmed on the same batches first and the hit rate is printed;
- a feature method (FitNet on features.6 / layers.1), which needs the teacher's feature maps and
  so runs the teacher every step.

The variants are interleaved round by round (these machines are shared and noisy) and the
median images/s per variant is reported, with the ratio to the student-only rate. Writes
`benchmarks/results/distill_throughput.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "mobilenet_edge.yaml")
    ap.add_argument("--teacher", type=Path, default=ROOT / "models" / "mobilenet_edge" / "teacher" / "model.pt",
                    help="teacher checkpoint (an untrained teacher of the config's architecture when missing)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill_throughput.md")
    args = ap.parse_args(argv)

    import torch

    from compresskit.checkpoint import model_from_checkpoint, read_checkpoint
    from compresskit.config import load_config
    from compresskit.data import load_data
    from compresskit.distill.cache import CachedTeacher
    from compresskit.distill.objective import build_objective
    from compresskit.envinfo import environment
    from compresskit.nets import build_model
    from compresskit.train import make_optimizer

    cfg = load_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg.data, seed=cfg.seed)
    extra = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    if args.teacher.is_file():
        teacher = model_from_checkpoint(read_checkpoint(args.teacher))
    else:
        teacher = build_model(cfg.teacher.model.model_dump(mode="json") | extra)
    teacher.eval().requires_grad_(False)
    tcfg = cfg.distill.train
    loader = data.loader("train", batch_size=tcfg.batch_size, shuffle=True, augment=True,
                         channels_last=tcfg.channels_last, seed=cfg.seed)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == args.steps:
            break
    store: dict = {}
    variants = {
        "student alone": ([{"method": "ce", "weight": 1.0}], None),
        "KD, teacher every step": ([{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9}], teacher),
        "KD, teacher outputs cached": ([{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9}],
                                       CachedTeacher(teacher, store).eval()),
        "FitNet + CE (teacher features every step)": ([{"method": "ce", "weight": 1.0},
                                                       {"method": "fitnet", "weight": 100.0,
                                                        "student": "features.6", "teacher": "layers.1"}], teacher),
    }
    with torch.no_grad():  # warm the cache on these very batches (what later epochs see)
        for x, _ in batches:
            variants["KD, teacher outputs cached"][1](x)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    hits: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (terms, t) in variants.items():
            torch.manual_seed(cfg.seed)
            student = build_model(cfg.distill.student.model_dump(mode="json") | extra)
            if tcfg.channels_last:
                student = student.to(memory_format=torch.channels_last)
            objective = build_objective(terms, student=student, teacher=t, example_input=batches[0][0][:2])
            opt = make_optimizer([*student.parameters(), *objective.parameters()], tcfg)
            student.train()
            objective.train()
            if isinstance(t, CachedTeacher):
                t.hits = t.misses = 0
            with objective:
                for x, y in batches[:3]:  # warm-up steps
                    objective(x, y).loss.backward()
                    opt.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                for x, y in batches:
                    out = objective(x, y)
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                seconds = time.perf_counter() - t0
            rates[name].append(sum(len(y) for _, y in batches) / seconds)
            if isinstance(t, CachedTeacher):
                hits[name] = t.hits / max(1, t.hits + t.misses)
    env = environment()
    base = statistics.median(rates["student alone"])
    lines = [
        "# Distillation step throughput vs the student alone",
        "",
        f"Machine: {env['cpu']['model']} ({env['cpu']['usable_cores']} usable cores), torch "
        f"{env['versions'].get('torch')}, {torch.get_num_threads()} torch threads.",
        "",
        f"Command: `python benchmarks/distill_throughput.py --steps {args.steps} --rounds {args.rounds}`. "
        f"Student {cfg.distill.student.arch} and teacher {cfg.teacher.model.arch} of `{args.config.name}`, "
        f"batch {batches[0][1].shape[0]}, channels_last={tcfg.channels_last}; median of {args.rounds} "
        "interleaved rounds.",
        "",
        "| variant | images/s | vs student alone |",
        "|---|---|---|",
    ]
    for name, values in rates.items():
        rate = statistics.median(values)
        note = f" (cache hit rate {hits[name]:.0%})" if name in hits else ""
        lines.append(f"| {name}{note} | {rate:.0f} | {rate / base:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
