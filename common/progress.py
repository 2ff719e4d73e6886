"""Live progress: a rich table with a row per epoch and a progress bar inside the epoch, in a terminal.

When stdout is not a terminal (a log file, `| tee`, CI, nohup) there is nothing to redraw, so each epoch ends
with one plain line starting "epoch N/M", and inside every long phase (feature extraction, an epoch,
prediction) an indented progress line is printed every 10% of the phase or every 30 seconds, whichever comes
first (never more than one every 2 seconds), so a log always shows that the run is alive and how far it is.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from common.distributed import is_main_process

# Long lines stay whole in logs; a terminal wraps them itself. Under torchrun only rank 0 prints: the other
# processes compute the same metrics, and N copies of every line would only garble the terminal.
console = Console(soft_wrap=True, quiet=not is_main_process())


@dataclass
class EpochStats:
    """One epoch's row: what the live table shows and metrics.json keeps in its history."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float  # at the epoch's first step (the schedule steps per batch)
    images_per_second: float
    seconds: float


# The whole level's time left, as one phrase ("the level: about 52 min left, by ..."), or None when no estimate
# exists. The runner sets it (common/runner/results.py: from the kept record of the same recipe); every training's
# display shows it beside that training's own time left.
level_time_left: Callable[[], str | None] = lambda: None  # noqa: E731


def _format_row(s: EpochStats) -> list[str]:
    return [f"{s.epoch}", f"{s.train_loss:.4f}", f"{s.train_accuracy:.2%}", f"{s.val_loss:.4f}",
            f"{s.val_accuracy:.2%}", f"{s.lr:.2e}", f"{s.images_per_second:,.0f}", f"{s.seconds:.1f}s"]


class PlainProgress:
    """Progress lines for a log: at each further 10% of a phase, or after 30 s without a line; at most one per 2 s."""

    STEP, QUIET_AT_MOST, SILENT_AT_MOST = 0.10, 30.0, 2.0

    def __init__(self, description: str, total: int):
        self.description, self.total = description, max(total, 1)
        self.started = self.last_time = time.perf_counter()
        self.last_fraction = 0.0

    def update(self, done: int, detail: str = "") -> None:
        now, fraction = time.perf_counter(), done / self.total
        due = fraction - self.last_fraction >= self.STEP or now - self.last_time >= self.QUIET_AT_MOST
        if due and now - self.last_time >= self.SILENT_AT_MOST and done < self.total:
            console.print(f"  {self.description}: {fraction:.0%} ({done:,}/{self.total:,}){detail}, "
                          f"{now - self.started:.0f}s elapsed", highlight=False)
            self.last_time, self.last_fraction = now, fraction


class TrainingDisplay:
    """Shows one training run (a level, or one ensemble member). Use as a context manager."""

    # "start lr": the learning rate at the epoch's first step; the schedule moves it every step (warm-up, cosine)
    COLUMNS = ["epoch", "train loss", "train acc", "val loss", "val acc", "start lr", "img/s", "time"]

    def __init__(self, title: str, epochs: int, live: bool | None = None):
        self.title, self.epochs = title, epochs
        self.live_mode = (console.is_terminal and not console.quiet) if live is None else live
        self.rows: list[EpochStats] = []
        self.started = time.perf_counter()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console)
        self.epoch_task = None
        self.plain: PlainProgress | None = None
        self.live = Live(get_renderable=self._render, console=console, refresh_per_second=4) if self.live_mode else None

    def _render(self):
        table = Table(title=self.title, title_justify="left")
        for name in self.COLUMNS:
            table.add_column(name, justify="right")
        for stats in self.rows:
            table.add_row(*_format_row(stats))
        return Group(table, self.progress, self._run_eta())

    def _run_eta(self) -> str:
        level = level_time_left()
        if not self.rows:
            return level or ""
        per_epoch = sum(r.seconds for r in self.rows) / len(self.rows)
        left = per_epoch * (self.epochs - len(self.rows))
        return (f"elapsed {time.perf_counter() - self.started:.0f}s, about {left:.0f}s of this training left"
                + (f"; {level}" if level else ""))

    def __enter__(self):
        if self.live:
            self.live.start()
        else:
            console.print(self.title, highlight=False)
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.stop()
        return False

    # -- what the training loop calls
    def begin_epoch(self, epoch: int, steps: int) -> None:
        if self.epoch_task is not None:
            self.progress.remove_task(self.epoch_task)
        self.epoch_task = self.progress.add_task(f"epoch {epoch}/{self.epochs}", total=steps, speed="")
        self.plain = None if self.live else PlainProgress(f"epoch {epoch}/{self.epochs}", steps)

    def advance(self, steps_done: int, images_per_second: float) -> None:
        self.progress.update(self.epoch_task, completed=steps_done, speed=f"{images_per_second:,.0f} img/s")
        if self.plain is not None:
            self.plain.update(steps_done, f" steps, {images_per_second:,.0f} img/s")

    def end_epoch(self, stats: EpochStats) -> None:
        self.rows.append(stats)
        if not self.live:
            cells = dict(zip(self.COLUMNS, _format_row(stats)))
            level = level_time_left()
            console.print(f"epoch {cells['epoch']}/{self.epochs}  " +
                          "  ".join(f"{k} {v}" for k, v in cells.items() if k != "epoch")
                          + (f"  ({level})" if level else ""), highlight=False)

    # -- other long steps (feature extraction, evaluation)
    @contextmanager
    def task(self, description: str, total: int, announce: bool = True):
        """A progress bar for a step that is not an epoch; yields advance(n). `announce`: a line when it is done."""
        start = time.perf_counter()
        task_id = self.progress.add_task(description, total=total, speed="")
        plain = None if self.live else PlainProgress(description, total)
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            self.progress.advance(task_id, n)
            if plain is not None:
                plain.update(done, " batches")

        yield advance
        self.progress.remove_task(task_id)
        if not announce:
            return
        message = f"{description}: {total:,} done in {time.perf_counter() - start:.1f}s"
        if self.live:
            self.live.console.print(message, highlight=False)
        else:
            console.print(message, highlight=False)
