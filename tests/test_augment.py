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


# ----------------------------------------------------------------------------------------------------------
# AutoAugment, CIFAR-10 policy


def _real_images(cifar_dir, n: int) -> torch.Tensor:
    from common.data import load_splits

    return load_splits(cifar_dir, train_size=n, val_size=10, test_size=10).train.images[:n]


def test_autoaugment_draws_per_image_and_keeps_dtype_and_shape(cifar_dir):
    from common.augment import autoaugment_cifar10

    same = _real_images(cifar_dir, 10)[:1].repeat(256, 1, 1, 1)  # 256 copies of one image
    torch.manual_seed(0)
    out = autoaugment_cifar10(same)
    assert out.shape == same.shape and out.dtype == torch.uint8 and out.device == same.device
    distinct = {bytes(img.numpy()) for img in out}
    # one draw for the whole batch (torchvision's AutoAugment on a batch tensor) gives at most 4 distinct results
    assert len(distinct) > 30
    assert any(torch.equal(img, same[0]) for img in out)  # some images draw no operation at all...
    assert sum(not torch.equal(img, same[0]) for img in out) > 128  # ...most are changed


def test_autoaugment_same_seed_same_images_and_generator_is_used(cifar_dir):
    from common.augment import autoaugment_cifar10

    images = _real_images(cifar_dir, 64)
    torch.manual_seed(3)
    first = autoaugment_cifar10(images)
    torch.manual_seed(3)
    assert torch.equal(autoaugment_cifar10(images), first)  # the global RNG by default
    torch.manual_seed(4)
    assert not torch.equal(autoaugment_cifar10(images), first)
    a = autoaugment_cifar10(images, torch.Generator().manual_seed(7))
    assert torch.equal(autoaugment_cifar10(images, torch.Generator().manual_seed(7)), a)
    assert not torch.equal(autoaugment_cifar10(images, torch.Generator().manual_seed(8)), a)


def _torchvision_with_only(sub_policy):
    """torchvision's own AutoAugment, restricted to one sub-policy whose two operations always apply."""
    from torchvision.transforms import v2

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    policy._policies = [tuple((name, 1.0, magnitude) for name, _, magnitude in sub_policy)]
    return policy


def _torchvision_signs(policy, seed: int) -> list[bool]:
    """Which magnitudes torchvision's forward negated after torch.manual_seed(seed): its draws, replayed in its
    order (sub-policy index, then per operation: apply?, then the sign for a signed operation with magnitudes)."""
    torch.manual_seed(seed)
    torch.randint(len(policy._policies), ())
    negated = []
    for name, probability, _ in policy._policies[0]:
        assert torch.rand(()) <= probability
        magnitudes, signed = policy._AUGMENTATION_SPACE[name]
        negated.append(bool(signed and magnitudes(10, 32, 32) is not None and torch.rand(()) <= 0.5))
    return negated


def test_autoaugment_matches_torchvision_image_by_image_for_every_sub_policy(cifar_dir):
    """Each of the 25 sub-policies, both operations applied, with the signs torchvision drew: the batched
    result for each image equals torchvision's AutoAugment on that image alone."""
    from torchvision.transforms import v2

    from common.augment import apply_cifar10_sub_policies

    images = _real_images(cifar_dir, 10)
    table = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    assert len(table) == 25
    changed = 0
    for k, sub_policy in enumerate(table):
        policy = _torchvision_with_only(sub_policy)
        expected, negated = [], []
        for i, image in enumerate(images):
            torch.manual_seed(1000 * k + i)
            expected.append(policy(image))
            negated.append(_torchvision_signs(policy, 1000 * k + i))
        n = len(images)
        out = apply_cifar10_sub_policies(images, torch.full((n,), k), torch.ones(n, 2, dtype=torch.bool),
                                         torch.tensor(negated))
        for i in range(n):
            assert torch.equal(out[i], expected[i]), (k, sub_policy, negated[i], i)
        changed += sum(not torch.equal(out[i], images[i]) for i in range(n))
    assert changed > 200  # the operations do something: an identity everywhere would pass the equalities too
    # an operation that is not applied leaves its image alone
    none = apply_cifar10_sub_policies(images, torch.arange(10), torch.zeros(10, 2, dtype=torch.bool),
                                      torch.zeros(10, 2, dtype=torch.bool))
    assert torch.equal(none, images)
