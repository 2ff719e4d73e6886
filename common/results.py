"""What a level run records (OUT/levelN/metrics.json), written atomically, and how a run ends.

metrics.json is the contract between the levels and the summary: level, status (complete | interrupted |
failed), test_accuracy and val_accuracy (fractions), split sizes, per-epoch history, timings, the config
actually used, the environment, quick (smoke run or not) and the figures' paths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from common.data import DataError
from common.distributed import is_main_process, world_size
from common.progress import console
from common.training import SetupError, TrainingDiverged

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, then rename: a reader (or a Ctrl-C) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically (under torchrun, rank 0 saves it; the others only close it)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        fig.savefig(partial, format="png", dpi=110, bbox_inches="tight")
        os.replace(partial, path)
    plt.close(fig)
    return path


def environment(device, precision) -> dict:
    import timm
    import torch
    import torchvision

    from common.training import device_name

    return dict(device=device_name(device), device_type=device.type, precision=precision.name,
                torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
                cuda=torch.version.cuda if device.type == "cuda" else None, processes=world_size(),
                python=platform.python_version(), platform=platform.platform())


class LevelRun:
    """The record of one level run. `metrics` is a plain dict that becomes metrics.json."""

    def __init__(self, level: int, title: str, approach: str, settings, hyperparameters):
        self.level = level
        self.dir = Path(settings.out_dir) / f"level{level}"
        self.out_dir = Path(settings.out_dir)
        self.started = time.perf_counter()
        self.metrics: dict = dict(
            level=level, title=title, approach=approach, status="running", quick=settings.quick,
            test_accuracy=None, val_accuracy=None, train_size=None, val_size=None, test_size=None,
            history=[], train_seconds=None, total_seconds=None,
            config={**dataclasses.asdict(settings), **dataclasses.asdict(hyperparameters)},
            environment=None, figures={}, command=" ".join(sys.argv),
        )

    def setup(self, settings):
        """Seed, device (joining the process group under torchrun), precision, backends; recorded in metrics."""
        import torch

        from common.training import configure_backends, select_device, select_precision

        torch.manual_seed(settings.seed)
        device = select_device(settings.device)
        precision = select_precision(device)
        configure_backends(device)
        self.metrics["environment"] = environment(device, precision)
        return device, precision

    def load_data(self, settings, device):
        """-> (splits on the CPU, {split: (uint8 images, labels)} on the device), the sizes recorded.

        The uint8 images go to the device once; every batch is then augmented, converted and resized there
        (see common/training.py)."""
        from common.data import load_splits

        splits = load_splits(settings.data_dir, settings.train_size, settings.val_size, settings.test_size)
        self.metrics.update(train_size=len(splits.train), val_size=len(splits.val), test_size=len(splits.test),
                            data_source=splits.source)
        images = {name: (s.images.to(device), s.labels.to(device))
                  for name, s in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
        return splits, images

    def path(self, name: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / name

    def add_figure(self, key: str, path: Path) -> None:
        """Record a figure that is on disk, by its path relative to the output folder (as summary.md links it)."""
        self.metrics["figures"][key] = Path(path).relative_to(self.out_dir).as_posix()

    def write(self, status: str) -> None:
        from common.summary import write_summary

        self.metrics["status"] = status
        self.metrics["total_seconds"] = time.perf_counter() - self.started
        if not is_main_process():  # under torchrun every process holds the same metrics; rank 0 writes them
            return
        write_json_atomic(self.path("metrics.json"), self.metrics)
        write_summary(self.out_dir)

    def execute(self, body: Callable[[], None]) -> int:
        """Run the level's body and end the way a user expects: an exit code, a message, never a traceback
        for a problem the user can fix. What was measured is written even when the run stops early."""
        try:
            body()
        except (DataError, SetupError) as error:  # before training: keep any earlier result as it is
            console.print(f"[bold red]Error:[/] {error}", highlight=False)
            return EXIT_BAD_INPUT
        except TrainingDiverged as error:
            console.print(f"[bold red]Training failed:[/] {error}", highlight=False)
            self.metrics["error"] = str(error)
            self.write("failed")
            return EXIT_FAILED
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted.[/] Writing what was measured so far "
                          f"({len(self.metrics['history'])} epoch(s)) with status 'interrupted'.")
            self.write("interrupted")
            return EXIT_INTERRUPTED
        self.write("complete")
        console.print(f"Level {self.level}: test accuracy {self.metrics['test_accuracy']:.2%}"
                      f"{' (smoke run, not comparable)' if self.metrics['quick'] else ''}. "
                      f"Results in {self.dir}/, summary in {self.out_dir / 'summary.md'}", highlight=False)
        return EXIT_OK
