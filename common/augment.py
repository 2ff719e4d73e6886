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


def color_jitter(images: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.1) -> torch.Tensor:
    """Colour jitter with its own random factors per image. uint8 N x 3 x H x W in, uint8 out.

    Each image draws a brightness, contrast and saturation factor uniformly in [1 - s, 1 + s] and a hue shift
    in [-hue, hue] of a turn (torchvision's ColorJitter ranges), applied by adjust_colors.
    """
    n, device = images.shape[0], images.device

    def draw(low: float, high: float) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high)

    return adjust_colors(images, draw(1 - brightness, 1 + brightness), draw(1 - contrast, 1 + contrast),
                         draw(1 - saturation, 1 + saturation), draw(-hue, hue))


def adjust_colors(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                  hue: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with one factor per image (N values each), in that order, with
    torchvision's formulas: brightness scales the pixels, contrast blends with the image's mean grey level,
    saturation blends with each pixel's grey value, hue rotates the colour wheel. uint8 in, uint8 out."""
    per_image = dict(device=images.device, dtype=torch.float32)
    brightness, contrast, saturation = (torch.as_tensor(f, **per_image).view(-1, 1, 1, 1)
                                        for f in (brightness, contrast, saturation))
    x = images.float() / 255
    x = (x * brightness).clamp(0, 1)
    mean_grey = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean_grey + contrast * (x - mean_grey)).clamp(0, 1)
    grey = _grey(x)
    x = (grey + saturation * (x - grey)).clamp(0, 1)
    x = shift_hue(x, torch.as_tensor(hue, **per_image))
    return (x * 255).round().to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, N x 1 x H x W, as torchvision's rgb_to_grayscale."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by its own `shift` (N values, in turns). Float RGB in [0, 1], N x 3 x H x W.

    Written out because torchvision's adjust_hue takes one shift for the whole batch: RGB -> HSV, add the shift
    to H, HSV -> RGB, keeping each pixel's value (max) and chroma (max - min).
    """
    r, g, b = x.unbind(1)
    value = x.amax(1)
    chroma = value - x.amin(1)
    c = chroma.clamp_min(1e-8)  # grey pixels (chroma 0) have no hue; any value gives them back unchanged
    h = torch.where(value == r, ((g - b) / c) % 6, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4))
    h = (h + 6 * shift.view(-1, 1, 1)) % 6  # hue in sixths of a turn, in [0, 6)
    # HSV -> RGB in closed form: channel n (5 for red, 3 for green, 1 for blue) is V - C * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + H) mod 6
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h.unsqueeze(1)) % 6
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)
