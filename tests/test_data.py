import gzip

import numpy as np
import pytest
import torch

from compresskit.config import DataConfig, SyntheticConfig
from compresskit.data import BatchTransform, DataError, check_data_available, load_data


def test_splits_are_disjoint_and_sized(synthetic_data):
    d = synthetic_data
    assert len(d.train) + len(d.val) == 160 and len(d.val) == 16
    assert len(d.test) == 64 and len(d.calib) == 32
    assert d.in_channels == 1 and d.image_size == (16, 16) and d.num_classes == 4
    x, y = next(iter(d.loader("train", shuffle=True, augment=True)))
    assert x.dtype == torch.float32 and x.shape == (32, 1, 16, 16) and y.dtype == torch.int64


def test_numpy_split_matches_loader(synthetic_data):
    x, y = synthetic_data.numpy_split("test")
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,)
    xl, _ = next(iter(synthetic_data.loader("test")))
    np.testing.assert_allclose(x[: len(xl)], xl.numpy())


def test_normalisation_and_augmentation():
    t = BatchTransform([0.5], [0.25], hflip=False, crop_padding=0)
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(t(x, None), torch.full((2, 1, 4, 4), 2.0))
    crop = BatchTransform([0.0], [1 / 255], hflip=True, crop_padding=2)
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    out = crop(img, torch.Generator().manual_seed(0))
    assert out.shape == img.shape
    # every output pixel is either padding (0) or some input pixel value
    assert set(out.unique().tolist()) <= set(range(16))
    assert not torch.equal(out, img.float())


def _write_idx(path, arr):
    dims = arr.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    d = load_data(DataConfig(dataset="fashion-mnist", root=tmp_path, calib_size=8), seed=0)
    assert len(d.test) == 20 and len(d.train) + len(d.val) == 50 and d.num_classes == 10


def test_missing_fashion_mnist_is_a_clear_error(tmp_path):
    cfg = DataConfig(dataset="fashion-mnist", root=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in check_data_available(cfg)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_data(cfg)


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_data(DataConfig(dataset="imagefolder", root=tmp_path, image_size=12, channels=1,
                             calib_size=4, val_fraction=0.25), seed=0)
    assert d.class_names == ["cat", "dog"] and d.in_channels == 1 and d.image_size == (12, 12)
    x, y = next(iter(d.loader("train", batch_size=4)))
    assert x.shape == (4, 1, 12, 12)
    assert len(d.numpy_split("test")[0]) == 12


def test_synthetic_is_deterministic():
    cfg = DataConfig(dataset="synthetic", synthetic=SyntheticConfig(num_train=32, num_test=16))
    a, b = load_data(cfg, seed=1), load_data(cfg, seed=1)
    assert torch.equal(a.train.images, b.train.images)


def test_limits_pick_a_random_subset_not_the_first_images():
    cfg = DataConfig(dataset="synthetic", limit_test=32, synthetic=SyntheticConfig(num_train=64, num_test=128))
    full = load_data(cfg.model_copy(update={"limit_test": None}), seed=0)
    part = load_data(cfg, seed=0)
    assert len(part.test) == 32
    assert not torch.equal(part.test.images, full.test.images[:32])


def test_training_loader_drops_a_single_sample_batch(synthetic_data):
    loader = synthetic_data.loader("train", batch_size=len(synthetic_data.train) - 1, shuffle=True)
    sizes = [len(y) for _, y in loader]
    assert sizes == [len(synthetic_data.train) - 1]


@pytest.mark.gpu
def test_augmentation_on_cuda(synthetic_data):
    synthetic_data.hflip, synthetic_data.crop_padding = True, 2
    x, _ = next(iter(synthetic_data.loader("train", shuffle=True, augment=True, device="cuda")))
    assert x.is_cuda
