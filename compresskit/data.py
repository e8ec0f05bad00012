"""Datasets and loaders.

Images travel as uint8 (N, C, H, W) and are normalised (and augmented) per batch on the
training device: small datasets (Fashion-MNIST, CIFAR-10, synthetic) live in memory as one
tensor, which is several times faster than per-sample PIL transforms; an image folder is read
lazily through a DataLoader and goes through the same batch transform.

Splits: `train` (for fitting), `val` (carved from the training set, for model selection),
`test` (only for the reported accuracy), `calib` (a subset of `train` for PTQ calibration).

Before a run (`compresskit.preflight`): `check_data` finds what `load_data` would fail on (an
image folder is scanned whole by `scan_imagefolder`), and `config_preprocess` tells, from the
config alone, what `DataBundle.checkpoint_preprocess()` will be (what checkpoints record).
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from compresskit.config import DataConfig
from compresskit.stage import InputError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
DEFAULT_NORM = {  # mean, std after scaling pixels to [0, 1]
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


class DataError(InputError):
    """The dataset cannot be found or read; the message says how to fix it."""


@dataclass
class Split:
    """A split: in-memory uint8 images, or a lazy dataset of (uint8 CHW tensor, label)."""

    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    dataset: Dataset | None = None

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.dataset)  # type: ignore[arg-type]

    def subset(self, index: torch.Tensor) -> Split:
        if self.images is not None:
            return Split(self.images[index], self.labels[index])  # type: ignore[index]
        return Split(dataset=Subset(self.dataset, index.tolist()))  # type: ignore[arg-type]


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    calib: Split
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    class_names: list[str]
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    hflip: bool = False
    crop_padding: int = 0
    extra: dict = field(default_factory=dict)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, *self.image_size)

    def loader(self, split: str, *, batch_size: int | None = None, shuffle: bool = False,
               augment: bool = False, device: torch.device | str = "cpu",
               channels_last: bool = False, seed: int = 0) -> BatchLoader:
        bs = batch_size or (self.batch_size if split == "train" else self.eval_batch_size)
        return BatchLoader(getattr(self, split), bs, shuffle=shuffle, seed=seed,
                           transform=BatchTransform(self.mean, self.std,
                                                    self.hflip and augment,
                                                    self.crop_padding if augment else 0),
                           device=torch.device(device), channels_last=channels_last,
                           num_workers=self.num_workers)

    def numpy_split(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 images and int64 labels of a split (for onnxruntime)."""
        xs, ys = [], []
        seen = 0
        for x, y in self.loader(split):
            xs.append(x.numpy())
            ys.append(y.numpy())
            seen += len(y)
            if limit is not None and seen >= limit:
                break
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        return (x_all[:limit], y_all[:limit]) if limit is not None else (x_all, y_all)

    def preprocess(self) -> dict:
        """What a deployment applies to raw 0..255 pixels: (x * scale - mean) / std, NCHW."""
        return _preprocess(self.mean, self.std, self.in_channels, self.image_size)

    def checkpoint_preprocess(self) -> dict:
        """What a checkpoint records of the data it was trained on (`save_checkpoint(...,
        preprocess=...)`): `preprocess()` plus the class names, in label order."""
        return self.preprocess() | {"class_names": list(self.class_names)}


PIXEL_SCALE = 1 / 255


def _preprocess(mean, std, channels: int, size) -> dict:
    return {"scale": PIXEL_SCALE, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "layout": "NCHW", "channels": int(channels), "size": [int(v) for v in size]}


def _normalisation(cfg: DataConfig, channels: int) -> tuple[list[float], list[float]]:
    """mean, std the batches are normalised with: the config's, else the dataset's default."""
    mean, std = DEFAULT_NORM.get(cfg.dataset, ([0.5] * channels, [0.25] * channels))
    return (list(cfg.mean) if cfg.mean is not None else list(mean),
            list(cfg.std) if cfg.std is not None else list(std))


