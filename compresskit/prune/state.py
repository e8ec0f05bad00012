"""Saving and rebuilding a pruned model from plain data, so checkpoints load with `weights_only=True`.

`pruning_state(model)` records, per module, its structural attributes and tensor shapes as plain
data, and `rebuild_pruned(fresh_model, state)` reshapes a freshly built unpruned model so the
pruned `state_dict` loads into it. Rebuilding needs no example input and no tracing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from compresskit.prune.common import _masked_names

STATE_FORMAT = "compresskit.pruning"
STATE_VERSION = 1


def _structural_attrs(module: nn.Module) -> dict[str, Any] | None:
    """The attributes that describe a module's tensor shapes, or None for an unknown type."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return {"num_features": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"normalized_shape": list(module.normalized_shape)}
    if isinstance(module, nn.GroupNorm):
        return {"num_groups": module.num_groups, "num_channels": module.num_channels}
    if isinstance(module, nn.PReLU):
        return {"num_parameters": module.num_parameters}
    if isinstance(module, nn.MultiheadAttention):
        return {"embed_dim": module.embed_dim, "kdim": module.kdim, "vdim": module.vdim,
                "head_dim": module.head_dim}
    if isinstance(module, nn.Embedding):
        return {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim}
    return None


# Types whose attributes Torch-Pruning rewrites when it prunes them; any other module only has
# bare parameters resized (ConvNeXt's layer scale, ViT's class token), with no attribute to record.
_RESTRUCTURED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                 nn.GroupNorm, nn.PReLU, nn.MultiheadAttention, nn.Embedding, nn.RNNBase)


def pruning_state(pruned_model: nn.Module) -> dict[str, Any]:
    """Plain data (str/int/bool/list/dict only, so `weights_only=True` loading works) that lets
    `rebuild_pruned` reshape a fresh unpruned model of the same architecture to this one.

    For every module that owns tensors it records the type name, the structural attributes
    (channels, features, groups) and every parameter/buffer shape; active magnitude masks are
    listed so a checkpoint taken mid fine-tuning rebuilds with its masks.
    """
    modules: dict[str, Any] = {}
    masked: list[str] = []
    for name, module in pruned_model.named_modules():
        tensors = {n: list(t.shape) for n, t in module._parameters.items() if t is not None}
        tensors.update({n: list(t.shape) for n, t in module._buffers.items() if t is not None})
        if not tensors:
            continue
        modules[name] = {
            "type": type(module).__name__,
            "attrs": _structural_attrs(module),
            "tensors": tensors,
        }
        masked += [f"{name}.{n}" if name else n for n in _masked_names(module)]
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "modules": modules, "masked": masked}


def _resize(module: nn.Module, name: str, shape: list[int]) -> None:
    """Replace a parameter or buffer by a zero tensor of `shape` (same dtype, device, grad)."""
    if name in module._parameters:
        old = module._parameters[name]
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        old = module._buffers[name]
        module._buffers[name] = torch.zeros(shape, dtype=old.dtype, device=old.device)


def _rebuild_module(path: str, module: nn.Module, record: dict[str, Any]) -> None:
    if type(module).__name__ != record["type"]:
        raise ValueError(
            f"module {path!r} is a {type(module).__name__}, the pruning state "
            f"records a {record['type']}: not the same architecture"
        )
    own = {**module._parameters, **module._buffers}
    changed = []
    for name, shape in record["tensors"].items():
        if own.get(name) is None:
            raise ValueError(
                f"module {path!r} has no tensor {name!r} recorded in the pruning "
                "state: not the same architecture"
            )
        if list(own[name].shape) != list(shape):
            changed.append((name, shape))
    if not changed:
        return
    attrs = record["attrs"]
    if attrs is None and not isinstance(module, _RESTRUCTURED):
        attrs = {}  # bare parameters only: resizing them is the whole rebuild
    if attrs is None:
        raise ValueError(
            f"cannot rebuild module {path!r}: tensors of a {record['type']} changed "
            "shape and its structural attributes are unknown to compresskit"
        )
    for key, value in attrs.items():
        setattr(module, key, tuple(value) if isinstance(value, list) else value)
    for name, shape in changed:
        _resize(module, name, shape)


def rebuild_pruned(unpruned_model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Reshape a freshly built unpruned model in place (and return it) so that the state dict of
    the pruned model `state` was taken from loads into it. Weights are zeros until loaded."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            "not a compresskit pruning state (missing format "
            f"{STATE_FORMAT!r}); make it with pruning_state(model)"
        )
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"pruning state version {state.get('version')} is not supported "
            f"(expected {STATE_VERSION})"
        )
    modules = dict(unpruned_model.named_modules())
    missing = [p for p in state["modules"] if p not in modules]
    if missing:
        raise ValueError(
            f"the model has no module(s) {missing[:5]} recorded in the pruning "
            "state: not the same architecture"
        )
    for dotted in state["masked"]:
        path, _, name = dotted.rpartition(".")
        torch_prune.identity(modules[path], name)
    for path, record in state["modules"].items():
        _rebuild_module(path, modules[path], record)
    for dotted in state["masked"]:  # refresh the masked view to the new shape
        path, _, name = dotted.rpartition(".")
        module = modules[path]
        setattr(module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask"))
    return unpruned_model
