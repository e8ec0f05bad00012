"""Quantization-aware training with fake quantization that exports to QDQ ONNX.

``prepare_qat`` traces a float model with ``torch.fx``, folds each BatchNorm into the conv before
it (with the BN's running statistics, so the trained model is exactly what runs after export),
fake-quantizes every Conv2d/Linear weight (symmetric int8, per output channel by default), and
inserts activation fake-quantizers where onnxruntime's QDQ fusions want them: on the input of
every conv/linear/add/mul/concat/average pool and on their outputs, after a ReLU/ReLU6 that
follows them (onnxruntime drops the activation when the quantized range already clips).
Reshapes, flattens and max pools reuse their input's quantizer, so onnxruntime can run them on
int8 data. The returned ``torch.fx.GraphModule`` trains with a plain ``model(images)`` loop.

Activation ranges start from observer batches (running min/max) and then follow an exponential
moving average of each training batch's min/max until :func:`freeze`. EMA was chosen over
learned (LSQ-style) ranges because it needs nothing from the training loop (no extra parameter
group, no learning rate for scales), ranges are plain buffers that export as constants, and at
8 bits learned ranges bring little; freezing for the last epochs lets weights settle on fixed
ranges.

The fake-quant ops are ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine``; the TorchScript exporter writes them as
QuantizeLinear/DequantizeLinear pairs. :func:`export_qat_onnx` then stores weights as int8 and
biases as int32 initializers (as onnxruntime's own quantizer does; the torch-free rewrites are in
:mod:`compresskit.quantize.qdq`), so the file is small and onnxruntime fuses convs into
``QLinearConv``.
"""

from __future__ import annotations

import copy
import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils.fusion import fuse_conv_bn_eval

from compresskit.export import DEFAULT_OPSET, export_to_proto
from compresskit.onnxutil import save_onnx, tidy_graph
from compresskit.quantize.qdq import fold_constant_quantize, quantize_biases

ACT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127
WEIGHT_LEVELS = 127.0  # symmetric: |w| max maps to 127, as onnxruntime's quantizer does
MIN_SCALE = 1e-8
_META_KEY = "compresskit.qat"


# --------------------------------------------------------------------------------------------
# Fake-quant building blocks
# --------------------------------------------------------------------------------------------


class ActFakeQuant(nn.Module):
    """Per-tensor affine fake quantization of an activation, range tracked by min/max EMA.

    In training mode each call updates the range (unless frozen) and then fake-quantizes; in
    eval mode the stored range is used as is. ``observe=False`` reuses the range without
    updating it (for reshapes and max pools that must share their input's quantization).
    """

    def __init__(self, dtype: str = "uint8", momentum: float = 0.01) -> None:
        super().__init__()
        self.dtype = dtype
        self.quant_min, self.quant_max = ACT_RANGES[dtype]
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        # flags live in buffers for the state dict, mirrored in Python to avoid device syncs
        self.register_buffer("initialized_flag", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen_flag", torch.zeros((), dtype=torch.bool))
        self._initialized = False
        self._frozen = False
        self.calibrating = False  # transient: float pass-through + running min/max

    @property
    def initialized(self) -> bool:
        return self._initialized

    @initialized.setter
    def initialized(self, value: bool) -> None:
        self._initialized = bool(value)
        self.initialized_flag.fill_(self._initialized)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)
        self.frozen_flag.fill_(self._frozen)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized_flag)
        self._frozen = bool(self.frozen_flag)

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if observe and not self.frozen and (self.training or self.calibrating):
            self._observe(x.detach())
        if self.calibrating or not self.initialized:
            return x
        if x.dtype != torch.float32:  # autocast: quantize in fp32, hand back the same dtype
            return self._fake_quant(x.float()).to(x.dtype)
        return self._fake_quant(x)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max
        )

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.float())
        if not self.initialized:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized = True
        elif self.calibrating:
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        self._update_qparams()

    @torch.no_grad()
    def _update_qparams(self) -> None:
        """Scale and zero point from the range, widened to include 0 (as onnxruntime does)."""
        lo = self.min_val.clamp(max=0.0)
        hi = self.max_val.clamp(min=0.0)
        scale = ((hi - lo) / float(self.quant_max - self.quant_min)).clamp_min(MIN_SCALE)
        zp = (self.quant_min - torch.round(lo / scale)).clamp(self.quant_min, self.quant_max)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp.to(torch.int32))

    def extra_repr(self) -> str:
        rng = (
            f"[{float(self.min_val):.4g}, {float(self.max_val):.4g}]"
            if self.initialized
            else "unset"
        )
        return f"dtype={self.dtype}, range={rng}, frozen={self.frozen}"


