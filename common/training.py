"""The training engine every level shares: on-device batches, one training loop, checkpoints.

Why the data stays on the device as uint8: CIFAR-10 is small (the 40,000-image train split is 123 MB as
uint8), so it is copied to the GPU once. Each batch is then sliced, augmented at 32x32 where that is cheap,
converted to float, normalized and only then resized to the model's input size, all on the device in a
handful of batched kernels. The naive pipeline (PIL resizes every image to 224x224 on the CPU, then ships
150,528 floats per image to the GPU) is what made the seed's fine-tune take 47 minutes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator


import torch
import torch.nn.functional as F
from torch import nn

from common import distributed
from common.device import Precision, SetupError, autocast, rng_state, set_rng_state
from common.progress import EpochStats, console

class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------
# Batches on the device


@functools.lru_cache(maxsize=8)
def _normalization_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building a CUDA tensor from Python numbers copies from pageable host memory,
    # which waits for the GPU to catch up; doing that every batch would stall the pipeline.
    as_tensor = lambda v: torch.tensor(v, device=device).view(1, 3, 1, 1) * 255  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def model_input(images: torch.Tensor, img_size: int, mean, std) -> torch.Tensor:
    """uint8 N x 3 x 32 x 32 on the device -> normalized float at img_size, channels_last.

    Normalizing before resizing gives the same result (both are linear) on 50x fewer pixels at 224.
    """
    mean, std = _normalization_constants(tuple(mean), tuple(std), images.device)
    x = (images.float() - mean) / std
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


class TensorBatches:
    """Batches of (inputs, labels) from tensors already on the device; a fresh shuffle every epoch.

    `transform` turns a batch of stored inputs into model inputs (augment + model_input for images; nothing
    for cached features). With rank/world_size each process of a multi-GPU run takes its own shard: items
    rank, rank + world_size, ... of each epoch's order (see shard(); fit() and evaluate() call it).
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, even_shards: bool = False):
        self.inputs, self.labels = inputs, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.transform = transform
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards
        self.generator = torch.Generator().manual_seed(seed)

    def _ordered_count(self) -> int:
        n = len(self.labels)
        return n - n % self.world_size if self.even_shards else n

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        return order[:self._ordered_count()][self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(range(self.rank, self._ordered_count(), self.world_size))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def shard(self, rank: int, world_size: int, training: bool) -> "TensorBatches":
        """This process's share of these batches in a run of `world_size` processes.

        Training: every global batch of batch_size images is split between the processes, batch_size /
        world_size each (item j of process r's step k is item r + j * world_size of the one-process step k),
        so N processes take the same steps on the same batches as one process. All get the same number of
        steps, which DDP needs: when the images do not divide evenly, each epoch leaves out the last
        (at most world_size - 1) of its shuffled order. Same seed, same shuffle on every process.
        Evaluation: each process takes every world_size-th image, in batches of the same size as before;
        distributed.gather_in_order() puts the results back in order.
        """
        share = copy.copy(self)
        share.rank, share.world_size, share.even_shards = rank, world_size, training
        share.generator = torch.Generator()
        share.generator.set_state(self.generator.get_state())
        if training:
            if self.batch_size % world_size:
                raise SetupError(f"--batch-size {self.batch_size} does not split evenly between {world_size} "
                                 f"processes: use a multiple of {world_size}.")
            share.batch_size = self.batch_size // world_size
        return share

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices().to(self.inputs.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.inputs[idx]
            yield (self.transform(x) if self.transform else x), self.labels[idx]


class EpochCountingBatches(TensorBatches):
    """TensorBatches that know which epoch they are in, for batches that change with it (cifarnet's alternating
    flip, Level 4's growing images). The count is the state that fit() saves in every checkpoint, so --resume
    continues with the next epoch's batches, not the first's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch)

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

    def start_epoch(self) -> int:
        """The epoch now starting (0, 1, ...); counts it."""
        self.epoch += 1
        return self.epoch - 1


def process_share(batches, training: bool = False):
    """Under torchrun, this process's share of `batches`; otherwise `batches` itself.

    Any batches object with a shard(rank, world_size, training) method works, with TensorBatches.shard's
    contract (training: the same number of steps in every process, batch_size / world_size images each;
    evaluation: process r takes items r, r + N, ...). Training batches without one are used whole by every
    process: still correct (DDP averages the processes' gradients), but no faster than one process.
    """
    if distributed.world_size() == 1 or getattr(batches, "world_size", 1) > 1:
        return batches
    if hasattr(batches, "shard"):
        return batches.shard(distributed.rank(), distributed.world_size(), training)
    if training:
        warnings.warn(f"{type(batches).__name__} has no shard() method: every process trains on all of it.")
    return batches


# ----------------------------------------------------------------------------------------------------------
# Models: freezing and optimizers


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except that a BatchNorm whose weights are frozen keeps its running statistics frozen too.

    A frozen layer should compute exactly what it computed in pretraining; updating its BatchNorm statistics
    from CIFAR batches would change it even though no weight is trained.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9, nesterov=True)
    raise SetupError(f"--optimizer must be adam, adamw or sgd, not '{name}'.")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    """Cosine annealing from the base learning rate to zero, stepped once per batch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine to zero; stepped per batch.

    The warm-up protects pretrained weights from the first steps' large, noisy gradients of a new head (AdamW's
    moment estimates are also still poor then); ViTs are known to need it.
    """
    warm = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)



# ----------------------------------------------------------------------------------------------------------
# Train and evaluate


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    logits: torch.Tensor  # float32, on the CPU, N x classes
    labels: torch.Tensor


class NullDisplay:
    """What the training loop reports to; common.progress.TrainingDisplay draws it."""

    def begin_epoch(self, epoch: int, steps: int) -> None: ...
    def advance(self, steps_done: int, images_per_second: float) -> None: ...
    def end_epoch(self, stats: EpochStats) -> None: ...


def check_finite(loss_sum: torch.Tensor | float, where: str) -> None:
    """Stop the run when the loss is NaN or infinite: nothing trained after that point would mean anything."""
    if not math.isfinite(float(loss_sum)):
        raise TrainingDiverged(f"The training loss became {float(loss_sum)} ({where}). Lower --lr, or check the "
                               f"data; nothing after this point would mean anything.")


def train_one_epoch(model: nn.Module, batches, optimizer, scheduler, loss_fn, device: torch.device,
                    precision: Precision, scaler: torch.amp.GradScaler | None = None,
                    mix: Callable | None = None, display=NullDisplay(), sync_every: int = 10):
    """One pass over `batches`; returns (mean loss, accuracy, images seen, seconds).

    Loss and accuracy are summed on the device and read back only every `sync_every` steps, because each
    read-back (.item()) makes the CPU wait for the GPU. A NaN stays NaN in the sum, so checking the sum at
    those points catches divergence without a sync per step. `mix` (e.g. timm's Mixup) turns
    (inputs, labels) into (mixed inputs, soft targets); accuracy is still counted against the true labels.
    Under torchrun the returned loss, accuracy and image count are summed over all processes.
    """
    set_train_mode(model)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    for step, (x, y) in enumerate(batches, start=1):
        targets = y
        if mix is not None:
            x, targets = mix(x, y)
        with autocast(device, precision, training=True):
            logits = model(x)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if step % sync_every == 0 or step == len(batches):
            check_finite(loss_sum, f"step {step}")
            display.advance(step, seen * distributed.world_size() / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    seen_total = torch.tensor(seen, device=device)
    distributed.all_reduce_sum(loss_sum, correct, seen_total)
    seen = int(seen_total.item())
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen, seconds


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, precision: Precision, display=None,
             label: str = "validation") -> Evaluation:
    """Loss, accuracy and the logits of every image. Under torchrun the processes split the images and every
    process gets all the logits back, in order: the same Evaluation everywhere. With `display`, a progress bar
    (and progress lines in a log)."""
    import contextlib

    model.eval()
    share = process_share(batches)
    all_logits, all_labels = [], []
    progress = display.task(label, len(share), announce=False) if display is not None and hasattr(display, "task") \
        else contextlib.nullcontext(lambda n=1: None)
    with progress as advance:
        for x, y in share:
            with autocast(device, precision):
                all_logits.append(model(x).float())
            all_labels.append(y)
            advance()
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    if share is not batches:
        logits, labels = (distributed.gather_in_order(t) for t in (logits, labels))
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return Evaluation(loss, accuracy, logits.cpu(), labels.cpu())


def average_views(evaluations: list[Evaluation]) -> Evaluation:
    """One prediction from the same images seen under several views (test-time augmentation): the mean of the
    views' softmax probabilities. Its `logits` are that mean's log, so that argmax, cross-entropy and a later
    softmax are those of the averaged prediction. One view: that view's Evaluation itself."""
    if len(evaluations) == 1:
        return evaluations[0]
    probabilities = torch.stack([e.logits.float().softmax(1) for e in evaluations]).mean(0)
    logits, labels = probabilities.clamp_min(1e-12).log(), evaluations[0].labels
    return Evaluation(F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item(),
                      logits, labels)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    train_seconds: float = 0.0
    resumed_epochs: int = 0  # epochs restored from a checkpoint rather than trained in this process


# ----------------------------------------------------------------------------------------------------------
# Same seed, same numbers; and the state to resume from


def code_version(root: Path | None = None) -> str:
    """A fingerprint of the project's code (common/, its subpackages included, and levels/): a checkpoint made by
    other code is refused."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    files = {path.relative_to(root).as_posix(): path
             for path in [*root.glob("common/**/*.py"), *root.glob("levels/*.py")]}
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes())
    return digest.hexdigest()[:16]


class EpochCheckpoint:
    """Everything needed to continue a training run from its last finished epoch, in one file.

    After each epoch fit() saves the model, optimizer, learning-rate schedule, GradScaler, every random state
    (Python, numpy, torch, the batches' shuffle), the best epoch's weights and the history, atomically. With
    `resume`, fit() loads it and carries on as if it had never stopped: on a CPU the final numbers are
    bit-identical to an uninterrupted run. `signature` says what the training depends on (recipe, data, code);
    a checkpoint made under another signature is refused, naming what differs.
    """

    def __init__(self, path: Path, signature: dict, resume: bool, label: str = ""):
        self.path, self.signature, self.resume = Path(path), signature, resume
        self.label = label or self.path.stem

    def load(self) -> dict | None:
        """The stored state to resume from, None to start fresh (no --resume, or nothing stored yet)."""
        if not self.path.is_file():
            if self.resume:
                console.print(f"--resume: nothing saved yet for {self.label} ({self.path}); starting it from the "
                              f"beginning.", highlight=False)
            return None
        if not self.resume:
            console.print(f"Found a checkpoint of an earlier run for {self.label} ({self.path}): starting over "
                          f"(--resume continues it).", highlight=False)
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            stored = state["signature"]
        except Exception as error:  # truncated, or not a checkpoint at all
            raise SetupError(f"--resume: the checkpoint {self.path} cannot be read ({type(error).__name__}: "
                             f"{str(error)[:200]}). Delete it to start {self.label} from the beginning, or run "
                             f"without --resume.") from None
        if stored != self.signature:
            differs = sorted(k for k in {*stored, *self.signature} if stored.get(k) != self.signature.get(k))
            detail = "; ".join(f"{k}: {stored.get(k)!r} there, {self.signature.get(k)!r} now" for k in differs)
            raise SetupError(f"--resume: the checkpoint {self.path} comes from a different run ({detail}). Run with "
                             f"the same flags and code, or without --resume to start over.")
        return state

    def save(self, state: dict) -> None:
        from common.io import torch_save_atomic

        if distributed.is_main_process():
            torch_save_atomic(self.path, dict(state, signature=self.signature))


def _cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def fit(model: nn.Module, train_batches, val_batches, *, epochs: int, optimizer, scheduler, loss_fn,
        device: torch.device, precision: Precision, mix: Callable | None = None, display=NullDisplay(),
        history: list | None = None, checkpoint: EpochCheckpoint | None = None,
        on_epoch_end: Callable[[], None] | None = None, compile: bool = False) -> FitResult:
    """Level 1's loop, grown up: the training loop of Levels 2 to 4.

    Each epoch it does what Level 1 writes out by hand (batches -> forward -> loss -> backward -> step ->
    schedule, in train_one_epoch), then measures validation and remembers the best epoch. What it adds:
    - mixed precision (autocast) and, for fp16, a GradScaler that keeps small gradients from underflowing;
    - the best-epoch restore: at the end the model holds the weights of the epoch with the best *validation*
      accuracy; the test set plays no part in that choice;
    - a checkpoint after every epoch (`checkpoint`), from which --resume continues bit for bit, and a call
      to `on_epoch_end` (the level writes metrics.json there), so a killed run loses at most one epoch;
    - under torchrun (common/distributed.py) DistributedDataParallel, each process taking its share of every
      batch; the caller passes the same arguments as for one process.
    `history` (a list) receives one dict per epoch as it finishes. With `compile` (--compile), the training
    steps run through torch.compile; `model` itself stays the plain module, so checkpoints and model.pt hold
    its state dict, with no `_orig_mod.` prefixes.
    """
    result = FitResult(history=history if history is not None else [])
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    trained = distributed.wrap(model, device)
    if compile:
        trained = torch.compile(trained)
    train_batches = process_share(train_batches, training=True)
    best_state, first_epoch = None, 1
    stored = checkpoint.load() if checkpoint is not None else None
    if stored is not None:
        model.load_state_dict(stored["model"])
        optimizer.load_state_dict(stored["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(stored["scheduler"])
        if scaler is not None and stored.get("scaler"):
            scaler.load_state_dict(stored["scaler"])
        set_rng_state(stored["rng"])
        if stored.get("batches_rng") is not None and hasattr(train_batches, "generator"):
            train_batches.generator.set_state(stored["batches_rng"])
        if stored.get("batches_state") is not None:  # batches that keep more state, e.g. an epoch count
            train_batches.load_state_dict(stored["batches_state"])
        best_state = stored["best_state"]
        result.history[:] = stored["history"]
        result.best_epoch, result.best_val_accuracy = stored["best_epoch"], stored["best_val_accuracy"]
        result.train_seconds = sum(h["seconds"] for h in result.history)
        result.resumed_epochs = stored["epoch"]
        first_epoch = stored["epoch"] + 1
        for row in result.history:
            display.end_epoch(EpochStats(**row))
    for epoch in range(first_epoch, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        display.begin_epoch(epoch, len(train_batches))
        train_loss, train_acc, seen, seconds = train_one_epoch(
            trained, train_batches, optimizer, scheduler, loss_fn, device, precision, scaler, mix, display)
        val = evaluate(model, val_batches, device, precision, display=display)
        stats = EpochStats(epoch, train_loss, train_acc, val.loss, val.accuracy, lr, seen / seconds, seconds)
        result.history.append(stats.__dict__.copy())
        result.train_seconds += seconds
        if val.accuracy > result.best_val_accuracy or best_state is None:
            result.best_epoch, result.best_val_accuracy = epoch, val.accuracy
            best_state = _cpu_copy(model.state_dict())
        if checkpoint is not None:
            checkpoint.save(dict(
                epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                scaler=scaler.state_dict() if scaler is not None else None, rng=rng_state(),
                batches_rng=train_batches.generator.get_state() if hasattr(train_batches, "generator") else None,
                batches_state=train_batches.state_dict() if hasattr(train_batches, "state_dict") else None,
                best_state=best_state, best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                history=result.history))
        if on_epoch_end is not None:
            on_epoch_end()
        display.end_epoch(stats)  # after the save: a log's "epoch N" line means epoch N is on disk
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