class BatchTransform:
    """uint8 batch -> normalised float batch, with optional flip / pad-and-crop per sample."""

    def __init__(self, mean: list[float], std: list[float], hflip: bool, crop_padding: int) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255)
        self.hflip = hflip
        self.pad = crop_padding

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        x = x.float()
        dev = x.device
        if self.hflip:
            flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(dev)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.pad:
            n, _, h, w = x.shape
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen).to(dev)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen).to(dev)
            rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
            x = padded.gather(2, rows.expand(n, x.shape[1], h, w + 2 * self.pad))
            cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
            x = x.gather(3, cols.expand(n, x.shape[1], h, w))
        mean, inv_std = self.mean.to(x.device), self.inv_std.to(x.device)
        return (x - mean) * inv_std


class BatchLoader:
    """Iterates (normalised images, labels) batches on `device`; reshuffles every epoch."""

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, seed: int,
                 transform: BatchTransform, device: torch.device, channels_last: bool,
                 num_workers: int) -> None:
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.transform, self.device, self.channels_last = transform, device, channels_last
        self.num_workers = num_workers
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def _raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.split.images is not None:
            order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
            for i in range(0, n, self.batch_size):
                idx = order[i:i + self.batch_size]
                if self.shuffle and len(idx) < 2 < n:
                    break  # a training batch of one sample breaks BatchNorm
                yield self.split.images[idx], self.split.labels[idx]  # type: ignore[index]
        else:
            drop_last = self.shuffle and n % self.batch_size == 1 and n > 2
            loader = DataLoader(self.split.dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                                num_workers=self.num_workers, generator=self.gen, drop_last=drop_last,
                                persistent_workers=False, pin_memory=self.device.type == "cuda")
            yield from loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._raw_batches():
            x = x.to(self.device, non_blocking=True)
            x = self.transform(x, self.gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True).long()


# ------------------------------------------------------------------ readers

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz",
                      root / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_root(cfg: DataConfig) -> Path | None:
    """The first directory that holds all four Fashion-MNIST files, or None."""
    candidates = [cfg.root] if cfg.root is not None else [DEBIAN_FASHION_MNIST, Path("data/fashion-mnist")]
    for root in candidates:
        if all(_find_idx(root, s) for pair in FASHION_FILES.values() for s in pair):
            return root
    return None


def _load_fashion_mnist(cfg: DataConfig) -> tuple[Split, Split]:
    root = fashion_mnist_root(cfg)
    if root is None and cfg.download:
        from torchvision.datasets import FashionMNIST

        target = cfg.root or Path("data/fashion-mnist")
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
        root = target
    if root is None:
        where = str(cfg.root) if cfg.root else f"{DEBIAN_FASHION_MNIST} or data/fashion-mnist"
        raise DataError(
            f"Fashion-MNIST not found in {where}. On Debian/Ubuntu: "
            "'sudo apt-get install dataset-fashion-mnist'; or set data.root to a directory with the "
            "four IDX .gz files; or set data.download: true to fetch it with torchvision.")
    splits = []
    for images_stem, labels_stem in FASHION_FILES.values():
        images = _read_idx(_find_idx(root, images_stem))  # type: ignore[arg-type]
        labels = _read_idx(_find_idx(root, labels_stem))  # type: ignore[arg-type]
        splits.append(Split(torch.from_numpy(images.copy()).unsqueeze(1),
                            torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def _load_cifar10(cfg: DataConfig) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10

    root = cfg.root or Path("data/cifar10")
    out = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=cfg.download)
        except RuntimeError as err:
            raise DataError(f"CIFAR-10 not found in {root} ({err}); set data.root to torchvision's "
                            "CIFAR-10 directory or data.download: true") from None
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        out.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
    return out[0], out[1]


def _to_rgb(image):
    return image.convert("RGB")


def _load_imagefolder(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)  # type: ignore[arg-type]
    channels = cfg.channels or 3
    tf = [transforms.Resize((cfg.image_size, cfg.image_size))]
    tf.append(transforms.Grayscale(1) if channels == 1 else transforms.Lambda(_to_rgb))
    tf.append(transforms.PILToTensor())
    transform = transforms.Compose(tf)
    splits = []
    for name in ("train", "test"):
        if not (root / name).is_dir():
            raise DataError(f"imagefolder: {root / name} is not a directory (expected {root}/train/<class>/*.png "
                            f"and {root}/test/<class>/*.png)")
        try:
            splits.append(ImageFolder(str(root / name), transform=transform))
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"imagefolder: {root / name}: {err}") from None
    train, test = splits
    if train.classes != test.classes:
        raise DataError(f"imagefolder: train classes {train.classes} differ from test classes {test.classes}")
    return Split(dataset=train), Split(dataset=test), list(train.classes)


