"""Level 2: what augmentation and fine-tuning buy, measured by an ablation study.

What this level teaches
    Two ways to do better than a linear probe, and how to find out what each one is worth.
    Augmentation: every training image is shown slightly changed each time (mirrored, shifted by up to four
    pixels, its brightness, contrast, saturation and hue jittered), each image with its own random draw, so
    the network learns what does not change a class. Fine-tuning: besides a new head, the backbone's last
    stage (ResNet50's layer4) trains too, so the most task-specific features adapt to CIFAR-10; everything
    before it stays frozen, BatchNorm statistics included. The ablation trains all four combinations
    {no augmentation, augmentation} x {head only, head + last stage} on the same budget and compares them on
    *validation* accuracy: what each ingredient buys, alone and together. Test accuracy is measured once, for
    the configuration chosen.

What changed since Level 1
    The backbone no longer runs once: layer4 trains and every image is augmented differently each epoch, so
    the features cannot be cached. Augmentation runs on the device at 32x32, before the resize
    (common/augment.py). AdamW (lr 3e-4, weight decay 1e-4), cosine annealing, 10 epochs, batch 64.
    Level 1 wrote its training loop out by hand; from here on the same loop runs inside common.training.fit(),
    which adds mixed precision, DDP, per-epoch checkpoints and the best-epoch restore (its docstring says how).
    What Levels 2 and 3 share (the augmentation, which modules train, the training call) is in
    common/finetuning.py, so Level 3 differs from this level only by its architecture.

Which configuration is trained
    The recipe is augmentation + head + last stage (the flags --no-augment and --no-fine-tune change it). The
    ablation keeps the recipe unless another arm beats it on validation by more than two standard errors: a
    difference within noise is no reason to change. When the ablation's budget equals the main run's
    (--ablation-epochs = --epochs, as in --quick), the chosen arm *is* the main run and is not trained twice.

Which weights
    resnet50.tv_in1k, torchvision's, as in Level 1, so that the gain over Level 1 comes from this level's
    methods and not from other pretrained weights. The exact tag is recorded in metrics.json.

Run
    python levels/level2_intermediate.py                 # ResNet50 on a GPU; without one, the CPU profile
    python levels/level2_intermediate.py --quick         # smoke profile for a CPU
    python levels/level2_intermediate.py --no-ablation   # the recipe alone
    python levels/level2_intermediate.py --profile cpu --weights efficientnet_lite0_imagenet.pth   # full data, CPU
    python levels/level2_intermediate.py --resume        # continue a run (each ablation arm too) after a crash
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import common` when run as a script

import torch
from torch import nn

from common.runner.cli import parse_args
from common.data import CLASSES, stratified_subset
from common.finetuning import (SCOPE_WORDS, augmentation_steps, check_scope, crop_flip_jitter, evaluation_batches,
                               fine_tune_scope, train)
from common.models import check_input_size, create_model, last_stage, pretrained_tag, train_only, zero_head
from common.plots import plot_ablation, plot_augmentation, plot_training_curves
from common.runner.results import LevelRun
from common.stats import compare_with_level, describe, difference, standard_error
from common.training import FitResult, count_parameters

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass
class Hyperparameters:
    model: str = "resnet50.tv_in1k"  # torchvision's ImageNet weights, as in Level 1; any timm CNN works
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4  # try 1e-3 with --fine-tune-scope all: the whole network needs care, and warms up slower
    img_size: int = 224
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0  # try 0.1: targets of 0.9 / 0.01 instead of 1 / 0, a milder loss on hard images
    augment: bool = True  # the recipe: per-image flip, 4-pixel-padded crop and colour jitter, at 32x32
    fine_tune: bool = True  # the recipe: train part of the backbone with the head; --no-fine-tune: the head alone
    fine_tune_scope: str = "last-stage"  # try "all": the whole network (slower per step, usually more accurate)
    brightness: float = 0.2  # try 0.4: colour jitter factors drawn in [1 - x, 1 + x], per image
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1  # a hue shift drawn in [-x, x] of a turn, per image
    ablation: bool = True  # run the 2x2 study first (--no-ablation: train the recipe alone)
    ablation_epochs: int = 3  # per arm; the same for all four arms, and may be smaller than --epochs
    ablation_train_size: int | None = None  # train the arms on a stratified subset (None: the whole train split)
    eval_batch_size: int = 256  # validation and test only run inference: larger batches change only speed


# --profile cpu: the whole data set on a 2-core CPU. EfficientNet-Lite0 (ImageNet weights) at 128 px, fine-tuned in
# full: its last stage holds too few of its weights for a partial fine-tune to reach 90%. A full fine-tune's lr, weight
# decay and label smoothing; the ablation's arms train 2 epochs on a 10,000-image subset, too short for augmentation to
# win clearly either way. The measurements: docs/cpu-profile.md
CPU_PROFILE = dict(model="efficientnet_lite0", img_size=128, epochs=5, lr=1e-3, weight_decay=0.05,
                   label_smoothing=0.1, fine_tune_scope="all", ablation_epochs=2, ablation_train_size=10_000,
                   eval_batch_size=16)  # see Level 1's CPU_PROFILE: small batches are faster on a CPU

TITLE = "Level 2: augmentation and fine-tuning"
APPROACH = "Augmentation + fine-tuned last stage, with an ablation"
QUICK = dict(ablation_epochs=1)  # --quick: one epoch per arm, as for the main run, so the chosen arm is reused


@dataclass(frozen=True)
class Arm:
    """One configuration of the ablation."""

    augment: bool
    fine_tune: bool
    scope: str = "last-stage"  # what "fine-tune" trains besides the head: the last stage, or "all"

    @property
    def name(self) -> str:
        tuned = "head + last stage" if self.scope == "last-stage" else "whole network"
        return f"{'augmentation' if self.augment else 'no augmentation'}, {tuned if self.fine_tune else 'head only'}"


ARMS = [Arm(False, False), Arm(True, False), Arm(False, True), Arm(True, True)]


def main(argv: list[str] | None = None) -> int:
    settings, hp = parse_args(argv, Hyperparameters(), prog="level2_intermediate.py", description=__doc__,
                              quick_overrides=QUICK, profiles=dict(cpu=CPU_PROFILE))
    run = LevelRun(2, TITLE, APPROACH, settings, hp)
    return run.execute(lambda: train_and_evaluate(run, settings, hp))


def build_model(name: str, settings, arm: Arm, device, scope: str = "last-stage", img_size: int | None = None
                ) -> nn.Module:
    """A fresh pretrained network, trainable where `arm` says: the new head, and the last stage (or, with
    scope "all", the whole network) if fine-tuned. Everything else is frozen; set_train_mode() (in fit) keeps
    the frozen BatchNorm layers in eval mode."""
    torch.manual_seed(settings.seed)  # every arm starts from the same weights
    model = create_model(name, num_classes=10, pretrained=settings.pretrained, weights=settings.weights)
    train_only(model, [zero_head(model)] + (fine_tune_scope(model, scope) if arm.fine_tune else []))
    model = model.to(device, memory_format=torch.channels_last)
    if img_size is not None:
        check_input_size(model, img_size, name)
    return model


# ----------------------------------------------------------------------------------------------------------


def train_and_evaluate(run: LevelRun, settings, hp: Hyperparameters) -> None:
    metrics = run.metrics

    # ------------------------------------------------------------------------------------------------------
    #                                              Setup
    check_scope(hp.fine_tune_scope)  # now: the arms that train the head alone would not find a typo in it
    device = run.setup(settings)  # seeds, device; the output folder and --weights files checked (LevelRun)

    # ------------------------------------------------------------------------------------------------------
    #                                              Data
    splits, images = run.load_data(settings, device)  # 40k/10k/10k, uint8 on the device
    ablation_images = images
    if hp.ablation_train_size:  # the arms train on a stratified subset; validation stays whole
        keep = torch.from_numpy(stratified_subset(splits.train.labels.numpy(), hp.ablation_train_size)).to(device)
        ablation_images = dict(images, train=tuple(t[keep] for t in images["train"]))

    # ------------------------------------------------------------------------------------------------------
    #                          Network and training, for one configuration ("arm")

    def train_arm(arm: Arm, epochs: int, data: dict, title: str, history: list, run_name: str
                  ) -> tuple[nn.Module, FitResult]:
        model = build_model(hp.model, settings, arm, device, arm.scope, hp.img_size)
        precision = run.precision_for(model)  # bf16 where the hardware has it and it is faster (common/device.py)
        # one checkpoint file per training run: the ablation's arm and the main run of the same arm are two runs
        checkpoint = run.checkpoint(run_name, epochs=epochs, train_images=len(data["train"][1]))
        return model, train(model, data, hp, epochs=epochs, augmented=arm.augment, seed=settings.seed,
                            device=device, precision=precision, title=title, history=history,
                            checkpoint=checkpoint, on_epoch_end=run.epoch_done, compile=run.compile)

    # ------------------------------------------------------------------------------------------------------
    #                              Ablation: four arms, the same budget each
    recipe = Arm(hp.augment, hp.fine_tune, hp.fine_tune_scope)
    chosen, reason, trained = recipe, "it is the recipe (--no-ablation: no study run)", {}
    # when the ablation's budget is the main run's, the chosen arm *is* the main run: not trained twice
    reuse = hp.ablation and hp.ablation_epochs == hp.epochs and ablation_images is images
    if hp.ablation:
        arm_size = len(ablation_images["train"][1])
        study = metrics["ablation"] = dict(epochs_per_arm=hp.ablation_epochs, main_epochs=hp.epochs,
                                           train_size=arm_size, val_size=metrics["val_size"], arms=[])
        for i, arm in enumerate(Arm(a.augment, a.fine_tune, hp.fine_tune_scope) for a in ARMS):
            record = dict(name=arm.name, augment=arm.augment, fine_tune=arm.fine_tune, history=[])
            study["arms"].append(record)
            model, result = train_arm(arm, hp.ablation_epochs, ablation_images,
                                      f"{TITLE} — ablation {i + 1}/{len(ARMS)}: {arm.name}, {hp.ablation_epochs} "
                                      f"epoch(s) on {arm_size:,} images", record["history"], f"ablation, {arm.name}")
            record.update(val_accuracy=result.best_val_accuracy, best_epoch=result.best_epoch,
                          train_seconds=result.train_seconds,
                          trainable_parameters=count_parameters(model, trainable_only=True))
            if reuse:
                trained[arm] = (model, result)
        chosen, reason = choose(study["arms"], recipe, metrics["val_size"])
        study.update(chosen=chosen.name, reason=reason, seconds=sum(a["train_seconds"] for a in study["arms"]))

    # ------------------------------------------------------------------------------------------------------
    #                                 Train the chosen configuration
    reused = chosen in trained
    if reused:
        model, result = trained.pop(chosen)
        metrics["history"].extend(next(a for a in metrics["ablation"]["arms"] if a["name"] == chosen.name)["history"])
    else:
        model, result = train_arm(chosen, hp.epochs, images, f"{TITLE} — {chosen.name} — {hp.model} at "
                                  f"{hp.img_size}px on {metrics['environment']['device']}", metrics["history"],
                                  f"main run, {chosen.name}")
    trained.clear()
    precision = run.precision_for(model)
    metrics.update(approach=chosen.name.capitalize() + (", chosen by an ablation" if hp.ablation else ""),
                   configuration=dict(name=chosen.name, augment=chosen.augment, fine_tune=chosen.fine_tune,
                                      scope=chosen.scope, chosen_by=reason, reused_ablation_arm=reused),
                   augmentation=augmentation_steps(hp) if chosen.augment else [],
                   total_parameters=count_parameters(model), head_parameters=count_parameters(model.get_classifier()),
                   last_stage_parameters=sum(count_parameters(s) for s in last_stage(model)),
                   trainable_parameters=count_parameters(model, trainable_only=True),
                   pretrained_tag=pretrained_tag(model) if settings.pretrained else None,
                   best_epoch=result.best_epoch, val_accuracy=result.best_val_accuracy,
                   main_train_seconds=result.train_seconds,
                   # the level's training time: the ablation's arms and the main run (unless it is one of the arms)
                   train_seconds=metrics.get("ablation", {}).get("seconds", 0) + (0 if reused else result.train_seconds))

    # ------------------------------------------------------------------------------------------------------
    #                                 Evaluate: the test set, once
    test = run.evaluate_test(model, evaluation_batches(images, "test", model, hp), device, precision)
    metrics.update(test_accuracy=test.accuracy, test_loss=test.loss)

    # ------------------------------------------------------------------------------------------------------
    #                                             Report
    run.add_figure("curves", plot_training_curves(metrics["history"], run.path("curves.png"),
                                                  f"{TITLE}: {chosen.name} ({hp.model}, {metrics['train_size']:,} images)"))
    if hp.ablation:
        arms = metrics["ablation"]["arms"]
        run.add_figure("ablation", plot_ablation(
            [a["name"].replace(", ", ",\n") for a in arms], [a["val_accuracy"] for a in arms],
            [standard_error(a["val_accuracy"], metrics["val_size"]) for a in arms], run.path("ablation.png"),
            f"Ablation: best validation accuracy ± 1 standard error, {hp.ablation_epochs} epoch(s) per arm "
            f"({hp.model})",
            highlight=[a["name"] for a in arms].index(chosen.name)))
        metrics["sections"] = [dict(heading="Ablation study (validation accuracy)", markdown=ablation_table(metrics))]
    run.add_figure("augmentation", augmentation_figure(run, splits, hp, device, settings.seed, chosen.augment))
    level1_text, metrics["level1_comparison"] = compare_with_level(1, metrics, run.out_dir)
    metrics["improvement_analysis"] = improvement_analysis(metrics, level1_text)
    metrics.setdefault("sections", []).append(dict(heading="Improvement analysis",
                                                   markdown=metrics["improvement_analysis"]))
    mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")
    run.save_model(model.state_dict(), kind="timm", model=hp.model, img_size=hp.img_size, mean=mean, std=std,
                   pretrained_tag=metrics["pretrained_tag"])


def augmentation_figure(run: LevelRun, splits, hp: Hyperparameters, device, seed: int, used: bool,
                        images: int = 6, views: int = 5):
    """OUT/level2/augmentation.png: the first training image of six classes, each next to `views` views drawn by
    crop_flip_jitter with this run's hp: the very function (and settings) that training calls on every batch.

    The draws are seeded with --seed inside torch.random.fork_rng, so the figure is the same every run and the
    run's own random state is left as it was."""
    labels = splits.train.labels
    picks = [int((labels == c).nonzero()[0, 0]) for c in range(images)]
    originals = splits.train.images[picks].to(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        drawn = crop_flip_jitter(originals.repeat(views, 1, 1, 1), hp)  # view j of image i at j * images + i
    grid = drawn.reshape(views, images, *originals.shape[1:]).transpose(0, 1).cpu()
    run.metrics["augmentation_figure"] = dict(train_positions=picks, views=views)
    note = "" if used else " (the chosen configuration trains without it)"
    return plot_augmentation(originals.cpu(), grid, [CLASSES[c] for c in range(images)], augmentation_steps(hp),
                             run.path("augmentation.png"), f"Level 2's augmentation, each view a fresh draw{note}")


def bench_recipes(overrides: dict) -> list:
    """What `python run.py bench` times for this level: the recipe's trainable part, with its augmentation."""
    from common.runner.bench_recipes import Recipe, random_timm_model, train_part, with_overrides

    hp = with_overrides(Hyperparameters(), overrides, profiles=dict(cpu=CPU_PROFILE))
    return [Recipe(2, "Level 2", hp.model, hp.img_size, hp.batch_size, hp.eval_batch_size,
                   f"{hp.fine_tune_scope} + head", ", ".join(augmentation_steps(hp)),
                   lambda: train_part(random_timm_model(hp.model, hp.img_size), hp.fine_tune_scope), hp.optimizer,
                   hp.lr, hp.weight_decay, augment=lambda x: crop_flip_jitter(x, hp))]


def choose(arms: list[dict], recipe: Arm, n_val: int) -> tuple[Arm, str]:
    """The recipe, unless another arm beats it on validation by more than two standard errors."""
    by_name = {a["name"]: a for a in arms}
    best = max(arms, key=lambda a: a["val_accuracy"])
    kept = by_name[recipe.name]
    if best is kept:
        return recipe, "it is the recipe, and the best arm on validation"
    d = difference(best["val_accuracy"], kept["val_accuracy"], n_val, n_val)
    if d["beyond_noise"]:
        return (Arm(best["augment"], best["fine_tune"], recipe.scope),
                f"it beats the recipe ({recipe.name}) on validation by {describe(d)}")
    return recipe, (f"it is the recipe, and the best arm on validation ({best['name']}) is ahead of it by only "
                    f"{describe(d)}")


def ablation_table(metrics: dict) -> str:
    study = metrics["ablation"]
    se = [standard_error(a["val_accuracy"], metrics["val_size"]) for a in study["arms"]]
    lines = ["| configuration | trainable parameters | best validation accuracy | ± 1 s.e. | best epoch | "
             "training time |", "|---|---|---|---|---|---|"]
    for arm, error in zip(study["arms"], se):
        name = f"**{arm['name']}** (chosen)" if arm["name"] == study["chosen"] else arm["name"]
        lines.append(f"| {name} | {arm['trainable_parameters']:,} | {100 * arm['val_accuracy']:.2f}% | "
                     f"{100 * error:.2f} | {arm['best_epoch']} of {study['epochs_per_arm']} | "
                     f"{arm['train_seconds']:.0f} s |")
    same = "the same as" if study["epochs_per_arm"] == study["main_epochs"] else "smaller than"
    lines += ["", f"Budget: {study['epochs_per_arm']} epoch(s) per arm, on {study.get('train_size', metrics['train_size']):,} training images, the "
              f"same seed and the same batches for every arm; {same} the main run's {study['main_epochs']} epoch(s). "
              f"Validation on {metrics['val_size']:,} images; the test set is used once, for the chosen configuration "
              f"only. Chosen: {study['chosen']}, because {study['reason']}."]
    return "\n".join(lines)


def improvement_analysis(metrics: dict, level1_text: str) -> str:
    """The paragraph that says what each ingredient bought, written from the numbers."""
    sentences = []
    if "ablation" in metrics:
        study, n = metrics["ablation"], metrics["val_size"]
        acc = {(a["augment"], a["fine_tune"]): a["val_accuracy"] for a in study["arms"]}

        tuned = SCOPE_WORDS[metrics["configuration"]["scope"]]

        def effect(new, old):
            return describe(difference(acc[new], acc[old], n, n))

        sentences.append(
            f"On the ablation's equal budget ({study['epochs_per_arm']} epoch(s) per arm, validation accuracy on "
            f"{n:,} images), augmentation changed accuracy by {effect((True, True), (False, True))} with "
            f"{tuned} fine-tuned, and by {effect((True, False), (False, False))} with the head alone.")
        sentences.append(
            f"Fine-tuning {tuned} changed it by {effect((True, True), (True, False))} with augmentation, and "
            f"by {effect((False, True), (False, False))} without.")
        sentences.append(f"Both together, against the head alone without augmentation: "
                         f"{effect((True, True), (False, False))}.")
        best = max(study["arms"], key=lambda a: a["val_accuracy"])
        sentences.append(f"The best arm was {best['name']} ({100 * best['val_accuracy']:.2f}%); the main run "
                         f"trains {study['chosen']}: {study['reason']}.")
    cfg = metrics["configuration"]
    sentences.append(
        f"The main run ({cfg['name']}, {metrics['config']['epochs']} epoch(s), best epoch {metrics['best_epoch']}) reached "
        f"{100 * metrics['val_accuracy']:.2f}% on validation and {100 * metrics['test_accuracy']:.2f}% on {metrics['test_size']:,} "
        f"test images (± {100 * standard_error(metrics['test_accuracy'], metrics['test_size']):.2f} points, one standard error).")
    sentences.append(level1_text)
    if metrics.get("quick"):
        sentences.append("This is a smoke run (`--quick`): small subsets and tiny images; the differences show that "
                         "the study works, not what the methods are worth.")
    return " ".join(sentences)


if __name__ == "__main__":
    sys.exit(main())
