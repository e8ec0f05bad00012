"""The model matrix: every stage's library functions on a broad set of torchvision classifiers
(and a user's `module:callable`), tiny inputs (3x32x32, 3 classes, 8 images), CPU only.

Per model: distill (KD + attention transfer from the last feature map, one short epoch),
structured pruning (and the checkpoint rebuild of the pruned shapes), FP32 ONNX export with a
parity check, PTQ, QAT (fake-quant, one training step, INT8 export) and a bench. Each stage is
recorded as ``ok``, ``ok (...)``, ``refused (...)`` or ``fails (...)``; the test asserts the
recorded kind against `EXPECTED`, so a stage that starts or stops working shows up here.

The fast subset (`FAST`) runs in the default suite; the whole matrix is marked slow. Print the
matrix as a Markdown table: ``python tests/test_model_matrix.py [names...]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresskit.nets import build_model

CLASSES, CHANNELS, SIZE = 3, 3, 32
STAGES = ("distill", "prune", "export", "ptq", "qat", "bench")
QAT_MAX_REL_DIFF = 0.2  # INT8 kernels round differently from fake-quant, but not by a fifth of the logits


# ---------------------------------------------------------------- models built through factories


def tiny_vit(num_classes: int = CLASSES, in_channels: int = CHANNELS) -> nn.Module:
    """torchvision's VisionTransformer at tiny dimensions (vit_b_16 is far too big for a test)."""
    from torchvision.models import VisionTransformer

    if in_channels != 3:
        raise ValueError("tiny_vit takes 3-channel images")
    return VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=num_classes)


def tiny_convnext(num_classes: int = CLASSES, in_channels: int = CHANNELS) -> nn.Module:
    """torchvision's ConvNeXt with two tiny stages (convnext_tiny has 28M parameters)."""
    from torchvision.models import ConvNeXt
    from torchvision.models.convnext import CNBlockConfig

    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=num_classes)
    if in_channels != 3:
        from compresskit.nets import adapt_stem

        adapt_stem(model, in_channels)
    return model


