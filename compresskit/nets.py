"""Architectures.

`build_model(spec)` turns a JSON-able spec into a module. The spec always carries `arch`,
`num_classes` and `in_channels`, so a checkpoint that stores it beside the weights rebuilds the
model with `torch.load(..., weights_only=True)` and nothing else (see `compresskit.checkpoint`,
which also re-applies pruning and QAT; this module stays below them and imports neither).

Architectures:
- `resnet`: a ResNet (basic blocks) for small inputs: 3x3 stem with configurable stride, no max-pool.
- `mobilenetv2`: MobileNetV2 for small inputs: width multiplier, stem stride, per-stage strides,
  configurable head width.
- `mbnet`: a MobileNetV2-style net with configurable stages (channels, blocks, strides, expansion
  ratio and depthwise kernel per stage), stem and head width; with its defaults it has
  `mobilenetv2`'s layout. The student search varies it (`compresskit.search`).
- `plainconv`: a plain stack of conv-BN-ReLU layers, global average pool, linear head: few
  operators, so fast at batch 1 where onnxruntime's per-operator dispatch dominates.
- `mobilenetv3`: torchvision's MobileNetV3 small/large, adapted to the input channels and stem stride.
- `torchvision`: any torchvision classifier by name.
- `custom`: a user's `module:callable`, looked for in the spec's `search_path` (the pipeline
  file's folder), on PYTHONPATH and in the current directory.

`fold_input_affine` adapts a trained model to another input normalisation.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping below 90% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU6) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (`conv.0`, absent at expansion 1), `kernel` x `kernel`
    depthwise, 1x1 linear projection; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: float, kernel: int = 3) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, k=1))
        layers += [
            ConvBNAct(hidden, hidden, k=kernel, stride=stride, groups=hidden),
            ConvBNAct(hidden, cout, k=1, act=None),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


# (expansion, channels, repeats) per stage; strides come from the spec.
MBV2_STAGES = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))


MBNET_CHANNELS = tuple(c for _, c, _ in MBV2_STAGES)
MBNET_BLOCKS = tuple(n for _, _, n in MBV2_STAGES)
MBNET_EXPAND = tuple(float(e) for e, _, _ in MBV2_STAGES)


class MBNet(nn.Module):
    """MobileNetV2-style net whose every stage is configurable: base channels (times
    `width_mult`), blocks (0 drops the stage, its stride too), stride, expansion ratio and
    depthwise kernel. The defaults give MobileNetV2's layout (`features`, `pool`, `classifier`)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 stem_channels: int = 32, stem_stride: int = 2, channels: Sequence[int] = MBNET_CHANNELS,
                 blocks: Sequence[int] = MBNET_BLOCKS, strides: Sequence[int] = (1, 2, 2, 2, 1, 1, 1),
                 expand: Sequence[float] = MBNET_EXPAND, kernel: Sequence[int] = (3,) * 7,
                 last_channel: int = 1280, dropout: float = 0.0) -> None:
        super().__init__()
        n = len(channels)
        if not (len(blocks) == len(strides) == len(expand) == len(kernel) == n):
            raise ValueError(f"mbnet: channels, blocks, strides, expand and kernel need one entry per stage; got "
                             f"{len(channels)}, {len(blocks)}, {len(strides)}, {len(expand)}, {len(kernel)}")
        if sum(blocks) < 1:
            raise ValueError("mbnet: blocks must hold at least one block")
        cin = make_divisible(stem_channels * width_mult)
        layers: list[nn.Module] = [ConvBNAct(in_channels, cin, stride=stem_stride)]
        for c, repeats, stride, e, k in zip(channels, blocks, strides, expand, kernel, strict=True):
            cout = make_divisible(c * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, e, k))
                cin = cout
        layers.append(ConvBNAct(cin, last_channel, k=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MobileNetV2(MBNet):
    """MobileNetV2 whose downsampling suits small images (28x28 to 64x64).

    torchvision's version downsamples 32x; on 28x28 inputs that leaves 1x1 maps. Here the stem
    stride and the stride of each of the 7 stages are part of the spec (default total stride 16).
    It is `mbnet` with MobileNetV2's stages (same modules, same initialisation).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 stem_stride: int = 2, stage_strides: Sequence[int] = (1, 2, 2, 2, 1, 1, 1),
                 last_channel: int = 1280, dropout: float = 0.0) -> None:
        if len(stage_strides) != len(MBV2_STAGES):
            raise ValueError(f"stage_strides needs {len(MBV2_STAGES)} entries, got {len(stage_strides)}")
        super().__init__(num_classes, in_channels, width_mult, stem_channels=32, stem_stride=stem_stride,
                         strides=stage_strides, last_channel=last_channel, dropout=dropout)


class PlainConvNet(nn.Module):
    """conv-BN-ReLU layers (`channels[i]` out, `strides[i]`, `kernel` x `kernel`), global average
    pool, linear head. No branches and no depthwise convolutions: every conv fuses with its ReLU
    into one INT8 kernel, so the graph has about one operator per layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64, 128),
                 strides: Sequence[int] = (2, 1, 2, 1), kernel: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"plainconv: channels and strides need one entry per layer; got {len(channels)}, "
                             f"{len(strides)}")
        layers: list[nn.Module] = []
        cin = in_channels
        for c, s in zip(channels, strides, strict=True):
            layers.append(ConvBNAct(cin, c, k=kernel, stride=s, act=nn.ReLU))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with basic blocks for small inputs: 3x3 stem (no max-pool), stages of width
    `width * 2**i`, stride 2 between stages."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks: Sequence[int] = (2, 2, 2, 2),
                 width: int = 64, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, width, k=3, stride=stem_stride, act=nn.ReLU)
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stage = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            stage += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)
        for m in self.modules():  # zero-init the last BN of each block: a known stabiliser
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise ValueError("model has no Conv2d layer to adapt to the input channels")


