"""Device bundles: everything needed to measure a run's deployed model on the target itself.

``make_bundle(run_dir, target, out)`` writes the folder ``out`` and ``out.zip`` with

- the deployed model (``report/deployed.onnx`` of the run, with its measured figures, the
  preprocessing and the labels in its metadata; with ``all_models`` every ``export/*.onnx``),
- for phones (android, ios) the ``.ort`` files made by onnxruntime's converter, each checked to
  load in an ``InferenceSession`` and to predict like the ``.onnx`` file,
- ``samples.npz``: evaluation samples (x preprocessed float32 NCHW, y labels) from the run's test
  split, with the host's argmax predictions per model, so a device can check its numerics,
- ``preprocess.json``, ``bundle.json`` (the manifest), the standalone runner ``bench.py``
  (a copy of ``compresskit/bundle_runner.py``: numpy and onnxruntime only) and ``README.md``
  with the commands for the target.

``ssh_bench`` copies a bundle to a host over ssh, runs it there and fetches ``result.json``.
Torch-free: only rebuilding the test set from the run's config needs torch (``--samples-from``
is the way without it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from compresskit import __version__
from compresskit import bundle_runner as runner

BUNDLE_SCHEMA = "compresskit.bundle"
BUNDLE_SCHEMA_VERSION = 1
TARGETS = ("rpi", "android", "ios", "x86")
MOBILE_TARGETS = ("android", "ios")
DEFAULT_SAMPLES = 1000
RUNNER_NAME = "bench.py"
TORCH_FREE_SAMPLES = ("torch is not installed here, so the test set cannot be rebuilt from the run's config: "
                      "pass --samples-from FILE.npz (x: preprocessed float32 NCHW, y: labels) or --samples 0")

LogFn = Callable[[str], None]


class BundleError(ValueError):
    """Bad input (run folder, report, samples, target): one line for the user, exit code 2."""


# --------------------------------------------------------------------------- finding the run


def report_path_of(run_dir: Path, report: str | os.PathLike | None = None) -> Path:
    """The run's report.json: ``report`` if given, else the ``report_json`` path recorded in
    ``RUN_DIR/report/metrics.json`` (absolute, or relative to the current directory or to the
    folder that holds ``models/``)."""
    if report is not None:
        path = Path(report)
        path = path / "report.json" if path.is_dir() else path
        if not path.is_file():
            raise BundleError(f"--report {report}: no report.json there")
        return path
    metrics = run_dir / "report" / "metrics.json"
    if not metrics.is_file():
        raise BundleError(f"{run_dir}: no report/metrics.json; run the pipeline's report stage first, "
                          "or pass --report PATH")
    try:
        recorded = json.loads(metrics.read_text(encoding="utf-8")).get("report_json")
    except (OSError, ValueError) as err:
        raise BundleError(f"{metrics}: unreadable ({err})") from None
    if not recorded:
        raise BundleError(f"{metrics} names no report_json; pass --report PATH")
    rel = Path(recorded)
    tries = [rel] if rel.is_absolute() else [rel, run_dir.resolve().parent.parent / rel]
    for path in tries:
        if path.is_file():
            return path
    raise BundleError(f"the report recorded in {metrics} ({recorded}) is not there; pass --report PATH")


def load_run_report(run_dir: Path, report: str | os.PathLike | None = None) -> tuple[Path, dict]:
    from compresskit.report import load_report

    path = report_path_of(run_dir, report)
    try:
        return path, load_report(path)
    except (FileNotFoundError, ValueError) as err:
        raise BundleError(str(err)) from None


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def sha256(path: str | os.PathLike) -> str:
    return runner.sha256(path)


def run_models(run_dir: Path, report: dict, all_models: bool) -> list[dict]:
    """[{name, source, role}]: the deployed model first (``report/deployed.onnx``), then with
    ``all_models`` every other ``export/*.onnx`` in report order."""
    deployed_name = (report.get("verdict") or {}).get("model")
    deployed = run_dir / "report" / "deployed.onnx"
    if not deployed_name or not deployed.is_file():
        raise BundleError(f"{run_dir}: no deployed model (report/deployed.onnx); did the report stage run?")
    models = [{"name": deployed_name, "source": deployed, "role": "deployed"}]
    if all_models:
        order = [r["name"] for r in report.get("rows", []) if not r.get("device")]
        found = sorted((run_dir / "export").glob("*.onnx"),
                       key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem))
        models += [{"name": p.stem, "source": p, "role": "candidate"} for p in found if p.stem != deployed_name]
    return models


# --------------------------------------------------------------------------- samples


def _check_samples(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        raise BundleError(f"{where}: x must be a float array (N, C, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise BundleError(f"{where}: y must be an int array of shape ({len(x)},), got {y.dtype} {y.shape}")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def samples_from_file(path: str | os.PathLike, limit: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"--samples-from {path}: file not found")
    try:
        with np.load(path) as npz:
            if "x" not in npz or "y" not in npz:
                raise BundleError(f"--samples-from {path}: needs arrays 'x' and 'y'")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as err:
        raise BundleError(f"--samples-from {path}: not a readable .npz ({err})") from None
    x, y = _check_samples(x, y, f"--samples-from {path}")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y, f"{path.name} (first {len(y)})"


def samples_from_run(report: dict, limit: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``limit`` test samples, rebuilt from the report's data config (needs torch)."""
    config = report.get("config") or {}
    try:
        import torch  # noqa: F401  (the data loaders are torch code)

        from compresskit.config import DataConfig
        from compresskit.data import load_data
    except ImportError:
        raise BundleError(TORCH_FREE_SAMPLES) from None
    from compresskit.stage import InputError

    try:
        cfg = DataConfig.model_validate(config.get("data") or {})
        data = load_data(cfg, seed=int(config.get("seed", 0)))
        x, y = data.numpy_split("test", limit=limit)
    except (InputError, ValueError) as err:
        raise BundleError(f"cannot rebuild the test set from the run's config: {err}") from None
    x, y = _check_samples(x, y, "test split")
    return x, y, f"test split of the run's data config, first {len(y)} of {len(data.test)}"


# --------------------------------------------------------------------------- models


def _session(path: Path):
    try:
        return runner.make_session(path, 0, ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise BundleError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None


def _check_input(session, x: np.ndarray, name: str) -> None:
    arg = session.get_inputs()[0]
    expected = list(arg.shape[1:])
    if len(expected) != x.ndim - 1 or any(isinstance(d, int) and d != s
                                           for d, s in zip(expected, x.shape[1:], strict=True)):
        raise BundleError(f"samples have shape {tuple(x.shape[1:])} but model {name!r} expects {expected}")


def convert_to_ort(onnx_path: Path, out_dir: Path, style: str = "Fixed", target_platform: str = "arm") -> Path:
    """``python -m onnxruntime.tools.convert_onnx_models_to_ort`` in a subprocess (torch-free);
    returns the ``.ort`` file written into ``out_dir`` (``.with_runtime_opt.ort`` for Runtime)."""
    with tempfile.TemporaryDirectory(prefix="ck-ort-") as tmp:
        src = Path(tmp) / onnx_path.name
        shutil.copyfile(onnx_path, src)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src), "--output_dir",
               str(Path(tmp) / "out"), "--optimization_style", style, "--target_platform", target_platform]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        suffix = ".ort" if style == "Fixed" else ".with_runtime_opt.ort"
        made = Path(tmp) / "out" / (onnx_path.stem + suffix)
        if proc.returncode != 0 or not made.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            cause = re.sub(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", tail[0])
            raise BundleError(f"ORT conversion of {onnx_path.name} ({style}) failed: {cause}")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / made.name
        shutil.copyfile(made, target)
        if style == "Fixed":  # named <model>.required_operators.config (1.32) or required_operators.config
            for config in (Path(tmp) / "out").glob("*required_operators.config"):
                shutil.copyfile(config, out_dir / f"{onnx_path.stem}.required_operators.config")
    return target


def _ort_files(onnx_file: Path, out: Path, x: np.ndarray | None, ref: np.ndarray | None) -> dict:
    """Convert one bundled model to both ORT styles, load each and compare its predictions."""
    info = {}
    for style in ("Fixed", "Runtime"):
        try:
            path = convert_to_ort(onnx_file, out, style)
        except BundleError as err:
            if style == "Fixed":
                raise
            # Runtime style is optional (for NNAPI/CoreML); onnxruntime 1.32 fails on some QDQ graphs
            info[style.lower()] = {"file": None, "optimization_style": style, "loads": False, "error": str(err)}
            continue
        session = _session(path)  # the load check
        entry = {"file": path.name, "sha256": sha256(path), "size_bytes": path.stat().st_size,
                 "optimization_style": style, "loads": True, "agreement_with_onnx": None}
        if x is not None and ref is not None:
            pred, _, _ = runner.predict(session, x)
            entry["agreement_with_onnx"] = float(np.mean(pred == ref))
        info[style.lower()] = entry
    return info


def _metadata(session) -> dict:
    meta = dict(session.get_modelmeta().custom_metadata_map)
    out = {}
    for key in ("compresskit.preprocess", "compresskit.labels", "compresskit.metrics"):
        if key in meta:
            try:
                out[key.split(".", 1)[1]] = json.loads(meta[key])
            except ValueError:
                out[key.split(".", 1)[1]] = meta[key]
    return out


# --------------------------------------------------------------------------- README


def preprocess_note(pre: dict | None, labels: Sequence[str] | None) -> str:
    if not pre:
        return ("The model carries no `compresskit.preprocess` metadata: feed it what it was trained on; "
                "samples.npz holds ready inputs.")
    size = "x".join(str(s) for s in pre.get("size", [])) or "?"
    mean, std = pre.get("mean"), pre.get("std")
    scale = pre.get("scale", 1 / 255)
    scale_text = "1/255" if abs(scale - 1 / 255) < 1e-12 else f"{scale:g}"
    text = (f"Input: float32 {pre.get('layout', 'NCHW')}, {pre.get('channels', '?')} channel(s), {size} (H x W). "
            f"From 0..255 pixels: `x = (pixel * {scale_text} - mean) / std` per channel, "
            f"mean {mean}, std {std}.")
    if labels:
        text += f" Output: {len(labels)} logits in the order {', '.join(map(str, labels))}."
    return text


def _readme(manifest: dict) -> str:
    target, name = manifest["target"], manifest["name"]
    deployed = manifest["deployed"]
    d_file = next(m["file"] for m in manifest["models"] if m["name"] == deployed)
    lines = [f"# compresskit bundle: run `{manifest['run']}`, target `{target}`", "",
             f"Made {manifest['created']} by compresskit {manifest['compresskit_version']}. Deployed model: "
             f"`{d_file}` (`{deployed}`); models: {', '.join('`' + m['file'] + '`' for m in manifest['models'])}.",
             ""]
    samples = manifest.get("samples")
    if samples:
        lines += [f"`samples.npz`: {samples['n']} preprocessed samples ({samples['source']}), with the host's "
                  "predictions, so `bench.py` reports accuracy and how many predictions match the host.", ""]
    lines += ["## Preprocessing", "", preprocess_note(manifest.get("preprocess"), manifest.get("labels")),
              "(also in `preprocess.json`)", ""]
    bench_line = "python bench.py --json result.json"
    lines += ["## Measure on a Raspberry Pi or a Linux box (64-bit)", "",
              "`bench.py` needs Python 3.9+, numpy and onnxruntime only. On 64-bit Raspberry Pi OS "
              "(onnxruntime has aarch64 wheels on PyPI; none for 32-bit armv7l):", "",
              f"    scp -r {name} pi@raspberrypi.local:      # from this machine (or copy {name}.zip and unzip it)",
              "    sudo apt install -y python3-venv          # then on the Pi",
              f"    cd {name}",
              "    python3 -m venv ~/ck-venv",
              "    ~/ck-venv/bin/pip install numpy onnxruntime",
              f"    ~/ck-venv/bin/{bench_line}", "",
              "Options: `--batch-sizes 1,8`, `--threads 1,0` (0 = all cores), `--max-seconds 5`, "
              "`--model NAME|FILE`, `--providers CPUExecutionProvider,...`, `--device-name rpi5`, "
              "`--predictions preds.npy`. Close other programs first: latency measured while anything else runs "
              "is wrong, not noisy.", "",
              "Back on the machine that made the run, merge the result into the report and re-check the "
              "budgets at the device's latency:", "",
              f"    compresskit report models/{manifest['run']} --add-device result.json", "",
              "Or let compresskit do all of it over ssh (copy, run, fetch, merge):", "",
              f"    compresskit bundle models/{manifest['run']} --target {target} -o {name} --ssh pi@raspberrypi.local "
              "--remote-python '~/ck-venv/bin/python'", ""]
    if target in MOBILE_TARGETS or any(m.get("ort") for m in manifest["models"]):
        lines += ["## Phones", "",
                  "`bench.py` is Python and does not run on a phone: there the model goes into an app. The "
                  "`.ort` files are onnxruntime's mobile format (made with "
                  "`python -m onnxruntime.tools.convert_onnx_models_to_ort`, checked to load and to predict like "
                  "the `.onnx` file on the samples): `NAME.ort` (optimization style Fixed) for the CPU and XNNPACK "
                  "execution providers, `NAME.with_runtime_opt.ort` (style Runtime) for NNAPI and CoreML, which "
                  "needs the session option `session.enable_saved_runtime_optimizations=1`. "
                  "`NAME.required_operators.config` lists the operators, for a reduced custom build. Made with "
                  f"onnxruntime {manifest['onnxruntime_version']}: load them with that version or a later one.", "",
                  *[f"No Runtime-style file for `{m['file']}`: {m['ort']['runtime']['error']}"
                    for m in manifest["models"]
                    if (m.get("ort") or {}).get("runtime", {}).get("error")],
                  "",
                  "- Android: add `com.microsoft.onnxruntime:onnxruntime-android` (Maven; Java/Kotlin/C/C++). "
                  "It includes the XNNPACK and NNAPI execution providers; register them on the session options "
                  "(`addXnnpack(...)`, `addNnapi()`), else the CPU provider runs everything. XNNPACK: set the "
                  "session's intra-op threads to 1 and XNNPACK's own `intra_op_num_threads`, and disable "
                  "spinning (`session.intra_op.allow_spinning=0`). NNAPI needs Android 8.1+ (Google deprecated it "
                  "in Android 15); nodes it cannot take run on the CPU provider.",
                  "- iOS: the `onnxruntime-objc` (Swift/Objective-C) or `onnxruntime-c` CocoaPods; append the "
                  "CoreML execution provider to the session options (nodes CoreML cannot take run on the CPU).",
                  "",
                  "Feed the model inputs preprocessed as above and time `run()` in the app, warm-up first; "
                  "compare its argmax on `samples.npz` with the host's (`ref_pred__NAME` arrays).", ""]
    lines += ["## Files", "",
              "- `bundle.json`: models with sha256, target, samples, preprocessing, the run's budgets",
              "- `bench.py`: the runner (`python bench.py --help`)",
              "- `result.json` schema: `compresskit.device-result` version 1 (device, onnxruntime version and "
              "providers, per model: load time, latency p50/p90/p99 per batch size and threads, accuracy, "
              "peak memory)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the bundle


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise BundleError(f"-o {out}: exists and is not a folder")
        if any(out.iterdir()) and not (out / runner.MANIFEST).is_file() and not force:
            raise BundleError(f"-o {out}: folder exists, is not empty and is not a bundle; pass --force to replace it")


def make_bundle(
    run_dir: str | os.PathLike,
    target: str,
    out: str | os.PathLike,
    *,
    all_models: bool = False,
    samples: int | None = DEFAULT_SAMPLES,
    samples_from: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    force: bool = False,
    batch_sizes: Sequence[int] | None = None,
    threads: Sequence[int] | None = None,
    log: LogFn | None = None,
) -> dict:
    """Write the bundle folder ``out`` and ``out.zip``; returns the manifest (``bundle.json``).

    ``samples`` (0: none) caps the samples; they come from ``samples_from`` if given, else from
    the run's test split (needs torch). Raises BundleError on bad input.
    """
    note = log or (lambda _m: None)
    if target not in TARGETS:
        raise BundleError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise BundleError(f"{run_dir}: not a folder (expected models/<run>)")
    if samples is not None and samples < 0:
        raise BundleError(f"--samples must be >= 0, got {samples}")
    _prepare_out(out, force)
    _, rep = load_run_report(run_dir, report)
    models = run_models(run_dir, rep, all_models)

    x = y = None
    samples_source = None
    if samples_from is not None and samples != 0:
        x, y, samples_source = samples_from_file(samples_from, samples)
    elif samples != 0:
        note(f"rebuilding {samples} test samples from the run's data config")
        x, y, samples_source = samples_from_run(rep, samples or DEFAULT_SAMPLES)

    bench_cfg = (rep.get("config") or {}).get("bench") or {}
    defaults = {"batch_sizes": list(batch_sizes or bench_cfg.get("batch_sizes") or [1]),
                "threads": list(threads or bench_cfg.get("threads") or [1])}
    budgets = (rep.get("verdict") or {}).get("budgets") or {}
    lat_batch = budgets.get("latency_batch_size")
    if budgets.get("max_latency_ms") is not None and lat_batch and lat_batch not in defaults["batch_sizes"]:
        defaults["batch_sizes"].insert(0, lat_batch)  # the device must measure what the budget checks
    lat_threads = budgets.get("latency_threads")
    if budgets.get("max_latency_ms") is not None and lat_threads is not None and lat_threads not in defaults["threads"]:
        defaults["threads"].insert(0, lat_threads)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: rename
    try:
        manifest_models, refs = [], {}
        preprocess = labels = None
        for m in models:
            dest = staging / f"{m['name']}.onnx"
            shutil.copyfile(m["source"], dest)
            session = _session(dest)
            meta = _metadata(session)
            entry = {"name": m["name"], "role": m["role"], "file": dest.name, "sha256": sha256(dest),
                     "size_bytes": dest.stat().st_size, "source": str(m["source"].relative_to(run_dir)),
                     "inputs": [{"name": a.name, "shape": list(a.shape), "type": a.type} for a in session.get_inputs()],
                     "host_samples_accuracy": None, "ort": None}
            if m["role"] == "deployed":
                preprocess, labels = meta.get("preprocess"), meta.get("labels")
            if x is not None:
                _check_input(session, x, m["name"])
                pred, _, classes = runner.predict(session, x)
                if y.min() < 0 or y.max() >= classes:
                    raise BundleError(f"sample labels lie in [{y.min()}, {y.max()}] but {m['name']!r} "
                                      f"has {classes} classes")
                refs[m["name"]] = pred
                entry["host_samples_accuracy"] = float(np.mean(pred == y))
            if target in MOBILE_TARGETS:
                note(f"{m['name']}: converting to ORT format")
                entry["ort"] = _ort_files(dest, staging, x, refs.get(m["name"]))
                entry["ort_file"] = entry["ort"]["fixed"]["file"]
            manifest_models.append(entry)
        if x is not None:
            np.savez_compressed(staging / runner.SAMPLES, x=x, y=y,
                                **{f"{runner.REF_PREFIX}{k}": v for k, v in refs.items()})
        note_doc = {"preprocess": preprocess, "labels": labels, "note": preprocess_note(preprocess, labels)}
        (staging / "preprocess.json").write_text(json.dumps(note_doc, indent=2) + "\n")
        shutil.copyfile(Path(runner.__file__), staging / RUNNER_NAME)
        manifest = {
            "schema": BUNDLE_SCHEMA, "schema_version": BUNDLE_SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "compresskit_version": __version__, "name": out.name, "run": rep.get("run"), "target": target,
            "onnxruntime_version": ort_version(),
            "deployed": models[0]["name"], "models": manifest_models,
            "samples": None if x is None else {"file": runner.SAMPLES, "n": int(len(y)), "source": samples_source},
            "preprocess": preprocess, "labels": labels, "defaults": defaults, "budgets": budgets,
            "runner": {"file": RUNNER_NAME, "sha256": sha256(staging / RUNNER_NAME),
                       "result_schema": runner.RESULT_SCHEMA, "result_schema_version": runner.RESULT_SCHEMA_VERSION},
        }
        (staging / runner.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / "README.md").write_text(_readme(manifest))
        staging.chmod(0o755)  # mkdtemp makes it 0700; the bundle is copied to other machines
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_zip(out)
    note(f"wrote {out}/ and {out}.zip")
    return manifest


def write_zip(folder: Path) -> Path:
    """``folder.zip`` holding ``folder/...`` (unzips to the folder), deterministic order."""
    target = folder.with_name(folder.name + ".zip")
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(folder.name) / path.relative_to(folder))
    os.replace(tmp, target)
    return target


def load_manifest(bundle: str | os.PathLike) -> dict:
    path = Path(bundle) / runner.MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle}: not a bundle (no {runner.MANIFEST})")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("schema") != BUNDLE_SCHEMA:
        raise BundleError(f"{path}: not a compresskit bundle manifest")
    return manifest


# --------------------------------------------------------------------------- over ssh


def _remote_path(path: str) -> str:
    """Shell-quote a remote path, keeping a leading ``~/`` expandable."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def ssh_bench(
    bundle: str | os.PathLike,
    host: str,
    *,
    port: int | None = None,
    identity: str | os.PathLike | None = None,
    options: Sequence[str] = (),
    remote_python: str = "python3",
    remote_dir: str = "compresskit-bundles",
    bench_args: Sequence[str] = (),
    result: str | os.PathLike | None = None,
    timeout: float = 3600,
    log: LogFn | None = None,
) -> Path:
    """Copy the bundle to ``host`` (scp -r), run ``bench.py --json result.json`` there with
    ``remote_python`` and fetch the result; returns the local result file (default
    ``BUNDLE/result-<host>.json``). Raises BundleError with the failing step's last line."""
    note = log or (lambda _m: None)
    bundle = Path(bundle)
    load_manifest(bundle)
    common = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
    if identity:
        common += ["-i", str(identity)]
    for opt in options:
        common += ["-o", opt]
    ssh = ["ssh", *common] + (["-p", str(port)] if port else [])
    scp = ["scp", "-q", *common] + (["-P", str(port)] if port else [])
    folder = f"{remote_dir.rstrip('/')}/{bundle.name}"

    def step(what: str, cmd: list[str], stream: bool = False) -> None:
        note(what)
        proc = subprocess.run(cmd, capture_output=not stream, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines() if not stream else []
            raise BundleError(f"ssh {host}: {what} failed (exit {proc.returncode})" + (f": {tail[-1]}" if tail else ""))

    step(f"creating {folder} on {host}", [*ssh, host, f"mkdir -p {_remote_path(folder)}"])
    scp_dir = folder if not folder.startswith("~/") else folder[2:]  # scp paths are relative to $HOME
    files = [str(p) for p in sorted(bundle.iterdir()) if p.name != "__pycache__" and not p.name.startswith("result")]
    step(f"copying {bundle} to {host}:{scp_dir}", [*scp, "-r", *files, f"{host}:{scp_dir}/"])
    py = _remote_path(remote_python) if remote_python.startswith("~") else shlex.quote(remote_python)
    args = " ".join(shlex.quote(a) for a in bench_args)
    remote = f"cd {_remote_path(folder)} && rm -f result.json && {py} bench.py --json result.json {args}".rstrip()
    step(f"running bench.py on {host}", [*ssh, host, remote], stream=True)
    local = Path(result) if result else bundle / f"result-{_safe(host)}.json"
    step(f"fetching result.json from {host}", [*scp, f"{host}:{scp_dir}/result.json", str(local)])
    note(f"wrote {local}")
    return local


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.split("@")[-1])


def describe_model(m: dict) -> str:
    """One line per bundled model: file, role, accuracy on the samples here, the .ort checks."""
    acc = m.get("host_samples_accuracy")
    text = f"{m['file']} ({m['role']}{'' if acc is None else f', {acc:.2%} on the samples here'})"
    for v in (m.get("ort") or {}).values():
        if v.get("error"):
            text += f"; no {v['optimization_style']}-style .ort: {v['error']}"
        else:
            same = v.get("agreement_with_onnx")
            text += f"; {v['file']} loads" + ("" if same is None else f", {same:.0%} same predictions as .onnx")
    return text
