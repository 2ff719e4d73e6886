"""A level folder (OUT/levelN) and the runs that meet in it: one at a time, and a finished run never lost.

- LevelLock: the operating system's advisory lock (fcntl.flock) on OUT/.levelN.lock, held by a run from before it
  reads or writes anything until it ends. A second run that targets the folder is refused at once, naming the
  holder (its process id, host, start and command, which the holder writes into the lock file). The kernel drops
  the lock with its process, so a run killed outright (SIGKILL, a power cut) blocks nothing: the next run or
  --resume takes the lock at once. A run that ends removes the file; a killed one leaves it, harmless.
- finished_run(): the record of the finished run in a level folder (status `complete` and its model.pt), or None.
- move_aside(): a finished run that a new run (without --resume) would overwrite goes to
  OUT/previous/levelN-<when it finished>/, as it was: nothing reads that folder as a current run.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs in one folder are not guarded there
    fcntl = None

PREVIOUS = "previous"  # OUT/previous/levelN-<finished>/: the finished runs that later runs moved aside
TIME_FORMAT = "%Y-%m-%d %H:%M:%S %Z"  # as metrics.json's started_at


class FolderInUse(Exception):
    """Another process holds the lock of this level folder. The message names it."""


def finished_run(level_dir: Path) -> dict | None:
    """The metrics of the finished run in `level_dir`: status `complete` and its model.pt on disk; else None."""
    level_dir = Path(level_dir)
    try:
        metrics = json.loads((level_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(metrics, dict) or metrics.get("status") != "complete" or not (level_dir / "model.pt").is_file():
        return None
    return metrics


def has_checkpoints(level_dir: Path) -> bool:
    """Is there a checkpoint in the folder (something --resume would read)? A complete run deletes them."""
    folder = Path(level_dir) / "checkpoints"
    return folder.is_dir() and any(folder.iterdir())


def finished_when(metrics: dict, level_dir: Path) -> str:
    """When the run finished: its finished_at, or, for a record written before that field, metrics.json's time."""
    if metrics.get("finished_at"):
        return str(metrics["finished_at"])
    try:
        return time.strftime(TIME_FORMAT, time.localtime((Path(level_dir) / "metrics.json").stat().st_mtime))
    except OSError:
        return "at an unknown time"


def describe(metrics: dict, level_dir: Path) -> str:
    """'test accuracy 47.10% (smoke run), finished 2025-01-02 10:11:12 UTC'."""
    accuracy = metrics.get("test_accuracy")
    text = "test accuracy " + ("unknown" if accuracy is None else f"{accuracy:.2%}")
    if metrics.get("quick"):
        text += " (smoke run)"
    return f"{text}, finished {finished_when(metrics, level_dir)}"


def previous_dir(out_dir: Path) -> Path:
    return Path(out_dir) / PREVIOUS


def move_aside(level_dir: Path, metrics: dict) -> Path:
    """Move the finished run in `level_dir` to OUT/previous/levelN-<finished>/ (a new name if that is taken);
    -> where it went. One rename: the folder is whole in one place or the other."""
    level_dir = Path(level_dir)
    try:  # "2025-01-02 10:11:12 UTC" -> 2025-01-02_10-11-12
        when = time.strptime(" ".join(finished_when(metrics, level_dir).split()[:2]), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        when = time.localtime()
    target = previous_dir(level_dir.parent) / f"{level_dir.name}-{time.strftime('%Y-%m-%d_%H-%M-%S', when)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = target, 1
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.name}-{n}")
    os.rename(level_dir, candidate)
    return candidate


class LevelLock:
    """One run per level folder: an exclusive flock on OUT/.levelN.lock, the holder named inside it."""

    def __init__(self, out_dir: Path, level: int):
        self.path = Path(out_dir) / f".level{level}.lock"
        self.folder = Path(out_dir) / f"level{level}"
        self.fd: int | None = None

    def acquire(self, holder: dict) -> None:
        """Take the lock, or raise FolderInUse naming the process that holds it. `holder`: what a refused run
        shows of this one (pid, host, started_at, command)."""
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's name is in it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held (BlockingIOError)
                other = self._read_holder(fd)
                os.close(fd)
                raise FolderInUse(self._in_use(other)) from None
            # the holder before us removes the file as it ends: is the file we locked still the one at the path?
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file, then let go (in that order: a run that opened the old file sees it is gone)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None

    @staticmethod
    def _read_holder(fd: int) -> dict:
        """What the holder wrote into the lock file; it writes it just after locking, so wait a moment for it."""
        for _ in range(20):
            try:
                found = json.loads(os.pread(fd, 65536, 0).decode() or "null")
            except (OSError, ValueError):
                found = None
            if isinstance(found, dict):
                return found
            time.sleep(0.05)
        return {}

    def _in_use(self, other: dict) -> str:
        host = other.get("host")
        where = "" if not host or host == socket.gethostname() else f" on {host}"
        who = (f"process {other.get('pid', '?')}{where}, started {other.get('started_at') or 'at an unknown time'}"
               + (f": python {other['command']}" if other.get("command") else ""))
        out_dir = self.folder.parent
        status = "python run.py status" + ("" if out_dir == Path("outputs") else f" --out-dir {out_dir}")
        return (f"{self.folder} is in use by another run ({who}). One run per level folder at a time: wait for it "
                f"to end ({status} shows it), or choose another --out-dir. Nothing was changed.")


def holder(metrics: dict) -> dict:
    """This run as a refused run names it: process id, host, when it started and its command."""
    process = metrics.get("process") or {}
    return dict(pid=process.get("pid", os.getpid()), host=process.get("host", socket.gethostname()),
                started_at=metrics.get("started_at"), command=metrics.get("command"))
