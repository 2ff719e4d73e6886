"""How Level 4 fine-tunes a pretrained member: MixUp/CutMix with its loss (timm), batches that grow with the
epochs (progressive resizing), and AdamW with warm-up and cosine, through common.training.fit. `hp` is Level 4's
Hyperparameters; the level hands in its augmentation (AutoAugment or colour jitter, with crop and flip).

    check_recipe()         the flags no member could train with (an odd batch for MixUp...), before anything trains
    mixing()               MixUp or CutMix per batch, and the soft-target loss that goes with it
    training_sizes()       the image size of each epoch: --low-res-size for the first --low-res-epochs, then --img-size
    GrowingImageBatches    training batches whose images grow with the epochs
    train()                the whole fine-tuning call

Progressive resizing (--low-res-epochs): small images are cheap while the weights still move far; the last epochs
at full size undo the change of apparent object size (Touvron et al., "Fixing the train-test resolution
discrepancy", 2019; Tan & Le, "EfficientNetV2", 2021, progressive learning). Validation and prediction always run
at --img-size. Measured on a CPU, and not adopted there: docs/cpu-profile.md.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from common.device import SetupError
from common.models import normalization
from common.training import EpochCountingBatches, TensorBatches, fit, make_optimizer, model_input, warmup_cosine


def check_recipe(hp) -> None:
    """Level 4's flags that no member could train with, as one-line errors before anything trains."""
    if (hp.mixup or hp.cutmix) and hp.batch_size % 2:
        raise SetupError(f"--batch-size {hp.batch_size}: MixUp and CutMix pair each image with another of the "
                         f"batch and need an even batch size (or --no-mixup --no-cutmix).")
    if hp.weighting not in ("logloss", "accuracy"):
        raise SetupError(f"--weighting must be logloss or accuracy, not '{hp.weighting}'.")
    if hp.frozen_stages < 0:
        raise SetupError(f"--frozen-stages {hp.frozen_stages}: give how many stages to freeze, 0 for none.")
    if hp.low_res_epochs < 0 or hp.low_res_size < 1:
        raise SetupError(f"--low-res-epochs {hp.low_res_epochs} --low-res-size {hp.low_res_size}: give how many "
                         f"epochs (0 for none) train at which size in pixels.")


def mixing(hp) -> tuple[Callable | None, nn.Module]:
    """MixUp or CutMix per batch (one of the two, at random, when both are on), and the loss to go with it:
    the targets become soft, label-smoothed vectors, hence timm's soft-target cross-entropy."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    if not (hp.mixup or hp.cutmix):
        return None, nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    return Mixup(mixup_alpha=0.8 if hp.mixup else 0.0, cutmix_alpha=1.0 if hp.cutmix else 0.0,
                 label_smoothing=hp.label_smoothing, num_classes=10), SoftTargetCrossEntropy()


def training_sizes(hp) -> list[int]:
    """A pretrained member's image size in each epoch (hp: Level 4's Hyperparameters): --low-res-size for the
    first --low-res-epochs, then --img-size."""
    low = min(hp.low_res_epochs, hp.epochs)
    return [hp.low_res_size] * low + [hp.img_size] * (hp.epochs - low)


class GrowingImageBatches(EpochCountingBatches):
    """Batches whose images grow with the epochs: epoch k's batches are resized to sizes[k] (the last size for any
    epoch after). The epoch count is part of the state that --resume restores."""

    def __init__(self, *args, sizes: list[int], to_input: Callable[[torch.Tensor, int], torch.Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        self.sizes, self.to_input = sizes, to_input

    def __iter__(self):
        size = self.sizes[min(self.start_epoch(), len(self.sizes) - 1)]
        for x, y in super().__iter__():
            yield self.to_input(x, size), y


def train(model: nn.Module, images: dict, hp, *, augment: Callable[[torch.Tensor], torch.Tensor], seed: int,
          compile: bool, device: torch.device, precision, display, history: list, checkpoint=None, on_epoch_end=None):
    """Fine-tune `model` in full and return common.training.fit's result (checkpoints and --resume included).

    `hp` gives the recipe: epochs, batch_size, optimizer, lr, weight_decay, warmup, img_size, eval_batch_size,
    MixUp/CutMix (mixing) and the progressive resizing (training_sizes). `augment`: a uint8 batch at 32x32 -> the
    same, augmented, on the device.
    """
    mean, std = normalization(model)
    # Everything on the device, per batch: augment at 32x32 (each image its own draws), normalize, resize.
    # drop_last: MixUp and CutMix pair the images of a batch, so every batch is a full one.
    train_batches = GrowingImageBatches(*images["train"], hp.batch_size, shuffle=True, seed=seed,
                                        drop_last=True, sizes=training_sizes(hp),
                                        to_input=lambda b, size: model_input(augment(b), size, mean, std))
    if len(train_batches) == 0:
        raise SetupError(f"--train-size {len(images['train'][1])} is smaller than one batch of {hp.batch_size}.")
    val_batches = TensorBatches(*images["val"], hp.eval_batch_size,
                                transform=lambda b: model_input(b, hp.img_size, mean, std))
    mix, loss_fn = mixing(hp)
    optimizer = make_optimizer(hp.optimizer, model.parameters(), hp.lr, hp.weight_decay)
    steps = hp.epochs * len(train_batches)
    return fit(model, train_batches, val_batches, epochs=hp.epochs, optimizer=optimizer,
               scheduler=warmup_cosine(optimizer, steps, hp.warmup), loss_fn=loss_fn, device=device,
               precision=precision, mix=mix, display=display, history=history, checkpoint=checkpoint,
               on_epoch_end=on_epoch_end, compile=compile)