def fake_quant_weight(
    w: torch.Tensor, per_channel: bool, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric int8 fake quantization of a weight (per output channel = dim 0, or per tensor).

    The scale follows the current weights (``max|w| / 127``) unless ``scale`` is given; it is
    detached, so gradients reach the weights through the straight-through estimator only.
    """
    if per_channel:
        if scale is None:
            amax = w.detach().abs().amax(dim=tuple(range(1, w.dim())))
            scale = (amax / WEIGHT_LEVELS).clamp_min(MIN_SCALE)
        zp = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, WEIGHT_QMIN, WEIGHT_QMAX)
    if scale is None:
        scale = (w.detach().abs().amax() / WEIGHT_LEVELS).clamp_min(MIN_SCALE)
    zp = torch.zeros((), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_tensor_affine(w, scale, zp, WEIGHT_QMIN, WEIGHT_QMAX)


class _WeightQuantMixin:
    """Shared by QuantConv2d/QuantLinear: settings and the weight scale fixed for export."""

    per_channel: bool = True
    export_scale: torch.Tensor | None = None

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.per_channel, self.export_scale)

    def fix_scale_for_export(self) -> None:
        """Freeze the weight scale as a constant so the exported graph holds no scale math."""
        w = self.weight.detach()
        if self.per_channel:
            amax = w.abs().amax(dim=tuple(range(1, w.dim())))
        else:
            amax = w.abs().amax()
        self.export_scale = (amax / WEIGHT_LEVELS).clamp_min(MIN_SCALE)


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """Conv2d whose weight is fake-quantized on every forward (BN already folded in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, per_channel: bool) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.per_channel = per_channel
        return q


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """Linear whose weight is fake-quantized on every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, per_channel: bool) -> QuantLinear:
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        q.weight, q.bias = linear.weight, linear.bias
        q.per_channel = per_channel
        return q


# --------------------------------------------------------------------------------------------
# Graph classification: which nodes onnxruntime runs in int8 and how
# --------------------------------------------------------------------------------------------

# "compute": int8 kernels with quantized inputs and output (QLinearConv/Gemm/Add/Mul/Concat/Pool)
# "act": ReLU/ReLU6, absorbed into the preceding compute op's output quantizer
# "pass": data movement that runs on int8 data if it shares its input's quantizer
# "transparent": identity at inference (dropout), invisible in the exported graph
_FN_KINDS = {
    operator.add: "binary", operator.iadd: "binary", torch.add: "binary",
    operator.mul: "binary", operator.imul: "binary", torch.mul: "binary",
    torch.cat: "cat", torch.concat: "cat",
    F.adaptive_avg_pool2d: "compute", F.avg_pool2d: "compute",
    F.relu: "act", torch.relu: "act", F.relu6: "act",
    torch.flatten: "pass", torch.reshape: "pass", F.max_pool2d: "pass",
    torch.squeeze: "pass", torch.unsqueeze: "pass",
    F.dropout: "transparent",
}  # fmt: skip
_METHOD_KINDS = {
    "add": "binary", "add_": "binary", "mul": "binary", "mul_": "binary",
    "relu": "act", "relu_": "act",
    "flatten": "pass", "view": "pass", "reshape": "pass", "squeeze": "pass",
    "unsqueeze": "pass", "contiguous": "pass",
}  # fmt: skip
_MODULE_KINDS = (
    ((QuantConv2d, QuantLinear, nn.AdaptiveAvgPool2d, nn.AvgPool2d), "compute"),
    ((nn.ReLU, nn.ReLU6), "act"),
    ((nn.MaxPool2d, nn.Flatten), "pass"),
    ((nn.Dropout, nn.Dropout2d, nn.Identity), "transparent"),
)


def _kind(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    if node.op == "call_function":
        return _FN_KINDS.get(node.target)
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
    if node.op == "call_module":
        mod = modules[node.target]
        for types, kind in _MODULE_KINDS:
            if isinstance(mod, types):
                return kind
    return None


def _is_float_tensor(node: object) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def _tensor_inputs(node: fx.Node, kind: str) -> list[fx.Node]:
    """The activation inputs a compute node needs quantized (weights live inside modules)."""
    if kind == "cat":
        args = node.args[0] if node.args else node.kwargs.get("tensors", [])
        return [a for a in args if _is_float_tensor(a)]
    if kind == "binary":
        args = [*node.args[:2], *(node.kwargs.get(k) for k in ("other",))]
        floats = [a for a in args if _is_float_tensor(a)]
        return floats if len(floats) == 2 else []  # x + scalar stays float
    return [node.args[0]] if node.args and _is_float_tensor(node.args[0]) else []


# --------------------------------------------------------------------------------------------
# prepare_qat and the graph passes it runs
# --------------------------------------------------------------------------------------------


def prepare_qat(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    per_channel: bool = True,
    activation_dtype: str = "uint8",
    observer_batches: Iterable[torch.Tensor] | None = None,
    ema_momentum: float = 0.01,
    example_shape: Sequence[int] | None = None,
) -> fx.GraphModule:
    """Return a fake-quant copy of ``model`` ready for QAT; ``model`` itself is not touched.

    ``example_input`` (or, when rebuilding from :func:`qat_state`, ``example_shape``) is run
    once to tell tensors from other values in the traced graph. ``observer_batches`` (tensors,
    or ``(images, ...)`` tuples) initialise the activation ranges by running min/max with
    quantization off; without them each range starts from the first training batch.
    ``ema_momentum`` is the EMA weight of each new batch's range.
    """
    if activation_dtype not in ACT_RANGES:
        raise ValueError(
            f"activation_dtype must be one of {sorted(ACT_RANGES)}, got {activation_dtype!r}"
        )
    if not 0.0 < ema_momentum <= 1.0:
        raise ValueError(f"ema_momentum must be in (0, 1], got {ema_momentum}")
    example = _example(example_input, example_shape)
    was_training = model.training
    gm = _trace(copy.deepcopy(model).eval())
    _fold_batchnorm(gm)
    _swap_weight_quant(gm, per_channel)
    device = _device_of(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example.to(device))
    except RuntimeError as e:
        raise ValueError(
            f"model forward failed on example_input of shape {tuple(example.shape)}: {e}"
        ) from e
    _insert_act_quant(gm, activation_dtype, ema_momentum)
    gm.meta[_META_KEY] = {"example_shape": [1, *example.shape[1:]]}
    gm.to(device)
    if observer_batches is not None:
        calibrate(gm, observer_batches)
    return gm.train(was_training)


def rebuild_qat(model: nn.Module, state: Mapping) -> fx.GraphModule:
    """The QAT graph :func:`qat_state` describes, built around a float model of the same
    architecture; load the saved QAT ``state_dict`` into the result."""
    if "example_shape" not in state:
        raise ValueError("QAT state has no example_shape; pass an example to prepare_qat instead")
    return prepare_qat(model, None, **state)


def _example(example_input: torch.Tensor | None, shape: Sequence[int] | None) -> torch.Tensor:
    if example_input is None:
        if shape is None:
            raise ValueError("prepare_qat needs example_input (or example_shape)")
        return torch.zeros([int(d) for d in shape])
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError("example_input must be a batched tensor (N, ...)")
    return example_input.detach()


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except (fx.proxy.TraceError, TypeError, NotImplementedError, AttributeError) as e:
        raise ValueError(
            "prepare_qat needs a model that torch.fx.symbolic_trace can trace "
            f"(no Python control flow on tensor values in forward): {e}"
        ) from e


def _device_of(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _fold_batchnorm(gm: fx.GraphModule) -> None:
    """Fold each BatchNorm2d that directly follows a Conv2d (and is its only user)."""
    modules = dict(gm.named_modules())
    calls = _call_counts(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"):
            continue
        conv, bn = modules[prev.target], modules[node.target]
        foldable = (
            type(conv) is nn.Conv2d
            and len(prev.users) == 1
            and calls[prev.target] == 1
            and calls[node.target] == 1
            and bn.track_running_stats
            and bn.running_mean is not None
        )
        if not foldable:
            continue
        _set_module(gm, prev.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _swap_weight_quant(gm: fx.GraphModule, per_channel: bool) -> None:
    """Give plain Conv2d/Linear modules fake-quantized weights.

    Subclasses are left alone: their forward may differ (padding tricks, for instance), so
    they stay float, with quantized neighbours, rather than silently change behaviour.
    """
    modules = dict(gm.named_modules())
    for target in _call_counts(gm):
        mod = modules[target]
        if type(mod) is nn.Conv2d:
            _set_module(gm, target, QuantConv2d.from_float(mod, per_channel))
        elif type(mod) is nn.Linear:
            _set_module(gm, target, QuantLinear.from_float(mod, per_channel))


class _Inserter:
    """Adds activation quantizers to a traced graph (one per quantized tensor)."""

    def __init__(self, gm: fx.GraphModule, dtype: str, momentum: float) -> None:
        self.gm, self.dtype, self.momentum = gm, dtype, momentum
        self.modules = dict(gm.named_modules())
        self.quantizers: set[fx.Node] = set()
        self.done: dict[fx.Node, fx.Node] = {}

    def kind(self, node: fx.Node) -> str | None:
        return None if node in self.quantizers else _kind(node, self.modules)

    def ensure(self, node: fx.Node) -> None:
        """Make sure the tensor ``node`` produces reaches its users quantized."""
        if node in self.quantizers or node in self.done or not _is_float_tensor(node):
            return
        kind = self.kind(node)
        if kind == "transparent":
            if node.args and isinstance(node.args[0], fx.Node):
                self.ensure(node.args[0])
            return
        owner = self._shared_quantizer(node) if kind == "pass" else None
        self.done[node] = self._insert_after(node, owner)

    def _shared_quantizer(self, node: fx.Node) -> str | None:
        """Target of the quantizer a pass-through node's input already went through, if any."""
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node) and src not in self.quantizers:
            if self.kind(src) not in ("pass", "transparent") or not src.args:
                return None
            src = src.args[0]
        return src.target if isinstance(src, fx.Node) else None

    def _insert_after(self, node: fx.Node, owner: str | None) -> fx.Node:
        graph = self.gm.graph
        if owner is None:
            owner = f"{node.name}_act_quant"
            self.gm.add_submodule(owner, ActFakeQuant(self.dtype, self.momentum))
            kwargs = {}
        else:
            kwargs = {"observe": False}
        with graph.inserting_after(node):
            q = graph.call_module(owner, (node,), kwargs)
        q.meta["tensor_meta"] = node.meta.get("tensor_meta")  # same tensor, quantized
        node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q and u.op != "output")
        self.quantizers.add(q)
        return q

    def output_end(self, node: fx.Node) -> fx.Node:
        """The node whose output carries ``node``'s result after fused ReLU/ReLU6s."""
        end = node
        while len(end.users) == 1:
            user = next(iter(end.users))
            if self.kind(user) != "act" or user.args[0] is not end:
                break
            end = user
        return end


