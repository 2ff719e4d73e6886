"""Level 4: an ensemble of three architectures, modern regularization, test-time augmentation, and a report.

What this level teaches
    How far careful engineering takes a classifier, and how to show it honestly. In the order of the code:
    three different networks (the members) are fine-tuned in full with the regularizers of modern recipes;
    each predicts every image, also mirrored (test-time augmentation); their probabilities are averaged by
    voting, with weights fitted on the validation set only; every member and ensemble is then compared on the
    test set, once. Members that make *different* mistakes are what an ensemble feeds on, so the comparison
    measures that (pairwise disagreement) next to accuracy, log-loss and calibration. common/runner/report.py writes
    the numbers up as OUT/level4/report.md.

What changed since Level 3
    - Three members instead of one: `resnet50+se` (ResNet50 with Level 3's SE block, imported from Level 3),
      `efficientnet_b0` and `vit_small_patch16_224`, each ImageNet-pretrained and fine-tuned in full.
    - Regularization, each switchable: MixUp and CutMix with label smoothing (timm's Mixup and its
      soft-target loss; --no-mixup, --no-cutmix, --label-smoothing), stochastic depth (timm's drop_path_rate;
      --drop-path 0), AutoAugment with the CIFAR-10 policy (--no-autoaugment): every image draws its own
      sub-policy, at 32x32, on the device, like the crop and flip (common/augment.py; no CPU workers); or
      Level 2's colour jitter instead (--no-autoaugment --color-jitter, the CPU profile's choice).
    - Ensembles: soft voting, and weighted soft voting fitted on validation (--weighting logloss|accuracy), each
      member calibrated first by a temperature fitted on validation.
    - Test-time augmentation: the mirror image (and with --tta-shifts four 2-pixel shifts) for every member
      and every ensemble (--no-tta).
    - A comparison table, pairwise disagreement, per-class gains, an accuracy chart, a reliability diagram,
      and OUT/level4/report.md, written from this run's numbers only.
    - A checkpoint after every epoch of every member (common.training.fit); --resume continues a member
      part-way through and skips the members already trained. OUT/level4/model.pt holds the whole ensemble.
    - A member of another kind: `cifarnet` (common/cifarnet.py), a small network trained from scratch at 32 px
      with the ideas of airbench (whitened first layer, alternating flip, lookahead...). Its mistakes differ from
      those of ImageNet networks fed blown-up images, which is what a vote needs. Alone (--models cifarnet) it
      needs no pretrained weights at all, and trains in 22 minutes on a 2-core CPU with bf16 hardware.

Run
    python levels/level4_expert.py                   # the three members, ImageNet weights from the hub
    python levels/level4_expert.py --quick --no-pretrained   # smoke profile for a CPU
    python levels/level4_expert.py --resume          # after a crash: from each member's last finished epoch
    python levels/level4_expert.py --profile cpu --weights efficientnet_lite2=L2,efficientnet_lite0+se=L0
                                                     # the whole data set on a CPU: cifarnet, lite2, lite0+SE
    python levels/level4_expert.py --profile cpu --models cifarnet   # the from-scratch member alone, on a CPU
    python levels/level4_expert.py --models efficientnet_lite0,resnet18 \\
        --weights efficientnet_lite0=FILE --no-pretrained     # offline: local weights for some members
    (--weights: NAME=FILE pairs, or a bare FILE for one member; the others download, or --no-pretrained)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import common` when run as a script

import numpy as np
import torch
from torch import nn

from common import cifarnet
from common.augment import autoaugment_cifar10, color_jitter, random_crop_flip, tta_views
from common.runner.cli import parse_args
from common.io import save_npz_atomic
from common.members import member_names, member_network, member_seed_offset, member_weights
from common.models import create_model, freeze_first_stages, normalization, zero_head
from common.progress import TrainingDisplay
from common.runner.report import (
    CALIBRATION_BINS, comparison_row, log_loss, per_class_gains, plot_ensemble_figures, write_ensemble_report,
)
from common.runner.results import LevelRun
from common.stats import paired_difference
from common.training import (
    EpochCountingBatches, TensorBatches, count_parameters, fit, make_optimizer, model_input, warmup_cosine,
)
from common.device import SetupError, autocast, synchronize

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass
class Hyperparameters:
    # try two members, or your own mix of timm names: NAME+se puts Level 3's SE block on NAME; NAME#2 adds a second
    # copy of NAME trained with the next seed (a seed ensemble: compare its disagreement with an architecture's)
    models: str = "resnet50+se,efficientnet_b0,vit_small_patch16_224"
    model: str | None = None  # the common --model flag: one timm model, the same as --models NAME
    epochs: int = 8  # try 3: how much of the ensemble's gain over its best member is left?
    # at 224 px the tensors saved for backward take at most 86 MiB an image (resnet50+se, measured on a CPU), so
    # 64 fit a 16 GB T4 in 16-bit mixed precision without gradient accumulation
    batch_size: int = 64
    lr: float = 2e-4  # full fine-tuning of pretrained weights: an order of magnitude below training from scratch
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    warmup: float = 0.05  # the first 5% of the steps ramp the learning rate up linearly, then cosine to zero
    img_size: int = 224  # the members' pretraining size; CIFAR's 32x32 is upsampled on the device
    mixup: bool = True  # MixUp (Zhang et al., 2018), alpha 0.8. Try --no-mixup --no-cutmix: do the members gain?
    cutmix: bool = True  # CutMix (Yun et al., 2019): paste a patch of one image into another, alpha 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.1  # stochastic depth: each residual branch skipped with this probability. Try 0
    autoaugment: bool = True  # AutoAugment's CIFAR-10 policy, per image, at 32x32. Try --no-autoaugment
    color_jitter: bool = False  # Level 2's colour jitter after the crop and flip (the CPU profile's choice)
    se_reduction: int = 16  # the SE block's bottleneck, as in Level 3
    # keep the stem and the first N stages of each pretrained member at their ImageNet weights (0: train them all):
    # no backward pass through them, so each step is cheaper (common.models.freeze_first_stages says why it is safe)
    frozen_stages: int = 0
    # progressive resizing: each pretrained member's first N epochs train at --low-res-size, the rest at --img-size
    # (validation and prediction always at --img-size). Small images are cheap while the weights move far; the last
    # epochs at full size undo the change of apparent object size (Touvron et al., "Fixing the train-test resolution
    # discrepancy", 2019; Tan & Le, "EfficientNetV2", 2021, progressive learning). Try --epochs 5 --low-res-epochs 2
    low_res_epochs: int = 0
    low_res_size: int = 96
    tta: bool = True  # also predict the mirror image and average. Try --no-tta: accuracy against images/s
    tta_shifts: bool = False  # with --tta, also four copies shifted by 2 pixels (6 views instead of 2)
    weighting: str = "logloss"  # weighted voting: minimize validation log-loss. Try accuracy (weights ∝ val acc)
    eval_batch_size: int = 256  # inference only: larger batches change nothing but speed
    # the member `cifarnet` (common/cifarnet.py) trains from scratch at 32 px with its own recipe, airbench's:
    # the flags above that describe fine-tuning (lr, optimizer, img-size, MixUp...) do not apply to it
    cifarnet_epochs: int = 10
    cifarnet_widths: str = "64,256,256"  # airbench94's; 64,128,128 is airbench93's (a quarter of the FLOPs)
    cifarnet_batch_size: int = 1024


# --profile cpu: the whole data set on a 2-core CPU, within the 2-hour budget. Three members of two kinds: `cifarnet`,
# trained from scratch at 32 px (common/cifarnet.py) with airbench94's widths 64,256,256 for 16 epochs, and two
# ImageNet-pretrained EfficientNet-Lites of different sizes, lite2 and lite0 with Level 3's SE block, fine-tuned in full
# at 128 px for 4 epochs with Level 3's CPU recipe: AdamW lr 1e-3, weight decay 0.05, label smoothing 0.1, Level 2's
# crop, flip and colour jitter; no AutoAugment, stochastic depth, MixUp or CutMix. Why, measured on a 2-core AMD EPYC
# with AVX-512 and bf16 hardware (the runs: docs/cpu-profile.md; the speeds: results/cpu/bench/):
# - cifarnet trains at 529 img/s in bf16 (fp32: 234), 16 epochs in 21 min (airbench's 10: 90.00% test alone in 12.6
#   min, 0.6 points less). Alone it made 90.63 and 90.87% test (seeds 42 and 43), as accurate as lite0+SE but
#   wrong on other images (they disagree on 10.8-11.1% of the test set, two cifarnet seeds on 8.6%).
# - lite2 and lite0+SE train at 55-69 and 78-89 img/s in eager fp32 (bf16 and compile gain nothing for their depthwise
#   convolutions). lite2 is the best single member measured here (5 epochs alone: 92.25% test; lite0+SE 91.22-91.28%).
#   At 5 epochs, cifarnet + lite2 + lite0+SE voted 92.93-93.00% test but need about 125 min; at 4 epochs they fit
#   with room to spare, and 4 epochs cost the vote 0.15-0.22 points (saved members voted again: one member at 4 epochs
#   and the other at 5, 92.82%; docs/cpu-profile.md). The previous profile, two lite0+SE (seeds 42 and 43) of 5
#   epochs, made 92.72% test in 112.3 min (docs/results-history.md).
# - Not 5 epochs with the first 2 at 96 px (--epochs 5 --low-res-epochs 2, progressive resizing): 96 px trains only
#   1.5-1.7x faster than 128 here, and the members ended under their 4 epochs at 128; one run made 92.54% test in
#   123.8 min, on a machine about 8% slower than the kept run's (docs/cpu-profile.md).
# - Not a second cifarnet, six test-time views, a fourth member, lite0+SE at 160 px or the first stages frozen
#   (--frozen-stages 2): voted again from saved members, none reaches 93% within 120 min (docs/cpu-profile.md).
# MixUp and CutMix slow convergence and pay off over hundreds of epochs, and 4 is the other end (a judgment, not
# measured here; --mixup --cutmix puts them back). Inference in batches of 16, as in Levels 1-3 (lite0 at 128 px
# infers 1.5x faster than in batches of 256 here). cifarnet is underconfident (airbench's label smoothing of 0.2), so
# each member is calibrated by a temperature before the vote. On the 2-core EPYC without AVX-512 (AVX2, fp32 only)
# this profile is about twice as slow; --models cifarnet,efficientnet_lite0+se --cifarnet-widths 64,128,128
# --cifarnet-epochs 10 --epochs 3 is the earlier, smaller one (docs/results-history.md).
# Measured, one run on the AVX-512 EPYC, the shared JPEG copy (results/cpu/level4.json, code 436a159): 95.5 min of
# training (cifarnet 20.6, lite2 43.9, lite0+SE 31.0), 105.9 min in all; members with TTA 90.63% (cifarnet), 91.78%
# (lite2), 91.12% (lite0+SE); disagreement on test: cifarnet against lite2 and lite0+SE 10.8%, lite2 against lite0+SE
# 8.3%; the weighted vote + TTA 92.99% validation, 92.78% test, +1.00 points over the best member (6.8 paired standard
# errors). The 93% bar is missed by 0.22.
CPU_PROFILE = dict(models="cifarnet,efficientnet_lite2,efficientnet_lite0+se", model=None, img_size=128,
                   eval_batch_size=16, epochs=4, lr=1e-3, weight_decay=0.05, mixup=False, cutmix=False,
                   autoaugment=False, color_jitter=True, drop_path=0.0,
                   cifarnet_widths="64,256,256", cifarnet_epochs=16)

TITLE = "Level 4: ensemble of three architectures"
CIFARNET = "cifarnet"  # the --models name of common/cifarnet.py's from-scratch network
APPROACH = "Ensemble (weighted soft voting{tta}) of {members}"  # by default fine-tuned ResNet50+SE, EfficientNet, ViT


def main(argv: list[str] | None = None) -> int:
    settings, hp = parse_args(argv, Hyperparameters(), prog="level4_expert.py", description=__doc__,
                              quick_overrides=dict(eval_batch_size=128, cifarnet_epochs=4,
                                                                   cifarnet_batch_size=128), profiles=dict(cpu=CPU_PROFILE))
    if hp.model:  # --model NAME is --models NAME; the record shows the member list under both names
        hp = dataclasses.replace(hp, models=hp.model)
    hp = dataclasses.replace(hp, model=hp.models)
    run = LevelRun(4, TITLE, APPROACH, settings, hp)  # the members are filled in once --models is checked
    return run.execute(lambda: train_and_evaluate(run, settings, hp))


def train_and_evaluate(run: LevelRun, settings, hp: Hyperparameters) -> None:
    metrics = run.metrics

    # ------------------------------------------------------------------------------------------------------
    #                                              Setup
    members = member_names(hp.models)
    described = [f"{n} (from scratch)" if member_network(n) == CIFARNET else f"fine-tuned {n}" for n in members]
    metrics["approach"] = APPROACH.format(tta=" + TTA" if hp.tta else "", members=", ".join(described))  # before any write
    weights = member_weights(settings.weights, members)
    check_recipe(hp)
    if hp.frozen_stages:  # does every pretrained member have that many stages? Asked now, not after hours of training
        for network in dict.fromkeys(member_network(n) for n in members if member_network(n) != CIFARNET):
            build_member(network, False, None, hp)
    # seeds Python's, numpy's (timm's Mixup draws from them) and torch's generators from --seed, so that two runs
    # with the same flags give the same numbers; picks the device
    device = run.setup(settings)
    metrics["members"] = {}

    # ------------------------------------------------------------------------------------------------------
    #                                              Data
    _, images = run.load_data(settings, device)  # 40k/10k/10k, uint8 on the device
    views = tta_views(hp.tta, hp.tta_shifts)
    cifarnet_views = tta_views(hp.tta, translates=True)  # airbench's: the mirror and 1-px translations

    # ------------------------------------------------------------------------------------------------------
    #                            Members: train (or resume), then predict
    # Each member is trained, saved, and then asked for its probabilities on the validation and test images
    # under every view. Predicting the test images reads no test label; the labels are read once, below.
    predictions: dict[str, dict] = {}
    saved_members = []
    for number, name in enumerate(members, start=1):
        member_views = cifarnet_views if member_network(name) == CIFARNET else views
        predictions[name], saved = run_member(run, number, len(members), name, weights[name], images,
                                              member_views, settings, hp, device)
        saved_members.append(saved)

    # ------------------------------------------------------------------------------------------------------
    #                     Ensembles (fitted on validation), then the test set, once
    val_labels = images["val"][1].cpu().numpy()
    test_labels = run.read_test_labels(images)  # counted: the one time this level looks at the test answers
    comparison = compare(predictions, val_labels, test_labels, hp.weighting, metrics["members"])
    chosen = comparison["chosen"]
    chosen_row = comparison["rows"][chosen]
    metrics.update(val_accuracy=chosen_row["val_accuracy"], test_accuracy=chosen_row["test_accuracy"],
                   test_loss=chosen_row["test_log_loss"],
                   train_seconds=sum(r["train_seconds"] for r in metrics["members"].values()),
                   chosen=chosen, best_member=comparison["best_member"], comparison=list(comparison["rows"].values()),
                   ensemble_weights=comparison["weights"], ensemble_temperatures=comparison["temperatures"],
                   disagreement=comparison["disagreement"],
                   per_class=comparison["per_class"], gain_over_best_member=comparison["gain_over_best_member"],
                   calibration_bins=CALIBRATION_BINS,
                   tta_views=list(views), weights_fitted_on="validation")
    save_npz_atomic(run.path("predictions.npz"), val_labels=val_labels, test_labels=test_labels,
                    **{f"{name}|{split}": p for name, by_split in comparison["probs"].items()
                       for split, p in by_split.items()})
    # model.pt: every member, and how the chosen ensemble combines them (run.py predict uses it)
    vote = comparison["weights"].get(chosen) or {name: 1 / len(members) for name in members}
    temperatures = comparison["temperatures"].get(chosen) or {name: 1.0 for name in members}
    run.save_model({}, kind="ensemble", members=saved_members, vote_weights=vote, vote_temperatures=temperatures,
                   tta_views=list(views), chosen=chosen, img_size=hp.img_size)

    # ------------------------------------------------------------------------------------------------------
    #                                    Figures and the report
    plot_ensemble_figures(run, comparison, test_labels, hp.tta)  # accuracy, reliability, training curves
    write_ensemble_report(run, TITLE)  # OUT/level4/report.md, and Level 4's sections of summary.md


# ----------------------------------------------------------------------------------------------------------
#                                         Members: the networks


def check_recipe(hp: Hyperparameters) -> None:
    if (hp.mixup or hp.cutmix) and hp.batch_size % 2:
        raise SetupError(f"--batch-size {hp.batch_size}: MixUp and CutMix pair each image with another of the "
                         f"batch and need an even batch size (or --no-mixup --no-cutmix).")
    if hp.weighting not in ("logloss", "accuracy"):
        raise SetupError(f"--weighting must be logloss or accuracy, not '{hp.weighting}'.")
    if hp.frozen_stages < 0:
        raise SetupError(f"--frozen-stages {hp.frozen_stages}: give how many stages to freeze, 0 for none.")
    if hp.low_res_epochs < 0 or hp.low_res_size < 1:
        raise SetupError(f"--low-res-epochs {hp.low_res_epochs} --low-res-size {hp.low_res_size}: give how many epochs "
                         f"(0 for none) train at which size in pixels.")


def build_member(name: str, pretrained: bool, weights: str | None, hp: Hyperparameters) -> nn.Module:
    """A member network with a fresh 10-way head and stochastic depth; `cifarnet` is common/cifarnet.py's network,
    randomly initialized (its whitening layer is set from the training images in run_member).

    `NAME+se` is Level 3's SE model on NAME (its SE block written there, imported here). A model whose input
    size is fixed at creation (a ViT's grid of patch position embeddings) is built for --img-size: timm then
    resamples the pretrained position embeddings to the new grid (at 32 px, ViT-S/16 sees 2x2 = 4 patches).
    """
    import timm

    name = member_network(name)  # a copy (NAME#2) is NAME's network
    if name == CIFARNET:
        if weights:
            raise SetupError(f"--weights names {CIFARNET}, which trains from scratch: it has no pretrained weights.")
        return cifarnet.CifarNet(cifarnet.parse_widths(hp.cifarnet_widths))
    base, se = (name[:-3], True) if name.endswith("+se") else (name, False)
    kwargs = dict(drop_path_rate=hp.drop_path)
    cfg = timm.get_pretrained_cfg(base) if timm.is_model(base) else None
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = hp.img_size
    if se:
        from levels.level3_advanced import build_se_model

        model = build_se_model(base, pretrained, weights, num_classes=10, reduction=hp.se_reduction, **kwargs)
    else:
        model = create_model(base, num_classes=10, pretrained=pretrained, weights=weights, **kwargs)
    zero_head(model)  # uniform predictions at first: no large random gradients into the pretrained backbone
    if hp.frozen_stages:
        freeze_first_stages(model, hp.frozen_stages)
    return model


# ----------------------------------------------------------------------------------------------------------
#                                     Train one member (or resume it)


def augment(batch: torch.Tensor, hp: Hyperparameters) -> torch.Tensor:
    """The training images' augmentation, on a uint8 batch at 32x32 on the device, each image with its own draws:
    AutoAugment's CIFAR-10 policy (when on), then a random crop (4-pixel zero padding) and a horizontal flip, then
    (when on) Level 2's colour jitter (brightness, contrast and saturation 0.2, hue 0.1)."""
    batch = random_crop_flip(autoaugment_cifar10(batch) if hp.autoaugment else batch)
    return color_jitter(batch) if hp.color_jitter else batch


def run_member(run: LevelRun, number: int, count: int, name: str, weights: str | None, images: dict, views: dict,
               settings, hp: Hyperparameters, device) -> tuple[dict, dict]:
    """Train member `name` (with --resume, from its last finished epoch; a finished member is not trained again)
    and return its probabilities per split and view, and what model.pt needs to rebuild it."""
    metrics = run.metrics
    network = member_network(name)  # a copy (NAME#2) is NAME's network, trained with its own seed
    from_scratch = network == CIFARNET
    model = build_member(name, settings.pretrained, weights, hp)
    precision = run.precision_for(model, key=name)  # can differ per member (see common.device.select_precision)
    init = "random" if from_scratch else weights or ("imagenet" if settings.pretrained else "random")
    img_size, epochs = (32, hp.cifarnet_epochs) if from_scratch else (hp.img_size, hp.epochs)
    record = metrics["members"][name] = dict(member=name, status="training", init=init, history=[],
                                             parameters=count_parameters(model),
                                             trainable_parameters=count_parameters(model, trainable_only=True),
                                             img_size=img_size, tta_views=list(views))
    if not from_scratch and hp.low_res_epochs:
        record["train_img_sizes"] = training_sizes(hp)  # progressive resizing; validation and prediction at img_size
    model = model.to(device, memory_format=torch.channels_last)
    low = record.get("train_img_sizes", []).count(hp.low_res_size)  # the epochs at the low size, as recorded
    sizes = f"{hp.low_res_size}px for {low} epoch(s), then " if low else ""
    title = f"Member {number}/{count}: {name} at {sizes}{img_size}px on {metrics['environment']['device']}"
    with TrainingDisplay(title, epochs) as display:
        train = train_cifarnet if from_scratch else train_member
        # --compile where it works here; a copy (NAME#2) with its own seed: its own data order and draws
        settings = dataclasses.replace(settings, compile=run.compile, seed=settings.seed + member_seed_offset(name))
        record["seed"] = settings.seed
        result = train(model, images, settings, hp, device, precision, display, record["history"],
                       checkpoint=run.checkpoint(f"member {name}", member=name, init=init),
                       on_epoch_end=run.epoch_done)
        record.update(status="trained", best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                      train_seconds=result.train_seconds, resumed_epochs=result.resumed_epochs)
        metrics["history"] += [dict(h, member=name) for h in record["history"]]
        mean, std = normalization(model)
        probs, seconds = {}, {}
        for split in ("val", "test"):
            probs[split], seconds[split] = predict(model, images[split][0], views,
                                                   lambda b: model_input(b, img_size, mean, std),
                                                   hp.eval_batch_size, device, precision, display, f"{split}")
    n_test = len(images["test"][0])
    record.update(images_per_second=n_test / seconds["test"]["identity"],
                  tta_images_per_second=n_test / sum(seconds["test"].values()))
    kind = CIFARNET if from_scratch else "se" if network.endswith("+se") else "timm"
    saved = dict(name=name, kind=kind, model=network.removesuffix("+se"), img_size=img_size,
                 mean=list(mean), std=list(std), reduction=hp.se_reduction, se_in_layer4=False, drop_path=hp.drop_path,
                 widths=list(cifarnet.parse_widths(hp.cifarnet_widths)), views=list(views),
                 state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next member starts from an empty GPU
    return probs, saved


def train_member(model: nn.Module, images: dict, settings, hp: Hyperparameters, device, precision, display,
                 history: list, checkpoint=None, on_epoch_end=None):
    mean, std = normalization(model)
    # Everything on the device, per batch: augment at 32x32 (each image its own draws), normalize, resize.
    # drop_last: MixUp and CutMix pair the images of a batch, so every batch is a full one.
    train_batches = GrowingImageBatches(*images["train"], hp.batch_size, shuffle=True, seed=settings.seed,
                                        drop_last=True, sizes=training_sizes(hp),
                                        to_input=lambda b, size: model_input(augment(b, hp), size, mean, std))
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
               on_epoch_end=on_epoch_end, compile=settings.compile)


def training_sizes(hp: Hyperparameters) -> list[int]:
    """A pretrained member's image size in each epoch: --low-res-size for the first --low-res-epochs, then
    --img-size."""
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


def train_cifarnet(model: cifarnet.CifarNet, images: dict, settings, hp: Hyperparameters, device, precision, display,
                   history: list, checkpoint=None, on_epoch_end=None):
    """The from-scratch member, with airbench's recipe (common/cifarnet.py says why each piece is there):
    whitened first layer, alternating flip + translation, label smoothing, Nesterov SGD with lookahead."""
    recipe = cifarnet.CifarNetRecipe(epochs=hp.cifarnet_epochs, widths=cifarnet.parse_widths(hp.cifarnet_widths),
                                     batch_size=hp.cifarnet_batch_size)
    mean, std = normalization(model)
    to_input = lambda b: model_input(b, 32, mean, std)  # noqa: E731
    train_images = images["train"][0]
    # whitening from 5,000 training images spread evenly over the split: the split is stored class by class, so
    # its first 5,000 would be airplanes and cars only (--resume then loads the saved, identical layer)
    every = max(1, len(train_images) // recipe.whiten_images)
    cifarnet.init_whitening(model, to_input(train_images[::every][:recipe.whiten_images]).float())
    train_batches = cifarnet.AlternatingFlipBatches(*images["train"], recipe.batch_size, seed=settings.seed,
                                                    shift=recipe.translate, transform=to_input)
    if len(train_batches) == 0:
        raise SetupError(f"--train-size {len(images['train'][1])} is smaller than one batch of "
                         f"--cifarnet-batch-size {recipe.batch_size}.")
    val_batches = TensorBatches(*images["val"], hp.eval_batch_size, transform=to_input)
    steps = recipe.epochs * len(train_batches)
    optimizer = cifarnet.make_optimizer(model, recipe, steps)
    return fit(model, train_batches, val_batches, epochs=recipe.epochs, optimizer=optimizer,
               scheduler=cifarnet.warmup_then_decay(optimizer, steps, recipe),
               loss_fn=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), device=device,
               precision=precision, display=display, history=history, checkpoint=checkpoint,
               on_epoch_end=on_epoch_end, compile=settings.compile)


def mixing(hp: Hyperparameters) -> tuple[Callable | None, nn.Module]:
    """MixUp or CutMix per batch (one of the two, at random, when both are on), and the loss to go with it:
    the targets become soft, label-smoothed vectors, hence timm's soft-target cross-entropy."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    if not (hp.mixup or hp.cutmix):
        return None, nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    return Mixup(mixup_alpha=0.8 if hp.mixup else 0.0, cutmix_alpha=1.0 if hp.cutmix else 0.0,
                 label_smoothing=hp.label_smoothing, num_classes=10), SoftTargetCrossEntropy()


def bench_recipes(overrides: dict) -> list:
    """What `run.py bench` times: each member trained in full, with this level's augmentation and MixUp/CutMix."""
    from common.runner.bench_recipes import Recipe, with_overrides

    hp = with_overrides(Hyperparameters(), overrides, profiles=dict(cpu=CPU_PROFILE))
    mix, loss_fn = mixing(hp)
    steps = (["AutoAugment (CIFAR-10 policy, per image, on the device)"] if hp.autoaugment else []) + \
        ["crop + flip"] + (["colour jitter"] if hp.color_jitter else []) + (["MixUp/CutMix"] if mix else [])
    names = [overrides["model"]] if overrides.get("model") else member_names(hp.models)
    names = list(dict.fromkeys(member_network(n) for n in names))  # a copy (NAME#2) trains as fast as NAME
    trainable = f"all but the stem and first {hp.frozen_stages} stages" if hp.frozen_stages else "all"
    recipes = [Recipe(4, f"Level 4: {name}", name, hp.img_size, hp.batch_size, hp.eval_batch_size, trainable,
                      ", ".join(steps), lambda name=name: build_member(name, False, None, hp), hp.optimizer, hp.lr,
                      hp.weight_decay, augment=lambda x: augment(x, hp), mix=mix, loss_fn=loss_fn)
               for name in names if name != CIFARNET]
    if CIFARNET in names:  # its own recipe: 32 px, its batch size, flip + translate, SGD (common/cifarnet.py)
        def flip_translate(x: torch.Tensor) -> torch.Tensor:
            flipped = torch.rand(len(x), device=x.device) < 0.5
            return cifarnet.translate(torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x), 2)

        batch = overrides.get("batch_size") or hp.cifarnet_batch_size
        recipes.append(Recipe(4, f"Level 4: {CIFARNET}", CIFARNET, 32, batch, hp.eval_batch_size,
                              "all (from scratch)", "alternating flip + translate",
                              lambda: build_member(CIFARNET, False, None, hp), "sgd", 0.1, 5e-4,
                              augment=flip_translate,
                              loss_fn=nn.CrossEntropyLoss(label_smoothing=cifarnet.CifarNetRecipe.label_smoothing)))
    return recipes


