"""Every distillation method on the default teacher and a MobileNetV2 student, side by side, at equal epochs.

    python benchmarks/distill_methods.py [--epochs 2] [--max-batches 150] [--methods kd,dkd,...]

Each method is one run of the pipeline's teacher and distill stages (`compresskit run
--until distill`), changing only the `distill.loss` section (and `teacher.ensemble` /
`teacher.specialists` for the two teacher schemes) of `pipelines/mobilenet_edge.yaml`, with
the student set to MobileNetV2-0.35 (`STUDENT`, whose module paths the feature methods name). The
teacher is trained once (or taken from `--teacher`, by default the default pipeline's teacher
when it exists) and loaded from its checkpoint by every run. The runs share one run directory,
so the teacher stage is skipped while its config is unchanged; only the distill stage reruns.
Every method trains the same student for the same epochs and batches with the same seed.

Writes `benchmarks/results/distill_methods.md` (and `.json`): test accuracy, the difference to
the student trained alone, the distill stage's training wall time and images per second, with
a description of the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The student every method trains (the default pipeline's original, hand-picked student; the
# pipeline now deploys what `compresskit search` found) and the module paths of the pair: teacher
# ResNet (stem stride 2; layers.1 is 64 x 7 x 7 on Fashion-MNIST), student MobileNetV2-0.35
# (features.6 is 32 x 7 x 7). `pool` is each model's global-average-pooled penultimate feature.
STUDENT = {"arch": "mobilenetv2", "width_mult": 0.35, "stem_stride": 2, "stage_strides": [1, 1, 2, 2, 1, 2, 1],
           "last_channel": 256}
S_MAP, T_MAP = "features.6", "layers.1"
S_PAIR, T_PAIR = ["features.4", "features.6"], ["layers.1.0", "layers.1"]
S_EMB, T_EMB = "pool", "pool"


def _ce(weight: float = 1.0) -> dict:
    return {"method": "ce", "weight": weight}


def recipes(s_map=S_MAP, t_map=T_MAP, s_pair=S_PAIR, t_pair=T_PAIR, s_emb=S_EMB, t_emb=T_EMB,
            byot_heads=("features.6", "features.13")) -> dict[str, dict]:
    """Method name -> {"loss": terms, "teacher": teacher-section changes}. Feature and relation
    terms are added to cross-entropy (weight 1) at their reference weights, as in the papers'
    comparisons; logit methods follow their papers' mixing."""
    pair = {"student": s_map, "teacher": t_map}
    emb = {"student": s_emb, "teacher": t_emb}
    out: dict[str, dict] = {
        "student alone": {"loss": [_ce()]},
        "kd": {"loss": [_ce(0.1), {"method": "kd", "weight": 0.9, "temperature": 4.0}]},
        "dkd": {"loss": [_ce(), {"method": "dkd", "weight": 1.0, "warmup_epochs": 1.0}]},
        "dist": {"loss": [_ce(), {"method": "dist", "weight": 1.0}]},
        "cskd": {"loss": [_ce(), {"method": "cskd", "weight": 1.0}]},
        "fitnet": {"loss": [_ce(), {"method": "fitnet", "weight": 100.0, **pair}]},
        "at": {"loss": [_ce(), {"method": "at", "weight": 1000.0, **pair}]},
        "ft": {"loss": [_ce(), {"method": "ft", "weight": 200.0, **pair}]},
        "vid": {"loss": [_ce(), {"method": "vid", "weight": 1.0, **pair}]},
        "fsp": {"loss": [_ce(), {"method": "fsp", "weight": 50.0, "student": s_pair, "teacher": t_pair}]},
        "ab": {"loss": [_ce(), {"method": "ab", "weight": 1.0, **pair}]},
        "crd": {"loss": [_ce(), {"method": "crd", "weight": 0.8, **emb}]},
        "sp": {"loss": [_ce(), {"method": "sp", "weight": 3000.0, **pair}]},
        "rkd": {"loss": [_ce(), {"method": "rkd", "weight": 1.0, **emb}]},
        "pkt": {"loss": [_ce(), {"method": "pkt", "weight": 30000.0, **emb}]},
        "cc": {"loss": [_ce(), {"method": "cc", "weight": 0.02, **emb}]},
        "nst": {"loss": [_ce(), {"method": "nst", "weight": 50.0, **pair}]},
        "dml": {"loss": [_ce(), {"method": "dml", "weight": 1.0, "peers": 1}]},
        "byot": {"loss": [_ce(), {"method": "byot", "weight": 1.0, "student": list(byot_heads)}]},
        "ddgsd": {"loss": [_ce(), {"method": "ddgsd", "weight": 1.0, "student": s_emb}]},
        "dafl": {"loss": [{"method": "dafl", "weight": 1.0, "teacher": t_emb}]},
        "ensemble": {"loss": [_ce(0.1), {"method": "ensemble", "weight": 0.9, "temperature": 4.0}],
                     "teacher": {"ensemble": [{}, {}]}},
        "specialists": {"loss": [_ce(0.1), {"method": "kd", "weight": 0.9, "temperature": 4.0}],
                        "teacher": {"specialists": {"enabled": True}}},
    }
    return out


