import dataclasses
import os
import stat
from pathlib import Path

import pytest
import torch

from fl_lightning.config.schema import DataConfig
from fl_lightning.data.datasets import Corruption, IndexedImages, _load_splits, load_splits
from fl_lightning.errors import DataError


def test_mnist_decodes_to_uint8_tensors(data_root: Path) -> None:
    splits = load_splits(DataConfig(dataset="mnist", root=str(data_root)))
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert splits.num_classes == 10
    assert splits.mean[0] == pytest.approx(0.1307, abs=1e-3)
    assert splits.std[0] == pytest.approx(0.3081, abs=1e-3)
    # Decoded once per process: the same config returns the same tensors.
    assert load_splits(DataConfig(dataset="mnist", root=str(data_root))) is splits


def _mapped(path: Path) -> bool:
    """Whether this process maps `path` (Linux)."""
    return str(path) in Path("/proc/self/maps").read_text()


def test_decoded_splits_are_mapped_from_the_cache_and_damage_is_rebuilt(
    data_root: Path, tmp_path: Path
) -> None:
    data = DataConfig(dataset="mnist", root=str(data_root), cache_dir=str(tmp_path))
    first = load_splits(data)
    (cache,) = tmp_path.glob("splits-*.pt")
    # Every process (driver, Ray workers) maps the one file: its pages, not a copy each.
    assert _mapped(cache)
    _load_splits.cache_clear()  # as a new process would
    # A damaged file (a new inode: writing into the mapped one would fault its readers,
    # which is why the cache is only ever replaced by rename).
    damaged = cache.read_bytes()[:1000]
    cache.unlink()
    cache.write_bytes(damaged)
    rebuilt = load_splits(data)
    assert torch.equal(rebuilt.train.images, first.train.images)
    assert rebuilt.mean == first.mean and rebuilt.std == first.std
    assert cache.stat().st_size > 50_000_000


def test_unwritable_cache_dir_warns_and_still_loads(data_root: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    data = DataConfig(dataset="mnist", root=str(data_root), cache_dir=str(tmp_path / "file" / "c"))
    with pytest.warns(UserWarning, match=r"data.cache_dir=.* is not writable"):
        splits = load_splits(data)
    assert splits.train.images.shape == (60000, 1, 28, 28)


def test_missing_mnist_is_a_one_line_data_error(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"MNIST not found under data.root=.*data.download=true"
    ) as err:
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path / "nothing")))
    assert "\n" not in str(err.value)


def test_cifar10_loads_from_an_image_folder_tree(tiny_image_folder: Path, tmp_path: Path) -> None:
    data = DataConfig(
        dataset="cifar10", root=str(tiny_image_folder), cache_dir=str(tmp_path / "cache")
    )
    splits = load_splits(data)
    assert splits.train.images.shape == (60, 3, 32, 32)
    assert splits.test.images.shape == (15, 3, 32, 32)
    assert splits.classes == ("airplane", "cat", "ship")
    assert splits.train.labels.bincount().tolist() == [20, 20, 20]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # both splits, decoded once


def test_one_cache_however_the_root_is_spelled(
    tiny_image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_image_folder.parent)
    cache = str(tmp_path / "cache")
    relative = DataConfig(dataset="cifar10", root=tiny_image_folder.name, cache_dir=cache)
    absolute = DataConfig(dataset="cifar10", root=str(tiny_image_folder), cache_dir=cache)
    assert load_splits(relative).train.images.equal(load_splits(absolute).train.images)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_imagefolder_converts_channels_and_resizes(tiny_image_folder: Path, tmp_path: Path) -> None:
    data = DataConfig(
        dataset="imagefolder",
        root=str(tiny_image_folder),
        channels=1,
        image_size=16,
        cache_dir=str(tmp_path),
    )
    splits = load_splits(data)
    assert splits.train.images.shape == (60, 1, 16, 16)


