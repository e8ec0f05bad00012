"""Teacher outputs cached by input content.

Without random augmentation every epoch shows the teacher the same images, so its logits can be
computed once and looked up afterwards: a KD step then costs about as much as a student-only
step. `CachedTeacher` wraps a frozen teacher; samples are keyed by their bytes, so a lookup is
exact (a changed pixel is a miss, never a wrong hit). Only logits are cached: feature terms
(FitNet, AT) need the teacher's intermediate maps and must not use it.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class CachedTeacher(nn.Module):
    """A frozen teacher whose outputs are memoised per input sample.

    `store` may be shared between wrappers of the same teacher (e.g. across pipeline stages).
    """

    def __init__(self, teacher: nn.Module, store: dict[bytes, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.teacher = teacher
        self.store: dict[bytes, torch.Tensor] = {} if store is None else store
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _keys(x: torch.Tensor) -> list[bytes]:
        flat = x.detach().contiguous().reshape(x.shape[0], -1).cpu().numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.teacher(x)  # only frozen, inference-time use is memoised
        keys = self._keys(x)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            out = self.teacher(x[missing] if len(missing) < len(keys) else x)
            for j, i in enumerate(missing):
                self.store[keys[i]] = out[j].detach().to("cpu", torch.float32)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self.store[k] for k in keys]).to(x.device)
