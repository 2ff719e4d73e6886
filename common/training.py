"""The training engine every level shares: device and precision, on-device batches, one training loop.

Why the data stays on the device as uint8: CIFAR-10 is small (the 40,000-image train split is 123 MB as
uint8), so it is copied to the GPU once. Each batch is then sliced, augmented at 32x32 where that is cheap,
converted to float, normalized and only then resized to the model's input size, all on the device in a
handful of batched kernels. The naive pipeline (PIL resizes every image to 224x224 on the CPU, then ships
150,528 floats per image to the GPU) is what made the seed's fine-tune take 47 minutes.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common import distributed

# ----------------------------------------------------------------------------------------------------------
# Device and precision


class SetupError(Exception):
    """A problem with the run's setup (device, weights, flags). The message is meant for the user, as is."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


def select_device(choice: str = "auto") -> torch.device:
    """The device to run on. Under torchrun this also joins the process group: each process gets its own GPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda was asked for, but PyTorch sees no CUDA GPU here. "
                         "Use --device auto or --device cpu.")
    if choice not in ("cpu", "cuda"):
        raise SetupError(f"--device must be auto, cpu or cuda, not '{choice}'.")
    if choice == "cuda" and distributed.local_rank() >= torch.cuda.device_count():
        raise SetupError(f"torchrun started more processes on this machine than it has GPUs "
                         f"({torch.cuda.device_count()}): use --nproc_per_node={torch.cuda.device_count()}.")
    return distributed.init(torch.device(choice))


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16", "fp16" or "fp32", for the record
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool


def select_precision(device: torch.device) -> Precision:
    """bf16 on Ampere and newer (compute capability >= 8.0), fp16 with loss scaling below that, fp32 on CPU.

    Decided by compute capability, not by torch.cuda.is_bf16_supported(): that answers True on a T4 (7.5),
    which only emulates bf16 and runs it several times slower than fp16.
    """
    if device.type != "cuda":
        return Precision("fp32", None, False)
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        return Precision("bf16", torch.bfloat16, False)
    return Precision("fp16", torch.float16, True)


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: Precision):
    return torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


# ----------------------------------------------------------------------------------------------------------
# Train and evaluate


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_second: float
    seconds: float


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


def _check_finite(loss_sum: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss_sum):
        raise TrainingDiverged(f"The training loss became {loss_sum.item()} ({where}). Lower --lr, or check the "
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
        with autocast(device, precision):
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
            _check_finite(loss_sum, f"step {step}")
            display.advance(step, seen * distributed.world_size() / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    seen_total = torch.tensor(seen, device=device)
    distributed.all_reduce_sum(loss_sum, correct, seen_total)
    seen = int(seen_total.item())
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen, seconds


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, precision: Precision) -> Evaluation:
    """Loss, accuracy and the logits of every image. Under torchrun the processes split the images and every
    process gets all the logits back, in order: the same Evaluation everywhere."""
    model.eval()
    share = process_share(batches)
    all_logits, all_labels = [], []
    for x, y in share:
        with autocast(device, precision):
            all_logits.append(model(x).float())
        all_labels.append(y)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    if share is not batches:
        logits, labels = (distributed.gather_in_order(t) for t in (logits, labels))
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return Evaluation(loss, accuracy, logits.cpu(), labels.cpu())


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    train_seconds: float = 0.0


def fit(model: nn.Module, train_batches, val_batches, *, epochs: int, optimizer, scheduler, loss_fn,
        device: torch.device, precision: Precision, mix: Callable | None = None, display=NullDisplay(),
        history: list | None = None) -> FitResult:
    """The training loop of every level: train an epoch, measure validation, remember the best epoch.

    At the end the model holds the weights of the epoch with the best *validation* accuracy; the test set
    plays no part in that choice. `history` (a list) receives one dict per epoch as it finishes, so a caller
    that is interrupted still has the epochs done so far.

    Under torchrun (see common/distributed.py) the model trains wrapped in DistributedDataParallel and each
    process takes its share of every batch of `train_batches`; the caller passes the same arguments as for
    one process, and `model` itself holds the trained weights afterwards.
    """
    result = FitResult(history=history if history is not None else [])
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    trained = distributed.wrap(model, device)
    train_batches = process_share(train_batches, training=True)
    best_state = None
    for epoch in range(1, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        display.begin_epoch(epoch, len(train_batches))
        train_loss, train_acc, seen, seconds = train_one_epoch(
            trained, train_batches, optimizer, scheduler, loss_fn, device, precision, scaler, mix, display)
        val = evaluate(model, val_batches, device, precision)
        stats = EpochStats(epoch, train_loss, train_acc, val.loss, val.accuracy, lr, seen / seconds, seconds)
        result.history.append(stats.__dict__.copy())
        result.train_seconds += seconds
        display.end_epoch(stats)
        if val.accuracy > result.best_val_accuracy or best_state is None:
            result.best_epoch, result.best_val_accuracy = epoch, val.accuracy
            best_state = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
