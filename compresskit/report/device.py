"""Device results in the run report: rows measured on the target, and the budgets re-checked there.

A device result (``bench.py --json result.json`` in a bundle, schema ``compresskit.device-result``
version 1) becomes one report row per model, named ``MODEL@DEVICE`` with ``device`` set. Its
latency entries are the device's; its ``accuracy`` is the run's test accuracy plus the device's
difference from the host on the bundle's samples (the same images, the host's predictions stored
in the bundle), so identical predictions give exactly the host's accuracy and a numeric problem on
the device shows as a drop, while a subset's sampling noise does not. The raw figures stay in the
row (``samples_accuracy``, ``host_samples_accuracy``, ``prediction_agreement``).

``device_verdicts`` re-checks the deployed model's budgets on each device: latency at the budget's
batch size and threads as measured there, accuracy as above, size. A device that did not measure
the deployed model, or measured another file than the run's current one, fails.

Every result merged is kept in ``<report dir>/devices/<device>.json``: a pipeline re-run rewrites
report.json, and ``merge_stored`` (``compresskit report RUN``) merges them again. No torch, no
onnxruntime.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from compresskit.artifacts import atomic_write_json, atomic_write_text
from compresskit.budget import check_model, find_latency, normalize_budgets
from compresskit.envinfo import peak_macs
from compresskit.report.render import REPORT_JSON, REPORT_MD, _md_table, fmt_peak_fraction, fmt_size, render_markdown

DEVICE_RESULT_SCHEMA = "compresskit.device-result"
DEVICE_RESULT_SCHEMA_VERSION = 1
DEVICES_DIR = "devices"
DEVICE_BUDGETS_FILE = "budgets.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DeviceResultError(ValueError):
    """A device result that cannot be merged (wrong file, schema, run or name)."""


def load_device_result(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DeviceResultError(f"{path}: file not found")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DeviceResultError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(result, dict) or result.get("schema") != DEVICE_RESULT_SCHEMA:
        raise DeviceResultError(f"{path}: not a device result (schema != {DEVICE_RESULT_SCHEMA!r}); "
                                "make it with the bundle's bench.py --json")
    if result.get("schema_version") != DEVICE_RESULT_SCHEMA_VERSION:
        raise DeviceResultError(f"{path}: device-result schema_version {result.get('schema_version')!r}; "
                                f"this compresskit reads version {DEVICE_RESULT_SCHEMA_VERSION}")
    return result


def device_name(result: Mapping, override: str | None = None) -> str:
    name = override or (result.get("device") or {}).get("name") or "device"
    if not _NAME.match(name) or "@" in name:
        raise DeviceResultError(f"device name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu_for_peak(device: Mapping) -> dict:
    cpu = dict(device.get("cpu") or {})
    cpu.setdefault("architecture", device.get("machine"))
    return cpu


def _host_model(name: str) -> tuple[str, str]:
    """(host row name, format) of a device model name (``ptq.ort`` -> ``ptq``, ort)."""
    return (name[:-4], "ort") if name.endswith(".ort") else (name, "onnx")


def device_rows(report: Mapping, result: Mapping, name: str, run_dir: str | os.PathLike | None = None) -> list[dict]:
    """One report row per model of ``result``, named ``MODEL@name``."""
    host_rows = {r["name"]: r for r in report.get("rows", []) if not r.get("device")}
    device = result.get("device") or {}
    cpu = _cpu_for_peak(device)
    rows = []
    for m in result.get("models", []):
        host_name, fmt = _host_model(m["name"])
        host = host_rows.get(host_name, {})
        ev = m.get("eval") or {}
        samples_acc, host_samples_acc = ev.get("accuracy"), ev.get("reference_accuracy")
        if samples_acc is not None and host_samples_acc is not None and host.get("accuracy") is not None:
            accuracy = min(1.0, max(0.0, host["accuracy"] + samples_acc - host_samples_acc))
            source = (f"run's test accuracy {host['accuracy']:.2%} + device - host on {ev.get('n')} samples "
                      f"({(samples_acc - host_samples_acc) * 100:+.2f} pt)")
        elif samples_acc is not None:
            accuracy, source = samples_acc, f"device on {ev.get('n')} samples (no host reference)"
        else:
            accuracy, source = None, "not measured on the device"
        precision = host.get("precision")
        latency = []
        for entry in m.get("latency") or []:
            e = dict(entry)
            macs = host.get("macs")
            if macs and e.get("p50_ms"):
                e["gmacs"] = macs * e["batch_size"] / (e["p50_ms"] / 1e3) / 1e9
                peak = peak_macs(cpu, "int8" if precision == "int8" else "fp32", int(e.get("threads") or 0))
                e["peak_fraction"] = e["gmacs"] / peak["peak_gmacs"] if peak["peak_gmacs"] else None
                e["device_peak"] = peak  # not "peak": the report's Environment lists the host's peaks
            latency.append(e)
        matches_run = None
        source_file = m.get("bundle_source")
        if run_dir is not None and source_file and fmt == "onnx":
            current = _sha256(Path(run_dir) / source_file)
            matches_run = None if current is None else current == m.get("sha256")
        notes = []
        if matches_run is False:
            notes.append(f"measured a different {source_file} than the run's current one (sha256 differs)")
        agreement = ev.get("reference_agreement")
        if agreement is not None and agreement < 1.0:
            notes.append(f"{ev.get('reference_mismatches')} of {ev.get('n')} predictions differ from the host's")
        rows.append({
            "name": f"{m['name']}@{name}",
            "device": name,
            "model": host_name,
            "format": fmt,
            "stage": host.get("stage"),
            "precision": precision,
            "int8": host.get("int8"),
            "size_bytes": m.get("size_bytes", host.get("size_bytes")),
            "macs": host.get("macs"),
            "params": host.get("params"),
            "nonzero_params": host.get("nonzero_params"),
            "accuracy": accuracy,
            "accuracy_source": source,
            "top5": None,
            "samples_accuracy": samples_acc,
            "samples_top5": ev.get("top5"),
            "samples_n": ev.get("n"),
            "host_samples_accuracy": host_samples_acc,
            "prediction_agreement": agreement,
            "delta_accuracy_vs_teacher": None,
            "latency": latency,
            "latency_skipped": m.get("latency_skipped") or [],
            "load_ms": m.get("load_ms"),
            "peak_rss_mib": m.get("peak_rss_mib_after"),
            "providers": m.get("providers_used"),
            "sha256": m.get("sha256"),
            "matches_run": matches_run,
            "stale": matches_run is False,
            "measured": result.get("created"),
            "notes": "; ".join(notes) or None,
        })
    _derive_on_device(rows, report)
    return rows


def _derive_on_device(rows: list[dict], report: Mapping) -> None:
    """Accuracy delta vs the reference model (on the host) and speed-up vs the reference model
    measured on the same device, when it was."""
    ref_name = report.get("reference_model")
    ref_host = next((r for r in report.get("rows", []) if r["name"] == ref_name and not r.get("device")), None)
    ref_dev = next((r for r in rows if r["model"] == ref_name and r["format"] == "onnx"), None)
    for row in rows:
        if row["accuracy"] is not None and ref_host and ref_host.get("accuracy") is not None:
            row["delta_accuracy_vs_teacher"] = (row["accuracy"] - ref_host["accuracy"]) * 100
        for e in row["latency"]:
            ref_e = find_latency(ref_dev, e["batch_size"], e.get("threads")) if ref_dev else None
            e["speedup_vs_teacher"] = ref_e["p50_ms"] / e["p50_ms"] if ref_e and e.get("p50_ms") else None


# --------------------------------------------------------------------------- verdicts


def device_budgets(report: Mapping, overrides: Mapping | None = None) -> dict:
    """The run's resolved budgets (from its verdict) with device overrides (e.g. a latency limit
    for a slower board) applied."""
    b = dict((report.get("verdict") or {}).get("budgets") or {})
    b.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return normalize_budgets(b)


def device_verdicts(report: Mapping, budgets: Mapping | None = None) -> dict:
    """Per device: pass/fail of the deployed model's budgets at the device's measurements.

    ``budgets`` (resolved, as in the report's verdict) default to the run's, with the overrides
    in ``report["device_budgets"]``. Each verdict: ``passed``, ``model``, ``row``, ``checks``
    (as ``budget.check_model``), ``reason``, and ``would_deploy`` (the model the run's policy
    would pick from the device's rows, when every candidate was measured there).
    """
    verdict = report.get("verdict") or {}
    model = verdict.get("model")
    b = dict(budgets) if budgets is not None else device_budgets(report, report.get("device_budgets"))
    reference_accuracy = verdict.get("reference_accuracy")
    rows = [r for r in report.get("rows", []) if r.get("device")]
    out = {}
    for dev in sorted({r["device"] for r in rows}):
        dev_rows = {r["model"]: r for r in rows if r["device"] == dev and r.get("format", "onnx") == "onnx"}
        row = dev_rows.get(model)
        if row is None:
            out[dev] = {"device": dev, "model": model, "row": None, "passed": False, "checks": [], "budgets": b,
                        "reason": f"the deployed model {model!r} was not measured on {dev}"}
            continue
        result = check_model(row, b, reference_accuracy)
        checks = list(result["checks"])
        if row.get("stale"):
            checks.append({"budget": "same_model", "limit": None, "value": None, "passed": False,
                           "detail": row.get("notes") or "measured another file than the run's deployed model"})
        passed = all(c["passed"] for c in checks)
        failed = "; ".join(c["detail"] for c in checks if not c["passed"])
        reason = (f"{row['name']} meets every budget" if passed and checks else
                  f"{row['name']}: no budgets set" if passed else f"{row['name']} fails: {failed}")
        entry = {"device": dev, "model": model, "row": row["name"], "passed": passed, "checks": checks,
                 "budgets": b, "reason": reason, "prediction_agreement": row.get("prediction_agreement"),
                 "measured": row.get("measured"), "would_deploy": None}
        candidates = [c["model"] for c in verdict.get("checks", [])]
        if candidates and all(c in dev_rows for c in candidates):
            renamed = [{**dev_rows[c], "name": c} for c in candidates]
            results = [check_model(r, b, reference_accuracy) for r in renamed]
            choice = _choose(renamed, results, candidates, b)
            entry["would_deploy"] = {"model": choice["model"], "passed": choice["passed"], "reason": choice["reason"]}
        out[dev] = entry
    return out


def recheck_devices(report: Mapping, overrides: Mapping | None = None,
                    device_max_latency_ms: float | None = None) -> dict:
    """Device verdicts for ``compresskit check``: the run's budgets with the stored device
    overrides, then ``overrides`` (check's own --min-accuracy etc.) except the latency ones (a
    host latency limit does not fit a slower board), then ``device_max_latency_ms``."""
    b = device_budgets(report, report.get("device_budgets"))
    latency_keys = ("max_latency_ms", "latency_batch_size", "latency_threads")
    b.update({k: v for k, v in (overrides or {}).items() if v is not None and k not in latency_keys})
    if device_max_latency_ms is not None:
        b["max_latency_ms"] = device_max_latency_ms
    return device_verdicts(report, normalize_budgets(b))


def _choose(rows: Sequence[Mapping], results: Sequence[Mapping], candidates: Sequence[str], b: Mapping) -> dict:
    passing = [i for i, r in enumerate(results) if r["passed"]]

    def p50(i: int) -> float:
        e = find_latency(rows[i], b["latency_batch_size"], b["latency_threads"])
        return e["p50_ms"] if e else float("inf")

    if passing:
        best = min(passing, key=lambda i: (p50(i), i))
        return {"model": candidates[best], "passed": True,
                "reason": f"the fastest of {len(passing)} candidate(s) meeting all budgets there "
                          f"(p50 {p50(best):.3f} ms at batch {b['latency_batch_size']})"}
    best = max(range(len(rows)), key=lambda i: (rows[i].get("accuracy") or -1, -i))
    return {"model": candidates[best], "passed": False,
            "reason": "no candidate meets all budgets there; the most accurate is named"}


# --------------------------------------------------------------------------- merging


def merge_devices(
    report: Mapping,
    results: Mapping[str, Mapping],
    *,
    run_dir: str | os.PathLike | None = None,
    budget_overrides: Mapping | None = None,
) -> dict:
    """A copy of ``report`` whose device rows are exactly those of ``results`` ({device name:
    result}), with ``devices`` (what each device is), ``device_budgets`` and ``device_verdicts``."""
    rep = copy.deepcopy(dict(report))
    run = rep.get("run")
    for name, result in results.items():
        measured_for = (result.get("bundle") or {}).get("run")
        if measured_for and run and measured_for != run:
            raise DeviceResultError(f"device {name}: the result was measured with a bundle of run {measured_for!r}, "
                                    f"not {run!r}")
    rep["rows"] = [r for r in rep.get("rows", []) if not r.get("device")]
    devices = {}
    for name in sorted(results):
        result = results[name]
        rep["rows"] += device_rows(rep, result, name, run_dir)
        dev = result.get("device") or {}
        devices[name] = {"device": dev, "onnxruntime": result.get("onnxruntime"), "settings": result.get("settings"),
                         "memory": result.get("memory"), "quiet": result.get("quiet"),
                         "created": result.get("created"),
                         "bundle": result.get("bundle")}
    rep["devices"] = devices
    rep["device_budgets"] = {k: v for k, v in (budget_overrides or {}).items() if v is not None}
    rep["device_verdicts"] = device_verdicts(rep)
    return rep


def stored_results(report_dir: str | os.PathLike) -> dict[str, dict]:
    folder = Path(report_dir) / DEVICES_DIR
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name == DEVICE_BUDGETS_FILE:
            continue
        out[path.stem] = load_device_result(path)
    return out


def stored_budget_overrides(report_dir: str | os.PathLike) -> dict:
    path = Path(report_dir) / DEVICES_DIR / DEVICE_BUDGETS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def add_devices(
    report_path: str | os.PathLike,
    result_files: Sequence[tuple[str | None, str | os.PathLike]] = (),
    *,
    run_dir: str | os.PathLike | None = None,
    budget_overrides: Mapping | None = None,
) -> dict:
    """Merge device results into ``report_path`` (report.json) and write report.json/report.md.

    ``result_files`` are (name or None, path): a given name overrides the device's own. The
    results are stored in ``devices/<name>.json`` next to the report (replacing an earlier result
    of the same device); every stored result is merged, so this with no files re-merges after a
    pipeline re-run. ``budget_overrides`` (e.g. ``{"max_latency_ms": 8}``) apply to the device
    verdicts only and are stored too. Returns the merged report.
    """
    from compresskit.report import load_report

    report_path = Path(report_path)
    report = load_report(report_path)
    report_dir = report_path.parent
    results = stored_results(report_dir)
    new = {}
    for override, path in result_files:
        result = load_device_result(path)
        name = device_name(result, override)
        if name in new:
            raise DeviceResultError(f"two results for device {name!r}: pass NAME=result.json to tell them apart")
        new[name] = result
    results.update(new)
    overrides = {**stored_budget_overrides(report_dir), **{k: v for k, v in (budget_overrides or {}).items()
                                                            if v is not None}}
    merged = merge_devices(report, results, run_dir=run_dir, budget_overrides=overrides)
    folder = report_dir / DEVICES_DIR
    for name, result in new.items():
        atomic_write_json(folder / f"{name}.json", result)
    if budget_overrides:
        atomic_write_json(folder / DEVICE_BUDGETS_FILE, overrides)
    write_report_with_devices(report_dir, merged)
    return merged


# --------------------------------------------------------------------------- rendering


def _f(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_devices_markdown(report: Mapping) -> list[str]:
    devices = report.get("devices") or {}
    if not devices:
        return []
    lines = ["## Devices", "",
             "Measured on each device with the bundle's `bench.py` (onnxruntime, numpy only). Accuracy: the run's "
             "test accuracy plus the device's difference from the host on the bundle's samples; 'same as host' "
             "counts identical argmax predictions. 'Other cores busy': other processes' CPU time over the "
             "measurement's wall time; above 0.1 the latencies are not trustworthy.", ""]
    body = []
    for name, d in devices.items():
        dev, cpu = d.get("device") or {}, (d.get("device") or {}).get("cpu") or {}
        ort = d.get("onnxruntime") or {}
        busy = (d.get("quiet") or {}).get("other_cores_busy")
        body.append([name, dev.get("board") or "-", cpu.get("model") or "-", dev.get("machine") or "-",
                     f"{cpu.get('usable_cores', '-')}", ", ".join(cpu.get("isa_flags") or []) or "-",
                     dev.get("platform") or "-", ort.get("version") or "-",
                     _f(busy, ".2f") + (" (NOT quiet)" if busy is not None and busy > 0.1 else ""),
                     d.get("created") or "-"])
    lines += _md_table(["device", "board", "CPU", "arch", "cores", "ISA flags", "OS", "onnxruntime",
                        "other cores busy", "measured"], body)
    body = []
    for row in report.get("rows", []):
        if not row.get("device"):
            continue
        first = (row.get("latency") or [None])[0]
        for e in row.get("latency") or []:
            body.append([row["name"], e["batch_size"], e.get("threads", "-"), _f(e.get("p50_ms"), ".3f"),
                         _f(e.get("p90_ms"), ".3f"), _f(e.get("p99_ms"), ".3f"), _f(e.get("throughput"), ".1f"),
                         fmt_peak_fraction(e.get("peak_fraction")),
                         _f(row.get("accuracy") and row["accuracy"] * 100, ".2f", "%") if e is first else "",
                         (f"{row['samples_accuracy']:.2%} / {row['host_samples_accuracy']:.2%}"
                          if e is first and row.get("samples_accuracy") is not None
                          and row.get("host_samples_accuracy") is not None else ""),
                         _f(row.get("prediction_agreement") and row["prediction_agreement"] * 100, ".1f", "%")
                         if e is first else "",
                         _f(row.get("load_ms"), ".1f") if e is first else "",
                         _f(row.get("peak_rss_mib"), ".1f") if e is first else "",
                         fmt_size(row.get("size_bytes")) if e is first else ""])
    if body:
        lines += ["", *_md_table(["row", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "samples/s", "% of peak",
                                   "accuracy", "samples: device / host", "same as host", "load ms", "peak MiB",
                                   "size"], body)]
    notes = [(r["name"], r["notes"]) for r in report.get("rows", []) if r.get("device") and r.get("notes")]
    if notes:
        lines += ["", *[f"- `{n}`: {t}" for n, t in notes]]
    verdicts = report.get("device_verdicts") or {}
    if verdicts:
        lines += ["", "### Budgets on the devices", ""]
        overrides = report.get("device_budgets") or {}
        if overrides:
            lines += ["Device budget overrides: " + ", ".join(f"{k} {v}" for k, v in overrides.items()), ""]
        for dev, v in verdicts.items():
            head = "PASS" if v["passed"] else "FAIL"
            lines.append(f"- **{dev}: {head}**, `{v.get('model')}`: {v.get('reason')}")
            if v.get("would_deploy"):
                w = v["would_deploy"]
                lines.append(f"  - the run's policy on {dev}'s measurements would deploy `{w['model']}` "
                             f"({'passes' if w['passed'] else 'fails'}: {w['reason']})")
        rows = [[dev, c["budget"], c["detail"], "pass" if c["passed"] else "FAIL"]
                for dev, v in verdicts.items() for c in v.get("checks", [])]
        if rows:
            lines += ["", *_md_table(["device", "budget", "check", "result"], rows)]
    return lines


def write_report_with_devices(report_dir: str | os.PathLike, report: Mapping) -> tuple[Path, Path]:
    """report.json, report.md (the run's Markdown plus the Devices section) and report.html,
    atomically."""
    from compresskit.report.html import write_html

    report_dir = Path(report_dir)
    json_path = atomic_write_json(report_dir / REPORT_JSON, report)
    text = render_markdown(report).rstrip("\n") + "\n\n" + "\n".join(render_devices_markdown(report)) + "\n"
    md_path = atomic_write_text(report_dir / REPORT_MD, text)
    write_html(report_dir, report)
    return json_path, md_path


def render_device_verdicts(report: Mapping) -> str:
    """Plain text, one line per device (for the console)."""
    verdicts = report.get("device_verdicts") or {}
    if not verdicts:
        return "no device results"
    lines = []
    for dev, v in verdicts.items():
        lines.append(f"device {dev}: {'PASS' if v['passed'] else 'FAIL'}: {v.get('reason')}")
        for c in v.get("checks", []):
            lines.append(f"  {c['budget']:<18} {'pass' if c['passed'] else 'FAIL'}  {c['detail']}")
        if v.get("would_deploy"):
            lines.append(f"  on {dev} the run's policy would deploy {v['would_deploy']['model']!r}")
    return "\n".join(lines)


def run_dir_of(report_path: str | os.PathLike) -> Path | None:
    """The run's models folder (``models_dir/run`` of the report's config, as recorded relative to
    the directory the run was started from), if it is here; used to check device results measured
    the run's current files."""
    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config, run = report.get("config") or {}, report.get("run")
    if not run or not config.get("models_dir"):
        return None
    candidate = Path(config["models_dir"]) / run
    return candidate if (candidate / "report").is_dir() else None
