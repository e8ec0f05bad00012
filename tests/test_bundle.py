"""Device bundles: the bundle's contents, its torch-free runner, merging device results into the
report with per-device budget verdicts, and the ssh round trip against a local sshd.

A fake run (two tiny ONNX classifiers made with onnx.helper and a report from build_report) keeps
this fast; nothing here trains a model.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from compresskit import bundle_runner
from compresskit.budget import decide, resolve_budgets
from compresskit.bundle import BundleError, make_bundle, ssh_bench
from compresskit.cli import app
from compresskit.report import build_report, load_report, write_report
from compresskit.report.device import add_devices, load_device_result

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"torch", "torchvision", "torchao", "torch_pruning", "compresskit"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in this test: import of {name!r}")
            return None

    sys.meta_path.insert(0, Block())
    """
)
PRE = {"scale": 1 / 255, "mean": [0.5], "std": [0.25], "layout": "NCHW", "channels": 1, "size": [8, 8]}
LABELS = ["a", "b", "c"]


def _model(path: Path, seed: int, metrics: dict | None = None) -> Path:
    """A 3-class linear classifier on 1x8x8 inputs with compresskit's metadata."""
    w = np.random.default_rng(seed).standard_normal((64, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"compresskit.preprocess": json.dumps(PRE), "compresskit.labels": json.dumps(LABELS)}
    if metrics:
        meta["compresskit.metrics"] = json.dumps(metrics)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, path)
    return path


def _row(name: str, acc: float, p50: float, precision: str = "fp32") -> dict:
    return {"name": name, "precision": precision, "accuracy": acc, "size_bytes": 400, "macs": 48, "params": 48,
            "latency": [{"batch_size": 1, "threads": 1, "threads_setting": 1, "p50_ms": p50, "p90_ms": p50},
                        {"batch_size": 4, "threads": 1, "threads_setting": 1, "p50_ms": 4 * p50, "p90_ms": 4 * p50}]}


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> dict:
    """models/fake/{export,report} and reports/fake/report.json as a pipeline run leaves them."""
    root = tmp_path_factory.mktemp("proj")
    run_dir = root / "models" / "fake"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "report").mkdir()
    _model(run_dir / "export" / "teacher.onnx", 3)
    _model(run_dir / "export" / "pruned.onnx", 1)
    _model(run_dir / "export" / "ptq.onnx", 2)
    budgets = {"min_accuracy": 0.5, "max_latency_ms": 1.0}
    rows = [_row("teacher", 0.95, 0.5), _row("pruned", 0.9, 0.2), _row("ptq", 0.89, 0.1, "int8")]
    verdict = decide(rows, resolve_budgets(budgets, [1]))
    assert verdict["model"] == "ptq"
    _model(run_dir / "report" / "deployed.onnx", 2, metrics={"model": "ptq", "run": "fake"})
    data = {"dataset": "synthetic", "synthetic": {"num_train": 32, "num_test": 24, "num_classes": 3, "image_size": 8}}
    config = {"name": "fake", "seed": 0, "data": data, "budgets": budgets,
              "bench": {"batch_sizes": [1, 4], "threads": [1]}}
    report = build_report(run="fake", config=config, rows=rows, verdict=verdict, environment={}, stages=[])
    report_json, _ = write_report(root / "reports" / "fake", report)
    (run_dir / "report" / "metrics.json").write_text(json.dumps({"report_json": str(report_json)}))
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(run_dir / "report" / "deployed.onnx"), providers=["CPUExecutionProvider"])
    y = np.argmax(sess.run(None, {"input": x})[0], axis=1)
    y[:4] = (y[:4] + 1) % 3  # 90% accuracy on the samples for the deployed model
    np.savez(root / "samples.npz", x=x, y=y)
    return {"root": root, "run_dir": run_dir, "report_json": report_json, "samples": root / "samples.npz",
            "report": report}


