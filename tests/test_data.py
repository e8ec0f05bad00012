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


# ------------------------------------------------------------------ checks before a run

def _folder(root, classes=("cat", "dog"), test_classes=None, n=3, size=(10, 12)):
    from PIL import Image

    for split, names in (("train", classes), ("test", classes if test_classes is None else test_classes)):
        for cls in names:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((*size, 3), 30 * i, np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _imagefolder_cfg(root, **kw):
    return DataConfig(dataset="imagefolder", root=root, image_size=8, **kw)


def test_scan_of_a_good_folder_finds_nothing(tmp_path):
    from compresskit.data import check_data, scan_imagefolder

    cfg = _imagefolder_cfg(_folder(tmp_path), class_names=["Cat", "Dog"])
    assert scan_imagefolder(cfg) == [] and check_data(cfg) == []


def test_scan_finds_class_differences_between_train_and_test(tmp_path):
    from compresskit.data import scan_imagefolder

    cfg = _imagefolder_cfg(_folder(tmp_path, classes=("cat", "dog", "emu"), test_classes=("cat", "dog", "fox")))
    problems = scan_imagefolder(cfg)
    assert ("data.root", f"class emu in {tmp_path / 'train'} but not in {tmp_path / 'test'} "
                         "(both need the same classes)") in problems
    assert any(loc == "data.root" and msg.startswith(f"class fox in {tmp_path / 'test'} but not in")
               for loc, msg in problems)


def test_scan_finds_an_empty_class_and_a_corrupt_image(tmp_path):
    from compresskit.data import scan_imagefolder

    _folder(tmp_path)
    (tmp_path / "test" / "bird").mkdir()
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "notes.txt").write_text("not an image")  # ignored, as run ignores it
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "test" / "dog" / "half.png").write_bytes((tmp_path / "test" / "dog" / "0.png").read_bytes()[:40])
    problems = dict.fromkeys(msg for _, msg in scan_imagefolder(_imagefolder_cfg(tmp_path)))
    assert f"{tmp_path / 'train' / 'bird'} has no images" in " ".join(problems)
    assert f"{tmp_path / 'test' / 'bird'} has no images" in " ".join(problems)
    bad = next(m for m in problems if "unreadable" in m)
    assert bad.startswith(f"2 unreadable images in {tmp_path}: ")
    assert "test/dog/half.png (" in bad and "train/cat/bad.png (" in bad


def test_check_data_finds_wrong_mean_std_and_class_names_lengths(tmp_path):
    from compresskit.data import check_data

    cfg = _imagefolder_cfg(_folder(tmp_path), channels=1, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2],
                           class_names=["a", "b", "c"])
    problems = dict(check_data(cfg))
    assert problems["data.mean"] == "3 values but the images have 1 channel (data.channels is 1)"
    assert problems["data.std"].startswith("3 values but the images have 1 channel")
    assert problems["data.class_names"].startswith(f"3 names but {tmp_path / 'train'} has 2 classes (cat, dog)")
    synthetic = DataConfig(dataset="synthetic", mean=[0.1, 0.2], std=[0.3, 0.3], class_names=["x"])
    problems = dict(check_data(synthetic))
    assert problems["data.mean"].startswith("2 values but the images have 1 channel")
    assert problems["data.class_names"] == "1 names but the dataset has 4 classes"


def test_config_preprocess_is_what_load_data_records(tmp_path):
    from compresskit.data import config_preprocess

    for cfg in (DataConfig(dataset="synthetic", synthetic=SyntheticConfig(num_train=32, num_test=16, channels=3)),
                _imagefolder_cfg(_folder(tmp_path), channels=1, mean=[0.4], class_names=["Cat", "Dog"])):
        recorded = load_data(cfg, seed=0).checkpoint_preprocess()
        assert recorded["class_names"] and config_preprocess(cfg) == recorded
