"""Fine-tuning a pretrained network with per-image augmentation: what Levels 2 and 3 share.

Level 2 introduces it and measures what each ingredient is worth; Level 3 trains its SE network the same way,
so that the only difference between the two levels is the architecture. Editing this file changes both.

    crop_flip_jitter()     the augmentation: random crop (4-pixel padding), flip, colour jitter, per image
    fine_tune_scope()      which modules train with the new head: the last stage, or the whole network
    train()                AdamW + cosine schedule + cross-entropy through common.training.fit
    evaluation_batches()   a split's images, in order, as the model's input
"""

from __future__ import annotations

import torch
from torch import nn

from common.augment import color_jitter, hflip, random_crop_flip
from common.models import last_stage, normalization
from common.progress import TrainingDisplay
from common.training import EpochCheckpoint, FitResult, TensorBatches, cosine_schedule, fit, make_optimizer, model_input

SCOPES = ("last-stage", "all")
SCOPE_WORDS = {"last-stage": "the last stage", "all": "the whole network"}  # for reports and titles


def crop_flip_jitter(batch: torch.Tensor, hp) -> torch.Tensor:
    """The augmentation pipeline, on a uint8 batch at 32x32 on the device, each image with its own draws."""
    batch = random_crop_flip(batch, padding=4)
    return color_jitter(batch, hp.brightness, hp.contrast, hp.saturation, hp.hue)


def augmentation_steps(hp) -> list[str]:
    """What crop_flip_jitter() does, in words, for metrics.json and the summary."""
    return ["random crop, 4-pixel zero padding", "random horizontal flip",
            f"colour jitter (brightness {hp.brightness}, contrast {hp.contrast}, saturation {hp.saturation}, "
            f"hue {hp.hue})"]


def fine_tune_scope(backbone: nn.Module, scope: str) -> list[nn.Module]:
    """The backbone modules that train with the head: its last stage (ResNet50's layer4; for an EfficientNet
    the last block stage with conv_head and bn2), or "all" of it."""
    check_scope(scope)
    return [backbone] if scope == "all" else last_stage(backbone)


def check_scope(scope: str) -> None:
    """--fine-tune-scope, checked before anything trains (Level 2's first arms train the head alone)."""
    from common.device import SetupError

    if scope not in SCOPES:
        raise SetupError(f"--fine-tune-scope must be one of {', '.join(SCOPES)}, not '{scope}'.")


def evaluation_batches(images: dict, split: str, model: nn.Module, hp, mirrored: bool = False) -> TensorBatches:
    """A split's images, in order, as the model's input (no augmentation); `mirrored`: each image's mirror,
    flipped at 32 x 32 before the resize, as `run.py predict` flips it."""
    mean, std = normalization(model)
    return TensorBatches(*images[split], hp.eval_batch_size,
                         transform=lambda batch: model_input(hflip(batch) if mirrored else batch, hp.img_size, mean,
                                                             std))


def train(model: nn.Module, images: dict, hp, *, epochs: int, augmented: bool, seed: int, device, precision,
          title: str, history: list | None = None, checkpoint: EpochCheckpoint | None = None,
          on_epoch_end=None, compile: bool = False) -> FitResult:
    """Train `model`'s trainable parameters with AdamW and cosine annealing; fit() keeps the best-validation epoch.

    `hp` gives the recipe: batch_size, lr, optimizer, weight_decay, label_smoothing, img_size, eval_batch_size
    and the jitter strengths. Every batch is augmented (when `augmented`) at 32x32, then normalized and resized
    on the device.
    """
    mean, std = normalization(model)

    def plain(batch: torch.Tensor) -> torch.Tensor:
        return model_input(batch, hp.img_size, mean, std)

    def with_augmentation(batch: torch.Tensor) -> torch.Tensor:
        return plain(crop_flip_jitter(batch, hp))

    train_batches = TensorBatches(*images["train"], hp.batch_size, shuffle=True, seed=seed,
                                  transform=with_augmentation if augmented else plain)
    val_batches = evaluation_batches(images, "val", model, hp)
    optimizer = make_optimizer(hp.optimizer, model.parameters(), hp.lr, hp.weight_decay)
    with TrainingDisplay(title, epochs) as display:
        return fit(model, train_batches, val_batches, epochs=epochs, optimizer=optimizer,
                   scheduler=cosine_schedule(optimizer, epochs * len(train_batches)),
                   loss_fn=nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing), device=device,
                   precision=precision, display=display, history=history, checkpoint=checkpoint,
                   on_epoch_end=on_epoch_end, compile=compile)
