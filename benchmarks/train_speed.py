"""What makes training finish sooner on this machine: training-step throughput, side by side.

    python benchmarks/train_speed.py [--steps 40] [--rounds 3] [--compile]

Times training steps (forward, backward, optimizer step; the training loop's objective and
optimizer) of the pipeline's student, and its teacher, on Fashion-MNIST batches already in memory:

- the data path alone: the pipeline's in-memory uint8 batches normalised per batch, against a
  torchvision-style per-sample dataset (`ToTensor` + `Normalize`) through a `DataLoader`;
- NCHW vs channels_last memory format (the pipeline trains channels_last);
- SGD's default (foreach) update vs `fused=True`;
- batch 128 (the pipeline's) vs 256 and 512: images/s only; a larger batch needs its learning
  rate scaled, and fewer steps per epoch can cost accuracy, which this script does not measure;
- KD with the teacher run every step vs its logits memoised once for the run (what
  `train.cache_teacher` does when inputs repeat exactly);
- with `--compile`: `torch.compile` (inductor) of the student, its compile time counted apart.

Every variant is timed once per round and the rounds are interleaved (these machines are shared
and noisy); the table gives the median images/s and the ratio to the pipeline's own setting.
Writes `benchmarks/results/train_speed.md`. Run it on a quiet machine.
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
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_speed.md")
    args = ap.parse_args(argv)

    import torch

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
    tcfg = cfg.distill.train
    base_bs = tcfg.batch_size or cfg.data.batch_size
    ce = [{"method": "ce", "weight": 1.0}]
    kd = [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9, "temperature": 4.0}]
    teacher = build_model(cfg.teacher.model.model_dump(mode="json") | extra).eval().requires_grad_(False)
    teacher = teacher.to(memory_format=torch.channels_last)

    pools: dict[tuple[int, bool], list] = {}

    def batches(bs: int, channels_last: bool) -> list:
        """`args.steps` (+3 warm-up) batches of the pipeline's loader, made once per shape."""
        if (bs, channels_last) not in pools:
            out = []
            for x, y in data.loader("train", batch_size=bs, shuffle=True, channels_last=channels_last,
                                    seed=cfg.seed):
                out.append((x, y))
                if len(out) == args.steps + 3:
                    break
            pools[(bs, channels_last)] = out
        return pools[(bs, channels_last)]

    # name -> (arch spec, terms, teacher, batch, channels_last, fused, compile)
    student_spec = cfg.distill.student.model_dump(mode="json") | extra
    teacher_spec = cfg.teacher.model.model_dump(mode="json") | extra
    base = "student, channels_last, batch %d (pipeline)" % base_bs
    variants: dict[str, tuple] = {
        base: (student_spec, ce, None, base_bs, True, False, False),
        "student, NCHW": (student_spec, ce, None, base_bs, False, False, False),
        "student, fused SGD": (student_spec, ce, None, base_bs, True, True, False),
        f"student, batch {2 * base_bs}": (student_spec, ce, None, 2 * base_bs, True, False, False),
        f"student, batch {4 * base_bs}": (student_spec, ce, None, 4 * base_bs, True, False, False),
        "student + KD, teacher every step": (student_spec, kd, teacher, base_bs, True, False, False),
        "student + KD, teacher logits memoised (pipeline)": (student_spec, kd, "cached", base_bs, True, False,
                                                              False),
        "teacher, channels_last (pipeline)": (teacher_spec, ce, None, base_bs, True, False, False),
        "teacher, NCHW": (teacher_spec, ce, None, base_bs, False, False, False),
    }
    if args.compile:
        variants["student, torch.compile"] = (student_spec, ce, None, base_bs, True, False, True)
    cached = CachedTeacher(teacher, {})
    with torch.no_grad():  # memoise on the very batches timed (what every epoch after the first sees)
        for x, _ in batches(base_bs, True):
            cached(x)

    compiled: dict[str, tuple] = {}
    compile_s: dict[str, float] = {}

    def step_rate(name: str) -> float:
        spec, terms, t, bs, cl, fused, comp = variants[name]
        t = cached if t == "cached" else t
        if comp and name in compiled:
            model, objective, opt = compiled[name]
        else:
            torch.manual_seed(cfg.seed)
            model = build_model(spec)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            model.train()
            objective = build_objective(terms, student=torch.compile(model) if comp else model, teacher=t,
                                        example_input=batches(bs, cl)[0][0][:2])
            opt = make_optimizer([*model.parameters(), *objective.parameters()], tcfg)
            if fused:  # the same parameter groups, one fused kernel per step
                opt = torch.optim.SGD(opt.param_groups, lr=tcfg.lr, momentum=tcfg.momentum,
                                      nesterov=tcfg.nesterov, fused=True)
            objective.train()
        pool = batches(bs, cl)
        with objective:
            t0 = time.perf_counter()
            for x, y in pool[:3]:  # warm-up (and, for torch.compile, the compile)
                objective(x, y).loss.backward()
                opt.zero_grad(set_to_none=True)
            if comp and name not in compiled:
                compile_s[name] = time.perf_counter() - t0
                compiled[name] = (model, objective, opt)
            t0 = time.perf_counter()
            for x, y in pool[3:]:
                out = objective(x, y)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
            seconds = time.perf_counter() - t0
        return sum(len(y) for _, y in pool[3:]) / seconds

    def data_rates() -> tuple[float, float]:
        """images/s of the two data paths alone (one pass over 50 batches each)."""
        from torch.utils.data import DataLoader, Dataset

        n = 50 * base_bs
        t0 = time.perf_counter()
        seen = 0
        for _x, y in data.loader("train", batch_size=base_bs, shuffle=True, channels_last=True, seed=cfg.seed):
            seen += len(y)
            if seen >= n:
                break
        ours = seen / (time.perf_counter() - t0)
        images = data.train.images[:n] if hasattr(data.train, "images") else None
        labels = data.train.labels[:n] if hasattr(data.train, "labels") else None
        if images is None:
            return ours, float("nan")
        mean = torch.tensor(data.mean).view(-1, 1, 1)
        std = torch.tensor(data.std).view(-1, 1, 1)

        class PerSample(Dataset):  # what a torchvision ToTensor + Normalize pipeline does per image
            def __len__(self):
                return len(labels)

            def __getitem__(self, i):
                img = images[i].float() / 255.0
                return (img - mean) / std, int(labels[i])

        t0 = time.perf_counter()
        seen = 0
        for _x, y in DataLoader(PerSample(), batch_size=base_bs, shuffle=True, num_workers=0):
            seen += len(y)
        return ours, seen / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {name: [] for name in variants}
    data_ours, data_torch = [], []
    for r in range(args.rounds):
        for name in variants:
            rates[name].append(step_rate(name))
            print(f"round {r + 1}/{args.rounds}: {name}: {rates[name][-1]:.0f} img/s", flush=True)
        o, t = data_rates()
        data_ours.append(o)
        data_torch.append(t)
    env = environment()
    med = {name: statistics.median(v) for name, v in rates.items()}
    ref_student, ref_teacher = med[base], med["teacher, channels_last (pipeline)"]
    cmd = f"python benchmarks/train_speed.py --steps {args.steps} --rounds {args.rounds}" + \
        (" --compile" if args.compile else "")
    lines = [
        "# Training speed: what pays on this machine",
        "",
        f"Machine: {env['cpu']['model']} ({env['cpu']['usable_cores']} usable cores), torch "
        f"{env['versions'].get('torch')}, {torch.get_num_threads()} torch threads, CPU.",
        "",
        f"Command: `{cmd}`. Student: `{cfg.distill.student.arch}` of `{args.config.name}` "
        f"({sum(p.numel() for p in build_model(student_spec).parameters()):,} params); teacher: "
        f"`{cfg.teacher.model.arch}`. Training steps (forward, backward, SGD step) on in-memory batches; "
        f"median of {args.rounds} interleaved rounds of {args.steps} steps.",
        "",
        "| variant | images/s | vs the pipeline's setting |",
        "|---|---|---|",
    ]
    for name, rate in med.items():
        ref = ref_teacher if name.startswith("teacher") else ref_student
        note = f" (compile: {compile_s[name]:.0f} s before the first step)" if name in compile_s else ""
        lines.append(f"| {name}{note} | {rate:.0f} | {rate / ref:.2f}x |")
    dt, do = statistics.median(data_torch), statistics.median(data_ours)
    lines += [
        "",
        "Data path alone (no model), batch %d: the pipeline's in-memory uint8 batches %.0f images/s; "
        "a per-sample torchvision-style Dataset + DataLoader %.0f images/s (%.1fx slower)." % (
            base_bs, do, dt, do / dt if dt == dt and dt > 0 else float("nan")),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
