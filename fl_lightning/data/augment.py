"""Batched image augmentation for training batches (random crop with padding, horizontal flip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Crop each image at a random offset of its zero-padded copy; flip half of them if asked.

    The standard CIFAR-10 augmentation (padding 4 on 32 pixels), vectorised over the
    batch (one gather, no Python loop per image); randomness comes from torch's RNG,
    which each client seeds per round.
    """
    n, c, h, w = images.shape
    padding = max(1, h // 8)
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1))
    dx = torch.randint(0, 2 * padding + 1, (n, 1))
    rows = (dy + torch.arange(h)).view(n, 1, h, 1)
    cols = (dx + torch.arange(w)).view(n, 1, 1, w)
    cropped = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    if flip:
        flipped = torch.rand(n) < 0.5
        cropped[flipped] = cropped[flipped].flip(-1)
    return cropped
