"""Writing files so that a reader, a Ctrl-C or a killed process never sees half of one.

Every file a run writes (metrics.json, summary.md, figures, checkpoints, the saved model) goes to a temporary
name first and is then renamed over the real one: on POSIX file systems the rename is atomic, so the old file
or the new one is there, never a torn mix. A folder that cannot be written becomes an OutputError that names it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path


class OutputError(Exception):
    """The output folder cannot be written (read-only, full, not a folder). The message names it."""


def safe_filename(name: str) -> str:
    """A run's name as a file name: resnet50+se -> resnet50_se, "no augmentation, head only" -> no_augmentation__head_only."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _describe(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"The disk holding {path.parent} is full (writing {path.name}). Free some space or choose --out-dir."
    return (f"Cannot write {path} ({error.strerror or error}). Choose a writable folder with --out-dir.")


def _write_atomic(path: Path, write) -> Path:
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        os.replace(partial, path)
    except BaseException as error:  # a Ctrl-C in the middle of a write must not leave the partial file behind
        if partial.parent.is_dir():
            partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(_describe(error, path)) from error
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return _write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_npz_atomic(path: Path, **arrays) -> Path:
    """numpy arrays, compressed, as one .npz file (under torchrun rank 0 writes it)."""
    import numpy as np

    from common.distributed import is_main_process

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the temporary name
            np.savez_compressed(f, **arrays)

    return _write_atomic(path, write) if is_main_process() else Path(path)


def torch_save_atomic(path: Path, obj) -> Path:
    import torch

    return _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically (under torchrun rank 0 saves it; the others only close it)."""
    import matplotlib.pyplot as plt

    from common.distributed import is_main_process

    try:
        if is_main_process():
            _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)


def check_writable(folder: Path) -> None:
    """Fail early, before any training, when `folder` cannot hold the run's results."""
    folder = Path(folder)
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"--out-dir {folder} is not writable ({error.strerror or error}): choose another "
                          f"folder with --out-dir.") from None
