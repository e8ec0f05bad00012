"""Train a teacher: a plain classifier trained with cross-entropy through the one training loop.

This is what the teacher stage does for the teacher and each ensemble member; with the
pipeline's loaders (`compresskit.train.loaders_for`) and seed the weights are bit-identical to
the stage's, which trains through distill's objective with a single ``ce`` term: that term
computes exactly ``F.cross_entropy(logits.float(), y, label_smoothing=...)`` times 1.0, which
is what the criterion here computes, without the objective's hooks and dry run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from compresskit.config import TrainConfig
    from compresskit.train import FitResult

__all__ = ["cross_entropy", "train_teacher"]


def cross_entropy(label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The teacher's criterion: cross-entropy in float32 (also under autocast) with label smoothing."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

    return loss


def train_teacher(model: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any] | None = None, *,
                  cfg: TrainConfig | None = None, epochs: int | None = None,
                  optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                  device: torch.device | str | None = None, seed: int | None = 0,
                  label_smoothing: float | None = None, **fit_kwargs: Any) -> FitResult:
    """Train `model` with cross-entropy on `train_loader`, keeping the best `val_loader` epoch.

    `label_smoothing` defaults to `cfg.label_smoothing` (0 without `cfg`). Everything else is
    `compresskit.train.fit`'s: `cfg`, `epochs`, `optimizer`, `scheduler`, `device`, `seed` and
    any other keyword of `fit` (`desc`, `resume_file`, `quiet`, ...).
    """
    from compresskit.train import fit

    if label_smoothing is None:
        label_smoothing = cfg.label_smoothing if cfg is not None else 0.0
    return fit(model, cross_entropy(label_smoothing), train_loader, val_loader, cfg=cfg, epochs=epochs,
               optimizer=optimizer, scheduler=scheduler, device=device, seed=seed, **fit_kwargs)
