"""The student search on the default data, and where its models stand against the hand path.

    python benchmarks/search.py                      # runs the search (about 20 minutes on 2 cores)
    python benchmarks/search.py --records DIR        # formats a finished search folder instead

Runs `compresskit search pipelines/mobilenet_edge_search.yaml` in `--workdir` (timed), then
writes `benchmarks/results/search.md`: the machine, the command and its wall time, the latency
reference (the hand-picked MobileNetV2-0.35 student, untrained, U8S8 INT8, timed the same way),
the accuracy-vs-latency front of the finalists with the hand model's latency beside it, and the
search's own record (`trials.md`: every trial, the Pareto front of the proxies, the finalists and
the KD-vs-labels-alone table). Run it on a quiet machine: latencies timed while anything else
runs are wrong.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "mobilenet_edge_search.yaml")
    ap.add_argument("--workdir", type=Path, default=ROOT / "models" / "bench-search")
    ap.add_argument("--records", type=Path, default=None,
                    help="a finished search folder (trials.json) to format instead of searching")
    ap.add_argument("--wall-s", type=float, default=None,
                    help="with --records: the search's wall time, when measured outside (default: the "
                         "record's process_s)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search.md")
    args = ap.parse_args(argv)

    from compresskit.envinfo import environment

    wall = args.wall_s
    if args.records is None:
        cmd = [sys.executable, "-m", "compresskit", "search", str(args.config), "--set",
               f"models_dir={args.workdir}", "--set", f"reports_dir={args.workdir / 'reports'}"]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        wall = time.perf_counter() - t0
        if rc not in (0, 1):  # 1: no candidate met the budgets (the record still says why)
            return rc
        folder = args.workdir / _run_name(args.config) / "search"
    else:
        folder = args.records
    doc = json.loads((folder / "trials.json").read_text())
    ref = doc.get("reference") or {}
    env = environment()
    finals = doc.get("finals") or []
    if wall is None:
        wall = doc.get("process_s")
    lines = [
        "# The student search on Fashion-MNIST",
        "",
        f"Machine: {env['cpu']['model']} ({env['cpu']['usable_cores']} usable cores), torch "
        f"{env['versions'].get('torch')}, onnxruntime {env['versions'].get('onnxruntime')}.",
        "",
        f"Command: `compresskit search {args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`"
        + (f": {wall / 60:.1f} min of wall time" if wall is not None else "")
        + f" (the teacher {doc.get('teacher_s') or 0:.0f} s); run on a quiet machine.",
        "",
    ]
    if ref.get("p50_ms"):
        lines += [
            f"Hand model (the latency reference): {ref.get('label')}, untrained, U8S8 INT8: p50 "
            f"{ref['p50_ms']:.3f} ms at batch {doc['budgets'].get('batch_size')}, "
            f"{doc['budgets'].get('threads')} thread(s)"
            + (f" (timed {len(ref['p50_runs_ms'])} times: " + " / ".join(f"{v:.3f}" for v in ref["p50_runs_ms"])
               + " ms)" if ref.get("p50_runs_ms") else "") + ".",
            "",
            "## Finalists against the hand model's latency",
            "",
            "| # | architecture | recipe | INT8 val | INT8 test | p50 ms | vs hand model's p50 | INT8 KiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in sorted(finals, key=lambda r: r.get("p50_ms") or 0):
            lines.append(f"| {f.get('id', f['number'])} | {f['label']} | {f['recipe_label']} | "
                         f"{f['int8_val_accuracy']:.2%} | {f['int8_test_accuracy']:.2%} | {f['p50_ms']:.3f} | "
                         f"{f['p50_ms'] / ref['p50_ms']:.2f}x | {f['size_bytes'] / 1024:.0f} |")
        lines += ["", "The hand path's accuracy at equal epochs is measured by `benchmarks/deployed_vs_hand.py`.", ""]
    lines += ["## The search's record (`trials.md`)", ""]
    record = (folder / "trials.md").read_text().splitlines()
    lines += ["#" + line if line.startswith("#") else line for line in record[1:]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}")
    return 0


def _run_name(config: Path) -> str:
    from compresskit.config import load_config

    return load_config(config).name


if __name__ == "__main__":
    sys.exit(main())
