"""Prediction under test-time views: a model's softmax probabilities for every image under each view (the views
come from common.augment.tta_views), their mean, and how fast it went. Level 4 predicts its members' validation
and test images with it (predict_splits)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from common.device import Precision, autocast, synchronize
from common.models import normalization
from common.training import model_input


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, views: dict[str, Callable[[torch.Tensor], torch.Tensor]],
            to_input: Callable[[torch.Tensor], torch.Tensor], batch_size: int, device: torch.device,
            precision: Precision, display, split: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Softmax probabilities under each view ({"plain": ..., "tta": mean over the views}) and the seconds each
    view took. Timed with the device synchronized, after one warm-up batch, so that img/s means something.
    `images`: uint8 at 32x32; each view is applied to them, then `to_input` (normalize, resize)."""
    model.eval()
    with autocast(device, precision):
        model(to_input(images[:batch_size]))  # warm-up: cuDNN autotuning and lazy allocations out of the timing
    per_view, seconds = {}, {}
    batches = range(0, len(images), batch_size)
    with display.task(f"predict {split}: {len(views)} view(s)", len(views) * len(batches)) as advance:
        for view, transform in views.items():
            synchronize(device)
            start = time.perf_counter()
            out = []
            for i in batches:
                with autocast(device, precision):
                    out.append(model(to_input(transform(images[i:i + batch_size]))).float().softmax(1))
                advance()
            per_view[view] = torch.cat(out).cpu().double().numpy()
            synchronize(device)
            seconds[view] = time.perf_counter() - start
    probs = {"plain": per_view["identity"]}
    if len(views) > 1:
        probs["tta"] = np.mean(list(per_view.values()), axis=0)
    return probs, seconds


def predict_splits(model: nn.Module, images: dict, views: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                   img_size: int, batch_size: int, device: torch.device, precision: Precision,
                   display) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """predict() on the validation and the test images, at img_size with the model's normalization: the
    probabilities per split ({"val": {"plain": ..., "tta": ...}, "test": ...}) and the test set's images/s,
    plain (images_per_second) and with every view (tta_images_per_second)."""
    mean, std = normalization(model)
    probs, seconds = {}, {}
    for split in ("val", "test"):
        probs[split], seconds[split] = predict(model, images[split][0], views,
                                               lambda b: model_input(b, img_size, mean, std), batch_size, device,
                                               precision, display, split)
    n_test = len(images["test"][0])
    return probs, dict(images_per_second=n_test / seconds["test"]["identity"],
                       tta_images_per_second=n_test / sum(seconds["test"].values()))
