"""Batched augmentation on the device, at CIFAR's native 32x32, with independent random parameters per image.

Why not torchvision.transforms here: given a batch tensor, a torchvision transform draws one set of random
parameters for the whole batch (every image flipped, or none; one crop offset for all). Per-image randomness
over a batch is what augmentation means, so these functions draw a parameter per image and apply them all
in a few batched tensor operations: no Python loop over images, no trip to the CPU.
autoaugment_cifar10 (AutoAugment's CIFAR-10 policy) loops over the policy's 25 sub-policies instead, each
applied to its group of images at once.
tta_views gives the test-time views (Level 4 predicts with them, and `run.py predict` with a saved ensemble).
"""

from __future__ import annotations

import functools
from typing import Callable

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


# ----------------------------------------------------------------------------------------------------------
# AutoAugment, CIFAR-10 policy


@functools.lru_cache(maxsize=1)
def _cifar10_policy():
    """torchvision's AutoAugment with the CIFAR-10 policy: its table of 25 sub-policies (`_policies`), its
    magnitude bins (`_AUGMENTATION_SPACE`) and its operations (`_apply_image_or_video_transform`) are used as
    they are, so that each image gets exactly what torchvision would give it."""
    from torchvision.transforms import v2

    return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)


@functools.lru_cache(maxsize=8)
def _sub_policy_table(height: int, width: int) -> list[list[tuple[str, float, bool]]]:
    """Per sub-policy, its two operations as (name, magnitude, signed), magnitudes for height x width images
    (translations are a fraction of the image size), as torchvision's AutoAugment.forward computes them."""
    policy = _cifar10_policy()
    table = []
    for sub_policy in policy._policies:
        ops = []
        for name, _, magnitude_bin in sub_policy:
            magnitudes, signed = policy._AUGMENTATION_SPACE[name]
            values = magnitudes(10, height, width)
            ops.append((name, 0.0 if values is None else float(values[magnitude_bin]), signed and values is not None))
        table.append(ops)
    return table


def cifar10_probabilities() -> torch.Tensor:
    """25 x 2: the probability of each operation of each sub-policy (torchvision's table)."""
    return torch.tensor([[p for _, p, _ in sub_policy] for sub_policy in _cifar10_policy()._policies])