# ----------------------------------------------------------------------------------------------------------
#                                 Test-time augmentation and prediction


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, views: dict, to_input, batch_size: int, device, precision,
            display, split: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Softmax probabilities under each view ({"plain": ..., "tta": mean over the views}) and the seconds each
    view took. Timed with the device synchronized, after one warm-up batch, so that img/s means something."""
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


# ----------------------------------------------------------------------------------------------------------
#                                      Ensembles and their scores


def soft_vote(probs: list[np.ndarray]) -> np.ndarray:
    """The mean of the members' probabilities (N x classes each)."""
    return np.mean(np.stack(probs), axis=0)


def weighted_vote(probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Σ_k w_k · p_k, with weights that are non-negative and sum to one: still a probability."""
    return np.tensordot(np.asarray(weights, dtype=float), np.stack(probs), axes=1)


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p -> softmax(log p / T). T < 1 sharpens an underconfident member, T > 1 softens an overconfident one; the
    order of the classes, so the accuracy, does not change (Guo et al., "On Calibration of Modern Neural
    Networks", 2017, temperature scaling)."""
    logits = np.log(np.clip(probs, 1e-12, None)) / temperature
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_temperature(val_probs: np.ndarray, val_labels: np.ndarray) -> float:
    """The temperature minimizing a member's validation log-loss (searched over log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: log_loss(temperature_scale(val_probs, np.exp(log_t)), val_labels),
                             bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(result.x))


def fit_weights(val_probs: list[np.ndarray], val_labels: np.ndarray, method: str = "logloss") -> np.ndarray:
    """Member weights from *validation* predictions and labels; nothing else goes in.

    "accuracy": w_k ∝ validation accuracy of member k.
    "logloss": the weights on the simplex minimizing the validation log-loss of the weighted vote, found by
    L-BFGS over w = softmax(z) (so they stay positive and sum to one) from equal weights.
    """
    from scipy.optimize import minimize

    if method == "accuracy":
        acc = np.array([(p.argmax(1) == val_labels).mean() for p in val_probs])
        return acc / acc.sum()

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        return log_loss(weighted_vote(val_probs, w / w.sum()), val_labels)

    z = minimize(loss, np.zeros(len(val_probs)), method="L-BFGS-B").x
    w = np.exp(z - z.max())
    return w / w.sum()


def compare(predictions: dict[str, dict], val_labels: np.ndarray, test_labels: np.ndarray, weighting: str,
            records: dict | None = None) -> dict:
    """Every member and every ensemble, without and with TTA, scored on validation and test.

    predictions: member -> {"val": {"plain": P, "tta": P}, "test": {...}} (N x classes probabilities).
    The ensemble weights are fitted first, from the validation probabilities and labels alone; only then are
    the test labels read, to score what was already decided. The chosen ensemble is fixed in advance (the
    weighted vote, with TTA when it is on), not picked by its results.

    The weighted vote calibrates each member first, with a temperature fitted on validation: a vote that
    minimizes log-loss otherwise trusts only the best-calibrated member. Measured on the CPU profile's run
    (results/cpu/level4.json, without this step): cifarnet, trained with label smoothing 0.2, was underconfident
    (mean confidence 0.68 at 88% accuracy) and got a weight of 0.000 beside lite0+SE, so the vote was lite0+SE
    alone, while the plain mean of the two was 0.9 points better on validation and on test.
    """
    records = records or {}
    members = list(predictions)
    variants = [v for v in ("plain", "tta") if all(v in predictions[n]["val"] for n in members)]
    suffix = {"plain": "", "tta": " + TTA"}

    # 1. everything that uses validation only: the ensembles' probabilities and the weights
    probs, weights, temperatures = {}, {}, {}
    for v in variants:
        for name in members:
            probs[name + suffix[v]] = {s: predictions[name][s][v] for s in ("val", "test")}
        probs["soft vote" + suffix[v]] = {s: soft_vote([predictions[n][s][v] for n in members])
                                          for s in ("val", "test")}
        t = {n: fit_temperature(predictions[n]["val"][v], val_labels) for n in members}
        calibrated = {s: [temperature_scale(predictions[n][s][v], t[n]) for n in members] for s in ("val", "test")}
        w = fit_weights(calibrated["val"], val_labels, weighting)
        weights["weighted vote" + suffix[v]] = dict(zip(members, w.tolist()))
        temperatures["weighted vote" + suffix[v]] = t
        probs["weighted vote" + suffix[v]] = {s: weighted_vote(calibrated[s], w) for s in ("val", "test")}
    best_member = max(members, key=lambda n: (predictions[n]["val"]["plain"].argmax(1) == val_labels).mean())
    chosen = "weighted vote" + suffix[variants[-1]]

    # 2. the test labels, read here
    rows = {}
    for v in variants:
        for name in [*members, "soft vote", "weighted vote"]:
            parts = [records.get(n, {}) for n in ([name] if name in members else members)]
            rows[name + suffix[v]] = comparison_row(name + suffix[v], name in members, v == "tta",
                                                    probs[name + suffix[v]], val_labels, test_labels, parts)
    plain = {n: probs[n]["test"].argmax(1) for n in members}
    disagreement = {f"{a} vs {b}": float((plain[a] != plain[b]).mean())
                    for i, a in enumerate(members) for b in members[i + 1:]}
    reference = best_member + suffix[variants[-1]]
    per_class = per_class_gains(probs[reference]["test"], probs[chosen]["test"], test_labels)
    # the ensemble and its best member answer the same test images: the paired standard error is the right one
    gain = paired_difference(probs[chosen]["test"].argmax(1) == test_labels,
                             probs[reference]["test"].argmax(1) == test_labels)
    return dict(rows=rows, weights=weights, temperatures=temperatures, probs=probs, chosen=chosen, best_member=best_member,
                reference=reference, disagreement=disagreement, per_class=per_class, gain_over_best_member=gain)


if __name__ == "__main__":
    sys.exit(main())
