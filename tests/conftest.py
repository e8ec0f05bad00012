"""Shared fixtures: tiny synthetic data and tiny models, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY_PIPELINE = ROOT / "pipelines" / "tiny_synthetic.yaml"


def pytest_configure(config):
    import torch

    # tiny models: one thread avoids oversubscription and is faster than two here
    torch.set_num_threads(1)


@pytest.fixture
def tiny_pipeline() -> Path:
    return TINY_PIPELINE


@pytest.fixture
def synthetic_data():
    from compresskit.config import DataConfig, SyntheticConfig
    from compresskit.data import load_data

    cfg = DataConfig(dataset="synthetic", batch_size=32, eval_batch_size=64, calib_size=32,
                     synthetic=SyntheticConfig(num_train=160, num_test=64, num_classes=4,
                                               image_size=16, channels=1))
    return load_data(cfg, seed=0)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
