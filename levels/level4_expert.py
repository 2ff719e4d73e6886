"""Level 4: an ensemble of three architectures, modern regularization, test-time augmentation, and a report.

What this level teaches
    How far careful engineering takes a classifier, and how to show it honestly. Three different networks
    (a CNN with Level 3's SE attention, an EfficientNet, a Vision Transformer) are fine-tuned in full with the
    regularizers of modern recipes; their predicted probabilities are then averaged (soft voting), with
    weights fitted on the validation set only, and each image is also seen mirrored (test-time augmentation).
    Members that make *different* mistakes are what an ensemble feeds on, so the level measures that
    (pairwise disagreement) next to accuracy, log-loss and calibration, and writes a report a reader can check.

What changed since Level 3
    - Three members instead of one: `resnet50+se` (ResNet50 with Level 3's SE block, imported from Level 3),
      `efficientnet_b0` and `vit_small_patch16_224`, each ImageNet-pretrained and fine-tuned in full.
    - Regularization, each switchable: MixUp and CutMix with label smoothing (timm's Mixup and its
      soft-target loss; --no-mixup, --no-cutmix, --label-smoothing), stochastic depth (timm's drop_path_rate;
      --drop-path 0), AutoAugment with the CIFAR-10 policy, per image at 32x32 (--no-autoaugment).
    - Ensembles: soft voting, and weighted soft voting fitted on validation (--weighting logloss|accuracy).
    - Test-time augmentation: the mirror image (and with --tta-shifts four 2-pixel shifts) for every member
      and every ensemble (--no-tta).
    - A comparison table, pairwise disagreement, per-class gains, an accuracy chart, a reliability diagram,
      and OUT/level4/report.md, written from this run's numbers only.
    - Each member is saved when it finishes; --resume skips the members already trained.

Run
    python levels/level4_expert.py                   # the three members, ImageNet weights from the hub
    python levels/level4_expert.py --quick --no-pretrained   # smoke profile for a CPU
    python levels/level4_expert.py --resume          # after a Ctrl-C or a crash: keeps the finished members
    python levels/level4_expert.py --models efficientnet_lite0,resnet18 \\
        --weights efficientnet_lite0=FILE --no-pretrained     # offline: local weights for some members

Offline: --weights takes NAME=FILE pairs separated by commas (a bare FILE when there is one member); members
without an entry download their weights, or start from random weights with --no-pretrained.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import common` when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common.augment import random_crop_flip  # noqa: E402
from common.cli import parse_args  # noqa: E402
from common.data import CLASSES  # noqa: E402
from common.models import create_model, normalization  # noqa: E402
from common.plots import plot_accuracy_comparison, plot_reliability, plot_training_curves  # noqa: E402
from common.progress import TrainingDisplay, console  # noqa: E402
from common.results import LevelRun, write_text_atomic  # noqa: E402
from common.training import (  # noqa: E402
    SetupError, TensorBatches, autocast, count_parameters, fit, make_optimizer, model_input,
)

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass
class Hyperparameters:
    models: str = "resnet50+se,efficientnet_b0,vit_small_patch16_224"  # NAME+se: Level 3's SE block on NAME
    model: str | None = None  # the common --model flag: one timm model, the same as --models NAME
    epochs: int = 8
    # 64 images per step fit a 16 GB T4 at 224 px in 16-bit mixed precision, so no gradient accumulation is
    # needed. Measured (on a CPU, bf16 autocast, summing the tensors autograd saves for backward, an upper
    # bound): 86 MiB per image for resnet50+se, 46 for efficientnet_b0, 54 for vit_small, i.e. at most 5.4 GiB
    # for a batch of 64, plus about 0.4 GB of weights, gradients and AdamW moments (16 bytes a parameter).
    batch_size: int = 64
    lr: float = 2e-4  # full fine-tuning of pretrained weights: an order of magnitude below training from scratch
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    warmup: float = 0.05  # the first 5% of the steps ramp the learning rate up linearly, then cosine to zero
    img_size: int = 224  # the members' pretraining size; CIFAR's 32x32 is upsampled on the device
    mixup: bool = True  # MixUp (Zhang et al., 2018): blend two images and their labels, alpha 0.8
    cutmix: bool = True  # CutMix (Yun et al., 2019): paste a patch of one image into another, alpha 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.1  # stochastic depth: each residual branch is skipped with this probability in training
    autoaugment: bool = True  # AutoAugment's CIFAR-10 policy, per image, at 32x32, before the resize
    se_reduction: int = 16  # the SE block's bottleneck, as in Level 3
    tta: bool = True  # test-time augmentation: also predict the mirror image and average the probabilities
    tta_shifts: bool = False  # with --tta, also four copies shifted by 2 pixels (6 views instead of 2)
    weighting: str = "logloss"  # weighted voting: minimize validation log-loss, or "accuracy" (weights ∝ val acc)
    eval_batch_size: int = 256  # inference only: larger batches change nothing but speed
    workers: int = 4  # CPU processes applying AutoAugment while the device trains
    resume: bool = False  # keep the members whose checkpoint matches this recipe; train only the others


TITLE = "Level 4: ensemble of three architectures"
APPROACH = "Ensemble (weighted soft voting + TTA) of fine-tuned CNN+SE, EfficientNet and ViT"
CALIBRATION_BINS = 15
SHIFT = 2  # pixels, at 32x32, for --tta-shifts


def main(argv: list[str] | None = None) -> int:
    settings, hp = parse_args(argv, Hyperparameters(), prog="level4_expert.py", description=__doc__,
                              quick_overrides=dict(workers=1, eval_batch_size=128))
    if hp.model:  # --model NAME is --models NAME; the record shows the member list under both names
        hp = dataclasses.replace(hp, models=hp.model)
    hp = dataclasses.replace(hp, model=hp.models)
    run = LevelRun(4, TITLE, APPROACH, settings, hp)
    return run.execute(lambda: train_and_evaluate(run, settings, hp))


def train_and_evaluate(run: LevelRun, settings, hp: Hyperparameters) -> None:
    m = run.metrics

    # ------------------------------------------------------------------------------------------------------
    #                                              Setup
    members = member_names(hp.models)
    weights = member_weights(settings.weights, members)
    check_recipe(hp)
    device, precision = run.setup(settings)  # seed, device, mixed precision (see common/training.py)
    m["members"] = {}

    # ------------------------------------------------------------------------------------------------------
    #                                              Data
    splits, images = run.load_data(settings, device)  # 40k/10k/10k, uint8 on the device
    views = tta_views(hp.tta, hp.tta_shifts)

    # ------------------------------------------------------------------------------------------------------
    #                            Members: train (or resume), then predict
    # Each member is trained, saved, and then asked for its probabilities on the validation and test images
    # under every view. Predicting the test images reads no test label; the labels are read once, below.
    predictions: dict[str, dict] = {}
    for number, name in enumerate(members, start=1):
        predictions[name] = run_member(run, number, len(members), name, weights[name], images, splits, views,
                                       settings, hp, device, precision)

    # ------------------------------------------------------------------------------------------------------
    #                     Ensembles (fitted on validation), then the test set, once
    val_labels, test_labels = splits.val.labels.numpy(), splits.test.labels.numpy()
    comparison = compare(predictions, val_labels, test_labels, hp.weighting, m["members"])
    m["test_evaluations"] = 1
    chosen = comparison["chosen"]
    chosen_row = comparison["rows"][chosen]
    m.update(val_accuracy=chosen_row["val_accuracy"], test_accuracy=chosen_row["test_accuracy"],
             test_loss=chosen_row["test_log_loss"], train_seconds=sum(r["train_seconds"] for r in m["members"].values()),
             chosen=chosen, best_member=comparison["best_member"], comparison=list(comparison["rows"].values()),
             ensemble_weights=comparison["weights"], disagreement=comparison["disagreement"],
             per_class=comparison["per_class"], calibration_bins=CALIBRATION_BINS,
             tta_views=list(views), weights_fitted_on="validation")
    np.savez_compressed(run.path("predictions.npz"), val_labels=val_labels, test_labels=test_labels,
                        **{f"{name}|{split}": p for name, by_split in comparison["probs"].items()
                           for split, p in by_split.items()})

    # ------------------------------------------------------------------------------------------------------
    #                                             Report
    bars = [dict(label=name, plain=comparison["rows"][name]["test_accuracy"],
                 tta=comparison["rows"].get(f"{name} + TTA", {}).get("test_accuracy"))
            for name in [*members, "soft vote", "weighted vote"]]
    run.add_figure("accuracy", plot_accuracy_comparison(
        bars, run.path("accuracy.png"), f"Test accuracy on {m['test_size']:,} images, without and with TTA"))
    best = comparison["best_member"] + (" + TTA" if hp.tta else "")
    run.add_figure("reliability", plot_reliability(
        {label: reliability_bins(comparison["probs"][label]["test"], test_labels) for label in (best, chosen)},
        run.path("reliability.png"), f"Reliability on the test set ({CALIBRATION_BINS} bins)"))
    for name in members:
        record = m["members"][name]
        if record["history"]:
            curves = plot_training_curves(record["history"], run.path(f"curves_{safe(name)}.png"),
                                          f"{name} ({m['train_size']:,} training images)")
            run.add_figure(f"curves {name}", curves)
    m["sections"] = summary_sections(m)
    report = run.path("report.md")
    write_text_atomic(report, render_report(m, run.out_dir))
    m["report"] = report.relative_to(run.out_dir).as_posix()


# ----------------------------------------------------------------------------------------------------------
#                                     Members: names, weights, networks


def member_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SetupError("--models is empty: give comma-separated timm names, e.g. resnet50+se,efficientnet_b0.")
    if len(set(names)) != len(names):
        raise SetupError(f"--models names a member twice: {spec}.")
    return names


def member_weights(flag: str | None, members: list[str]) -> dict[str, str | None]:
    """--weights: NAME=FILE pairs (comma-separated), or a bare FILE when there is a single member."""
    if not flag:
        return {name: None for name in members}
    if "=" not in flag:
        if len(members) != 1:
            raise SetupError("--weights FILE is ambiguous with several members: give NAME=FILE pairs, e.g. "
                             f"--weights {members[0]}=FILE (members without one download, or use --no-pretrained).")
        return {members[0]: flag}
    pairs = dict(item.split("=", 1) for item in flag.split(",") if item.strip())
    unknown = [name for name in pairs if name not in members]
    if unknown:
        raise SetupError(f"--weights names {', '.join(unknown)}, which is not among --models {','.join(members)}.")
    return {name: pairs.get(name) for name in members}


def check_recipe(hp: Hyperparameters) -> None:
    if (hp.mixup or hp.cutmix) and hp.batch_size % 2:
        raise SetupError(f"--batch-size {hp.batch_size}: MixUp and CutMix pair each image with another of the "
                         f"batch and need an even batch size (or --no-mixup --no-cutmix).")
    if hp.weighting not in ("logloss", "accuracy"):
        raise SetupError(f"--weighting must be logloss or accuracy, not '{hp.weighting}'.")


def build_member(name: str, pretrained: bool, weights: str | None, hp: Hyperparameters) -> nn.Module:
    """A member network with a fresh 10-way head and stochastic depth.

    `NAME+se` is Level 3's SE model on NAME (its SE block written there, imported here). A model whose input
    size is fixed at creation (a ViT's grid of patch position embeddings) is built for --img-size: timm then
    resamples the pretrained position embeddings to the new grid (at 32 px, ViT-S/16 sees 2x2 = 4 patches).
    """
    import timm

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
    # The new head starts at zero: uniform predictions, and no gradient into the pretrained backbone until the
    # head has learned something. timm initializes some heads for training from scratch (EfficientNet's gives
    # an initial loss near 6 on CIFAR-10), and those first large, random gradients damage the pretrained
    # features: a pretrained efficientnet_lite0 stayed near chance after two smoke epochs (measured) that way.
    for p in model.get_classifier().parameters():
        nn.init.zeros_(p)
    return model


def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ----------------------------------------------------------------------------------------------------------
#                                 AutoAugment, per image, on the CPU


class AutoAugmentImages(torch.utils.data.Dataset):
    """CIFAR-10 train images (uint8, 3 x 32 x 32, on the CPU) through AutoAugment's CIFAR-10 policy, one draw
    of the policy per image.

    Why on the CPU and per image: given a batch tensor, torchvision's AutoAugment draws *one* sub-policy and
    one magnitude for the whole batch, and every image of the batch gets the same operation. Applied image by
    image it costs about 0.14 ms per 32x32 image on one core (measured here), 6 s of CPU per epoch of 40,000
    images, spread over DataLoader worker processes that run while the device trains. One thread per call:
    with PyTorch's default intra-op threads each tiny image took 5 ms (measured), all of it thread start-up.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        self.policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            batch = torch.stack([self.policy(self.images[i]) for i in indices])
        finally:
            torch.set_num_threads(threads)
        return batch, self.labels[indices]


def _whole_batch(batch):
    return batch  # __getitems__ already returns the batch: nothing to collate


class GlobalBatchShare(torch.utils.data.Sampler):
    """Index lists of the shuffled global batches of `batch_size`, or this process's share of each under torchrun
    (process r takes items r, r + N, ... of every global batch, as common.training.TensorBatches.shard does).
    Every process draws the same shuffle from the same seed, so together they train on exactly the batches one
    process would; the last incomplete batch is dropped, so every process takes the same number of steps."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)
        for k in range(len(self)):
            yield order[k * self.batch_size:(k + 1) * self.batch_size][self.rank::self.world_size].tolist()


class AutoAugmentBatches:
    """Training batches: AutoAugment in DataLoader workers, then the crop, flip and resize on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, workers: int,
                 device: torch.device, transform: Callable[[torch.Tensor], torch.Tensor], rank: int = 0,
                 world_size: int = 1):
        self.arguments = (images, labels, batch_size, seed, workers, device, transform)
        self.device, self.transform = device, transform
        workers = min(workers, os.cpu_count() or 1)
        self.loader = torch.utils.data.DataLoader(
            AutoAugmentImages(images.cpu(), labels.cpu()),
            batch_sampler=GlobalBatchShare(len(labels), batch_size, seed, rank, world_size),
            num_workers=workers, collate_fn=_whole_batch, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0)

    def shard(self, rank: int, world_size: int, training: bool) -> "AutoAugmentBatches":
        """This process's share under torchrun (common.training.process_share calls it)."""
        images, labels, batch_size, *rest = self.arguments
        if batch_size % world_size:
            raise SetupError(f"--batch-size {batch_size} does not split evenly between {world_size} processes: "
                             f"use a multiple of {world_size}.")
        return AutoAugmentBatches(images, labels, batch_size, *rest, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield self.transform(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------
#                                     Train one member (or resume it)


def recipe_signature(name: str, weights: str | None, settings, hp: Hyperparameters, sizes: dict) -> dict:
    """What a member's training depends on. --resume keeps a checkpoint only when this is unchanged."""
    fields = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "warmup", "img_size", "mixup", "cutmix",
              "label_smoothing", "drop_path", "autoaugment", "se_reduction")
    return dict(member=name, init=weights or ("imagenet" if settings.pretrained else "random"), seed=settings.seed,
                **sizes, **{f: getattr(hp, f) for f in fields})


def run_member(run: LevelRun, number: int, count: int, name: str, weights: str | None, images: dict, splits,
               views: dict, settings, hp: Hyperparameters, device, precision) -> dict:
    """Train member `name` (or load it with --resume), save it, and return its probabilities per split and view."""
    m = run.metrics
    checkpoint = run.path("members") / f"{safe(name)}.pt"
    signature = recipe_signature(name, weights, settings, hp, dict(train_size=m["train_size"],
                                                                   val_size=m["val_size"]))
    model = build_member(name, settings.pretrained, weights, hp)
    stored = load_checkpoint(checkpoint, signature) if hp.resume else None
    title = f"Member {number}/{count}: {name} at {hp.img_size}px on {m['environment']['device']}"
    if stored is not None:
        model.load_state_dict(stored["state_dict"])
        record = dict(stored["record"], resumed=True)
        console.print(f"Resumed: {name} already trained ({checkpoint}); not training it again.", highlight=False)
    else:
        if hp.resume:
            console.print(f"Resume: no matching checkpoint for {name}; training it.", highlight=False)
        record = dict(member=name, status="training", init=signature["init"], history=[], resumed=False,
                      parameters=count_parameters(model), checkpoint=checkpoint.relative_to(run.out_dir).as_posix())
    m["members"][name] = record
    model = model.to(device, memory_format=torch.channels_last)
    with TrainingDisplay(title + (" (resumed)" if stored else ""), 0 if stored else hp.epochs) as display:
        if stored is None:
            result = train_member(model, images, splits, settings, hp, device, precision, display, record["history"])
            record.update(status="trained", best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                          train_seconds=result.train_seconds)
            save_checkpoint(checkpoint, model, record, signature)
        m["history"] += [dict(h, member=name) for h in record["history"]]
        mean, std = normalization(model)
        probs, seconds = {}, {}
        for split in ("val", "test"):
            probs[split], seconds[split] = predict(model, images[split][0], views,
                                                   lambda b: model_input(b, hp.img_size, mean, std),
                                                   hp.eval_batch_size, device, precision, display, f"{split}")
    n_test = len(images["test"][0])
    record.update(images_per_second=n_test / seconds["test"]["identity"],
                  tta_images_per_second=n_test / sum(seconds["test"].values()))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next member starts from an empty GPU
    return probs


def train_member(model: nn.Module, images: dict, splits, settings, hp: Hyperparameters, device, precision,
                 display, history: list):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mean, std = normalization(model)

    def crop_flip_resize(batch: torch.Tensor) -> torch.Tensor:
        # per image, at 32x32 (AutoAugment, when on, already ran on the CPU): then normalize and resize
        return model_input(random_crop_flip(batch), hp.img_size, mean, std)

    if hp.autoaugment:
        train_batches = AutoAugmentBatches(splits.train.images, splits.train.labels, hp.batch_size, settings.seed,
                                           hp.workers, device, crop_flip_resize)
    else:
        train_batches = TensorBatches(*images["train"], hp.batch_size, shuffle=True, seed=settings.seed,
                                      transform=crop_flip_resize, drop_last=True)
    if len(train_batches) == 0:
        raise SetupError(f"--train-size {len(splits.train)} is smaller than one batch of {hp.batch_size}.")
    val_batches = TensorBatches(*images["val"], hp.eval_batch_size,
                                transform=lambda b: model_input(b, hp.img_size, mean, std))
    mix = None
    if hp.mixup or hp.cutmix:
        # per batch, MixUp or CutMix (one of the two, at random, when both are on); targets become soft
        # label-smoothed vectors, hence timm's soft-target cross-entropy
        mix = Mixup(mixup_alpha=0.8 if hp.mixup else 0.0, cutmix_alpha=1.0 if hp.cutmix else 0.0,
                    label_smoothing=hp.label_smoothing, num_classes=10)
    loss_fn = SoftTargetCrossEntropy() if mix else nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    optimizer = make_optimizer(hp.optimizer, model.parameters(), hp.lr, hp.weight_decay)
    steps = hp.epochs * len(train_batches)
    return fit(model, train_batches, val_batches, epochs=hp.epochs, optimizer=optimizer,
               scheduler=warmup_cosine(optimizer, steps, hp.warmup), loss_fn=loss_fn, device=device,
               precision=precision, mix=mix, display=display, history=history)


def warmup_cosine(optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine to zero; stepped per batch.

    The warm-up protects the pretrained weights from the first steps' large, noisy gradients of a new head
    (AdamW's moment estimates are also still poor then); ViTs are known to need it.
    """
    warm = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_checkpoint(path: Path, model: nn.Module, record: dict, signature: dict) -> None:
    """Atomically: a Ctrl-C while saving leaves the previous file (or none), never half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(dict(state_dict=model.state_dict(), record=record, signature=signature), partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, signature: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file: train again rather than stop
        console.print(f"Resume: cannot read {path} ({type(error).__name__}); training that member again.")
        return None
    if stored.get("signature") != signature:
        changed = sorted(k for k in signature if stored.get("signature", {}).get(k) != signature[k])
        console.print(f"Resume: {path.name} was trained with a different recipe ({', '.join(changed)}); "
                      f"training it again.", highlight=False)
        return None
    return stored


# ----------------------------------------------------------------------------------------------------------
#                                 Test-time augmentation and prediction


def hflip(images: torch.Tensor) -> torch.Tensor:
    """The mirror image: column j of the result is column W-1-j of the input."""
    return images.flip(-1)


def shift(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move the content dx pixels right and dy down; what comes in from the border is black (zero)."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT))
    return padded[..., SHIFT - dy:SHIFT - dy + h, SHIFT - dx:SHIFT - dx + w]


def tta_views(tta: bool, shifts: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The views each image is predicted under; "identity" is the plain prediction. Applied at 32x32, uint8."""
    views = {"identity": lambda x: x}
    if tta:
        views["flip"] = hflip
        if shifts:
            for dx, dy in ((SHIFT, 0), (-SHIFT, 0), (0, SHIFT), (0, -SHIFT)):
                views[f"shift {dx:+d},{dy:+d}"] = lambda x, dx=dx, dy=dy: shift(x, dx, dy)
    return views


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
            _synchronize(device)
            start = time.perf_counter()
            out = []
            for i in batches:
                with autocast(device, precision):
                    out.append(model(to_input(transform(images[i:i + batch_size]))).float().softmax(1))
                advance()
            per_view[view] = torch.cat(out).cpu().double().numpy()
            _synchronize(device)
            seconds[view] = time.perf_counter() - start
    probs = {"plain": per_view["identity"]}
    if len(views) > 1:
        probs["tta"] = np.mean(list(per_view.values()), axis=0)
    return probs, seconds


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
#                                      Ensembles and their scores


def soft_vote(probs: list[np.ndarray]) -> np.ndarray:
    """The mean of the members' probabilities (N x classes each)."""
    return np.mean(np.stack(probs), axis=0)


def weighted_vote(probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Σ_k w_k · p_k, with weights that are non-negative and sum to one: still a probability."""
    return np.tensordot(np.asarray(weights, dtype=float), np.stack(probs), axes=1)


def fit_weights(val_probs: list[np.ndarray], val_labels: np.ndarray, method: str = "logloss") -> np.ndarray:
    """Member weights from *validation* predictions and labels; nothing else goes in.

    "accuracy": w_k ∝ validation accuracy of member k.
    "logloss": the weights on the simplex minimizing the validation log-loss of the weighted vote, found by
    L-BFGS over w = softmax(z) (so they stay positive and sum to one) from equal weights.
    """
    from scipy.optimize import minimize
    from sklearn.metrics import log_loss

    if method == "accuracy":
        acc = np.array([(p.argmax(1) == val_labels).mean() for p in val_probs])
        return acc / acc.sum()

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        return log_loss(val_labels, _normalized(weighted_vote(val_probs, w / w.sum())), labels=range(len(CLASSES)))

    z = minimize(loss, np.zeros(len(val_probs)), method="L-BFGS-B").x
    w = np.exp(z - z.max())
    return w / w.sum()


def _normalized(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return p / p.sum(1, keepdims=True)  # float rounding: rows sum to 1 within 1e-7, and sklearn checks


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Per confidence bin (equal widths over (0, 1]; bin b holds confidences in (b/B, (b+1)/B]): the mean
    confidence, the accuracy and the number of images. Confidence is the top-class probability."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return dict(confidence=mean_conf.tolist(), accuracy=accuracy.tolist(), count=count.tolist(), bins=bins)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|: how far confidence is from being a probability of
    being right, averaged over the images (Guo et al., 2017)."""
    r = reliability_bins(probs, labels, bins)
    count = np.array(r["count"])
    filled = count > 0
    gaps = np.abs(np.array(r["accuracy"])[filled] - np.array(r["confidence"])[filled])
    return float((count[filled] * gaps).sum() / count.sum())


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import log_loss

    return dict(accuracy=float((probs.argmax(1) == labels).mean()),
                log_loss=float(log_loss(labels, _normalized(probs), labels=range(len(CLASSES)))),
                ece=expected_calibration_error(probs, labels))


def compare(predictions: dict[str, dict], val_labels: np.ndarray, test_labels: np.ndarray, weighting: str,
            records: dict | None = None) -> dict:
    """Every member and every ensemble, without and with TTA, scored on validation and test.

    predictions: member -> {"val": {"plain": P, "tta": P}, "test": {...}} (N x classes probabilities).
    The ensemble weights are fitted first, from the validation probabilities and labels alone; only then are
    the test labels read, to score what was already decided. The chosen ensemble is fixed in advance (the
    weighted vote, with TTA when it is on), not picked by its results.
    """
    records = records or {}
    members = list(predictions)
    variants = [v for v in ("plain", "tta") if all(v in predictions[n]["val"] for n in members)]
    suffix = {"plain": "", "tta": " + TTA"}

    # 1. everything that uses validation only: the ensembles' probabilities and the weights
    probs, weights = {}, {}
    for v in variants:
        for name in members:
            probs[name + suffix[v]] = {s: predictions[name][s][v] for s in ("val", "test")}
        w = fit_weights([predictions[n]["val"][v] for n in members], val_labels, weighting)
        weights["weighted vote" + suffix[v]] = dict(zip(members, w.tolist()))
        for ensemble, combine in (("soft vote", soft_vote), ("weighted vote", lambda p: weighted_vote(p, w))):
            probs[ensemble + suffix[v]] = {s: combine([predictions[n][s][v] for n in members])
                                           for s in ("val", "test")}
    best_member = max(members, key=lambda n: (predictions[n]["val"]["plain"].argmax(1) == val_labels).mean())
    chosen = "weighted vote" + suffix[variants[-1]]

    # 2. the test labels, read here
    rows = {}
    for v in variants:
        for name in [*members, "soft vote", "weighted vote"]:
            label = name + suffix[v]
            val, test = scores(probs[label]["val"], val_labels), scores(probs[label]["test"], test_labels)
            is_member = name in members
            parts = [records.get(n, {}) for n in (members if not is_member else [name])]
            speed_key = "tta_images_per_second" if v == "tta" else "images_per_second"
            speeds = [p.get(speed_key) for p in parts]
            rows[label] = dict(
                name=label, kind="member" if is_member else "ensemble", tta=v == "tta",
                val_accuracy=val["accuracy"], val_log_loss=val["log_loss"], val_ece=val["ece"],
                test_accuracy=test["accuracy"], test_log_loss=test["log_loss"], test_ece=test["ece"],
                parameters=sum(p.get("parameters", 0) for p in parts),
                train_seconds=sum(p.get("train_seconds", 0.0) for p in parts),
                # an ensemble runs every member on every image: its throughput is 1 / Σ (1 / member throughput)
                images_per_second=(1 / sum(1 / s for s in speeds)) if speeds and all(speeds) else None)
    plain = {n: probs[n]["test"].argmax(1) for n in members}
    disagreement = {f"{a} vs {b}": float((plain[a] != plain[b]).mean())
                    for i, a in enumerate(members) for b in members[i + 1:]}
    reference = best_member + suffix[variants[-1]]
    per_class = []
    for c, class_name in enumerate(CLASSES):
        mask = test_labels == c
        member_acc = float((probs[reference]["test"].argmax(1)[mask] == c).mean()) if mask.any() else float("nan")
        ensemble_acc = float((probs[chosen]["test"].argmax(1)[mask] == c).mean()) if mask.any() else float("nan")
        per_class.append(dict(name=class_name, images=int(mask.sum()), best_member=member_acc,
                              ensemble=ensemble_acc, gain=ensemble_acc - member_acc))
    return dict(rows=rows, weights=weights, probs=probs, chosen=chosen, best_member=best_member,
                reference=reference, disagreement=disagreement, per_class=per_class)


# ----------------------------------------------------------------------------------------------------------
#                                    Tables, summary sections, report


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _time(seconds) -> str:
    if not seconds:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def comparison_table(m: dict) -> str:
    lines = ["| model | TTA | val acc | val log-loss | test acc | test log-loss | test ECE | parameters | "
             "training time | inference img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["comparison"]:
        name = r["name"].removesuffix(" + TTA")
        if r["name"] == m["chosen"]:
            name = f"**{name}** (chosen)"
        ips = "—" if r["images_per_second"] is None else f"{r['images_per_second']:,.0f}"
        lines.append(f"| {name} | {'yes' if r['tta'] else 'no'} | {_pct(r['val_accuracy'])} | "
                     f"{r['val_log_loss']:.4f} | {_pct(r['test_accuracy'])} | {r['test_log_loss']:.4f} | "
                     f"{_pct(r['test_ece'])} | {r['parameters'] / 1e6:.1f} M | {_time(r['train_seconds'])} | {ips} |")
    return "\n".join(lines)


def weights_table(m: dict) -> str:
    members = list(m["members"])
    lines = ["| ensemble | " + " | ".join(members) + " |", "|---|" + "---|" * len(members)]
    for ensemble, w in m["ensemble_weights"].items():
        lines.append(f"| {ensemble} | " + " | ".join(f"{w[n]:.3f}" for n in members) + " |")
    return "\n".join(lines)


def disagreement_table(m: dict) -> str:
    lines = ["| pair | test images on which their predictions differ |", "|---|---|"]
    lines += [f"| {pair} | {_pct(d)} |" for pair, d in m["disagreement"].items()]
    return "\n".join(lines)


def per_class_table(m: dict) -> str:
    reference = m["best_member"] + (" + TTA" if m["chosen"].endswith("TTA") else "")
    lines = [f"| class | images | {reference} (best member) | {m['chosen']} | gain (points) |", "|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['images']} | {_pct(c['best_member'])} | {_pct(c['ensemble'])} | "
              f"{100 * c['gain']:+.1f} |" for c in m["per_class"]]
    return "\n".join(lines)


def members_table(m: dict) -> str:
    lines = ["| member | initialization | epochs | best epoch (val) | val acc at that epoch | training time | "
             "checkpoint |", "|---|---|---|---|---|---|---|"]
    for name, r in m["members"].items():
        lines.append(f"| {name} | {r['init']} | {len(r['history'])} | {r.get('best_epoch', '—')} | "
                     f"{_pct(r.get('best_val_accuracy'))} | {_time(r.get('train_seconds'))}"
                     f"{' (resumed)' if r.get('resumed') else ''} | `{r['checkpoint']}` |")
    return "\n".join(lines)


def summary_sections(m: dict) -> list[dict]:
    return [
        dict(heading="Members", markdown=members_table(m)),
        dict(heading="Members and ensembles compared", markdown=comparison_table(m)),
        dict(heading="Ensemble weights (fitted on validation only)", markdown=weights_table(m)),
        dict(heading="Pairwise disagreement between members (test, no TTA)", markdown=disagreement_table(m)),
        dict(heading="Per-class test accuracy: chosen ensemble against the best member", markdown=per_class_table(m)),
        dict(heading="Report", markdown="The full write-up: [level4/report.md](level4/report.md)."),
    ]


def analysis(m: dict) -> list[str]:
    """Findings written from the numbers: what the ensemble gained, what TTA did, how calibration moved,
    and whether the differences are larger than the test set's sampling noise."""
    rows = {r["name"]: r for r in m["comparison"]}
    tta = m["chosen"].endswith("TTA")
    reference = m["best_member"] + (" + TTA" if tta else "")
    ens, ref = rows[m["chosen"]], rows[reference]
    n = m["test_size"]
    se = math.sqrt(max(ens["test_accuracy"] * (1 - ens["test_accuracy"]), 1e-12) / n)
    gain = ens["test_accuracy"] - ref["test_accuracy"]
    noise = "more than" if abs(gain) > 2 * se else "within"
    out = [f"- **Ensemble against the best member.** The chosen ensemble ({m['chosen']}) reaches "
           f"{_pct(ens['test_accuracy'])} on the {n:,} test images, against {_pct(ref['test_accuracy'])} for the best "
           f"single member chosen on validation ({reference}): {100 * gain:+.2f} points, {noise} two standard errors "
           f"of an accuracy measured on {n:,} images (±{100 * 2 * se:.2f} points)."]
    members = list(m["members"])
    if tta:
        deltas = [rows[f"{k} + TTA"]["test_accuracy"] - rows[k]["test_accuracy"] for k in members]
        out.append("- **Test-time augmentation.** Averaging the mirror image changed the members' test accuracy by "
                   + ", ".join(f"{100 * d:+.2f} ({k})" for k, d in zip(members, deltas))
                   + f" points, at {rows[reference]['images_per_second'] or 0:,.0f} instead of "
                   f"{rows[m['best_member']]['images_per_second'] or 0:,.0f} images per second for {m['best_member']}.")
    soft = rows["soft vote" + (" + TTA" if tta else "")]
    out.append(f"- **Weighted against equal voting.** Soft voting gives {_pct(soft['test_accuracy'])} "
               f"(log-loss {soft['test_log_loss']:.4f}); the weights fitted on validation give "
               f"{_pct(ens['test_accuracy'])} (log-loss {ens['test_log_loss']:.4f}). Weights: "
               + ", ".join(f"{k} {w:.2f}" for k, w in m["ensemble_weights"][m["chosen"]].items()) + ".")
    out.append(f"- **Calibration.** Expected calibration error on test: {_pct(ens['test_ece'])} for the ensemble, "
               f"{_pct(ref['test_ece'])} for {reference}; log-loss {ens['test_log_loss']:.4f} against "
               f"{ref['test_log_loss']:.4f}.")
    if m["disagreement"]:
        pairs = m["disagreement"]
        most = max(pairs, key=pairs.get)
        out.append(f"- **Diversity.** The members disagree on {_pct(min(pairs.values()))} to {_pct(max(pairs.values()))} "
                   f"of the test images (most: {most}). An ensemble can only correct a member where another "
                   f"member answers differently, so this bounds what voting can gain.")
    gains = sorted(m["per_class"], key=lambda c: c["gain"])
    up = [c for c in gains if c["gain"] > 0]
    down = [c for c in gains if c["gain"] < 0]
    out.append("- **Per class.** "
               + (f"The ensemble gains most on {up[-1]['name']} ({100 * up[-1]['gain']:+.1f} points)" if up
                  else "The ensemble gains on no class")
               + (f" and loses most on {down[0]['name']} ({100 * down[0]['gain']:+.1f} points)" if down
                  else " and loses on none")
               + f" ({len(up)} classes up, {len(down)} down), with about {n // len(CLASSES):,} test images per class "
               f"(one image is {100 * len(CLASSES) / n:.1f} points).")
    if m.get("quick"):
        out.append("- **This is a smoke run** (`--quick`: small subsets, one epoch, small images"
                   + (", random initialization" if not m["config"].get("pretrained") else "")
                   + "). Its numbers show that the pipeline works end to end, not what the method achieves.")
    return out


def render_report(m: dict, out_dir: Path) -> str:
    cfg, env = m["config"], m["environment"]
    members = list(m["members"])
    figures = "\n\n".join(f"![{k}]({Path(p).relative_to('level4').as_posix()})"
                          for k, p in m["figures"].items() if k in ("accuracy", "reliability"))
    command = m["command"]
    lines = [
        f"# {TITLE}: report", "",
        "> Every number below was measured by the run that wrote this file "
        f"(`{command}`); nothing is copied from elsewhere." + (" **Smoke run**: not comparable with a full run."
                                                                if m.get("quick") else ""), "",
        "## Motivation", "",
        "A single network's errors come partly from its inductive biases: a CNN looks at local texture first, a "
        "Vision Transformer relates patches across the whole image from the first layer. Networks built on "
        "different principles tend to make different mistakes, and averaging their predicted probabilities "
        "cancels some of them. This level asks how much an ensemble of three architectures, each fine-tuned with "
        "modern regularization, gains over its best member on CIFAR-10, what test-time augmentation adds, and "
        "what it all costs in parameters, training time and inference speed.", "",
        "## Methods", "",
        f"- **Members**: {', '.join(members)}. `NAME+se` is Level 3's network: NAME with a Squeeze-and-Excitation "
        "block on its final feature map. Each member gets a fresh 10-way head and is fine-tuned in full (every "
        "parameter trains). Initial weights: "
        + ", ".join(f"{n} {r['init']}" for n, r in m["members"].items()) + ".",
        f"- **Optimization**: {cfg['optimizer']} (lr {cfg['lr']}, weight decay {cfg['weight_decay']}), linear warm-up "
        f"over {cfg['warmup']:.0%} of the steps then cosine to zero, {cfg['epochs']} epoch(s), batch {cfg['batch_size']}; "
        "the epoch with the best validation accuracy is kept.",
        f"- **Regularization**: MixUp {'on (α 0.8)' if cfg['mixup'] else 'off'}, CutMix "
        f"{'on (α 1.0)' if cfg['cutmix'] else 'off'} (timm's Mixup: one of the two per batch, soft targets and "
        f"soft-target cross-entropy), label smoothing {cfg['label_smoothing']}, stochastic depth (drop path) "
        f"{cfg['drop_path']}, AutoAugment CIFAR-10 policy {'on' if cfg['autoaugment'] else 'off'} (per image at "
        "32×32, before the random crop and flip, then the resize).",
        f"- **Test-time augmentation**: views {', '.join(m['tta_views'])}; the probabilities of the views are averaged.",
        "- **Ensembles**: soft voting (the mean of the members' probabilities) and weighted soft voting, weights "
        + ("minimizing the validation log-loss (L-BFGS over softmax-parametrized weights)"
           if cfg["weighting"] == "logloss" else "proportional to validation accuracy")
        + ", fitted on validation predictions and labels only. The headline ensemble is fixed in advance: "
        f"**{m['chosen']}**.",
        f"- **Metrics**: accuracy, log-loss (scikit-learn), expected calibration error ({m['calibration_bins']} "
        "equal-width confidence bins), parameters, training time (sum of the epochs), inference images per second "
        "(test set, after a warm-up batch; an ensemble runs every member).", "",
        "## Setup", "",
        f"- **Splits**: {m['train_size']:,} training images (from the official 50,000, stratified, split seed 42), "
        f"{m['val_size']:,} validation images (choice of epoch, ensemble weights), {m['test_size']:,} test images "
        "(the official test set, scored once at the end).",
        f"- **Hardware**: {env['device']}, {env['precision']} precision; torch {env['torch']}, timm {env['timm']}.",
        f"- **Budget**: {cfg['epochs']} epoch(s) per member at {cfg['img_size']} px; training took "
        f"{_time(m['train_seconds'])} for the {len(members)} members together.",
        f"- **Seed**: {cfg['seed']} (initialization, shuffling, augmentation); the split is fixed.", "",
        "## Results", "",
        "### Members", "", members_table(m), "",
        "### Members and ensembles, without and with TTA", "", comparison_table(m), "",
        "### Ensemble weights (fitted on validation only)", "", weights_table(m), "",
        "### Pairwise disagreement (test, no TTA)", "", disagreement_table(m), "",
        "### Per-class test accuracy: chosen ensemble against the best member", "", per_class_table(m), "",
        figures, "",
        "## Analysis", "", *analysis(m), "",
        "## Limitations", "",
        "- One seed: the spread between runs of the same recipe is not measured, so small differences between "
        "rows may not repeat.",
        "- The validation set chooses each member's epoch and fits the ensemble weights, so the validation "
        "numbers of the members and of the weighted vote are slightly optimistic; the test numbers are not.",
        "- Full fine-tuning at the members' pretraining resolution is the expensive part; the recipe (learning "
        "rate, epochs) is shared by the three members rather than tuned for each.",
        "- No exponential moving average of weights (optional in the plan; not built).",
        "- Inference speed is measured on this run's hardware and precision, with the preprocessing included.", "",
        "## How to reproduce", "",
        "```bash", f"python {command}",
        f"python {command}{'' if '--resume' in command else ' --resume'}   # after an interruption: "
        "keeps the members already trained",
        "```", "",
        f"Seed {cfg['seed']}; the split seed is always 42. Checkpoints: "
        + ", ".join(f"`{r['checkpoint']}`" for r in m["members"].values())
        + "; every probability behind these tables: `level4/predictions.npz`; every number: `level4/metrics.json`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
