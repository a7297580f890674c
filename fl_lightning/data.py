"""Datasets decoded once into uint8 tensors that all processes map (MNIST, CIFAR-10, folders)."""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fl_lightning.augment import random_crop_flip
from fl_lightning.config import DataConfig
from fl_lightning.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageTensors:
    """One split: images as uint8 (N, C, H, W) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DatasetSplits:
    """Train and test splits plus the per-channel statistics used to normalise both."""

    train: ImageTensors
    test: ImageTensors
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output width)."""
        return len(self.classes)


class IndexedImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The samples of `tensors` listed in `indices`, normalised batch by batch.

    Implements `__getitems__` so the DataLoader gathers a whole batch with one tensor
    index instead of stacking samples one by one. Optionally corrupts the samples (the
    noisy-clients experiment: the same noise for a sample every time it is read) and
    augments them (training batches).
    """

    def __init__(
        self,
        tensors: ImageTensors,
        indices: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        noise: Corruption | None = None,
        augment: str = "none",
    ) -> None:
        self.tensors = tensors
        self.indices = indices
        channels = len(mean)
        self.mean = torch.tensor(mean).view(1, channels, 1, 1)
        self.std = torch.tensor(std).view(1, channels, 1, 1)
        self.noise = noise
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the batch at `positions` as normalised float images and labels."""
        rows = self.indices[positions]
        images = self.tensors.images[rows].float().div_(255.0)
        labels = self.tensors.labels[rows]
        if self.noise is not None:
            images, labels = self.noise.apply(rows, images, labels)
        if self.augment != "none":
            images = random_crop_flip(images, flip=self.augment == "crop_flip")
        return (images - self.mean) / self.std, labels

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([position])
        return images[0], labels[0]


@dataclass(frozen=True)
class Corruption:
    """Gaussian pixel noise and random labels, fixed per sample by (seed, sample index)."""

    std: float
    label_fraction: float
    num_classes: int
    seed: int

    def apply(
        self, rows: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt a batch in [0, 1] pixel units; `rows` are the samples' dataset indices."""
        labels = labels.clone()
        for i, row in enumerate(rows.tolist()):
            # One RNG per sample: its noise does not depend on batch order or size.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + row)
            if self.std > 0:
                images[i] += self.std * torch.randn(images[i].shape, generator=generator)
            if (
                self.label_fraction > 0
                and torch.rand(1, generator=generator).item() < self.label_fraction
            ):
                labels[i] = int(torch.randint(self.num_classes, (1,), generator=generator).item())
        return images.clamp_(0.0, 1.0), labels


def collate_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader collate_fn for `IndexedImages`: the batch is already assembled."""
    return batch


def load_splits(data: DataConfig) -> DatasetSplits:
    """Decoded train/test splits of the configured dataset (cached on disk and per process)."""
    return _load_splits(
        data.dataset, data.root, data.download, data.channels, data.image_size, data.cache_dir
    )


# Torchvision's on-disk folder (under data.root) of each dataset it reads itself. Spelled
# out rather than read from torchvision's classes: a cache hit then never imports
# torchvision (about 1 s, torch._dynamo included), in the driver or in any Ray worker.
TORCHVISION_FOLDERS = {"MNIST": "MNIST", "CIFAR10": "cifar-10-batches-py"}

Decoded = tuple[ImageTensors, ImageTensors, tuple[str, ...]]


@functools.lru_cache(maxsize=2)
def _load_splits(
    dataset: str, root: str, download: bool, channels: int, image_size: int | None, cache_dir: str
) -> DatasetSplits:
    path = Path(root).resolve()  # one cache however the root is spelled
    if dataset == "mnist" or (dataset == "cifar10" and not _is_image_folder_tree(path)):
        name = "MNIST" if dataset == "mnist" else "CIFAR10"
        # Cached: a first download decodes the files once, for the download and the cache.
        decode: Callable[[], Decoded] = functools.cache(
            functools.partial(_torchvision_splits, name, root, download)
        )
        folder = path / TORCHVISION_FOLDERS[name]
        if not folder.is_dir():
            decode()  # downloads it (data.download), or says what is missing
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        sources = [f"{name}:{_stamp(p)}" for p in files]
    else:
        if not _is_image_folder_tree(path):
            raise DataError(
                f"data.root={root} is not an ImageFolder tree: it needs train/<class>/ and "
                "test/<class>/ folders of images"
            )
        if dataset == "cifar10":  # CIFAR-10's JPEGs: RGB, at their own 32x32
            channels, image_size = 3, None
        trees = _image_folder_files(path)
        decode = functools.partial(_image_folder_splits, trees, channels, image_size)
        sources = [f"{channels}:{image_size}"]
        sources += [f"{label}:{_stamp(p)}" for files in trees[:2] for label, p in files]
    return _cached(sources, decode, Path(cache_dir).expanduser())


def _stamp(path: str | Path) -> str:
    stat = os.stat(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _cached(sources: list[str], decode: Callable[[], Decoded], cache_dir: Path) -> DatasetSplits:
    """Decode once per machine; every process then maps the same file (keyed by `sources`).

    Loaded with mmap, the images are pages of the file that the driver and all Ray
    workers share, not a copy in each process; the channel statistics are stored too.
    """
    digest = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:20]
    cache = cache_dir / f"splits-{digest}.pt"
    if cache.exists():
        try:
            return _read_cache(cache)
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    train, test, classes = decode()
    mean, std = _channel_stats(train.images)
    stored = {
        "train_images": train.images,
        "train_labels": train.labels,
        "test_images": test.images,
        "test_labels": test.labels,
        "classes": list(classes),
        "mean": list(mean),
        "std": list(std),
    }
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(stored, partial)
        partial.replace(cache)  # atomic: a concurrent reader sees no file or the whole file
    except OSError as err:
        warnings.warn(
            f"data.cache_dir={cache_dir} is not writable ({err}); every process decodes the "
            "dataset itself. Point data.cache_dir at a writable folder",
            stacklevel=2,
        )
        return DatasetSplits(train=train, test=test, classes=classes, mean=mean, std=std)
    return _read_cache(cache)


def _read_cache(cache: Path) -> DatasetSplits:
    stored = torch.load(cache, mmap=True, weights_only=True)
    return DatasetSplits(
        train=ImageTensors(stored["train_images"], stored["train_labels"]),
        test=ImageTensors(stored["test_images"], stored["test_labels"]),
        classes=tuple(stored["classes"]),
        mean=tuple(stored["mean"]),
        std=tuple(stored["std"]),
    )


def _torchvision_splits(name: str, root: str, download: bool) -> Decoded:
    """MNIST / CIFAR10 in torchvision's own on-disk layout (downloaded there if asked)."""
    import torchvision

    cls = getattr(torchvision.datasets, name)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=download)
        except RuntimeError as err:
            hint = (
                "point data.root at the folder that holds it"
                if download
                else "point data.root at the folder that holds it, or set data.download=true"
            )
            raise DataError(f"{name} not found under data.root={root} ({err}); {hint}") from None
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        splits.append(
            ImageTensors(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))
        )
    return splits[0], splits[1], tuple(ds.classes)