def test_corrupt_image_and_missing_class_are_named(tiny_image_folder: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_image_folder, broken)
    (broken / "train" / "cat" / "zz.jpg").write_bytes(b"not a jpeg")
    data = DataConfig(
        dataset="imagefolder", root=str(broken), image_size=32, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(DataError, match=r"zz.jpg is not a readable image"):
        load_splits(data)
    shutil.rmtree(broken / "test" / "cat")
    with pytest.raises(DataError, match=r"different class folders \(cat\)"):
        load_splits(dataclasses.replace(data, cache_dir=str(tmp_path / "d")))


def test_indexed_images_gathers_normalised_batches(data_root: Path) -> None:
    splits = load_splits(DataConfig(dataset="mnist", root=str(data_root)))
    dataset = IndexedImages(splits.train, torch.tensor([5, 7, 9]), splits.mean, splits.std)
    images, labels = dataset.__getitems__([0, 2])
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == splits.train.labels[[5, 9]].tolist()
    expected = (splits.train.images[9].float() / 255 - splits.mean[0]) / splits.std[0]
    assert torch.allclose(dataset[2][0], expected)


def test_corruption_is_fixed_per_sample(data_root: Path) -> None:
    splits = load_splits(DataConfig(dataset="mnist", root=str(data_root)))
    noise = Corruption(std=0.5, label_fraction=0.5, num_classes=10, seed=3)
    indices = torch.arange(100)
    dataset = IndexedImages(splits.train, indices, splits.mean, splits.std, noise=noise)
    clean = IndexedImages(splits.train, indices, splits.mean, splits.std)
    batch, labels = dataset.__getitems__(list(range(100)))
    # The same sample reads the same, whatever batch it comes in.
    single, single_label = dataset.__getitems__([42])
    assert torch.equal(batch[42], single[0]) and labels[42] == single_label[0]
    assert not torch.equal(batch, clean.__getitems__(list(range(100)))[0])
    changed = (labels != splits.train.labels[:100]).float().mean().item()
    assert 0.25 < changed < 0.65  # half re-drawn, a tenth of those land on the true class
    raw = batch * splits.std[0] + splits.mean[0]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # clipped to the pixel range


def _bmp_tree(root: Path) -> Path:
    """A 2-class ImageFolder tree of 8x8 PNGs, stored uncompressed: every file has one size."""
    from PIL import Image

    for split in ("train", "test"):
        for label, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for k in range(3):
                Image.new("L", (8, 8), color=40 * label + 10 * k).save(
                    root / split / name / f"{k}.png", compress_level=0
                )
    return root


def _tree_config(root: Path, cache: Path) -> DataConfig:
    return DataConfig(
        dataset="imagefolder", root=str(root), channels=1, image_size=8, cache_dir=str(cache)
    )


def test_cache_is_private_to_the_user_from_the_start(tmp_path: Path) -> None:
    data = _tree_config(_bmp_tree(tmp_path / "tree"), tmp_path / "cache")
    previous = os.umask(0)  # modes must not depend on a tight umask
    try:
        load_splits(data)
    finally:
        os.umask(previous)
    (cache,) = (tmp_path / "cache").glob("splits-*.pt")
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert os.listdir(tmp_path / "cache") == [cache.name]  # no temporary file left


def test_a_cache_others_could_write_is_not_trusted(tmp_path: Path) -> None:
    data = _tree_config(_bmp_tree(tmp_path / "tree"), tmp_path / "cache")
    first = load_splits(data)
    (cache,) = (tmp_path / "cache").glob("splits-*.pt")
    cache.chmod(0o666)
    _load_splits.cache_clear()  # as a new process would
    with pytest.warns(UserWarning, match=r"writable by group or others \(mode 666\)"):
        again = load_splits(data)
    assert torch.equal(again.train.images, first.train.images)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600  # decoded again, privately
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(cache, 12345, -1)
        _load_splits.cache_clear()
        with pytest.warns(UserWarning, match=r"belongs to another user \(uid 12345\)"):
            load_splits(data)
        assert cache.stat().st_uid == 0


def test_a_cache_of_the_wrong_structure_is_decoded_again(tmp_path: Path) -> None:
    data = _tree_config(_bmp_tree(tmp_path / "tree"), tmp_path / "cache")
    first = load_splits(data)
    (cache,) = (tmp_path / "cache").glob("splits-*.pt")
    stored = torch.load(cache, weights_only=True)
    for name, forged in (
        ("train_labels", torch.full_like(stored["train_labels"], 99)),  # outside the classes
        ("test_images", stored["test_images"].float()),  # wrong dtype
        ("mean", [0.5, 0.5, 0.5]),  # channels disagree
    ):
        cache.unlink()
        torch.save({**stored, name: forged}, cache)
        cache.chmod(0o600)
        _load_splits.cache_clear()
        with pytest.warns(UserWarning, match="decoding the dataset again"):
            again = load_splits(data)
        assert torch.equal(again.train.labels, first.train.labels)
        assert torch.equal(again.test.images, first.test.images) and again.mean == first.mean


def test_a_source_rewritten_with_its_old_size_and_mtime_is_not_served_stale(
    tmp_path: Path,
) -> None:
    from PIL import Image

    tree = _bmp_tree(tmp_path / "tree")
    data = _tree_config(tree, tmp_path / "cache")
    assert load_splits(data).train.images[0].max() == 0
    image = tree / "train" / "a" / "0.png"
    before = image.stat()
    Image.new("L", (8, 8), color=200).save(image, compress_level=0)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    _load_splits.cache_clear()
    assert load_splits(data).train.images[0].min() == 200


def test_a_cache_dir_of_an_unknown_users_home_is_one_line(tmp_path: Path) -> None:
    data = _tree_config(_bmp_tree(tmp_path / "tree"), Path("~nosuchuser-fl/cache"))
    with pytest.raises(DataError, match=r"data.cache_dir=~nosuchuser-fl/cache: no such user"):
        load_splits(data)
