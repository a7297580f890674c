import torch

from fl_lightning.data.augment import random_crop_flip


def dot_images(n: int, size: int = 32) -> torch.Tensor:
    images = torch.zeros(n, 1, size, size)
    images[:, :, 10, 20] = 1.0
    return images


def test_crop_shifts_content_by_at_most_the_padding() -> None:
    torch.manual_seed(0)
    out = random_crop_flip(dot_images(64), flip=False)
    assert out.shape == (64, 1, 32, 32)
    positions = [tuple(torch.nonzero(img[0])[0].tolist()) for img in out if img.sum() > 0]
    assert len(positions) == 64  # a shift of <= 4 keeps the dot (10, 20) inside the image
    assert all(abs(r - 10) <= 4 and abs(c - 20) <= 4 for r, c in positions)
    assert len(set(positions)) > 10  # offsets differ per image


def test_flip_mirrors_about_half_the_batch() -> None:
    torch.manual_seed(1)
    out = random_crop_flip(dot_images(200), flip=True)
    columns = torch.tensor([torch.nonzero(img[0])[0, 1].item() for img in out])
    mirrored = (columns <= 15).sum().item()  # column 20 flips to 11 (+-4)
    assert 60 < mirrored < 140


def test_same_seed_same_augmentation() -> None:
    torch.manual_seed(7)
    a = random_crop_flip(dot_images(8))
    torch.manual_seed(7)
    assert torch.equal(a, random_crop_flip(dot_images(8)))
