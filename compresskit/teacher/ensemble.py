"""An ensemble of teachers, used as one teacher.

`TeacherEnsemble(members)` runs every member; the objective reads each member's logits (for the
`ensemble` term, which averages the members' soft targets at its own temperature) and the
combined logits ``log(mean_k softmax(z_k))`` (for every other term: the ensemble's averaged
prediction at temperature 1, as valid logits).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from compresskit.distill.logit import average_probabilities

__all__ = ["TeacherEnsemble", "average_probabilities"]


class TeacherEnsemble(nn.Module):
    """Several frozen teachers behind one module; `forward` returns the combined logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 teachers, got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def primary(self) -> nn.Module:
        """The model whose module paths feature terms name (teacher paths tap the first member)."""
        return self.members[0]

    def forward_members(self, x: Tensor) -> tuple[Tensor, ...]:
        """Each member's logits on `x`."""
        return tuple(member(x) for member in self.members)

    @staticmethod
    def combine(member_logits: Sequence[Tensor]) -> Tensor:
        """Logits of the averaged prediction: ``log(mean_k softmax(z_k))``."""
        return average_probabilities(member_logits).clamp_min(1e-12).log()

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(self.forward_members(x))
