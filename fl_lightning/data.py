"""Datasets decoded once per process into uint8 tensors (MNIST, CIFAR-10, any ImageFolder tree)."""

from __future__ import annotations

import functools
import hashlib
import os
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
    """Decoded train/test splits of the configured dataset, cached for this process."""
    return _load_splits(
        data.dataset, data.root, data.download, data.channels, data.image_size, data.cache_dir
    )


@functools.lru_cache(maxsize=2)
def _load_splits(
    dataset: str, root: str, download: bool, channels: int, image_size: int | None, cache_dir: str
) -> DatasetSplits:
    if dataset == "mnist":
        train, test, classes = _torchvision_splits("MNIST", root, download)
    elif dataset == "cifar10" and _is_image_folder_tree(Path(root)):
        train, test, classes = _image_folder_splits(Path(root), 3, None, Path(cache_dir))
    elif dataset == "cifar10":
        train, test, classes = _torchvision_splits("CIFAR10", root, download)
    else:
        assert image_size is not None  # enforced by config validation
        if not _is_image_folder_tree(Path(root)):
            raise DataError(
                f"data.root={root} is not an ImageFolder tree: it needs train/<class>/ and "
                "test/<class>/ folders of images"
            )
        train, test, classes = _image_folder_splits(
            Path(root), channels, image_size, Path(cache_dir)
        )
    mean, std = _channel_stats(train.images)
    return DatasetSplits(train=train, test=test, classes=classes, mean=mean, std=std)


def _torchvision_splits(
    name: str, root: str, download: bool
) -> tuple[ImageTensors, ImageTensors, tuple[str, ...]]:
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


def _image_folder_splits(
    root: Path, channels: int, image_size: int | None, cache_dir: Path
) -> tuple[ImageTensors, ImageTensors, tuple[str, ...]]:
    """An ImageFolder tree (train/<class>/*, test/<class>/*) decoded, with a tensor cache."""
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
        files = [
            (index, path)
            for index, name in enumerate(classes)
            for path in sorted((root / split / name).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise DataError(f"{root / split} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        splits.append(_cached_decode(files, channels, image_size, cache_dir))
    return splits[0], splits[1], classes


def _class_names(folder: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    if not names:
        raise DataError(f"{folder} holds no class folders; expected {folder}/<class>/<image>")
    return names


def _cached_decode(
    files: list[tuple[int, Path]], channels: int, image_size: int | None, cache_dir: Path
) -> ImageTensors:
    """Decode `files` once; later processes load cached tensors (keyed by name, size, mtime)."""
    digest = hashlib.sha256(f"{channels}:{image_size}".encode())
    for label, path in files:
        stat = path.stat()
        digest.update(f"{label}:{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    cache = cache_dir / f"imagefolder-{digest.hexdigest()[:20]}.pt"
    if cache.exists():
        try:
            images, labels = torch.load(cache, weights_only=True)
            return ImageTensors(images, labels)
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    tensors = _decode(files, channels, image_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save((tensors.images, tensors.labels), partial)
    partial.replace(cache)  # atomic: a concurrent reader sees the old state or the whole file
    return tensors


def _decode(files: list[tuple[int, Path]], channels: int, image_size: int | None) -> ImageTensors:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    images = []
    for _, path in files:
        try:
            image = decode_image(read_file(str(path)), mode=mode)
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
            f"images in {files[0][1].parent.parent} differ in size {sorted(shapes)[:3]}; "
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