def _make_synthetic(cfg: DataConfig) -> tuple[Split, Split]:
    """Learnable synthetic images: a class template (smooth random pattern) plus noise."""
    s = cfg.synthetic
    gen = torch.Generator().manual_seed(s.seed)
    coarse = 0.15 + 0.7 * (torch.rand(s.num_classes, s.channels, 4, 4, generator=gen) > 0.5).float()
    templates = torch.nn.functional.interpolate(coarse, size=(s.image_size, s.image_size),
                                                mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        labels = torch.randint(0, s.num_classes, (n,), generator=gen)
        noise = torch.randn(n, s.channels, s.image_size, s.image_size, generator=gen) * 0.2
        images = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(images, labels)

    return draw(s.num_train), draw(s.num_test)


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the dataset and carve the val and calibration splits (deterministic for a seed)."""
    names: list[str] | None = None
    if cfg.dataset == "fashion-mnist":
        train, test = _load_fashion_mnist(cfg)
        names = FASHION_CLASSES
    elif cfg.dataset == "cifar10":
        train, test = _load_cifar10(cfg)
        names = CIFAR10_CLASSES
    elif cfg.dataset == "imagefolder":
        train, test, names = _load_imagefolder(cfg)
    else:
        train, test = _make_synthetic(cfg)
        names = [f"class_{i}" for i in range(cfg.synthetic.num_classes)]
    def limit(split: Split, n: int | None) -> Split:
        if n is None or n >= len(split):
            return split
        pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))[:n]
        return split.subset(pick.sort().values)  # random, since image folders are sorted by class

    train, test = limit(train, cfg.limit_train), limit(test, cfg.limit_test)

    sample, _ = (train.images[0], None) if train.images is not None else train.dataset[0]  # type: ignore[index]
    in_channels, h, w = sample.shape
    num_classes = len(names)
    if cfg.class_names is not None:
        if len(cfg.class_names) != num_classes:
            raise DataError(f"data.class_names has {len(cfg.class_names)} names but the dataset has "
                            f"{num_classes} classes")
        names = list(cfg.class_names)
    mean, std = _normalisation(cfg, in_channels)
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != in_channels:
            raise DataError(f"data.{key} has {len(values)} values but the images have {in_channels} channels")

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(train) * cfg.val_fraction))
    if cfg.val_fraction > 0 and n_val == 0:
        n_val = 1
    val_idx, train_idx = order[:n_val], order[n_val:]
    if len(train_idx) == 0:
        raise DataError("no training images left after carving the validation split")
    calib_idx = train_idx[: min(cfg.calib_size, len(train_idx))]
    # without a val split, model selection falls back to the training data's tail (never test)
    val = train.subset(val_idx) if n_val else train.subset(train_idx[-min(len(train_idx), 1000):])
    return DataBundle(
        train=train.subset(train_idx), val=val, test=test, calib=train.subset(calib_idx),
        num_classes=num_classes, in_channels=in_channels, image_size=(h, w), mean=mean, std=std,
        class_names=names, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers, hflip=cfg.augment.hflip, crop_padding=cfg.augment.crop_padding,
    )


def check_data_available(cfg: DataConfig) -> str | None:
    """Cheap pre-flight check; returns a problem message or None."""
    if cfg.dataset == "fashion-mnist" and not cfg.download and fashion_mnist_root(cfg) is None:
        where = str(cfg.root) if cfg.root else f"{DEBIAN_FASHION_MNIST} or data/fashion-mnist"
        return (f"Fashion-MNIST not found in {where} (apt-get install dataset-fashion-mnist, "
                "set data.root, or data.download: true)")
    if cfg.dataset == "imagefolder":
        for name in ("train", "test"):
            if not (Path(cfg.root) / name).is_dir():  # type: ignore[arg-type]
                return f"{Path(cfg.root) / name} is not a directory"  # type: ignore[arg-type]
    if cfg.dataset == "cifar10" and not cfg.download:
        root = cfg.root or Path("data/cifar10")
        if not (root / "cifar-10-batches-py").is_dir():
            return f"CIFAR-10 not found in {root} (set data.root or data.download: true)"
    return None


# ------------------------------------------------------------------ checks before a run

KNOWN_CLASSES = {"fashion-mnist": FASHION_CLASSES, "cifar10": CIFAR10_CLASSES}
KNOWN_SHAPE = {"fashion-mnist": (1, 28), "cifar10": (3, 32)}  # channels, side


def _config_shape(cfg: DataConfig) -> tuple[int, int]:
    """(channels, image side) the data will have, from the config alone."""
    if cfg.dataset == "synthetic":
        return cfg.synthetic.channels, cfg.synthetic.image_size
    if cfg.dataset == "imagefolder":
        return cfg.channels or 3, cfg.image_size or 32
    return KNOWN_SHAPE[cfg.dataset]


def imagefolder_classes(split_dir: Path) -> list[str]:
    """The classes torchvision's ImageFolder finds in a split folder: its sub-folders, sorted."""
    try:
        return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    except OSError:
        return []


def _image_files(class_dir: Path) -> list[Path]:
    """The files ImageFolder takes as images of a class (walked like its make_dataset)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    found = []
    for folder, _, names in sorted(os.walk(class_dir, followlinks=True)):
        found += [Path(folder) / n for n in sorted(names) if has_file_allowed_extension(n, IMG_EXTENSIONS)]
    return found


def _unreadable(path: Path) -> str | None:
    """Why PIL cannot open and verify an image file, or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except Exception as err:  # noqa: BLE001 - a damaged file makes PIL raise many kinds
        first = (str(err).strip().splitlines() or [""])[0]
        return f"{type(err).__name__}: {first[:80]}" if first else type(err).__name__
    return None


def _some(items: list[str], limit: int = 5) -> str:
    return ", ".join(map(str, items[:limit])) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def scan_imagefolder(cfg: DataConfig) -> list[tuple[str, str]]:
    """Check an image folder as a run would read it, before any training: train/ and test/ hold
    the same classes, no class is empty, every image opens and verifies with PIL (all of them:
    this takes a while on big folders), `class_names` names every class. Returns problems as
    (key path, message) pairs."""
    root = Path(cfg.root)  # type: ignore[arg-type]
    problems: list[tuple[str, str]] = []
    classes: dict[str, list[str]] = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            problems.append(("data.root", f"{folder} is not a directory (expected {root}/train/<class>/*.png "
                                          f"and {root}/test/<class>/*.png)"))
            continue
        classes[split] = imagefolder_classes(folder)
        if not classes[split]:
            problems.append(("data.root", f"{folder} has no class folders (expected {folder}/<class>/*.png)"))
    train, test = classes.get("train", []), classes.get("test", [])
    if train and test:
        for have, lack, names in (("train", "test", sorted(set(train) - set(test))),
                                  ("test", "train", sorted(set(test) - set(train)))):
            if names:
                problems.append(("data.root", f"class{'es' if len(names) > 1 else ''} {_some(names)} in "
                                              f"{root / have} but not in {root / lack} (both need the same classes)"))
    from torchvision.datasets.folder import IMG_EXTENSIONS

    bad: list[str] = []
    for split, names in classes.items():
        for name in names:
            files = _image_files(root / split / name)
            if not files:
                problems.append(("data.root", f"{root / split / name} has no images ({', '.join(IMG_EXTENSIONS)})"))
            for f in files:
                why = _unreadable(f)
                if why:
                    bad.append(f"{f.relative_to(root)} ({why})")
    if bad:
        problems.append(("data.root", f"{len(bad)} unreadable image{'s' if len(bad) > 1 else ''} in {root}: "
                                      f"{_some(bad, 3)}"))
    if cfg.class_names is not None and train and len(cfg.class_names) != len(train):
        problems.append(("data.class_names", f"{len(cfg.class_names)} names but {root / 'train'} has "
                                             f"{len(train)} classes ({_some(train)})"))
    return problems


def check_data(cfg: DataConfig) -> list[tuple[str, str]]:
    """Every check of the data `load_data` would fail on, from the config and the files, before
    anything is trained: the dataset is there (an image folder is scanned whole, see
    `scan_imagefolder`), `mean` / `std` have one value per channel, `class_names` one name per
    class. Returns problems as (key path, message) pairs."""
    problems: list[tuple[str, str]] = []
    if cfg.dataset == "imagefolder":
        problems += scan_imagefolder(cfg)
    else:
        msg = check_data_available(cfg)
        if msg:
            problems.append(("data", msg))
    channels, _ = _config_shape(cfg)
    why = {"imagefolder": f"data.channels is {channels}", "synthetic": "data.synthetic.channels",
           "fashion-mnist": "Fashion-MNIST is grayscale", "cifar10": "CIFAR-10 is RGB"}[cfg.dataset]
    for key, values in (("mean", cfg.mean), ("std", cfg.std)):
        if values is not None and len(values) != channels:
            problems.append((f"data.{key}", f"{len(values)} value{'s' if len(values) > 1 else ''} but the images "
                                            f"have {channels} channel{'s' if channels > 1 else ''} ({why})"))
    known = _config_class_names(cfg) if cfg.dataset != "imagefolder" else None
    if cfg.class_names is not None and known is not None and len(cfg.class_names) != len(known):
        problems.append(("data.class_names", f"{len(cfg.class_names)} names but the dataset has {len(known)} classes"))
    return problems


def _config_class_names(cfg: DataConfig) -> list[str] | None:
    """The dataset's own class names, from the config (and an image folder's train/ sub-folders)."""
    if cfg.dataset == "synthetic":
        return [f"class_{i}" for i in range(cfg.synthetic.num_classes)]
    if cfg.dataset == "imagefolder":
        return imagefolder_classes(Path(cfg.root) / "train") or None  # type: ignore[arg-type]
    return list(KNOWN_CLASSES[cfg.dataset])


def config_preprocess(cfg: DataConfig) -> dict:
    """What `load_data(cfg).checkpoint_preprocess()` will be, from the config (and an image
    folder's class folders) without reading any image: for checks before a run. `class_names`
    is None when an image folder has no classes to read."""
    channels, side = _config_shape(cfg)
    names = _config_class_names(cfg)
    if cfg.class_names is not None and (names is None or len(cfg.class_names) == len(names)):
        names = list(cfg.class_names)
    mean, std = _normalisation(cfg, channels)
    return _preprocess(mean, std, channels, (side, side)) | {"class_names": names}


def write_eval_npz(data_cfg: DataConfig, path: str | os.PathLike, split: str = "test", limit: int | None = None,
                   seed: int = 0) -> dict:
    """Write a split as ``.npz`` for ``compresskit bench --data`` (and ``bundle --samples-from``):
    ``x`` float32 (N, C, H, W) preprocessed exactly as the pipeline feeds its models
    ((pixel * scale - mean) / std, what the exported models record as ``compresskit.preprocess``)
    and ``y`` int64 labels. ``limit``: the first N samples of the split (the split's own order;
    `load_data` with ``seed`` carves val/calib). Written atomically. Returns the path, sample
    count, x's shape, the split and the preprocessing."""
    from compresskit.artifacts import atomic_path

    if split not in ("train", "val", "test", "calib"):
        raise ValueError(f"split must be one of train, val, test, calib; got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    data = load_data(data_cfg, seed)
    x, y = data.numpy_split(split, limit)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x.astype(np.float32, copy=False), y=y.astype(np.int64, copy=False))
    return {"path": path, "n": int(len(y)), "shape": list(x.shape), "split": split, "preprocess": data.preprocess()}