def _describe_terms(terms: list[dict]) -> str:
    parts = []
    for t in terms:
        opts = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("method", "weight", "student", "teacher"))
        parts.append(f"{t['weight']:g}·{t['method']}" + (f" ({opts})" if opts else ""))
    return " + ".join(parts)


def _machine() -> str:
    from compresskit.envinfo import environment

    env = environment()
    cpu = env["cpu"]
    v = env["versions"]
    return (f"{cpu['model']} ({cpu['usable_cores']} usable cores, {cpu['architecture']}), "
            f"torch {v.get('torch')}, Python {env['python']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "mobilenet_edge.yaml")
    ap.add_argument("--teacher", type=Path, default=ROOT / "models" / "mobilenet_edge" / "teacher" / "model.pt",
                    help="teacher checkpoint (trained with the config's teacher settings when missing)")
    ap.add_argument("--epochs", type=int, default=2, help="student epochs, equal for every method")
    ap.add_argument("--max-batches", type=int, default=None, help="batches per epoch (default: the whole set)")
    ap.add_argument("--member-epochs", type=int, default=2, help="epochs of each extra ensemble teacher")
    ap.add_argument("--specialist-epochs", type=int, default=1, help="epochs of each specialist")
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--student", type=json.loads, default=STUDENT,
                    help="the student spec as JSON (default: MobileNetV2-0.35; give --paths to match it)")
    ap.add_argument("--paths", type=json.loads, default={},
                    help="module paths for other architectures, as JSON: keys s_map, t_map, s_pair, t_pair, "
                         "s_emb, t_emb, byot_heads")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override key=value")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of methods not run now from an earlier result file")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill_methods")
    ap.add_argument("--workdir", type=Path, default=ROOT / "models" / "bench-distill")
    args = ap.parse_args(argv)

    from compresskit.config import apply_overrides, load_raw, validate_config
    from compresskit.pipeline import run_pipeline

    base = apply_overrides(load_raw(args.config), args.overrides)
    base["models_dir"] = str(args.workdir)
    base["reports_dir"] = str(args.workdir / "reports")
    base["name"] = "methods"
    teacher_path = args.teacher
    if not teacher_path.is_file():
        raw = copy.deepcopy(base) | {"name": "teacher"}
        print(f"training the teacher ({args.config.name}) ...", flush=True)
        run_pipeline(validate_config(raw), until="teacher", quiet=True, log=lambda _: None)
        teacher_path = args.workdir / "teacher" / "teacher" / "model.pt"
    all_recipes = recipes(**args.paths)
    names = list(all_recipes) if not args.methods else ["student alone", *args.methods.split(",")]
    unknown = [n for n in names if n not in all_recipes]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(all_recipes)}")
    rows = []
    for name in dict.fromkeys(names):
        recipe = all_recipes[name]
        raw = copy.deepcopy(base)
        raw["teacher"] = dict(raw.get("teacher", {})) | {"checkpoint": str(teacher_path)}
        raw["teacher"]["train"] = dict(raw["teacher"].get("train", {}))
        if "ensemble" in recipe.get("teacher", {}):
            raw["teacher"]["train"]["epochs"] = args.member_epochs  # the main teacher is loaded
        for key, value in recipe.get("teacher", {}).items():
            earlier = raw["teacher"].get(key)
            raw["teacher"][key] = (earlier | value) if isinstance(earlier, dict) else copy.deepcopy(value)
        if "specialists" in recipe.get("teacher", {}):
            raw["teacher"]["specialists"]["train"] = {"epochs": args.specialist_epochs, "lr": 0.01,
                                                     "schedule": "cosine"}
        raw["distill"] = dict(raw["distill"]) | {"student": args.student, "loss": recipe["loss"], "baseline": False}
        raw["distill"]["train"] = dict(raw["distill"].get("train", {})) | {"epochs": args.epochs}
        if args.max_batches:
            raw["distill"]["train"]["max_batches_per_epoch"] = args.max_batches
        cfg = validate_config(raw)
        t0 = time.perf_counter()
        try:
            outcomes, _ = run_pipeline(cfg, until="distill", quiet=True, log=lambda _: None)
        except Exception as err:  # noqa: BLE001 - one method failing must not lose the others' rows
            print(f"{name:14s} FAILED: {type(err).__name__}: {err}", flush=True)
            rows.append({"method": name, "terms": _describe_terms(recipe["loss"]),
                         "error": f"{type(err).__name__}: {err}"})
            continue
        wall = time.perf_counter() - t0
        run_dir = args.workdir / "methods"
        metrics = json.loads((run_dir / "distill" / "metrics.json").read_text())["student"]
        teacher_metrics = json.loads((run_dir / "teacher" / "metrics.json").read_text())
        teacher_s = next(o.wall_s for o in outcomes if o.name == "teacher")
        row = {"method": name, "terms": _describe_terms(recipe["loss"]),
               "test_accuracy": metrics["test_accuracy"], "train_s": metrics["fit"]["wall_s"],
               "images_per_s": metrics["fit"]["images_per_s"], "run_s": wall,
               "teacher_stage_s": teacher_s if "teacher" in recipe else 0.0}
        for scheme in ("ensemble", "specialists"):
            if scheme in recipe.get("teacher", {}):
                row["teacher_accuracy"] = teacher_metrics[scheme]["test_accuracy"]
        rows.append(row)
        print(f"{name:14s} test {row['test_accuracy']:.2%}  train {row['train_s']:.0f} s  "
              f"({row['images_per_s']:.0f} img/s)", flush=True)
    if args.merge and args.out.with_suffix(".json").is_file():
        done = {r["method"] for r in rows}
        earlier = json.loads(args.out.with_suffix(".json").read_text())["rows"]
        rows = [r for r in earlier if r["method"] not in done] + rows
        order = list(all_recipes)
        rows.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    write_table(rows, args, teacher_path)
    return 0