def _is_image_folder_tree(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


ImageFiles = list[tuple[int, str]]  # (label, path)


def _image_folder_files(root: Path) -> tuple[ImageFiles, ImageFiles, tuple[str, ...]]:
    """(label, path) of every image of train/<class>/* and test/<class>/*, and the classes."""
    classes = _class_names(root / "train")
    test_classes = _class_names(root / "test")
    if test_classes != classes:
        missing = sorted(set(classes) ^ set(test_classes))
        raise DataError(
            f"{root}: train/ and test/ hold different class folders ({', '.join(missing)}); "
            "both splits need the same classes"
        )
    splits = []
    for split in ("train", "test"):
        # Plain strings: every process lists the tree (the cache key) before it maps the
        # decoded tensors, and 60,000 pathlib.Path objects take seconds to build and sort.
        files = [
            (index, os.path.join(root, split, name, file))
            for index, name in enumerate(classes)
            for file in sorted(os.listdir(root / split / name))
            if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise DataError(f"{root / split} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        splits.append(files)
    return splits[0], splits[1], classes


def _image_folder_splits(
    trees: tuple[ImageFiles, ImageFiles, tuple[str, ...]], channels: int, image_size: int | None
) -> Decoded:
    """Both splits of an ImageFolder tree, decoded (the slow part: one JPEG at a time)."""
    train, test, classes = trees
    return _decode(train, channels, image_size), _decode(test, channels, image_size), classes


def _class_names(folder: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    if not names:
        raise DataError(f"{folder} holds no class folders; expected {folder}/<class>/<image>")
    return names


def _decode(files: ImageFiles, channels: int, image_size: int | None) -> ImageTensors:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    images = []
    for _, path in files:
        try:
            image = decode_image(read_file(path), mode=mode)
        except RuntimeError as err:
            raise DataError(
                f"{path} is not a readable image ({err}); remove or replace it"
            ) from None
        if image_size is not None and image.shape[-2:] != (image_size, image_size):
            image = resize(image, [image_size, image_size], antialias=True)
        images.append(image)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DataError(
            f"images in {Path(files[0][1]).parent.parent} differ in size {sorted(shapes)[:3]}; "
            "set data.image_size to resize them"
        )
    labels = torch.tensor([label for label, _ in files], dtype=torch.long)
    return ImageTensors(torch.stack(images), labels)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 images, in [0, 1] units."""
    # Sums over chunks of images: converting a whole split to float64 at once would cost
    # every process that loads the data a transient 400 MB (MNIST) at start-up.
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        values = chunk.double().div_(255.0)
        total += values.sum(dim=(0, 2, 3))
        squares += values.pow_(2).sum(dim=(0, 2, 3))
    n = images.numel() // images.shape[1]
    mean = total / n
    var = (squares - n * mean.pow(2)) / (n - 1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())
