"""Live progress: a rich table with a row per epoch and a progress bar inside the epoch, in a terminal;
one plain line per epoch when stdout is not a terminal (CI, a log file)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from common.distributed import is_main_process
from common.training import EpochStats

# Long lines stay whole in logs; a terminal wraps them itself. Under torchrun only rank 0 prints: the other
# processes compute the same metrics, and N copies of every line would only garble the terminal.
console = Console(soft_wrap=True, quiet=not is_main_process())


def _format_row(s: EpochStats) -> list[str]:
    return [f"{s.epoch}", f"{s.train_loss:.4f}", f"{s.train_accuracy:.2%}", f"{s.val_loss:.4f}",
            f"{s.val_accuracy:.2%}", f"{s.lr:.2e}", f"{s.images_per_second:,.0f}", f"{s.seconds:.1f}s"]


class TrainingDisplay:
    """Shows one training run (a level, or one ensemble member). Use as a context manager."""

    COLUMNS = ["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "img/s", "time"]

    def __init__(self, title: str, epochs: int, live: bool | None = None):
        self.title, self.epochs = title, epochs
        self.live_mode = (console.is_terminal and not console.quiet) if live is None else live
        self.rows: list[EpochStats] = []
        self.started = time.perf_counter()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console)
        self.epoch_task = None
        self.live = Live(get_renderable=self._render, console=console, refresh_per_second=4) if self.live_mode else None

    def _render(self):
        table = Table(title=self.title, title_justify="left")
        for name in self.COLUMNS:
            table.add_column(name, justify="right")
        for stats in self.rows:
            table.add_row(*_format_row(stats))
        return Group(table, self.progress, self._run_eta())

    def _run_eta(self) -> str:
        if not self.rows:
            return ""
        per_epoch = sum(r.seconds for r in self.rows) / len(self.rows)
        left = per_epoch * (self.epochs - len(self.rows))
        return f"elapsed {time.perf_counter() - self.started:.0f}s, about {left:.0f}s of training left"

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

    def advance(self, steps_done: int, images_per_second: float) -> None:
        self.progress.update(self.epoch_task, completed=steps_done, speed=f"{images_per_second:,.0f} img/s")

    def end_epoch(self, stats: EpochStats) -> None:
        self.rows.append(stats)
        if not self.live:
            cells = dict(zip(self.COLUMNS, _format_row(stats)))
            console.print(f"epoch {cells['epoch']}/{self.epochs}  " +
                          "  ".join(f"{k} {v}" for k, v in cells.items() if k != "epoch"), highlight=False)

    # -- other long steps (feature extraction, evaluation)
    @contextmanager
    def task(self, description: str, total: int):
        """A progress bar for a step that is not an epoch; yields advance(n)."""
        start = time.perf_counter()
        task_id = self.progress.add_task(description, total=total, speed="")
        yield lambda n=1: self.progress.advance(task_id, n)
        self.progress.remove_task(task_id)
        message = f"{description}: {total:,} done in {time.perf_counter() - start:.1f}s"
        if self.live:
            self.live.console.print(message, highlight=False)
        else:
            console.print(message, highlight=False)
