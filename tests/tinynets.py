"""A tiny conv net and learnable synthetic images shared by the export/PTQ/QAT tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 4


class TinyNet(nn.Module):
    """Conv-BN-ReLU, depthwise conv, residual add, global pool, (dropout), Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.pw(self.dw(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a fixed smooth colour pattern plus noise (learnable in seconds)."""
    g = torch.Generator().manual_seed(1234)
    patterns = F.avg_pool2d(torch.randn(NUM_CLASSES, 3, 20, 20, generator=g), 5, stride=1)
    patterns = patterns / patterns.std(dim=(1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    return patterns[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g), y
