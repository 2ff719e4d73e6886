"""Level 1: transfer learning baseline.

What this level teaches
    A network pretrained on ImageNet already computes features that separate CIFAR-10's classes. Freeze the
    whole backbone, replace its classifier by a new Linear(2048 -> 10) and train only that: a linear probe.
    The training loop is written out below, step by step: batches -> forward -> loss -> backward -> step ->
    learning-rate schedule, then validation and the best epoch. Level 2 hands the same loop to common.fit().

What is new here (the first level)
    The shared core in common/: fixed stratified splits (40,000 train / 10,000 validation from the official
    training set, the official 10,000 test images read once at the end), the on-device input pipeline,
    metrics.json after every epoch, checkpoints for --resume, and summary.md.

Why it is fast
    The backbone is frozen and runs in eval mode, so its output for an image never changes. We run it once
    over each split and cache the pooled features; the head then trains for its epochs on those features in
    well under a second each. The original assessment recomputed the backbone for every image in every epoch
    (and resized on the CPU with PIL): the same model for a fraction of the time. --no-cache-features computes
    the features afresh for every batch instead, for comparison.

Which weights
    resnet50.tv_in1k: torchvision's ImageNet weights, the ones the original assessment most likely used (it
    lists torchvision, not timm). timm's bare `resnet50` resolves to `resnet50.a1_in1k`, trained with a BCE
    loss and heavy regularization, and such training is known to weaken features for a linear probe. The
    exact tag is recorded in metrics.json (`pretrained_tag`).

Evidence (the CPU profile, the whole data set, one 2-core Xeon CPU, no GPU): see the README's results table.

Run
    python levels/level1_baseline.py                 # ResNet50 on a GPU; without one, the CPU profile
    python levels/level1_baseline.py --quick         # smoke profile for a CPU
    python levels/level1_baseline.py --profile cpu --weights efficientnet_lite0_imagenet.pth   # full data, CPU
    python levels/level1_baseline.py --resume        # after a crash: continue from the last finished epoch
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import common` when run as a script

import torch
import torch.nn.functional as F
from torch import nn

from common.runner.cli import parse_args
from common.distributed import gather_in_order
from common.models import check_input_size, create_model, normalization, pretrained_tag, zero_head
from common.plots import plot_training_curves
from common.progress import TrainingDisplay
from common.runner.results import LevelRun
from common.progress import EpochStats
from common.training import (
    TensorBatches, check_finite, cosine_schedule, count_parameters, evaluate, freeze, make_optimizer, model_input,
    process_share,
)
from common.device import autocast, rng_state, set_rng_state

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass
class Hyperparameters:
    model: str = "resnet50.tv_in1k"  # torchvision's ImageNet weights (see the docstring); any timm model works
    epochs: int = 5  # try 10: does the best epoch move?
    batch_size: int = 64
    lr: float = 1e-3  # try 3e-3 or 3e-4: the head is a single linear layer, so it tolerates a wide range
    optimizer: str = "adam"
    weight_decay: float = 0.0
    img_size: int = 224  # try 128 or 64: resolution matters a lot to ImageNet features (see the README)
    feature_batch_size: int = 256  # the frozen backbone only runs inference: larger batches change nothing but speed
    cache_features: bool = True  # try --no-cache-features: the backbone on every batch, as the original did


# --profile cpu: the whole data set on a CPU. EfficientNet-Lite0 (ImageNet weights) at 224 px: resolution matters to
# ImageNet features, and lite0 at 224 probed better than lite1 at 240 and lite2 at 260. 15 epochs at lr 3e-3: the head
# costs seconds on cached features, and fewer left it underfit. Feature batches of 16: on a 2-core CPU a batch of 256
# spills out of the caches. The measurements: docs/cpu-profile.md
CPU_PROFILE = dict(model="efficientnet_lite0", img_size=224, epochs=15, lr=3e-3, feature_batch_size=16)

TITLE = "Level 1: transfer learning baseline"
APPROACH = "Frozen ImageNet backbone + linear head"


def main(argv: list[str] | None = None) -> int:
    settings, hp = parse_args(argv, Hyperparameters(), prog="level1_baseline.py", description=__doc__,
                              profiles=dict(cpu=CPU_PROFILE))
    run = LevelRun(1, TITLE, APPROACH, settings, hp)
    return run.execute(lambda: train_and_evaluate(run, settings, hp))


def train_and_evaluate(run: LevelRun, settings, hp: Hyperparameters) -> None:
    metrics = run.metrics

    # ------------------------------------------------------------------------------------------------------
    #                                              Setup
    device = run.setup(settings)  # seeds, device; the output folder and --weights files checked (LevelRun)

    # ------------------------------------------------------------------------------------------------------
    #                                              Data
    splits, images = run.load_data(settings, device)  # 40k/10k/10k, uint8 on the device

    # ------------------------------------------------------------------------------------------------------
    #                                             Network
    # drop_rate=0: a linear probe has no dropout, so the cached-feature and the live path train the same thing
    model = create_model(hp.model, num_classes=10, pretrained=settings.pretrained, weights=settings.weights,
                         drop_rate=0.0)
    model = model.to(device, memory_format=torch.channels_last)
    check_input_size(model, hp.img_size, hp.model)
    freeze(model)
    head: nn.Module = zero_head(model)  # the new Linear(num_features -> 10), from uniform predictions
    for p in head.parameters():
        p.requires_grad_(True)
    precision = run.precision_for(model)  # the backbone only predicts: bf16 where the hardware has it
    metrics.update(total_parameters=count_parameters(model), head_parameters=count_parameters(head),
                   trainable_parameters=count_parameters(model, trainable_only=True),
                   pretrained_tag=pretrained_tag(model) if settings.pretrained else None)
    mean, std = normalization(model)

    def pooled_features(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    # --compile: the feature pass (the level's expensive part) through torch.compile; the head trains eagerly
    backbone = torch.compile(pooled_features) if run.compile else pooled_features

    def features_of(batch: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the frozen backbone's pooled features: what the head sees."""
        with torch.no_grad(), autocast(device, precision):
            return backbone(model_input(batch, hp.img_size, mean, std)).float()

    # ------------------------------------------------------------------------------------------------------
    #                      Features: the frozen backbone, once per split (and saved)
    with TrainingDisplay(f"{TITLE} — {hp.model} at {hp.img_size}px on {metrics['environment']['device']}",
                         hp.epochs) as display:
        started = time.perf_counter()
        model.eval()  # BatchNorm with its ImageNet statistics, as when the backbone is frozen in training
        if hp.cache_features:
            inputs = {name: (cached_features(run, name, x, y, features_of, hp.feature_batch_size, display), y)
                      for name, (x, y) in images.items()}
            to_features = None  # the batches already are features
        else:
            inputs, to_features = images, features_of  # the backbone runs again on every batch of every epoch
        train_batches = TensorBatches(*inputs["train"], hp.batch_size, shuffle=True, seed=settings.seed,
                                      transform=to_features)
        val_batches = TensorBatches(*inputs["val"], hp.feature_batch_size, transform=to_features)

        # --------------------------------------------------------------------------------------------------
        #                         Train the head: the training loop, written out
        optimizer = make_optimizer(hp.optimizer, head.parameters(), hp.lr, hp.weight_decay)
        scheduler = cosine_schedule(optimizer, hp.epochs * len(train_batches))  # per step, from lr down to 0
        best = dict(epoch=0, val_accuracy=-1.0, head=None)
        first_epoch, checkpoint = 1, run.checkpoint("head")
        if (stored := checkpoint.load()) is not None:  # --resume: carry on after the last finished epoch
            head.load_state_dict(stored["head"])
            optimizer.load_state_dict(stored["optimizer"])
            scheduler.load_state_dict(stored["scheduler"])
            set_rng_state(stored["rng"])
            train_batches.generator.set_state(stored["batches_rng"])  # the next epoch's shuffle, exactly
            best, metrics["history"][:], first_epoch = stored["best"], stored["history"], stored["epoch"] + 1
            for row in metrics["history"]:
                display.end_epoch(EpochStats(**row))
        for epoch in range(first_epoch, hp.epochs + 1):
            head.train()
            display.begin_epoch(epoch, len(train_batches))
            lr = optimizer.param_groups[0]["lr"]  # at the start of the epoch, for the record
            epoch_start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            for step, (x, y) in enumerate(train_batches, start=1):  # a fresh shuffle every epoch
                logits = head(x)  # forward: 10 scores per image
                loss = F.cross_entropy(logits, y)  # how wrong, averaged over the batch
                optimizer.zero_grad()  # forget the previous step's gradients
                loss.backward()  # d(loss)/d(weight) for every trainable weight: the head's
                optimizer.step()  # move each weight against its gradient (Adam scales the step per weight)
                scheduler.step()  # the learning rate for the next step
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                display.advance(step, seen / (time.perf_counter() - epoch_start))
            check_finite(loss_sum, f"epoch {epoch}")  # NaN or infinite: stop, nothing after it would mean anything
            seconds = time.perf_counter() - epoch_start
            val = evaluate(head, val_batches, device, precision, display)  # no gradients, eval mode, every image
            stats = EpochStats(epoch, loss_sum / seen, correct / seen, val.loss, val.accuracy, lr, seen / seconds,
                               seconds)
            metrics["history"].append(dataclasses.asdict(stats))
            if val.accuracy > best["val_accuracy"]:  # keep the best epoch's weights, judged on validation only
                best = dict(epoch=epoch, val_accuracy=val.accuracy,
                            head={k: v.detach().clone() for k, v in head.state_dict().items()})
            # After every epoch: everything needed to continue (--resume), then metrics.json ("running").
            checkpoint.save(dict(epoch=epoch, head=head.state_dict(), optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict(), rng=rng_state(),
                                 batches_rng=train_batches.generator.get_state(), best=best,
                                 history=metrics["history"]))
            run.epoch_done()
            display.end_epoch(stats)  # after the save: a log's "epoch N" line means epoch N is on disk
        head.load_state_dict(best["head"])  # the epoch chosen on validation
        metrics.update(train_seconds=time.perf_counter() - started, best_epoch=best["epoch"],
                       val_accuracy=best["val_accuracy"])

    # ------------------------------------------------------------------------------------------------------
    #                                 Evaluate: the test set, once
    started = time.perf_counter()
    test = run.evaluate_test(head, TensorBatches(*inputs["test"], hp.feature_batch_size, transform=to_features),
                             device, precision)
    metrics.update(test_accuracy=test.accuracy, test_loss=test.loss, test_seconds=time.perf_counter() - started)

    # ------------------------------------------------------------------------------------------------------
    #                                             Report
    curves = plot_training_curves(metrics["history"], run.path("curves.png"),
                                  f"{TITLE} ({hp.model}, {metrics['train_size']:,} training images)")
    run.add_figure("curves", curves)
    run.save_model(model.state_dict(), kind="timm", model=hp.model, img_size=hp.img_size, mean=mean, std=std,
                   pretrained_tag=metrics["pretrained_tag"])