def _insert_act_quant(gm: fx.GraphModule, dtype: str, momentum: float) -> None:
    ins = _Inserter(gm, dtype, momentum)
    for node in list(gm.graph.nodes):
        kind = ins.kind(node)
        if kind not in ("compute", "binary", "cat"):
            continue
        inputs = _tensor_inputs(node, kind)
        if kind != "compute" and not inputs:
            continue  # e.g. x * 0.5: not an int8 op
        for a in inputs:
            ins.ensure(a)
        end = ins.output_end(node)
        if any(u.op != "output" for u in end.users):
            ins.ensure(end)
    gm.graph.lint()
    gm.recompile()


# --------------------------------------------------------------------------------------------
# Observer control and state
# --------------------------------------------------------------------------------------------


def act_quantizers(model: nn.Module) -> list[ActFakeQuant]:
    return [m for m in model.modules() if isinstance(m, ActFakeQuant)]


def _weight_quantizers(model: nn.Module) -> list[_WeightQuantMixin]:
    return [m for m in model.modules() if isinstance(m, _WeightQuantMixin)]


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set activation ranges to the running min/max over ``batches`` (float pass-through).

    Returns the number of batches seen. The model's train/eval flags are restored afterwards.
    """
    fqs = act_quantizers(model)
    if not fqs:
        raise ValueError("model has no activation quantizers; build it with prepare_qat")
    modes = [(m, m.training) for m in model.modules()]
    device = _device_of(model)
    seen = 0
    model.eval()
    for fq in fqs:
        fq.calibrating, fq.initialized = True, False
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                seen += 1
    finally:
        for fq in fqs:
            fq.calibrating = False
        for m, training in modes:
            m.train(training)
    if seen == 0:
        raise ValueError("observer_batches was empty")
    return seen


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Stop (or with ``frozen=False`` resume) activation-range updates; returns ``model``.

    BatchNorm needs no freezing: it was folded into the convs with its running statistics.
    """
    fqs = act_quantizers(model)
    if not fqs:
        raise ValueError("model has no activation quantizers; build it with prepare_qat")
    for fq in fqs:
        fq.frozen = frozen
    return model


