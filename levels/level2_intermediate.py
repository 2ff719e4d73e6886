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

Which configuration is trained
    The recipe is augmentation + head + last stage (the flags --no-augment and --no-fine-tune change it). The
    ablation keeps the recipe unless another arm beats it on validation by more than two standard errors: a
    difference within noise is no reason to change. When the ablation's budget equals the main run's
    (--ablation-epochs = --epochs, as in --quick), the chosen arm *is* the main run and is not trained twice.

Run
    python levels/level2_intermediate.py                 # ResNet50, ImageNet weights from the hub
    python levels/level2_intermediate.py --quick         # smoke profile for a CPU
    python levels/level2_intermediate.py --no-ablation   # the recipe alone
    python levels/level2_intermediate.py --model efficientnet_lite0 --weights FILE --img-size 128   # offline
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import common` when run as a script

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.augment import color_jitter, random_crop_flip  # noqa: E402
from common.cli import parse_args  # noqa: E402
from common.models import create_model, last_stage, normalization, train_only  # noqa: E402
from common.plots import plot_ablation, plot_training_curves  # noqa: E402
from common.progress import TrainingDisplay  # noqa: E402
from common.results import LevelRun  # noqa: E402
from common.summary import load_metrics  # noqa: E402
from common.training import (  # noqa: E402
    FitResult, TensorBatches, cosine_schedule, count_parameters, evaluate, fit, make_optimizer, model_input,
)

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass
class Hyperparameters:
    model: str = "resnet50"  # ImageNet-pretrained; any timm CNN works (its last stage is found by common.models)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4
    img_size: int = 224
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    augment: bool = True  # the recipe: per-image flip, 4-pixel-padded crop and colour jitter, at 32x32
    fine_tune: bool = True  # the recipe: train the last stage (ResNet50's layer4) with the head; else the head alone
    brightness: float = 0.2  # colour jitter: factors drawn in [1 - x, 1 + x], per image
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1  # a hue shift drawn in [-x, x] of a turn, per image
    ablation: bool = True  # run the 2x2 study first (--no-ablation: train the recipe alone)
    ablation_epochs: int = 3  # per arm; the same for all four arms, and may be smaller than --epochs
    eval_batch_size: int = 256  # validation and test only run inference: larger batches change only speed


TITLE = "Level 2: augmentation and fine-tuning"
APPROACH = "Augmentation + fine-tuned last stage, with an ablation"
QUICK = dict(ablation_epochs=1)  # --quick: one epoch per arm, as for the main run, so the chosen arm is reused


@dataclass(frozen=True)
class Arm:
    """One configuration of the ablation."""

    augment: bool
    fine_tune: bool

    @property
    def name(self) -> str:
        return (f"{'augmentation' if self.augment else 'no augmentation'}, "
                f"{'head + last stage' if self.fine_tune else 'head only'}")


ARMS = [Arm(False, False), Arm(True, False), Arm(False, True), Arm(True, True)]


def main(argv: list[str] | None = None) -> int:
    settings, hp = parse_args(argv, Hyperparameters(), prog="level2_intermediate.py", description=__doc__,
                              quick_overrides=QUICK)
    run = LevelRun(2, TITLE, APPROACH, settings, hp)
    return run.execute(lambda: train_and_evaluate(run, settings, hp))


# ----------------------------------------------------------------------------------------------------------
#                   Building blocks (Level 3 imports them: it trains the same way, on another network)


def augment(batch: torch.Tensor, hp) -> torch.Tensor:
    """The augmentation pipeline, on a uint8 batch at 32x32 on the device, each image with its own draws."""
    batch = random_crop_flip(batch, padding=4)
    return color_jitter(batch, hp.brightness, hp.contrast, hp.saturation, hp.hue)


def augmentation_steps(hp) -> list[str]:
    """What augment() does, in words, for metrics.json and the summary."""
    return ["random crop, 4-pixel zero padding", "random horizontal flip",
            f"colour jitter (brightness {hp.brightness}, contrast {hp.contrast}, saturation {hp.saturation}, "
            f"hue {hp.hue})"]


def zero_head(model: nn.Module) -> nn.Module:
    """Start the new head at zero, i.e. from uniform predictions (loss ln 10), as in Level 1: some timm models
    initialize their classifier for training from scratch, wide enough to start at a loss of 6 or more."""
    head = model.get_classifier()
    for p in head.parameters():
        nn.init.zeros_(p)
    return head


def build_model(name: str, settings, arm: Arm, device) -> nn.Module:
    """A fresh pretrained network, trainable where `arm` says: the new head, and the last stage if fine-tuned.
    Everything else is frozen; set_train_mode() (in fit) keeps the frozen BatchNorm layers in eval mode."""
    torch.manual_seed(settings.seed)  # every arm starts from the same weights
    model = create_model(name, num_classes=10, pretrained=settings.pretrained, weights=settings.weights)
    train_only(model, [zero_head(model)] + (last_stage(model) if arm.fine_tune else []))
    return model.to(device, memory_format=torch.channels_last)


def train(model: nn.Module, images: dict, hp, *, epochs: int, augmented: bool, seed: int, device, precision,
          title: str, history: list | None = None) -> FitResult:
    """Train `model`'s trainable parameters with AdamW and cosine annealing; fit() keeps the best-validation epoch.

    `hp` gives the recipe: batch_size, lr, optimizer, weight_decay, img_size, eval_batch_size and the jitter
    strengths. Every batch is augmented (when `augmented`) at 32x32, then normalized and resized on the device.
    """
    mean, std = normalization(model)

    def plain(batch: torch.Tensor) -> torch.Tensor:
        return model_input(batch, hp.img_size, mean, std)

    def with_augmentation(batch: torch.Tensor) -> torch.Tensor:
        return plain(augment(batch, hp))

    train_batches = TensorBatches(*images["train"], hp.batch_size, shuffle=True, seed=seed,
                                  transform=with_augmentation if augmented else plain)
    val_batches = evaluation_batches(images, "val", model, hp)
    optimizer = make_optimizer(hp.optimizer, model.parameters(), hp.lr, hp.weight_decay)
    with TrainingDisplay(title, epochs) as display:
        return fit(model, train_batches, val_batches, epochs=epochs, optimizer=optimizer,
                   scheduler=cosine_schedule(optimizer, epochs * len(train_batches)), loss_fn=nn.CrossEntropyLoss(),
                   device=device, precision=precision, display=display, history=history)


def evaluation_batches(images: dict, split: str, model: nn.Module, hp) -> TensorBatches:
    """A split's images, in order, as the model's input (no augmentation)."""
    mean, std = normalization(model)
    return TensorBatches(*images[split], hp.eval_batch_size,
                         transform=lambda batch: model_input(batch, hp.img_size, mean, std))


# -- Noise: is a difference between two accuracies real?


def standard_error(accuracy: float, n: int) -> float:
    """One standard error of an accuracy measured on n images: sqrt(p(1 - p) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / max(n, 1))


def difference(new: float, old: float, n_new: int, n_old: int) -> dict:
    """new - old in points, with the standard error of that difference (the two measurements taken as
    independent); beyond noise when it is more than two standard errors."""
    se = math.hypot(standard_error(new, n_new), standard_error(old, n_old))
    return dict(points=100 * (new - old), standard_error_points=100 * se, beyond_noise=abs(new - old) > 2 * se)


def describe(d: dict) -> str:
    verdict = "beyond noise" if d["beyond_noise"] else "within noise"
    return (f"{d['points']:+.2f} points ({verdict}; one standard error of the difference: "
            f"{d['standard_error_points']:.2f})")


def compare_with_level(level: int, m: dict, out_dir: Path) -> tuple[str, dict | None]:
    """A sentence comparing this run's test accuracy with an earlier level's, from that level's metrics.json
    in the same output folder, naming what makes the two runs not like for like."""
    earlier = load_metrics(out_dir).get(level)
    if not earlier or earlier.get("status") != "complete" or earlier.get("test_accuracy") is None:
        return (f"Level {level} has no completed run in `{out_dir}`: run it (`python run.py level {level}` with the "
                f"same flags) to see the change against it.", None)
    d = difference(m["test_accuracy"], earlier["test_accuracy"], m["test_size"], earlier["test_size"])
    ours, theirs = m["config"], earlier.get("config", {})
    unlike = [f"{key} {theirs.get(key)} there, {ours.get(key)} here"
              for key in ("model", "img_size", "weights", "pretrained") if theirs.get(key) != ours.get(key)]
    unlike += [f"{key} {earlier.get(key)} there, {m.get(key)} here"
               for key in ("train_size", "test_size", "quick") if earlier.get(key) != m.get(key)]
    if "augmentation" in earlier and bool(earlier["augmentation"]) != bool(m.get("augmentation")):
        unlike.append(f"{'with' if earlier['augmentation'] else 'without'} augmentation there, "
                      f"{'with' if m.get('augmentation') else 'without'} here")
    text = (f"Against Level {level} ({100 * earlier['test_accuracy']:.2f}% on {earlier['test_size']:,} test images): "
            f"{describe(d)}.")
    if unlike:
        text += " Not a like-for-like comparison: " + "; ".join(unlike) + "."
    return text, dict(level=level, test_accuracy=earlier["test_accuracy"], like_for_like=not unlike, **d)


# ----------------------------------------------------------------------------------------------------------


def train_and_evaluate(run: LevelRun, settings, hp: Hyperparameters) -> None:
    m = run.metrics

    # ------------------------------------------------------------------------------------------------------
    #                                              Setup
    device, precision = run.setup(settings)  # seed, device, mixed precision (see common/training.py)

    # ------------------------------------------------------------------------------------------------------
    #                                              Data
    splits, images = run.load_data(settings, device)  # 40k/10k/10k, uint8 on the device

    # ------------------------------------------------------------------------------------------------------
    #                          Network and training, for one configuration ("arm")

    def train_arm(arm: Arm, epochs: int, title: str, history: list) -> tuple[nn.Module, FitResult]:
        model = build_model(hp.model, settings, arm, device)
        return model, train(model, images, hp, epochs=epochs, augmented=arm.augment, seed=settings.seed,
                            device=device, precision=precision, title=title, history=history)

    # ------------------------------------------------------------------------------------------------------
    #                              Ablation: four arms, the same budget each
    recipe = Arm(hp.augment, hp.fine_tune)
    chosen, reason, trained = recipe, "it is the recipe (--no-ablation: no study run)", {}
    reuse = hp.ablation and hp.ablation_epochs == hp.epochs  # then the chosen arm is the main run
    if hp.ablation:
        study = m["ablation"] = dict(epochs_per_arm=hp.ablation_epochs, main_epochs=hp.epochs,
                                     val_size=m["val_size"], arms=[])
        for i, arm in enumerate(ARMS, start=1):
            record = dict(name=arm.name, augment=arm.augment, fine_tune=arm.fine_tune, history=[])
            study["arms"].append(record)
            model, result = train_arm(arm, hp.ablation_epochs, f"{TITLE} — ablation {i}/{len(ARMS)}: {arm.name}, "
                                      f"{hp.ablation_epochs} epoch(s)", record["history"])
            record.update(val_accuracy=result.best_val_accuracy, best_epoch=result.best_epoch,
                          train_seconds=result.train_seconds,
                          trainable_parameters=count_parameters(model, trainable_only=True))
            if reuse:
                trained[arm] = (model, result)
        chosen, reason = choose(study["arms"], recipe, m["val_size"])
        study.update(chosen=chosen.name, reason=reason, seconds=sum(a["train_seconds"] for a in study["arms"]))

    # ------------------------------------------------------------------------------------------------------
    #                                 Train the chosen configuration
    reused = chosen in trained
    if reused:
        model, result = trained.pop(chosen)
        m["history"].extend(next(a for a in m["ablation"]["arms"] if a["name"] == chosen.name)["history"])
    else:
        model, result = train_arm(chosen, hp.epochs, f"{TITLE} — {chosen.name} — {hp.model} at {hp.img_size}px on "
                                  f"{m['environment']['device']}", m["history"])
    trained.clear()
    head_parameters = count_parameters(model.get_classifier())
    m.update(approach=chosen.name.capitalize() + (", chosen by an ablation" if hp.ablation else ""),
             configuration=dict(name=chosen.name, augment=chosen.augment, fine_tune=chosen.fine_tune,
                                chosen_by=reason, reused_ablation_arm=reused),
             augmentation=augmentation_steps(hp) if chosen.augment else [],
             total_parameters=count_parameters(model), head_parameters=head_parameters,
             last_stage_parameters=sum(count_parameters(s) for s in last_stage(model)),
             trainable_parameters=count_parameters(model, trainable_only=True),
             best_epoch=result.best_epoch, val_accuracy=result.best_val_accuracy,
             main_train_seconds=result.train_seconds,
             # the level's training time: the ablation's arms and the main run (unless it is one of the arms)
             train_seconds=m.get("ablation", {}).get("seconds", 0) + (0 if reused else result.train_seconds))

    # ------------------------------------------------------------------------------------------------------
    #                                 Evaluate: the test set, once
    test = evaluate(model, evaluation_batches(images, "test", model, hp), device, precision)
    m.update(test_accuracy=test.accuracy, test_loss=test.loss, test_evaluations=1)

    # ------------------------------------------------------------------------------------------------------
    #                                             Report
    run.add_figure("curves", plot_training_curves(m["history"], run.path("curves.png"),
                                                  f"{TITLE}: {chosen.name} ({hp.model}, {m['train_size']:,} images)"))
    if hp.ablation:
        arms = m["ablation"]["arms"]
        run.add_figure("ablation", plot_ablation(
            [a["name"].replace(", ", ",\n") for a in arms], [a["val_accuracy"] for a in arms],
            [standard_error(a["val_accuracy"], m["val_size"]) for a in arms], run.path("ablation.png"),
            f"Ablation: best validation accuracy ± 1 standard error, {hp.ablation_epochs} epoch(s) per arm "
            f"({hp.model})",
            highlight=[a["name"] for a in arms].index(chosen.name)))
        m["sections"] = [dict(heading="Ablation study (validation accuracy)", markdown=ablation_table(m))]
    level1_text, m["level1_comparison"] = compare_with_level(1, m, run.out_dir)
    m["improvement_analysis"] = improvement_analysis(m, level1_text)
    m.setdefault("sections", []).append(dict(heading="Improvement analysis", markdown=m["improvement_analysis"]))


def choose(arms: list[dict], recipe: Arm, n_val: int) -> tuple[Arm, str]:
    """The recipe, unless another arm beats it on validation by more than two standard errors."""
    by_name = {a["name"]: a for a in arms}
    best = max(arms, key=lambda a: a["val_accuracy"])
    kept = by_name[recipe.name]
    if best is kept:
        return recipe, "it is the recipe, and the best arm on validation"
    d = difference(best["val_accuracy"], kept["val_accuracy"], n_val, n_val)
    if d["beyond_noise"]:
        return (Arm(best["augment"], best["fine_tune"]),
                f"it beats the recipe ({recipe.name}) on validation by {describe(d)}")
    return recipe, (f"it is the recipe, and the best arm on validation ({best['name']}) is ahead of it by only "
                    f"{describe(d)}")


def ablation_table(m: dict) -> str:
    study = m["ablation"]
    se = [standard_error(a["val_accuracy"], m["val_size"]) for a in study["arms"]]
    lines = ["| configuration | trainable parameters | best validation accuracy | ± 1 s.e. | best epoch | "
             "training time |", "|---|---|---|---|---|---|"]
    for arm, error in zip(study["arms"], se):
        name = f"**{arm['name']}** (chosen)" if arm["name"] == study["chosen"] else arm["name"]
        lines.append(f"| {name} | {arm['trainable_parameters']:,} | {100 * arm['val_accuracy']:.2f}% | "
                     f"{100 * error:.2f} | {arm['best_epoch']} of {study['epochs_per_arm']} | "
                     f"{arm['train_seconds']:.0f} s |")
    same = "the same as" if study["epochs_per_arm"] == study["main_epochs"] else "smaller than"
    lines += ["", f"Budget: {study['epochs_per_arm']} epoch(s) per arm, on {m['train_size']:,} training images, the "
              f"same seed and the same batches for every arm; {same} the main run's {study['main_epochs']} epoch(s). "
              f"Validation on {m['val_size']:,} images; the test set is used once, for the chosen configuration "
              f"only. Chosen: {study['chosen']}, because {study['reason']}."]
    return "\n".join(lines)


def improvement_analysis(m: dict, level1_text: str) -> str:
    """The paragraph that says what each ingredient bought, written from the numbers."""
    sentences = []
    if "ablation" in m:
        study, n = m["ablation"], m["val_size"]
        acc = {(a["augment"], a["fine_tune"]): a["val_accuracy"] for a in study["arms"]}

        def effect(new, old):
            return describe(difference(acc[new], acc[old], n, n))

        sentences.append(
            f"On the ablation's equal budget ({study['epochs_per_arm']} epoch(s) per arm, validation accuracy on "
            f"{n:,} images), augmentation changed accuracy by {effect((True, True), (False, True))} with the last "
            f"stage fine-tuned, and by {effect((True, False), (False, False))} with the head alone.")
        sentences.append(
            f"Fine-tuning the last stage changed it by {effect((True, True), (True, False))} with augmentation, and "
            f"by {effect((False, True), (False, False))} without.")
        sentences.append(f"Both together, against the head alone without augmentation: "
                         f"{effect((True, True), (False, False))}.")
        best = max(study["arms"], key=lambda a: a["val_accuracy"])
        sentences.append(f"The best arm was {best['name']} ({100 * best['val_accuracy']:.2f}%); the main run "
                         f"trains {study['chosen']}: {study['reason']}.")
    cfg = m["configuration"]
    sentences.append(
        f"The main run ({cfg['name']}, {m['config']['epochs']} epoch(s), best epoch {m['best_epoch']}) reached "
        f"{100 * m['val_accuracy']:.2f}% on validation and {100 * m['test_accuracy']:.2f}% on {m['test_size']:,} "
        f"test images (± {100 * standard_error(m['test_accuracy'], m['test_size']):.2f} points, one standard error).")
    sentences.append(level1_text)
    if m.get("quick"):
        sentences.append("This is a smoke run (`--quick`): small subsets and tiny images; the differences show that "
                         "the study works, not what the methods are worth.")
    return " ".join(sentences)


if __name__ == "__main__":
    sys.exit(main())