class UserNet(nn.Module):
    """A user's own model: a CSP-style block (half the channels through a branch, then joined)
    that splits channels along dim 1, which Torch-Pruning sizes wrongly, and a residual add."""

    def __init__(self, num_classes: int = CLASSES, in_channels: int = CHANNELS, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        half = width // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = self.mix(torch.cat([a, self.branch(b)], dim=1))
        x = F.relu(x + self.res(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def user_net(num_classes: int = CLASSES, in_channels: int = CHANNELS, width: int = 16) -> nn.Module:
    return UserNet(num_classes, in_channels, width)


def _tv(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"arch": "torchvision", "name": name, "kwargs": kwargs}


def _custom(factory: str) -> dict[str, Any]:
    return {"arch": "custom", "factory": f"{__name__}:{factory}"}


MODELS: dict[str, dict[str, Any]] = {
    "resnet18": _tv("resnet18"),
    "mobilenet_v2": _tv("mobilenet_v2", width_mult=0.25),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", width_mult=0.25),
    "shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "mnasnet0_5": _tv("mnasnet0_5"),
    "squeezenet1_1": _tv("squeezenet1_1"),
    "densenet121": _tv("densenet121"),
    "convnext (tiny ConvNeXt)": _custom("tiny_convnext"),
    "vit (tiny VisionTransformer)": _custom("tiny_vit"),
    "user factory (CSP-style net)": _custom("user_net"),
}
FAST = ("mobilenet_v2", "shufflenet_v2_x0_5", "vit (tiny VisionTransformer)", "user factory (CSP-style net)")

# What each stage gives where it is not plain "ok" (kinds: ok, refused, fails), and why; a tuple
# lists kinds that depend on the CPU onnxruntime runs on.
EXPECTED: dict[str, dict[str, str | tuple[str, ...]]] = {
    # the INT8 file's logits drift from the fake-quant model's block by block (2% after the first
    # stack, ~40% after the fourth, ~60-100% at the end); the others stay within 15%, except:
    "mnasnet0_5": {"qat": "fails"},
    # 14.8% of the max logit with onnxruntime's graph optimizations at ORT_ENABLE_EXTENDED or off
    # on every CPU seen; its layout optimizations (ORT_ENABLE_ALL, the default) picked kernels that
    # reached 23% on one CPU (AMD EPYC with avx512_vp2intersect and avx512_bf16), under 20% on
    # another. The export stage's min_qat_top1_agreement guards a pipeline against such a file.
    "shufflenet_v2_x0_5": {"qat": ("ok", "fails")},
}


def expected(name: str, stage: str) -> tuple[str, ...]:
    kinds = EXPECTED.get(name, {}).get(stage, "ok")
    return kinds if isinstance(kinds, tuple) else (kinds,)


# ---------------------------------------------------------------- one row of the matrix


def _first_line(err: BaseException, limit: int = 160) -> str:
    """"Type: message" on one line; where it was raised when the message is empty."""
    text = " ".join(str(err).split())
    if not text:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        code = tb.tb_frame.f_code if tb is not None else None
        text = f"no message, raised in {Path(code.co_filename).name}:{code.co_name}" if code else "no message"
    return f"{type(err).__name__}: {text[:limit]}"


def _feature_map(model: nn.Module, x: torch.Tensor) -> str:
    """The last convolution called before the classifier (the last Conv/Linear called) whose
    output is a (N, C, H, W) map: where attention transfer reads the student."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[str, bool]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: calls.append((names[mod], isinstance(out, torch.Tensor)
                                                                          and out.dim() == 4
                                                                          and isinstance(mod, nn.Conv2d))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    maps = [n for n, is_map in calls[:-1] if is_map]
    if not maps:
        raise ValueError("no convolution feature map before the classifier")
    return maps[-1]


def _recalibrate_norms(model: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm statistics as the average over `x` (two training steps leave them far from the
    activations, and eval-mode logits then reach 1e18 on EfficientNet: garbage for every later
    stage's numerics). A real run trains long enough; here they are measured once."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, CHANNELS, SIZE, SIZE, generator=gen), torch.randint(0, CLASSES, (8,), generator=gen)


def run_row(name: str, work: Path) -> dict[str, str]:
    """Every stage on model `name`; returns {stage: status} (and "seconds")."""
    from compresskit import prune as P
    from compresskit.bench import bench_model
    from compresskit.config import TrainConfig
    from compresskit.distill import distill
    from compresskit.export import export_onnx, parity_check, parity_problem
    from compresskit.quantize import qat as Q
    from compresskit.quantize.ptq import quantize_ptq

    start = time.perf_counter()
    torch.manual_seed(0)
    spec = MODELS[name] | {"num_classes": CLASSES, "in_channels": CHANNELS}
    x, y = _data()
    example = x[:1]
    row: dict[str, str] = {}
    student = build_model(spec)

    # distill: KD + attention transfer from the last feature map, one epoch of two batches
    teacher = build_model({"arch": "resnet", "num_classes": CLASSES, "in_channels": CHANNELS,
                           "blocks": [1, 1], "width": 8})
    try:
        tap = _feature_map(student, example)
        terms = [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9, "temperature": 4.0},
                 {"method": "at", "weight": 1.0, "student": tap, "teacher": "layers.1"}]
        batches = [(x[:4], y[:4]), (x[4:], y[4:])]
        distill(student, teacher, batches, terms=terms, cfg=TrainConfig(epochs=1, lr=0.01), device="cpu",
                example_input=x[:2], quiet=True)  # a non-finite loss raises FloatingPointError
        row["distill"] = f"ok (at on {tap})"
    except Exception as err:  # noqa: BLE001 - the matrix records what fails
        row["distill"] = f"fails ({_first_line(err)})"
    _recalibrate_norms(student, x)

    # structured pruning, and the rebuild a checkpoint of the pruned model needs
    model = student
    try:
        result = P.prune_structured(student, example, ratio=0.3)
        fresh = P.rebuild_pruned(build_model(spec), P.pruning_state(result.model))
        fresh.load_state_dict(result.model.state_dict())
        with torch.no_grad():
            want, got = result.model.eval()(x), fresh.eval()(x)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
            raise AssertionError(f"the model rebuilt from its pruning state differs by {(got - want).abs().max():.3g}")
        model = result.model
        kept = result.settings["kept_layers"]
        note = f"MACs x{result.macs_ratio:.2f}"
        if kept:
            why = next(iter(kept.values()))
            note += f"; {len(kept)} layer(s) kept whole, e.g. {next(iter(kept))}: {why[:90]}"
        row["prune"] = f"ok ({note})"
    except P.PruneRefused as err:
        row["prune"] = f"refused ({err})"
    except Exception as err:  # noqa: BLE001
        row["prune"] = f"fails ({_first_line(err)})"

    # FP32 export of the (pruned) model and parity with onnxruntime
    fp32 = work / "model.onnx"
    try:
        export_onnx(model, fp32, example)
        problem = parity_problem(parity_check(model, fp32, x))
        if problem:
            raise AssertionError(problem)
        row["export"] = "ok"
    except Exception as err:  # noqa: BLE001
        row["export"] = f"fails ({_first_line(err)})"

    # PTQ of that file
    int8 = work / "ptq.onnx"
    try:
        if row["export"] != "ok":
            raise RuntimeError("no FP32 ONNX file")
        quantize_ptq(fp32, int8, x.numpy())
        agree = parity_check(model, int8, x)["top1_agreement"]
        row["ptq"] = f"ok (top-1 agreement {agree:.0%})"
    except Exception as err:  # noqa: BLE001
        row["ptq"] = f"fails ({_first_line(err)})"

    # QAT as the quantize stage runs it: prepare, a training step, INT8 export
    try:
        qmodel = Q.prepare_qat(model, example, per_channel=True, activation_dtype="uint8", observer_batches=[x])
        qmodel.train()
        opt = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
        F.cross_entropy(qmodel(x[:4]), y[:4]).backward()
        opt.step()
        qmodel.eval()
        qpath = Q.export_qat_onnx(qmodel, work / "qat.onnx", example)
        parity = parity_check(qmodel, qpath, x)
        if parity["max_rel_diff"] > QAT_MAX_REL_DIFF:
            raise AssertionError(f"the INT8 file differs from the fake-quant model by {parity['max_rel_diff']:.0%} "
                                 f"of the max |logit| (top-1 agreement {parity['top1_agreement']:.0%})")
        row["qat"] = f"ok (INT8 vs fake-quant: {parity['max_rel_diff']:.1%} of max logit)"
    except Exception as err:  # noqa: BLE001
        row["qat"] = f"fails ({_first_line(err)})"

    # bench: latency and accuracy of the INT8 file (FP32 when PTQ failed)
    try:
        target = int8 if row["ptq"].startswith("ok") else fp32
        if not target.is_file():
            raise RuntimeError("no ONNX file")
        stats = bench_model(target, batch_sizes=(1,), threads=(1,), warmup=1, min_runs=2, max_runs=3,
                            max_seconds=0.05, x=x.numpy(), y=y.numpy())
        assert stats, "empty bench result"
        row["bench"] = "ok"
    except Exception as err:  # noqa: BLE001
        row["bench"] = f"fails ({_first_line(err)})"
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    return row


def _check(name: str, tmp_path: Path) -> None:
    row = run_row(name, tmp_path)
    print(f"\n{name}: " + " | ".join(f"{s}: {row[s]}" for s in STAGES) + f" ({row['seconds']} s)")
    got = {s: row[s].split(" ", 1)[0] for s in STAGES}
    wrong = [s for s in STAGES if got[s] not in expected(name, s)]
    assert not wrong, f"{name}: " + "; ".join(f"{s}: {row[s]} (expected {' or '.join(expected(name, s))})"
                                              for s in wrong)


@pytest.mark.parametrize("name", FAST)
def test_model_matrix_fast(name: str, tmp_path: Path) -> None:
    _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matrix(name: str, tmp_path: Path) -> None:
    _check(name, tmp_path)


if __name__ == "__main__":  # the matrix as a Markdown table
    import tempfile

    torch.set_num_threads(1)
    names = sys.argv[1:] or list(MODELS)
    print("| model | " + " | ".join(STAGES) + " | s |")
    print("|---" * (len(STAGES) + 2) + "|")
    for model_name in names:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_row(model_name, Path(tmp))
        print(f"| {model_name} | " + " | ".join(r[s].replace("|", "/") for s in STAGES) + f" | {r['seconds']} |",
              flush=True)