def adapt_stem(model: nn.Module, in_channels: int, stem_stride: int | None = None) -> nn.Module:
    """Replace the first conv when the input channels (or the wanted stem stride) differ."""
    parent, attr, conv = _first_conv(model)
    stride = conv.stride if stem_stride is None else (stem_stride, stem_stride)
    if conv.in_channels == in_channels and tuple(conv.stride) == tuple(stride):
        return model
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    if conv.in_channels == in_channels:
        new.load_state_dict(conv.state_dict())
    setattr(parent, attr, new)
    return model


def fold_input_affine(model: nn.Module, scale: Sequence[float], shift: Sequence[float],
                      example_input: torch.Tensor) -> tuple[str, bool]:
    """Make `model(x)` compute what it computed on ``scale * x + shift`` (per input channel), by
    folding that map into the convolution the input goes straight into: its weights are scaled
    per input channel and the shift goes into its bias (or, without one, into the running mean of
    the BatchNorm right after it). Used to adapt a model trained under another normalisation:
    x_old = (x_new * std_new + mean_new - mean_old) / std_old is such a map.

    Returns (the convolution's module path, exact): the result is exact unless the convolution
    zero-pads, in which case border positions differ slightly (a zero pad in the new input is
    not the old input's zero). A ValueError says when the input does not go straight into a
    Conv2d, or the shift has nowhere to go; the model is then unchanged."""
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, Any] = {}

    def conv_pre(module: nn.Module, args: tuple) -> None:
        seen.setdefault("conv", (module, bool(args) and args[0] is example_input))

    def conv_post(module: nn.Module, args: tuple, out: Any) -> None:
        if seen["conv"][0] is module:
            seen.setdefault("out", out)

    def bn_pre(module: nn.Module, args: tuple) -> None:
        if "out" in seen:
            seen.setdefault("bn", (module, bool(args) and args[0] is seen["out"]))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles += [m.register_forward_pre_hook(conv_pre), m.register_forward_hook(conv_post)]
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_pre))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    except Exception as err:  # noqa: BLE001 - any model
        raise ValueError(f"cannot run the model on a {tuple(example_input.shape)} input: {type(err).__name__}: "
                         + (str(err).strip().splitlines() or [""])[0]) from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if "conv" not in seen or not seen["conv"][1]:
        raise ValueError("the model's input does not go straight into a convolution, so its normalisation "
                         "cannot be folded into one")
    conv: nn.Conv2d = seen["conv"][0]
    if len(scale) != conv.in_channels or len(shift) != conv.in_channels:
        raise ValueError(f"{len(scale)} channel(s) to convert but the first convolution takes {conv.in_channels}")
    bn = seen.get("bn")
    if conv.bias is None and not (bn is not None and bn[1] and bn[0].running_mean is not None):
        raise ValueError(f"the first convolution {names[conv]!r} has no bias and no BatchNorm right after it "
                         "to take the shift of the mean")
    with torch.no_grad():
        weight = conv.weight  # (out, in / groups, kh, kw)
        out_ch, in_per_group = weight.shape[:2]
        group = torch.arange(out_ch).div(out_ch // conv.groups, rounding_mode="floor")
        channel = group[:, None] * in_per_group + torch.arange(in_per_group)[None, :]  # input channel of each (out, in)
        a = torch.tensor(list(scale), dtype=weight.dtype)[channel][..., None, None]
        b = torch.tensor(list(shift), dtype=weight.dtype)[channel][..., None, None]
        delta = (weight * b).sum(dim=(1, 2, 3))  # W x_old = (W a) x_new + W b
        weight.mul_(a)
        if conv.bias is not None:
            conv.bias.add_(delta.to(conv.bias.dtype))
        else:
            bn[0].running_mean.sub_(delta.to(bn[0].running_mean.dtype))
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    exact = conv.padding_mode != "zeros" or padding == "valid" or (not isinstance(padding, str) and not any(padding))
    return names[conv] or "(model)", exact


@contextlib.contextmanager
def _import_path(folders: Sequence[str | os.PathLike]) -> Iterator[list[str]]:
    """sys.path with `folders` first and the current directory last (as with ``python -m``),
    for the time of the block only; yields the folders searched before sys.path's own."""
    front = []
    for folder in folders:
        entry = os.path.abspath(os.fspath(folder))
        if os.path.isdir(entry) and entry not in front:
            front.append(entry)
    cwd = os.getcwd()
    back = [] if cwd in sys.path or "" in sys.path else [cwd]
    sys.path[:0] = front
    sys.path.extend(back)
    importlib.invalidate_caches()
    try:
        yield front
    finally:
        for entry in front:
            if entry in sys.path:
                sys.path.remove(entry)
        for entry in back:
            if entry in sys.path:  # the last occurrence: the one added here
                del sys.path[len(sys.path) - 1 - sys.path[::-1].index(entry)]


def load_callable(target: str, search_path: Sequence[str | os.PathLike] = ()) -> Callable[..., Any]:
    """Resolve 'package.module:callable'; a clear one-line ValueError when it does not resolve.

    The module is looked for in `search_path` (the pipeline file's folder, see
    `compresskit.config.CustomSpec.search_path`), then on sys.path (PYTHONPATH, installed
    packages), then in the current directory."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:callable', got {target!r}")
    with _import_path(search_path) as front:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                where = ", ".join([*front, "PYTHONPATH", "the current directory"])
                raise ValueError(f"cannot import module {module_name!r} for {target!r}: not found in {where}") from None
            raise ValueError(f"importing {module_name!r} for {target!r} failed: {err}") from None
        except Exception as err:  # noqa: BLE001 - the user's module may raise anything while importing
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"importing {module_name!r} for {target!r} failed: "
                             f"{type(err).__name__}: {first}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is not callable")
    return obj


def _call_with_supported(fn: Callable[..., Any], kwargs: dict[str, Any], **optional: Any) -> Any:
    """Call fn(**kwargs, **optional) passing optional args only if fn accepts them."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in optional.items() if takes_any or k in params}
    return fn(**kwargs, **extra)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build a model from its spec (see module doc). `num_classes` and `in_channels` are required."""
    arch = spec.get("arch")
    num_classes = int(spec["num_classes"])
    in_channels = int(spec["in_channels"])
    if arch == "mobilenetv2":
        return MobileNetV2(num_classes, in_channels, spec.get("width_mult", 1.0),
                           spec.get("stem_stride", 2), tuple(spec.get("stage_strides", (1, 2, 2, 2, 1, 1, 1))),
                           spec.get("last_channel", 1280), spec.get("dropout", 0.0))
    if arch == "mbnet":
        return MBNet(num_classes, in_channels, spec.get("width_mult", 1.0), spec.get("stem_channels", 32),
                     spec.get("stem_stride", 2), tuple(spec.get("channels", MBNET_CHANNELS)),
                     tuple(spec.get("blocks", MBNET_BLOCKS)), tuple(spec.get("strides", (1, 2, 2, 2, 1, 1, 1))),
                     tuple(spec.get("expand", MBNET_EXPAND)), tuple(spec.get("kernel", (3,) * 7)),
                     spec.get("last_channel", 1280), spec.get("dropout", 0.0))
    if arch == "plainconv":
        return PlainConvNet(num_classes, in_channels, tuple(spec.get("channels", (16, 32, 64, 128))),
                            tuple(spec.get("strides", (2, 1, 2, 1))), spec.get("kernel", 3), spec.get("dropout", 0.0))
    if arch == "resnet":
        return ResNet(num_classes, in_channels, tuple(spec.get("blocks", (2, 2, 2, 2))),
                      spec.get("width", 64), spec.get("stem_stride", 1))
    if arch == "mobilenetv3":
        from torchvision import models as tvm

        size = spec.get("size", "small")
        factory = tvm.mobilenet_v3_small if size == "small" else tvm.mobilenet_v3_large
        model = factory(num_classes=num_classes, width_mult=spec.get("width_mult", 1.0),
                        dropout=spec.get("dropout", 0.2))
        return adapt_stem(model, in_channels, spec.get("stem_stride"))
    if arch == "torchvision":
        from torchvision import models as tvm

        name = spec["name"]
        if name not in tvm.list_models(module=tvm):
            raise ValueError(f"unknown torchvision classifier {name!r}")
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **spec.get("kwargs", {}))
        return adapt_stem(model, in_channels, spec.get("stem_stride"))
    if arch == "custom":
        search_path = spec.get("search_path") or ()
        fn = load_callable(spec["factory"], search_path)
        with _import_path(search_path):  # imports the factory makes when called
            try:
                model = _call_with_supported(fn, dict(spec.get("kwargs", {})),
                                             num_classes=num_classes, in_channels=in_channels)
            except Exception as err:  # noqa: BLE001 - the user's code may raise anything
                first = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"{spec['factory']!r} failed: {type(err).__name__}: {first}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec['factory']!r} returned {type(model).__name__}, not an nn.Module")
        return model
    raise ValueError(f"unknown arch {arch!r}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