@pytest.fixture(scope="module")
def rpi_bundle(fake_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "fake-rpi"
    make_bundle(fake_run["run_dir"], "rpi", out, all_models=True, samples_from=fake_run["samples"])
    return out


def _run_runner(bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """bench.py in a fresh interpreter where torch and compresskit cannot be imported."""
    code = BLOCKER + textwrap.dedent(f"""
        import runpy
        sys.argv = [{str(bundle / 'bench.py')!r}, *{list(args)!r}]
        sys.path = [p for p in sys.path if p not in ('', '.')]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": ""})


@pytest.fixture(scope="module")
def device_result(rpi_bundle, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dev")
    proc = _run_runner(rpi_bundle, "--json", str(work / "result.json"), "--max-seconds", "0.05", "--min-runs", "3",
                       "--warmup", "1", "--device-name", "testdev", "--predictions", str(work / "preds.npz"), "-q",
                       cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "blocked" not in proc.stderr
    return work / "result.json"


# --------------------------------------------------------------------------- the bundle


def test_bundle_contents_and_zip(fake_run, rpi_bundle):
    files = {p.name for p in rpi_bundle.iterdir()}
    assert {"bench.py", "bundle.json", "README.md", "samples.npz", "preprocess.json", "ptq.onnx", "pruned.onnx",
            "teacher.onnx"} <= files
    assert not any(f.endswith(".ort") for f in files)  # no .ort for a Raspberry Pi
    manifest = json.loads((rpi_bundle / "bundle.json").read_text())
    assert manifest["deployed"] == "ptq" and manifest["models"][0]["name"] == "ptq"
    assert manifest["models"][0]["source"] == "report/deployed.onnx"
    assert manifest["models"][0]["sha256"] == bundle_runner.sha256(fake_run["run_dir"] / "report" / "deployed.onnx")
    assert manifest["defaults"] == {"batch_sizes": [1, 4], "threads": [1]}
    assert manifest["preprocess"] == PRE and manifest["labels"] == LABELS
    assert (rpi_bundle / "bench.py").read_text() == Path(bundle_runner.__file__).read_text()
    with np.load(rpi_bundle / "samples.npz") as npz:
        assert npz["x"].dtype == np.float32 and npz["x"].shape == (40, 1, 8, 8)
        assert {"ref_pred__ptq", "ref_pred__pruned", "ref_pred__teacher"} <= set(npz.files)
    assert manifest["models"][0]["host_samples_accuracy"] == pytest.approx(0.9)
    readme = (rpi_bundle / "README.md").read_text()
    for needle in ("python3 -m venv", "pip install numpy onnxruntime", "bench.py --json result.json",
                   "x = (pixel * 1/255 - mean) / std", "compresskit report models/fake --add-device result.json"):
        assert needle in readme
    with zipfile.ZipFile(rpi_bundle.with_name("fake-rpi.zip")) as zf:
        names = set(zf.namelist())
    assert {f"fake-rpi/{f}" for f in files} == names


def test_mobile_bundle_has_ort_that_loads(fake_run, tmp_path):
    out = tmp_path / "fake-android"
    manifest = make_bundle(fake_run["run_dir"], "android", out, samples_from=fake_run["samples"])
    entry = manifest["models"][0]
    assert entry["ort"]["fixed"]["agreement_with_onnx"] == 1.0
    for style in ("fixed", "runtime"):
        path = out / entry["ort"][style]["file"]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})[0].shape == (2, 3)
    assert (out / "ptq.required_operators.config").is_file()
    readme = (out / "README.md").read_text()
    assert "onnxruntime-android" in readme and "CoreML" in readme and "does not run on a phone" in readme


def test_bundle_bad_inputs(fake_run, tmp_path):
    with pytest.raises(BundleError, match="--target"):
        make_bundle(fake_run["run_dir"], "esp32", tmp_path / "o", samples_from=fake_run["samples"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 1, 5, 5), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(BundleError, match="expects"):
        make_bundle(fake_run["run_dir"], "rpi", tmp_path / "o", samples_from=bad)
    np.savez(bad, x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([0, 1, 7]))
    with pytest.raises(BundleError, match="has 3 classes"):
        make_bundle(fake_run["run_dir"], "rpi", tmp_path / "o", samples_from=bad)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(BundleError, match="not a bundle"):
        make_bundle(fake_run["run_dir"], "rpi", tmp_path / "busy", samples_from=fake_run["samples"])
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


def test_bundle_rebuilds_test_samples_from_the_run_config(fake_run, tmp_path):
    """With torch, the samples are the first N of the run's test split (from report.json's config)."""
    from compresskit.config import DataConfig
    from compresskit.data import load_data

    manifest = make_bundle(fake_run["run_dir"], "x86", tmp_path / "b", samples=10)
    x_ref, y_ref = load_data(DataConfig.model_validate(fake_run["report"]["config"]["data"]), 0).numpy_split("test")
    with np.load(tmp_path / "b" / "samples.npz") as npz:
        assert np.array_equal(npz["x"], x_ref[:10]) and np.array_equal(npz["y"], y_ref[:10])
    assert manifest["samples"]["n"] == 10 and "test split" in manifest["samples"]["source"]


def test_bundle_without_torch_says_use_samples_from(fake_run, tmp_path):
    """Without torch the test set cannot be rebuilt: one line pointing at --samples-from; with
    it the bundle is made."""
    blocker = BLOCKER.replace('"compresskit"}', "}")
    code = blocker + textwrap.dedent(f"""
        from compresskit.cli import app
        sys.argv = ["compresskit", "bundle", {str(fake_run['run_dir'])!r}, "--target", "x86", "-o",
                    {str(tmp_path / 'b')!r}, *sys.argv[1:]]
        app()
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "torch is not installed here" in proc.stderr and "--samples-from" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-c", code, "--samples-from", str(fake_run["samples"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "samples.npz").is_file()
    code = blocker + "import compresskit.bundle, compresskit.report.device, compresskit.bundle_runner\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


# --------------------------------------------------------------------------- the runner


def test_runner_imports_only_numpy_onnxruntime_stdlib():
    tree = ast.parse(Path(bundle_runner.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names - set(sys.stdlib_module_names) == {"numpy", "onnxruntime"}


def test_runner_result_without_torch_or_compresskit(device_result, rpi_bundle):
    result = load_device_result(device_result)
    assert result["schema"] == "compresskit.device-result" and result["schema_version"] == 1
    dev = result["device"]
    assert dev["name"] == "testdev" and dev["machine"] and dev["python"] and dev["cpu"]["usable_cores"] >= 1
    assert isinstance(dev["cpu"]["isa"], dict)
    assert result["onnxruntime"]["version"] == ort.__version__
    assert "CPUExecutionProvider" in result["onnxruntime"]["available_providers"]
    assert [m["name"] for m in result["models"]] == ["ptq", "teacher", "pruned"]
    ptq = result["models"][0]
    assert ptq["providers_used"] == ["CPUExecutionProvider"] and ptq["matches_bundle"] is True
    assert ptq["load_ms"] > 0 and ptq["peak_rss_mib_after"] > 0 and result["memory"]["peak_rss_mib"] > 0
    assert [(e["batch_size"], e["threads"]) for e in ptq["latency"]] == [(1, 1), (4, 1)]
    for e in ptq["latency"]:
        assert 0 < e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] and e["runs"] >= 3
    assert ptq["accuracy"] == pytest.approx(0.9)
    assert ptq["eval"]["reference_agreement"] == 1.0 and ptq["eval"]["n"] == 40
    preds = np.load(device_result.parent / "preds.npz")
    with np.load(rpi_bundle / "samples.npz") as npz:
        assert np.array_equal(preds["ptq"], npz["ref_pred__ptq"])


def test_runner_unknown_provider_is_one_line(rpi_bundle, tmp_path):
    proc = _run_runner(rpi_bundle, "--providers", "NoSuchExecutionProvider", "--json", str(tmp_path / "r.json"),
                       cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "NoSuchExecutionProvider" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_runner_device_names():
    pi5 = ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics asimdrdm lrcpc dcpop asimddp\n"
           "CPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    info = bundle_runner.device_info(cpuinfo_text=pi5, board_text="", machine="aarch64")
    assert info["name"] == "rpi5" and info["cpu"]["model"] == "Cortex-A76"
    assert info["cpu"]["isa"] == {"asimd": True, "asimddp": True, "i8mm": False, "sve": False, "sve2": False,
                                  "bf16": False} and info["cpu"]["int8_dot"]
    x86 = "model name\t: AMD EPYC 9B14 96-Core Processor\nflags\t\t: fpu avx2 avx512f avx512_vnni\nmodel\t: 17\n"
    info = bundle_runner.device_info(cpuinfo_text=x86, board_text="", machine="x86_64")
    assert info["name"] == "amd-epyc-9b14" and info["board"] is None
    assert info["cpu"]["isa_flags"] == ["avx2", "avx512f", "avx512_vnni"]


# --------------------------------------------------------------------------- merging


def _fresh_report(fake_run, tmp_path) -> tuple[Path, Path]:
    """A private copy of the run (report and run folder) so merges do not leak between tests."""
    reports = tmp_path / "reports" / "fake"
    shutil.copytree(fake_run["report_json"].parent, reports)
    run_dir = tmp_path / "models" / "fake"
    shutil.copytree(fake_run["run_dir"], run_dir)
    (run_dir / "report" / "metrics.json").write_text(json.dumps({"report_json": str(reports / "report.json")}))
    return run_dir, reports / "report.json"


def _slow_copy(result_path: Path, tmp_path: Path, factor: float, name: str) -> Path:
    result = json.loads(result_path.read_text())
    result["device"]["name"] = name
    for m in result["models"]:
        for e in m["latency"]:
            e["p50_ms"] = factor
    out = tmp_path / f"{name}.json"
    out.write_text(json.dumps(result))
    return out


def test_add_device_rows_and_verdicts(fake_run, device_result, tmp_path):
    run_dir, report_json = _fresh_report(fake_run, tmp_path)
    slow = _slow_copy(device_result, tmp_path, 5.0, "slowpi")  # p50 5 ms > the 1 ms budget
    proc = CliRunner().invoke(app, ["report", str(run_dir), "--add-device", str(device_result),
                                    "--add-device", str(slow)])
    assert proc.exit_code == 1, proc.output  # slowpi fails the latency budget
    rep = load_report(report_json)
    names = [r["name"] for r in rep["rows"]]
    assert {"ptq@testdev", "pruned@testdev", "teacher@testdev", "ptq@slowpi"} <= set(names)
    row = next(r for r in rep["rows"] if r["name"] == "ptq@testdev")
    assert row["device"] == "testdev" and row["model"] == "ptq" and row["matches_run"] is True
    assert row["accuracy"] == pytest.approx(0.89)  # the run's test accuracy, device == host on the samples
    assert row["prediction_agreement"] == 1.0 and row["samples_accuracy"] == pytest.approx(0.9)
    v = rep["device_verdicts"]
    assert v["testdev"]["passed"] and v["testdev"]["model"] == "ptq"
    assert {c["budget"] for c in v["testdev"]["checks"]} == {"min_accuracy", "max_latency_ms"}
    assert v["testdev"]["would_deploy"]["model"] in {"ptq", "pruned"}
    assert not v["slowpi"]["passed"] and "p50 5.000 ms > 1 ms" in v["slowpi"]["reason"]
    md = report_json.with_name("report.md").read_text()
    assert "## Devices" in md and "ptq@testdev" in md and "**slowpi: FAIL**" in md
    assert "ptq@testdev" in report_json.with_name("report.html").read_text()
    assert (report_json.parent / "devices" / "testdev.json").is_file()
    assert rep["verdict"]["model"] == "ptq" and rep["verdict"]["passed"]  # the host verdict is untouched

    # a device-only latency budget, kept for later merges
    proc = CliRunner().invoke(app, ["report", str(run_dir), "--max-latency-ms", "6"])
    assert proc.exit_code == 0, proc.output
    assert load_report(report_json)["device_verdicts"]["slowpi"]["passed"]

    # a pipeline re-run rewrites report.json: `compresskit report RUN` merges the stored results again
    write_report(report_json.parent, fake_run["report"])
    assert not any(r.get("device") for r in load_report(report_json)["rows"])
    assert CliRunner().invoke(app, ["report", str(run_dir)]).exit_code == 0
    rep = load_report(report_json)
    assert {"ptq@testdev", "ptq@slowpi"} <= {r["name"] for r in rep["rows"]}


def test_device_verdict_fails_on_stale_or_missing_model(fake_run, device_result, tmp_path):
    run_dir, report_json = _fresh_report(fake_run, tmp_path)
    result = json.loads(device_result.read_text())
    result["models"] = [m for m in result["models"] if m["name"] != "ptq"]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(result))
    _model(run_dir / "report" / "deployed.onnx", 7)  # the run deployed another file since the bundle
    rep = add_devices(report_json, [("nodeploy", missing), (None, device_result)], run_dir=run_dir)
    assert not rep["device_verdicts"]["nodeploy"]["passed"]
    assert "was not measured on nodeploy" in rep["device_verdicts"]["nodeploy"]["reason"]
    stale = rep["device_verdicts"]["testdev"]
    assert not stale["passed"] and any(c["budget"] == "same_model" and not c["passed"] for c in stale["checks"])


def test_recheck_devices_for_check(fake_run, device_result, tmp_path):
    """What `check` can call: its accuracy overrides apply to the devices, its host latency limit does not."""
    from compresskit.report.device import recheck_devices

    run_dir, report_json = _fresh_report(fake_run, tmp_path)
    rep = add_devices(report_json, [(None, device_result)], run_dir=run_dir)
    assert recheck_devices(rep)["testdev"]["passed"]
    assert recheck_devices(rep, {"max_latency_ms": 1e-6})["testdev"]["passed"]
    assert not recheck_devices(rep, {"min_accuracy": 0.95})["testdev"]["passed"]
    assert not recheck_devices(rep, device_max_latency_ms=1e-6)["testdev"]["passed"]


def test_add_device_rejects_other_files(fake_run, tmp_path):
    _, report_json = _fresh_report(fake_run, tmp_path)
    proc = CliRunner().invoke(app, ["report", str(report_json), "--add-device", str(report_json)])
    assert proc.exit_code == 2 and "not a device result" in proc.output


def test_bench_records_providers(fake_run):
    from compresskit.bench import bench_model

    res = bench_model(fake_run["run_dir"] / "export" / "ptq.onnx", batch_sizes=(1,), warmup=1, min_runs=2,
                      max_seconds=0.01, providers=["CPUExecutionProvider"])
    assert res["providers"] == ["CPUExecutionProvider"] and res["providers_used"] == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="not available"):
        bench_model(fake_run["run_dir"] / "export" / "ptq.onnx", batch_sizes=(1,), providers=["NoSuchProvider"])


# --------------------------------------------------------------------------- over ssh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_sshd(tmp_path):
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd/ssh not installed (apt-get install openssh-server)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    auth = keys / "authorized_keys"
    shutil.copyfile(keys / "client.pub", auth)
    auth.chmod(0o600)
    port = _free_port()
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([sshd, "-D", "-e", "-p", str(port), "-h", str(keys / "host"),
                             "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={auth}",
                             "-o", "PasswordAuthentication=no", "-o", "StrictModes=no",
                             "-o", "PidFile=none", "-o", "UsePAM=no", "-o", "PermitRootLogin=yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(50):
        if proc.poll() is not None:
            pytest.skip(f"sshd did not start: {proc.stderr.read().strip()[-200:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield {"port": port, "identity": keys / "client",
           "options": ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]}
    proc.terminate()
    proc.wait(timeout=10)


def test_bundle_over_ssh(fake_run, local_sshd, tmp_path):
    """bundle --ssh: copy to a host, run bench.py there, fetch result.json, merge it."""
    import getpass

    run_dir, report_json = _fresh_report(fake_run, tmp_path)
    remote_home = tmp_path / "remote"
    out = tmp_path / "fake-x86"
    proc = CliRunner().invoke(app, [
        "bundle", str(run_dir), "--target", "x86", "-o", str(out), "--samples-from", str(fake_run["samples"]),
        "--ssh", f"{getpass.getuser()}@127.0.0.1", "--ssh-port", str(local_sshd["port"]),
        "--ssh-identity", str(local_sshd["identity"]),
        *[a for o in local_sshd["options"] for a in ("--ssh-option", o)],
        "--remote-python", sys.executable, "--remote-dir", str(remote_home),
        "--bench-args", "--max-seconds 0.05 --min-runs 3 --warmup 1", "--device-name", "sshbox"])
    assert proc.exit_code == 0, proc.output
    assert (remote_home / "fake-x86" / "result.json").is_file()
    assert (out / "result-127.0.0.1.json").is_file()
    rep = load_report(report_json)
    assert rep["device_verdicts"]["sshbox"]["passed"]
    assert "ptq@sshbox" in {r["name"] for r in rep["rows"]}


def test_ssh_failure_is_one_clear_error(rpi_bundle, local_sshd, tmp_path):
    with pytest.raises(BundleError, match="ssh nobody@127.0.0.1: creating"):
        ssh_bench(rpi_bundle, "nobody@127.0.0.1", port=local_sshd["port"], identity=local_sshd["identity"],
                  options=local_sshd["options"], remote_dir=str(tmp_path / "r"), timeout=30)


def test_check_gates_on_device_rows(fake_run, device_result, tmp_path):
    run_dir, report_json = _fresh_report(fake_run, tmp_path)
    add_devices(report_json, [(None, device_result)], run_dir=run_dir)
    ok = CliRunner().invoke(app, ["check", str(report_json)])
    assert ok.exit_code == 0 and "device testdev: PASS" in ok.output
    slow = CliRunner().invoke(app, ["check", str(report_json), "--device-max-latency-ms", "0.000001"])
    assert slow.exit_code == 1 and "device testdev: FAIL" in slow.output


def test_bench_command_takes_providers(fake_run, tmp_path):
    model = fake_run["run_dir"] / "export" / "ptq.onnx"
    out = tmp_path / "b.json"
    ok = CliRunner().invoke(app, ["bench", str(model), "--batch-sizes", "1", "--max-seconds", "0.05", "-q",
                                  "--json", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["providers"] == ["CPUExecutionProvider"]
    bad = CliRunner().invoke(app, ["bench", str(model), "--providers", "NoSuchExecutionProvider"])
    assert bad.exit_code == 2 and "NoSuchExecutionProvider" in bad.output
