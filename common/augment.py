"""Batched augmentation on the device, at CIFAR's native 32x32, with independent random parameters per image.

Why not torchvision.transforms here: given a batch tensor, a torchvision transform draws one set of random
parameters for the whole batch (every image flipped, or none; one crop offset for all). Per-image randomness
over a batch is what augmentation means, so these functions draw a parameter per image and apply them all
in a few batched tensor operations: no Python loop over images, no trip to the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding plus random horizontal flip, per image. uint8 or float, N x C x H x W.

    Pads by `padding` on every side, then cuts an H x W window at a random offset per image (0..2*padding in
    each direction), and mirrors each image with probability 1/2.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=device)
    flip = torch.rand(n, device=device) < 0.5
    cols = torch.arange(w, device=device)
    # a flipped image reads its columns right to left: the flip is folded into the gather for free
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # N x W
    rows = torch.arange(h, device=device) + dy[:, None]  # N x H
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # N x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()
