"""Per-image augmentation on batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.augment import random_crop_flip


def test_crop_flip_gives_each_image_its_own_crop_and_flip():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    batch = image.repeat(256, 1, 1, 1)
    out = random_crop_flip(batch, padding=4)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    padded = F.pad(image, (4,) * 4)[0]
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            window = padded[:, dy:dy + 32, dx:dx + 32]
            candidates[(dy, dx, False)] = window
            candidates[(dy, dx, True)] = window.flip(-1)
    seen = set()
    for img in out:
        matches = [k for k, v in candidates.items() if torch.equal(v, img)]
        assert matches, "every output must be a padded crop of the input, possibly mirrored"
        seen.add(matches[0])
    # 256 copies of one image get many different (offset, flip) draws: the parameters are per image
    assert len(seen) > 60
    assert any(k[2] for k in seen) and any(not k[2] for k in seen)