def autoaugment_cifar10(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """AutoAugment's CIFAR-10 policy (Cubuk et al., 2019) with its own random draws for every image.
    uint8 N x 3 x H x W in (on any device), uint8 of the same shape out.

    Each image draws one of the policy's 25 sub-policies; each of that sub-policy's two operations is then
    applied with its own probability, drawn per image, at its fixed magnitude, whose sign (for the signed
    operations: rotate, shear, translate, brightness, colour, contrast, sharpness) is also drawn per image,
    as torchvision's AutoAugment does for a single image.

    Why not torchvision's AutoAugment on the batch: given a batch tensor it draws *one* sub-policy, one set of
    coin flips and one sign, and every image of the batch gets the same operation. Applied image by image it
    is right but slow (0.14 ms per 32x32 image on one CPU core), which is why Level 4 used to run it in
    DataLoader worker processes, competing with training for the CPU. Here the images that share a
    sub-policy, an operation and a sign go through torchvision's operation together, as one batched tensor
    op on the device (torchvision.transforms.v2.functional accepts batches): at most 25 groups, two
    operations each (four when split by sign), whatever the batch size, and no worker processes.

    The draws are made on the CPU, from `generator` (a CPU generator) or, by default, torch's global
    generator: torch.manual_seed(s) makes the result reproducible. (The groups are formed on the CPU, so
    drawing there means nothing is read back from the device.) Not yet measured on a GPU: torchvision's
    rotate, affine and sharpness build a small tensor from Python numbers on the device at every call, a
    copy that waits for the GPU's queued work, so the CPU cannot run far ahead of the training steps.
    """
    n = images.shape[0]
    sub_policy = torch.randint(len(_cifar10_policy()._policies), (n,), generator=generator)
    applied = torch.rand(n, 2, generator=generator) <= cifar10_probabilities()[sub_policy]
    negated = torch.rand(n, 2, generator=generator) <= 0.5
    return apply_cifar10_sub_policies(images, sub_policy, applied, negated)


def apply_cifar10_sub_policies(images: torch.Tensor, sub_policy: torch.Tensor, applied: torch.Tensor,
                               negated: torch.Tensor) -> torch.Tensor:
    """The deterministic half of autoaugment_cifar10: image i goes through sub-policy `sub_policy[i]` (N values
    in 0..24), whose operation j (0, then 1) is applied where `applied[i, j]`, with its magnitude negated where
    `negated[i, j]` (signed operations only). The draws are CPU tensors (N x 2 for applied and negated)."""
    policy = _cifar10_policy()
    table = _sub_policy_table(*images.shape[-2:])
    n = images.shape[0]
    signed = torch.tensor([[is_signed and magnitude != 0 for _, magnitude, is_signed in ops] for ops in table])
    # Each application of an operation to an image is a job, numbered by sub-policy, then operation, then sign:
    # 4k + 2j + negated. Sorting the jobs by number groups the images that get the same operation, in an order
    # where every image's first operation comes before its second.
    job = 4 * sub_policy[:, None] + 2 * torch.arange(2) + (negated & signed[sub_policy]).long()  # N x 2
    image = torch.arange(n)[:, None].expand(n, 2)
    job, image = job[applied], image[applied]
    order = torch.argsort(job, stable=True)
    image = image[order].to(images.device, non_blocking=True)  # one copy to the device; each job takes a slice
    out, start = images.clone(), 0
    # On a CPU, one thread: each operation works on a few small images, too little to share between threads,
    # and with PyTorch's default intra-op threads a batch took 535 ms instead of 9 on a busy 2-core machine
    # (measured: the threads wait for each other at each of the dozens of operations).
    threads = torch.get_num_threads()
    if images.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for number, count in enumerate(torch.bincount(job, minlength=4 * len(table)).tolist()):
            if count == 0:
                continue
            name, magnitude, _ = table[number // 4][number // 2 % 2]
            where = image[start:start + count]
            start += count
            out[where] = policy._apply_image_or_video_transform(
                out[where], name, -magnitude if number % 2 else magnitude, interpolation=policy.interpolation,
                fill=policy._fill)
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------------------------------------
# Test-time views (deterministic: the same view of every image)

TTA_SHIFT = 2  # pixels, at 32x32, for --tta-shifts


def hflip(images: torch.Tensor) -> torch.Tensor:
    """The mirror image: column j of the result is column W-1-j of the input."""
    return images.flip(-1)


def shift(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move the content dx pixels right and dy down; what comes in from the border is black (zero)."""
    h, w, pad = *images.shape[-2:], TTA_SHIFT
    padded = F.pad(images, (pad, pad, pad, pad))
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def shift_reflect(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move the content dx pixels right and dy down; the border is filled by reflection, as CifarNet's training
    translations fill it (common/cifarnet.py), so the view looks like what the network was trained on."""
    h, w, pad = *images.shape[-2:], max(abs(dx), abs(dy))
    padded = F.pad(images.float(), (pad,) * 4, mode="reflect").to(images.dtype)
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def tta_views(tta: bool = True, shifts: bool = False,
              translates: bool = False) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The views each image is predicted under; "identity" is the plain prediction. Applied at 32x32, uint8.

    shifts: four 2-px shifts with black borders (--tta-shifts). translates: airbench's views for CifarNet, the
    image moved 1 px up-left and 1 px down-right with reflected borders, each also mirrored (6 views in all)."""
    views = {"identity": lambda x: x}
    if tta:
        views["flip"] = hflip
        if shifts:
            for dx, dy in ((TTA_SHIFT, 0), (-TTA_SHIFT, 0), (0, TTA_SHIFT), (0, -TTA_SHIFT)):
                views[f"shift {dx:+d},{dy:+d}"] = lambda x, dx=dx, dy=dy: shift(x, dx, dy)
        if translates:
            for d in (-1, 1):
                views[f"translate {d:+d},{d:+d}"] = lambda x, d=d: shift_reflect(x, d, d)
                views[f"flip translate {d:+d},{d:+d}"] = lambda x, d=d: hflip(shift_reflect(x, d, d))
    return views
