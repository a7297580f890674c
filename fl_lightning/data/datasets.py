"""Datasets decoded once into uint8 tensors that all processes map (MNIST, CIFAR-10, folders)."""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG, S_IWGRP, S_IWOTH
from typing import Any

import torch
from torch.utils.data import Dataset

from fl_lightning import seeding
from fl_lightning.config.schema import DataConfig
from fl_lightning.data.augment import random_crop_flip
from fl_lightning.errors import DataError
from fl_lightning.files import write_atomically

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
    """Gaussian pixel noise and random labels, fixed per sample by (seed, sample index).

    `seed` is the split's noise stream (`seeding.derive(run seed, "noise", split)`).
    """

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
            generator = seeding.generator(self.seed, row)
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
    cache_folder = _cache_folder(cache_dir)
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
        # A few large files: their first and last MiB join the key (milliseconds).
        sources = [f"{name}:{_stamp(p)}:{_ends_digest(p)}" for p in files]
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
    return _cached(sources, decode, cache_folder)


def _cache_folder(cache_dir: str) -> Path:
    try:
        return Path(cache_dir).expanduser()
    except RuntimeError:  # `~nosuchuser/...`
        raise DataError(
            f"data.cache_dir={cache_dir}: no such user's home folder; give an existing path"
        ) from None


def _stamp(path: str | Path) -> str:
    """What changes when a source file does: size, mtime, and the inode's ctime and number.

    ctime cannot be set back by `touch` or `utime` (any write, rename or metadata change
    moves it to now), so a file rewritten with its old size and mtime still gets a new
    key. Reading every file's content instead would cost 1-4 s per process for CIFAR-10's
    60,000 JPEGs (measured); each process computes this key before it maps the cache.
    """
    stat = os.stat(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"


def _ends_digest(path: Path, window: int = 1 << 20) -> str:
    """SHA-256 of a file's first and last `window` bytes (the whole file if smaller)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        digest.update(stream.read(window))
        size = os.fstat(stream.fileno()).st_size
        if size > window:
            stream.seek(max(window, size - window))
            digest.update(stream.read(window))
    return digest.hexdigest()[:16]


def _cached(sources: list[str], decode: Callable[[], Decoded], cache_dir: Path) -> DatasetSplits:
    """Decode once per machine; every process then maps the same file (keyed by `sources`).

    Loaded with mmap, the images are pages of the file that the driver and all Ray
    workers share, not a copy in each process; the channel statistics are stored too.
    """
    digest = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:20]
    cache = cache_dir / f"splits-{digest}.pt"
    folder_problem = _untrusted(cache_dir, folder=True)
    if folder_problem is None and cache.exists():
        try:
            if (problem := _untrusted(cache, folder=False)) is not None:
                raise ValueError(problem)
            return _read_cache(cache)
        except Exception as err:  # a damaged or untrusted cache is rebuilt, never used
            reason = str(err).split(". ")[0]  # torch's zip errors run to several sentences
            warnings.warn(f"{cache}: {reason}; decoding the dataset again", stacklevel=2)
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
        if folder_problem is not None and cache_dir.exists():
            raise OSError(folder_problem)
        # Private to the user from the start: a decoded copy of the images is as sensitive
        # as the images (created with these modes, never loosened and then tightened).
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Atomic: a concurrent reader sees no file or the whole file.
        write_atomically(cache, lambda partial: torch.save(stored, partial), mode=0o600)
    except OSError as err:
        warnings.warn(
            f"data.cache_dir={cache_dir} is not writable, or not yours alone ({err}); every "
            "process decodes the dataset itself. Point data.cache_dir at a folder of your own",
            stacklevel=2,
        )
        return DatasetSplits(train=train, test=test, classes=classes, mean=mean, std=std)
    return _read_cache(cache)


def _untrusted(path: Path, folder: bool) -> str | None:
    """Why the cache file or folder at `path` must not be trusted (None: it may, or is absent).

    Only what this user alone can write is loaded: anyone else able to replace the file
    could hand every process of a run tensors of their choosing.
    """
    try:
        stat = path.lstat()  # a symlink is judged itself, never followed
    except (FileNotFoundError, NotADirectoryError):
        return None
    kind = "folder" if folder else "file"
    if (folder and not S_ISDIR(stat.st_mode)) or (not folder and not S_ISREG(stat.st_mode)):
        return f"not a plain {kind}"
    if hasattr(os, "geteuid") and stat.st_uid != os.geteuid():
        return f"the {kind} belongs to another user (uid {stat.st_uid})"
    if stat.st_mode & (S_IWGRP | S_IWOTH):
        return f"the {kind} is writable by group or others (mode {stat.st_mode & 0o777:o})"
    return None


CACHE_KEYS = {
    "train_images",
    "train_labels",
    "test_images",
    "test_labels",
    "classes",
    "mean",
    "std",
}


def _read_cache(cache: Path) -> DatasetSplits:
    """Map a cache file (tensors and plain data only) and check it is what `_cached` writes."""
    stored = torch.load(cache, mmap=True, weights_only=True)
    if not isinstance(stored, dict) or set(stored) != CACHE_KEYS:
        raise ValueError("not a dataset cache (unexpected keys)")
    classes, mean, std = stored["classes"], stored["mean"], stored["std"]
    if not (
        isinstance(classes, list)
        and classes
        and all(isinstance(c, str) for c in classes)
        and isinstance(mean, list)
        and isinstance(std, list)
        and all(isinstance(v, float) for v in (*mean, *std))
    ):
        raise ValueError("classes, mean or std malformed")
    splits = []
    for split in ("train", "test"):
        images, labels = stored[f"{split}_images"], stored[f"{split}_labels"]
        _check_split(split, images, labels, len(classes), len(mean))
        splits.append(ImageTensors(images, labels))
    if splits[0].images.shape[1:] != splits[1].images.shape[1:] or len(std) != len(mean):
        raise ValueError("the splits' image shapes or channel statistics disagree")
    return DatasetSplits(splits[0], splits[1], tuple(classes), tuple(mean), tuple(std))


def _check_split(
    split: str, images: object, labels: object, num_classes: int, channels: int
) -> None:
    """Raise ValueError unless `images` are uint8 (N, C, H, W) and `labels` int64 (N,) in range."""
    if not (
        isinstance(images, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and images.dtype == torch.uint8
        and images.ndim == 4
        and images.shape[1] == channels
        and labels.dtype == torch.long
        and labels.shape == (images.shape[0],)
        and len(labels) > 0
    ):
        raise ValueError(f"{split} images or labels malformed")
    # Labels only (a few hundred KB): the images stay unread pages of the mapping.
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"{split} labels outside the {num_classes} classes")


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
