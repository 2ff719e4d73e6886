"""Multi-GPU training with torchrun: one process per GPU, DistributedDataParallel, and rank 0 reports.

    torchrun --nproc_per_node=N levels/level2_intermediate.py ...      (or: python -m torch.distributed.run ...)

torchrun starts N copies of the script, each with RANK, WORLD_SIZE and LOCAL_RANK in its environment. A level
needs no code of its own for it; the shared engine does the rest:

- select_device() joins the process group (NCCL on GPUs, gloo on CPUs) and gives each process its own GPU;
- fit() wraps the model in DistributedDataParallel (which averages the gradients across processes during
  backward) and gives each process its share of every training batch. `--batch-size` stays the *global*
  batch: each of N processes takes batch_size / N images of it, so the recipe (batch size, learning rate,
  steps per epoch, which images meet in a batch) is the same on 1 GPU or N, and so is the result;
- train_one_epoch() sums loss and accuracy over the processes; evaluate() splits the images between the
  processes and gathers every logit back, in order, so every process sees the same metrics and keeps the
  same best epoch;
- only rank 0 draws the live table and writes files (common.progress, common.runner.results).

Not synchronized: BatchNorm statistics in layers that train are computed per process on its share of the
batch (as in most DDP recipes), so a run that trains BatchNorm layers differs slightly from a 1-GPU run.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn


def env_rank() -> int:
    """This process's rank as torchrun set it; readable before the process group exists (e.g. at import)."""
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that prints and writes."""
    return env_rank() == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def local_rank() -> int:
    """This process's index on its machine: which GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (once) and return this process's device; otherwise `device`."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not _active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model to train: DistributedDataParallel around `model` under torchrun, else `model` itself.

    DDP copies rank 0's weights to every process here, so the processes start identical. After that each
    process reseeds its random generator with its rank: augmentation and Mixup draw from it, and without
    this every process would crop, flip and mix its images exactly as the others do.
    """
    if world_size() == 1:
        return model
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank() > 0:
        torch.manual_seed(torch.initial_seed() + rank())
    return wrapped


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the processes, in place (a no-op in a single process)."""
    if world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def interleave(parts: list[torch.Tensor], total: int) -> torch.Tensor:
    """Undo the strided split: part r holds items r, r + N, r + 2N, ... (padded to equal length) -> items 0..total-1."""
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]


def gather_in_order(local: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Every process's share of a result (rank r computed items r, r + N, ...), put back together on every process.

    all_gather needs equal shapes, so each share is padded to the longest one; the padding falls past `total`
    (the number of items in all; counted across the processes when not given).
    """
    n = world_size()
    if n == 1:
        return local
    if total is None:
        count = torch.tensor(len(local), device=local.device)
        all_reduce_sum(count)
        total = int(count.item())
    per_process = -(-total // n)
    padded = local.new_zeros((per_process, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return interleave(parts, total)