def qat_state(model: nn.Module) -> dict:
    """JSON-able settings that rebuild the same QAT graph around a float model of the same
    architecture: ``prepare_qat(float_model, example, **state)`` or ``rebuild_qat``.

    Together with ``model.state_dict()`` (which loads with ``torch.load(weights_only=True)``)
    this reproduces a trained QAT model.
    """
    fqs = act_quantizers(model)
    wqs = _weight_quantizers(model)
    if not fqs or not wqs:
        raise ValueError("model is not a QAT model built by prepare_qat")
    state = {
        "per_channel": bool(wqs[0].per_channel),
        "activation_dtype": fqs[0].dtype,
        "ema_momentum": float(fqs[0].momentum),
    }
    meta = getattr(model, "meta", {}).get(_META_KEY, {})
    if "example_shape" in meta:
        state["example_shape"] = [int(d) for d in meta["example_shape"]]
    return state


def epoch_callback(
    total_epochs: int, freeze_after: float = 0.5
) -> Callable[[int, nn.Module], None]:
    """A ``train.fit`` epoch callback that freezes activation ranges for the last epochs.

    Ranges follow the EMA for the first ``freeze_after`` share of the epochs (at least one),
    then stay fixed so the weights settle on them. Decided per epoch index, so a resumed run
    ends up in the same state.
    """
    if total_epochs < 1 or not 0.0 <= freeze_after <= 1.0:
        raise ValueError(
            f"need total_epochs >= 1 and 0 <= freeze_after <= 1, got {total_epochs}, {freeze_after}"
        )
    start = max(1, math.ceil(total_epochs * freeze_after))

    def callback(epoch: int, model: nn.Module) -> None:
        freeze(model, frozen=epoch >= start)

    return callback


# --------------------------------------------------------------------------------------------
# Export to QDQ ONNX
# --------------------------------------------------------------------------------------------


def export_qat_onnx(
    qat_model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export a QAT model to a QDQ ONNX file that onnxruntime runs as INT8.

    Weights are stored as int8 and conv/gemm biases as int32 (scale = input scale x weight
    scale), like onnxruntime's static quantizer writes them. ``qat_model`` is not changed.
    """
    fqs = act_quantizers(qat_model)
    if not fqs:
        raise ValueError("model has no activation quantizers; build it with prepare_qat")
    unset = sum(not fq.initialized for fq in fqs)
    if unset:
        raise ValueError(
            f"{unset} of {len(fqs)} activation ranges are not set; pass observer_batches to "
            "prepare_qat or train at least one step before export"
        )
    m = copy.deepcopy(qat_model).cpu().eval()
    for wq in _weight_quantizers(m):
        wq.fix_scale_for_export()
    proto = export_to_proto(m, example_input, opset=opset, dynamic_batch=True)
    fold_constant_quantize(proto)
    quantize_biases(proto)
    tidy_graph(proto)
    return save_onnx(proto, path, metadata)
