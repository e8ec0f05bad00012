"""Checkpoints: save a model with what rebuilds it, read one back, rebuild the model.

A checkpoint is a dict readable with ``torch.load(..., weights_only=True)``: the architecture
spec (`compresskit.nets.build_model`), the pruning state (`compresskit.prune.rebuild_pruned`),
the QAT state (`compresskit.quantize.qat.rebuild_qat`), free-form `meta` and the weights. Plain
state dicts (and ``{"model": ...}`` / ``{"state_dict": ...}`` files) are read too; rebuilding
those needs the spec from the caller.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.nets import build_model

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_model", "model_from_checkpoint",
           "read_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "compresskit.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, model: nn.Module, spec: dict[str, Any], *,
                    pruning: dict[str, Any] | None = None, qat: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Save weights with the spec (and pruning / QAT state) that rebuild the model, atomically."""
    from compresskit.artifacts import atomic_path

    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": spec,
        "pruning": pruning,
        "qat": qat,
        "meta": meta or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file with weights_only=True. Plain state dicts are wrapped as
    `{"state_dict": ...}` (also `{"model": ...}` / `{"state_dict": ...}` layouts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"cannot read checkpoint {path} with weights_only=True (it holds Python objects "
                         f"other than tensors; save only the state_dict): {str(err).splitlines()[0]}") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return {"state_dict": obj[key], "spec": None}
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"state_dict": obj, "spec": None}
    raise ValueError(f"{path} is neither a compresskit checkpoint nor a state dict")


def model_from_checkpoint(ckpt: dict[str, Any], spec: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the model a checkpoint describes (pruned and QAT ones too) and load its weights."""
    spec = ckpt.get("spec") or spec
    if spec is None:
        raise ValueError("checkpoint has no architecture spec and none was given")
    model = build_model(spec)
    if ckpt.get("pruning"):
        from compresskit.prune import rebuild_pruned

        model = rebuild_pruned(model, ckpt["pruning"])
    if ckpt.get("qat"):
        from compresskit.quantize.qat import rebuild_qat

        model = rebuild_qat(model, ckpt["qat"])
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).split("\n\t")[1:3]
        raise ValueError(f"checkpoint does not fit the architecture {spec.get('arch')!r}: "
                         + "; ".join(first)) from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the architecture {spec.get('arch')!r}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return model


def load_model(path: Path, spec: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint file and rebuild its model: ``(model, checkpoint dict)``. `spec` is
    needed only for plain state dicts, which carry none."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, spec), ckpt
