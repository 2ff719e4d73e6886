"""Level 4: an ensemble of three architectures, modern regularization, test-time augmentation, and a report.

What this level teaches
    How far careful engineering takes a classifier, and how to show it honestly. Three different networks (the
    members) are fine-tuned with the regularizers of modern recipes; each predicts every image, also mirrored
    (test-time augmentation); a vote averages their probabilities with weights fitted on the validation set only;
    every member and ensemble is then scored on the test set, once. Members that make *different* mistakes are
    what an ensemble feeds on, so their disagreement is measured beside accuracy, log-loss and calibration.

What changed since Level 3
    - Three members, ImageNet-pretrained and fine-tuned in full: `resnet50+se` (Level 3's SE model),
      `efficientnet_b0`, `vit_small_patch16_224`; or `cifarnet` (common/cifarnet.py), trained from scratch at
      32 px with airbench's ideas, whose mistakes differ from those of ImageNet networks fed blown-up images (alone,
      --models cifarnet, it needs no pretrained weights and trains in 22 minutes on a 2-core CPU with bf16 hardware).
    - Regularization, each switchable: MixUp and CutMix with label smoothing (timm), stochastic depth, and
      AutoAugment's CIFAR-10 policy per image on the device, or Level 2's colour jitter (the CPU profile's).
    - Soft voting, and weighted soft voting fitted on validation, each member first calibrated by a temperature.
    - Test-time augmentation (the mirror; --tta-shifts adds four 2-pixel shifts) for every member and ensemble.
    - A comparison table, disagreement, per-class gains, two charts and OUT/level4/report.md; a checkpoint after
      every epoch of every member (--resume); OUT/level4/model.pt holds the whole ensemble.

Run
    python levels/level4_expert.py                   # the three members on a GPU; without one, the CPU profile
    python levels/level4_expert.py --quick --no-pretrained   # smoke profile for a CPU
    python levels/level4_expert.py --resume          # after a crash: from each member's last finished epoch
    python levels/level4_expert.py --profile cpu --weights efficientnet_lite2=L2,efficientnet_lite0+se=L0  # all data
    python levels/level4_expert.py --profile cpu --models cifarnet   # the from-scratch member alone, on a CPU
    python levels/level4_expert.py --models efficientnet_lite0,resnet18 --weights efficientnet_lite0=FILE
    (--weights: NAME=FILE pairs, or a bare FILE for one member; the others download, or --no-pretrained)
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import common` when run as a script

import numpy as np
import torch
from torch import nn

from common import cifarnet, member_training
from common.augment import autoaugment_cifar10, color_jitter, random_crop_flip, tta_views
from common.device import SetupError
from common.io import save_npz_atomic
from common.members import member_names, member_network, member_seed_offset, member_weights
from common.models import create_model, freeze_first_stages, normalization, zero_head
from common.progress import TrainingDisplay
from common.runner.cli import parse_args
from common.runner.report import (CALIBRATION_BINS, comparison_row, log_loss, per_class_gains, plot_ensemble_figures,
                                  write_ensemble_report)
from common.runner.results import LevelRun
from common.stats import paired_difference
from common.training import count_parameters
from common.tta_prediction import predict_splits

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass
class Hyperparameters:
    models: str = "resnet50+se,efficientnet_b0,vit_small_patch16_224"  # NAME+se: with Level 3's SE; NAME#2: 2nd seed
    model: str | None = None  # the common --model flag: one timm model, the same as --models NAME
    epochs: int = 8  # try 3: how much of the ensemble's gain over its best member is left?
    batch_size: int = 64  # fits a T4 at 224 px without gradient accumulation (docs/levels.md: why)
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
    frozen_stages: int = 0  # the stem and first N stages keep their ImageNet weights: cheaper steps (0: none)
    low_res_epochs: int = 0  # progressive resizing: the first N epochs at --low-res-size. Try 2 of --epochs 5
    low_res_size: int = 96
    tta: bool = True  # also predict the mirror image and average. Try --no-tta: accuracy against images/s
    tta_shifts: bool = False  # with --tta, also four copies shifted by 2 pixels (6 views instead of 2)
    weighting: str = "logloss"  # weighted voting: minimize validation log-loss. Try accuracy (weights ∝ val acc)
    eval_batch_size: int = 256  # inference only: larger batches change nothing but speed
    cifarnet_epochs: int = 10  # `cifarnet` trains with airbench's recipe: the fine-tuning flags above do not apply
    cifarnet_widths: str = "64,256,256"  # airbench94's; 64,128,128 is airbench93's (a quarter of the FLOPs)
    cifarnet_batch_size: int = 1024


# --profile cpu: the whole data set on a 2-core CPU within the time budget. Three members of two kinds, whose mistakes
# differ: cifarnet from scratch at 32 px (airbench94's widths, 16 epochs) and two ImageNet-pretrained EfficientNet-Lites
# (lite2, lite0 + SE) fine-tuned in full at 128 px for 4 epochs with Level 3's CPU recipe: crop, flip, colour jitter,
# no AutoAugment, stochastic depth, MixUp or CutMix (they pay off over far more epochs). Inference in batches of 16,
# faster than 256 on a CPU. The measurements behind each choice: docs/cpu-profile.md
CPU_PROFILE = dict(models="cifarnet,efficientnet_lite2,efficientnet_lite0+se", model=None, img_size=128,
                   eval_batch_size=16, epochs=4, lr=1e-3, weight_decay=0.05, mixup=False, cutmix=False,
                   autoaugment=False, color_jitter=True, drop_path=0.0,
                   cifarnet_widths="64,256,256", cifarnet_epochs=16)

TITLE = "Level 4: ensemble of three architectures"
CIFARNET = "cifarnet"  # the --models name of common/cifarnet.py's from-scratch network
APPROACH = "Ensemble (weighted soft voting{tta}) of {members}"  # by default fine-tuned ResNet50+SE, EfficientNet, ViT


def main(argv: list[str] | None = None) -> int:
    settings, hp = parse_args(argv, Hyperparameters(), prog="level4_expert.py", description=__doc__,
                              quick_overrides=dict(eval_batch_size=128, cifarnet_epochs=4, cifarnet_batch_size=128),
                              profiles=dict(cpu=CPU_PROFILE))
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
    names = ", ".join(f"{n} (from scratch)" if member_network(n) == CIFARNET else f"fine-tuned {n}" for n in members)
    metrics["approach"] = APPROACH.format(tta=" + TTA" if hp.tta else "", members=names)  # before any write
    weights = member_weights(settings.weights, members)
    member_training.check_recipe(hp)
    if hp.frozen_stages:  # does every pretrained member have that many stages? Asked now, not after hours of training
        for network in dict.fromkeys(member_network(n) for n in members if member_network(n) != CIFARNET):
            build_member(network, False, None, hp)
    device = run.setup(settings)  # seeds every generator from --seed (timm's Mixup draws from numpy's); the device
    metrics["members"] = {}

    # ------------------------------------------------------------------------------------------------------
    #                                              Data
    _, images = run.load_data(settings, device)  # 40k/10k/10k, uint8 on the device
    views = tta_views(hp.tta, hp.tta_shifts)
    cifarnet_views = tta_views(hp.tta, translates=True)  # airbench's: the mirror and 1-px translations

    # ------------------------------------------------------------------------------------------------------
    #                            Members: train (or resume), then predict
    # Each member's probabilities on the validation and test images, under every view: no test label is read
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
                   disagreement=comparison["disagreement"], per_class=comparison["per_class"],
                   gain_over_best_member=comparison["gain_over_best_member"], calibration_bins=CALIBRATION_BINS,
                   tta_views=list(views), weights_fitted_on="validation")
    save_npz_atomic(run.path("predictions.npz"), val_labels=val_labels, test_labels=test_labels,
                    **{f"{name}|{split}": p for name, by_split in comparison["probs"].items()
                       for split, p in by_split.items()})
    # model.pt: every member, and how the chosen ensemble combines them (run.py predict uses it)
    run.save_model({}, kind="ensemble", members=saved_members, vote_weights=comparison["weights"][chosen],
                   vote_temperatures=comparison["temperatures"][chosen], tta_views=list(views), chosen=chosen,
                   img_size=hp.img_size)

    # ------------------------------------------------------------------------------------------------------
    #                                    Figures and the report
    plot_ensemble_figures(run, comparison, test_labels, hp.tta)  # accuracy, reliability, training curves
    write_ensemble_report(run, TITLE)  # OUT/level4/report.md, and Level 4's sections of summary.md


# ----------------------------------------------------------------------------------------------------------
#                          Members: the networks, their regularizers, train (or resume), predict


def build_member(name: str, pretrained: bool, weights: str | None, hp: Hyperparameters) -> nn.Module:
    """A member network with a fresh 10-way head and stochastic depth (`cifarnet`: common/cifarnet.py's, random).
    `NAME+se` is Level 3's SE model on NAME. A model whose input size is fixed at creation (a ViT's grid of patch
    position embeddings) is built for --img-size: timm then resamples the pretrained position embeddings to the
    new grid (at 32 px, ViT-S/16 sees 2x2 = 4 patches)."""
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
    network = member_network(name)  # a copy (NAME#2) is NAME's network, trained with its own seed
    from_scratch = network == CIFARNET
    model = build_member(name, settings.pretrained, weights, hp)
    precision = run.precision_for(model, key=name)  # can differ per member (see common.device.select_precision)
    init = "random" if from_scratch else weights or ("imagenet" if settings.pretrained else "random")
    img_size, epochs = (32, hp.cifarnet_epochs) if from_scratch else (hp.img_size, hp.epochs)
    record = run.metrics["members"][name] = dict(
        member=name, status="training", init=init, history=[], parameters=count_parameters(model),
        trainable_parameters=count_parameters(model, trainable_only=True), img_size=img_size, tta_views=list(views))
    if not from_scratch and hp.low_res_epochs:
        record["train_img_sizes"] = member_training.training_sizes(hp)  # progressive resizing; predicted at img_size
    model = model.to(device, memory_format=torch.channels_last)
    low = record.get("train_img_sizes", []).count(hp.low_res_size)  # the epochs at the low size, as recorded
    sizes = f"{hp.low_res_size}px for {low} epoch(s), then " if low else ""
    title = f"Member {number}/{count}: {name} at {sizes}{img_size}px on {run.metrics['environment']['device']}"
    record["seed"] = settings.seed + member_seed_offset(name)  # a copy (NAME#2): its own data order and draws
    with TrainingDisplay(title, epochs) as display:
        fit_args = dict(seed=record["seed"], compile=run.compile, device=device, precision=precision, display=display,
                        history=record["history"], checkpoint=run.checkpoint(f"member {name}", member=name, init=init),
                        on_epoch_end=run.epoch_done)  # run.compile: --compile where it works here
        if from_scratch:  # airbench's recipe: common/cifarnet.py says why each piece is there
            recipe = cifarnet.CifarNetRecipe(epochs=hp.cifarnet_epochs, batch_size=hp.cifarnet_batch_size,
                                             widths=cifarnet.parse_widths(hp.cifarnet_widths))
            result = cifarnet.train(model, images, recipe, hp.eval_batch_size, **fit_args)
        else:  # this level's augmentation, with MixUp/CutMix, AdamW, warm-up and cosine (common/member_training.py)
            result = member_training.train(model, images, hp, augment=lambda b: augment(b, hp), **fit_args)
        record.update(status="trained", best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                      train_seconds=result.train_seconds, resumed_epochs=result.resumed_epochs)
        run.metrics["history"] += [dict(h, member=name) for h in record["history"]]
        probs, speeds = predict_splits(model, images, views, img_size, hp.eval_batch_size, device, precision, display)
    record.update(speeds)  # the test set's images/s, plain and with every view
    mean, std = normalization(model)
    kind = CIFARNET if from_scratch else "se" if network.endswith("+se") else "timm"
    saved = dict(name=name, kind=kind, model=network.removesuffix("+se"), img_size=img_size,
                 mean=list(mean), std=list(std), reduction=hp.se_reduction, se_in_layer4=False, drop_path=hp.drop_path,
                 widths=list(cifarnet.parse_widths(hp.cifarnet_widths)), views=list(views),
                 state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next member starts from an empty GPU
    return probs, saved


def bench_recipes(overrides: dict) -> list:
    """What `run.py bench` times: each member trained in full, with this level's augmentation and MixUp/CutMix."""
    from common.runner.bench_recipes import Recipe, with_overrides

    hp = with_overrides(Hyperparameters(), overrides, profiles=dict(cpu=CPU_PROFILE))
    mix, loss_fn = member_training.mixing(hp)
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
        recipes.append(Recipe(4, f"Level 4: {CIFARNET}", CIFARNET, eval_batch_size=hp.eval_batch_size,
                              build=lambda: build_member(CIFARNET, False, None, hp),
                              **cifarnet.bench_settings(overrides.get("batch_size") or hp.cifarnet_batch_size)))
    return recipes


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
    minimizes log-loss otherwise trusts only the best-calibrated member (measured: docs/cpu-profile.md).
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
    return dict(rows=rows, weights=weights, temperatures=temperatures, probs=probs, chosen=chosen,
                best_member=best_member, reference=reference, disagreement=disagreement, per_class=per_class,
                gain_over_best_member=gain)


if __name__ == "__main__":
    sys.exit(main())