def bench_recipes(overrides: dict) -> list:
    """What `python run.py bench` times for this level: the head on the frozen backbone run live (the
    --no-cache-features path, whose speed is the backbone's)."""
    from common.runner.bench_recipes import Recipe, random_timm_model, train_only_head, with_overrides

    hp = with_overrides(Hyperparameters(), overrides, profiles=dict(cpu=CPU_PROFILE))
    return [Recipe(1, "Level 1", hp.model, hp.img_size, hp.batch_size, hp.feature_batch_size,
                   "head (frozen backbone run live, as --no-cache-features)", "none",
                   lambda: train_only_head(random_timm_model(hp.model, hp.img_size, drop_rate=0.0)),
                   hp.optimizer, hp.lr, hp.weight_decay)]


def cached_features(run: LevelRun, name: str, images: torch.Tensor, labels: torch.Tensor, features_of,
                    batch_size: int, display) -> torch.Tensor:
    """A split's features, computed once and saved in the level's checkpoints (--resume reads them back)."""
    store = run.checkpoint(f"features-{name}")
    stored = store.load()
    if stored is not None:
        return stored["features"].to(images.device)
    features = extract_features(images, labels, features_of, batch_size, display, name)
    store.save(dict(features=features.cpu()))
    return features


@torch.no_grad()
def extract_features(images: torch.Tensor, labels: torch.Tensor, features_of, batch_size: int, display,
                     name: str) -> torch.Tensor:
    """features_of() over every image of a split, in order. Under torchrun each process runs the backbone on
    its share of the images, and every process gets all the features back, in order."""
    features = []
    batches = process_share(TensorBatches(images, labels, batch_size, transform=features_of))
    with display.task(f"features: {name}", len(batches)) as advance:
        for x, _ in batches:
            features.append(x)
            advance()
    return gather_in_order(torch.cat(features), len(labels))


if __name__ == "__main__":
    sys.exit(main())
