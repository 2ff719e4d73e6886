"""Level 1: transfer learning baseline.

What this level teaches
    A network pretrained on ImageNet already computes features that separate CIFAR-10's classes. Freeze the
    whole backbone, replace its classifier by a new Linear(2048 -> 10) and train only that: a linear probe.

What is new here (the first level)
    The shared core in common/: fixed stratified splits (40,000 train / 10,000 validation from the official
    training set, the official 10,000 test images read once at the end), the on-device input pipeline, the
    training loop, metrics.json and summary.md.

Why it is fast
    The backbone is frozen and runs in eval mode, so its output for an image never changes. We run it once
    over each split and cache the pooled features; the head then trains for its epochs on those features in
    well under a second each. The seed recomputed the backbone for every image in every epoch (and resized
    on the CPU with PIL): the same model for a fraction of the time. --no-cache-features does it the seed's
    way, on the same engine, for comparison.

Run
    python levels/level1_baseline.py                 # ResNet50, ImageNet weights from the hub
    python levels/level1_baseline.py --quick         # smoke profile for a CPU
    python levels/level1_baseline.py --model efficientnet_lite0 --weights FILE --img-size 128   # offline
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import common` when run as a script

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.cli import parse_args  # noqa: E402
from common.models import create_model, normalization  # noqa: E402
from common.plots import plot_training_curves  # noqa: E402
from common.progress import TrainingDisplay  # noqa: E402
from common.results import LevelRun  # noqa: E402
from common.training import (  # noqa: E402
    TensorBatches, autocast, cosine_schedule, count_parameters, evaluate, fit, freeze, make_optimizer, model_input,
    process_share,
)
from common.distributed import gather_in_order  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass
class Hyperparameters:
    model: str = "resnet50"  # ImageNet-pretrained backbone; any timm model name works
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    img_size: int = 224  # the size the backbone was pretrained at; CIFAR's 32x32 is upsampled on the device
    feature_batch_size: int = 256  # the frozen backbone only runs inference: larger batches change nothing but speed
    cache_features: bool = True  # False: run the frozen backbone on every batch of every epoch, as the seed did


TITLE = "Level 1: transfer learning baseline"
APPROACH = "Frozen ImageNet backbone + linear head"


def main(argv: list[str] | None = None) -> int:
    settings, hp = parse_args(argv, Hyperparameters(), prog="level1_baseline.py", description=__doc__)
    run = LevelRun(1, TITLE, APPROACH, settings, hp)
    return run.execute(lambda: train_and_evaluate(run, settings, hp))


def train_and_evaluate(run: LevelRun, settings, hp: Hyperparameters) -> None:
    m = run.metrics

    # ------------------------------------------------------------------------------------------------------
    #                                              Setup
    device, precision = run.setup(settings)  # seed, device, mixed precision (see common/training.py)

    # ------------------------------------------------------------------------------------------------------
    #                                              Data
    splits, images = run.load_data(settings, device)  # 40k/10k/10k, uint8 on the device

    # ------------------------------------------------------------------------------------------------------
    #                                             Network
    # drop_rate=0: a linear probe has no dropout, so the cached-feature and the live path train the same thing
    model = create_model(hp.model, num_classes=10, pretrained=settings.pretrained, weights=settings.weights,
                         drop_rate=0.0)
    model = model.to(device, memory_format=torch.channels_last)
    freeze(model)
    head: nn.Module = model.get_classifier()  # the new Linear(num_features -> 10)
    for p in head.parameters():
        # Start from zero: uniform predictions (loss ln 10 = 2.30). Some timm models initialize their classifier
        # for training from scratch, wide enough that a probe on large features starts at a loss of 6 or more.
        nn.init.zeros_(p)
        p.requires_grad_(True)
    m.update(total_parameters=count_parameters(model), head_parameters=count_parameters(head),
             trainable_parameters=count_parameters(model, trainable_only=True))
    mean, std = normalization(model)

    def to_input(batch: torch.Tensor) -> torch.Tensor:
        return model_input(batch, hp.img_size, mean, std)

    # ------------------------------------------------------------------------------------------------------
    #                                        Features, then train
    with TrainingDisplay(f"{TITLE} — {hp.model} at {hp.img_size}px on {m['environment']['device']}",
                         hp.epochs) as display:
        started = time.perf_counter()
        if hp.cache_features:
            inputs = {name: (extract_features(model, x, y, to_input, hp.feature_batch_size, device, precision,
                                              display, name), y)
                      for name, (x, y) in images.items()}
            trained, transform = head, None
        else:
            inputs, trained, transform = images, model, to_input
        train_batches = TensorBatches(*inputs["train"], hp.batch_size, shuffle=True, seed=settings.seed,
                                      transform=transform)
        val_batches = TensorBatches(*inputs["val"], hp.feature_batch_size, transform=transform)
        optimizer = make_optimizer(hp.optimizer, trained.parameters(), hp.lr, hp.weight_decay)
        result = fit(trained, train_batches, val_batches, epochs=hp.epochs, optimizer=optimizer,
                     scheduler=cosine_schedule(optimizer, hp.epochs * len(train_batches)),
                     loss_fn=nn.CrossEntropyLoss(), device=device, precision=precision, display=display,
                     history=m["history"])
        m.update(train_seconds=time.perf_counter() - started, best_epoch=result.best_epoch,
                 val_accuracy=result.best_val_accuracy)

    # ------------------------------------------------------------------------------------------------------
    #                                 Evaluate: the test set, once
    started = time.perf_counter()
    test = evaluate(trained, TensorBatches(*inputs["test"], hp.feature_batch_size, transform=transform),
                    device, precision)
    m.update(test_accuracy=test.accuracy, test_loss=test.loss, test_evaluations=1,
             test_seconds=time.perf_counter() - started)

    # ------------------------------------------------------------------------------------------------------
    #                                             Report
    curves = plot_training_curves(m["history"], run.path("curves.png"),
                                  f"{TITLE} ({hp.model}, {m['train_size']:,} training images)")
    run.add_figure("curves", curves)


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, to_input, batch_size: int,
                     device, precision, display, name: str) -> torch.Tensor:
    """The frozen backbone's pooled features (the head's input) for every image, in eval mode.

    Eval mode matters: BatchNorm uses its ImageNet running statistics, exactly as when training the head
    on the live backbone with frozen BatchNorm. Under torchrun each process runs the backbone on its share of
    the images, and every process gets all the features back, in order.
    """
    model.eval()
    features = []
    batches = process_share(TensorBatches(images, labels, batch_size, transform=to_input))
    with display.task(f"features: {name}", len(batches)) as advance:
        for x, _ in batches:
            with autocast(device, precision):
                features.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
            advance()
    return gather_in_order(torch.cat(features), len(labels))


if __name__ == "__main__":
    sys.exit(main())