def write_table(rows: list[dict], args, teacher_path: Path) -> None:
    base = next((r["test_accuracy"] for r in rows if r["method"] == "student alone"), None)
    lines = [
        "# Distillation methods on Fashion-MNIST: default teacher and student, equal epochs",
        "",
        f"Machine: {_machine()}.",
        "",
        f"Command: `python benchmarks/distill_methods.py --epochs {args.epochs}"
        + (f" --max-batches {args.max_batches}" if args.max_batches else "")
        + (f" --methods {args.methods}" if args.methods else "") + "`",
        "",
        f"Teacher: `{teacher_path.relative_to(ROOT) if teacher_path.is_relative_to(ROOT) else teacher_path}`. "
        f"Student: {args.epochs} epochs"
        + (f" of {args.max_batches} batches" if args.max_batches else "")
        + ", one seed (0) per method: differences of a few tenths of a point are within seed noise.",
        "",
        "| method | loss | test acc | vs student alone | train time (s) | img/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['terms']} | failed: {r['error'][:80]} | | | |")
            continue
        delta = "" if base is None or r["method"] == "student alone" else f"{(r['test_accuracy'] - base) * 100:+.2f} pt"
        extra = ""
        if "teacher_accuracy" in r:
            extra = f" (teacher {r['teacher_accuracy']:.2%}, built in {r['teacher_stage_s']:.0f} s)"
        lines.append(f"| {r['method']}{extra} | {r['terms']} | {r['test_accuracy']:.2%} | {delta} | "
                     f"{r['train_s']:.0f} | {r['images_per_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": _machine()}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
