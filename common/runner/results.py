"""One level run from start to end: its record (metrics.json), its checkpoints, its saved model, how it ends.

LevelRun holds `metrics`, the plain dict that becomes OUT/levelN/metrics.json (common/records.py says what is
in it). The level writes its numbers into it; LevelRun writes it after every epoch (status `running`) and at
the end, and turns every way a run can end into an exit code and a message a user can act on.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from common.data import DataError
from common.distributed import is_main_process, world_size
from common.io import OutputError, check_writable, safe_filename, save_npz_atomic, torch_save_atomic
from common.models import weight_files
from common.progress import console
from common.records import metrics_path, this_process, write_metrics
from common.runner.run_folder import (FolderInUse, LevelLock, TIME_FORMAT, describe, finished_run, has_checkpoints,
                                      holder, move_aside, previous_dir)
from common.runner.summary import write_summary
from common.training import EpochCheckpoint, TrainingDiverged, code_version
from common.device import SetupError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# Settings that change where or how fast a run goes, not what it computes: a checkpoint stays valid across them.
NOT_IN_SIGNATURE = ("out_dir", "data_dir", "device", "resume", "quick", "profile", "profile_chosen")

MODEL_FORMAT = "cifar10-levels model v1"


def recipe(metrics: dict) -> dict:
    """The flags a run's training depends on: its config without where and how fast it runs."""
    return {k: v for k, v in metrics.get("config", {}).items() if k not in NOT_IN_SIGNATURE}


def time_already_spent(out_dir: Path, level: int, metrics: dict) -> float:
    """The wall time of the unfinished run that --resume continues: the total_seconds in its metrics.json, which
    it wrote after its last finished epoch (an epoch lost with the process is not counted). 0 when there is no
    such run: none on disk, a complete one, or one with other flags or code (its checkpoints are refused)."""
    try:
        earlier = json.loads(metrics_path(out_dir, level).read_text())
    except (OSError, json.JSONDecodeError):
        return 0.0

    if earlier.get("status") == "complete" or earlier.get("code_version") != metrics["code_version"] \
            or recipe(earlier) != recipe(metrics):
        return 0.0
    return float(earlier.get("total_seconds") or 0.0)


def provenance() -> dict:
    """What a kept result says of its making: the command, when it started, and which code ran (the digest that
    `python run.py record` matches to a commit). A level's metrics.json and the benchmark's bench.json both hold it."""
    return dict(command=" ".join(sys.argv), started_at=time.strftime(TIME_FORMAT),
                code_version=code_version())


def environment(device, precision=None) -> dict:
    import timm
    import torch
    import torchvision

    from common.device import device_name

    return dict(device=device_name(device), device_type=device.type,
                precision=precision.name if precision else None,
                torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
                cuda=torch.version.cuda if device.type == "cuda" else None, processes=world_size(),
                threads=torch.get_num_threads(), python=platform.python_version(), platform=platform.platform())


class LevelRun:
    """The record of one level run. `metrics` is a plain dict that becomes metrics.json."""

    def __init__(self, level: int, title: str, approach: str, settings, hyperparameters):
        self.level, self.settings = level, settings
        self.hyperparameter_names = [f.name for f in dataclasses.fields(hyperparameters)]
        self.out_dir = Path(settings.out_dir)
        self.dir = self.out_dir / f"level{level}"
        self.started = time.perf_counter()
        self.written = False  # has this run written metrics.json yet? (bad input must overwrite nothing)
        self.metrics: dict = dict(
            level=level, title=title, approach=approach, status="running", quick=settings.quick,
            profile=settings.profile, profile_chosen=settings.profile_chosen, test_accuracy=None, val_accuracy=None,
            train_size=None, val_size=None, test_size=None, history=[], train_seconds=None, total_seconds=None,
            config={**dataclasses.asdict(settings), **dataclasses.asdict(hyperparameters)},
            environment=None, figures={}, process=this_process(), **provenance(),
        )
        # --resume continues a run that has already spent time (in a session that ended, say): total_seconds counts
        # it too, so that "in all" is never less than the training time summed over the epochs
        self.metrics["resumed_after_seconds"] = time_already_spent(self.out_dir, level, self.metrics) \
            if settings.resume else 0.0
        self.lock = LevelLock(self.out_dir, level)  # one run per level folder: taken by execute(), first of all
        self.to_keep: dict | None = None  # a finished run found in the folder, moved aside at this run's first write

    def estimate_from_kept_record(self, results_dir: Path | None = None) -> None:
        """The live table's time left for the whole level: when this run trains the very recipe of the level's kept
        record (results/cpu/levelN.json: the same hyperparameters, on the whole data set), that record's time in all,
        less the time this run has spent. Said as an estimate, with the record's hardware; no estimate otherwise."""
        from common import progress
        from common.runner.filing import RESULTS_DIR, record_path

        path = record_path("cpu", self.level, results_dir or RESULTS_DIR)
        if self.settings.profile != "cpu" or self.settings.quick or not path.is_file():
            return
        if any(getattr(self.settings, k) is not None for k in ("train_size", "val_size", "test_size")):
            return
        kept = json.loads(path.read_text())
        same = all(kept.get("config", {}).get(k) == v for k, v in self.metrics["config"].items()
                   if k in self.hyperparameter_names)
        if not same or not kept.get("total_seconds"):
            return
        device = (kept.get("environment") or {}).get("device", "its machine")

        def left() -> str:
            spent = self.metrics["resumed_after_seconds"] + time.perf_counter() - self.started
            minutes = max(kept["total_seconds"] - spent, 0) / 60
            left = f"about {minutes:.0f} min" if minutes >= 1 else "under a minute"
            return f"the level: {left} left, by the kept run of this recipe on {device}"

        progress.level_time_left = left

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, settings):
        """Seeds, device (joining the process group under torchrun), backends; recorded in metrics.
        Returns the device; the precision depends on the model too: see precision_for()."""
        from common.device import configure_backends, seed_everything, select_device

        check_writable(self.out_dir)
        weight_files(settings.weights)  # a mistyped --weights path: said now, before the data loads
        seed_everything(settings.seed)
        device = select_device(settings.device)
        self.metrics["environment"] = dict(environment(device), **configure_backends(device, settings.deterministic))
        self.device = device
        self.compile = self._resolve_compile(settings)
        self.estimate_from_kept_record()
        return device

    def _resolve_compile(self, settings) -> bool:
        """--compile, where torch.compile works here; recorded in metrics.json (`compile`) with the reason."""
        from common.device import compiler_problem

        if not settings.compile:
            self.metrics["compile"] = dict(used=False, reason="eager (--no-compile, the default)")
            return False
        problem = compiler_problem()
        if problem:
            console.print(f"[yellow]--compile:[/] {problem}; training eagerly instead.", highlight=False)
            self.metrics["compile"] = dict(used=False, reason=problem)
            return False
        self.metrics["compile"] = dict(used=True, reason="--compile")
        return True

    def precision_for(self, model, key: str | None = None):
        """Training and inference precision for `model` (--precision), recorded with its reason."""
        from common.device import select_precision

        precision = select_precision(self.device, self.settings.precision, model)
        if key is None:
            self.metrics["precision"] = precision.record()
            self.metrics["environment"]["precision"] = precision.name
        else:
            self.metrics.setdefault("precision", {})[key] = precision.record()
        return precision

    def load_data(self, settings, device):
        """-> (splits on the CPU, {split: (uint8 images, labels)} on the device), the sizes recorded.

        The uint8 images go to the device once; every batch is then augmented, converted and resized there
        (see common/training.py)."""
        from common.data import load_splits

        splits = load_splits(settings.data_dir, settings.train_size, settings.val_size, settings.test_size)
        # data_source: where the images were read here; data: what they are (format, counts, content fingerprint),
        # which a kept record keeps when its paths become placeholders (common/runner/placeholders.py)
        self.metrics.update(train_size=len(splits.train), val_size=len(splits.val), test_size=len(splits.test),
                            data_source=splits.source, data=splits.data)
        images = {name: (s.images.to(device), s.labels.to(device))
                  for name, s in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
        return splits, images

    # -- files -------------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        self.keep_finished_run()
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / name

    def keep_finished_run(self) -> None:
        """Before this run's first write into OUT/levelN: a finished run there is moved to OUT/previous/, whole,
        and the move is said. Until then it stays in place, so a run stopped by bad input leaves it as it was."""
        if self.to_keep is None:
            return
        kept, self.to_keep = self.to_keep, None
        what = describe(kept, self.dir)
        try:
            where = move_aside(self.dir, kept)
        except OSError as error:
            raise OutputError(f"Cannot keep the finished run in {self.dir}: moving it to {previous_dir(self.out_dir)}/ "
                              f"failed ({error.strerror or error}). Move it yourself, or choose another --out-dir.") \
                from None
        console.print(f"Kept the finished run that was in {self.dir} ({what}): moved to {where}/. This run writes a "
                      f"new {self.dir}/.", highlight=False)

    def add_figure(self, key: str, path: Path) -> None:
        """Record a figure that is on disk, by its path relative to the output folder (as summary.md links it)."""
        self.metrics["figures"][key] = Path(path).relative_to(self.out_dir).as_posix()

    def checkpoint(self, name: str, **extra) -> EpochCheckpoint:
        """The per-epoch checkpoint of one training run of this level (`name`: "main", an ablation arm, a member).

        Its signature is what the training depends on: the recipe (every flag but where and how fast), the data
        (source and split sizes), the code version and `extra`. --resume refuses a checkpoint whose signature
        differs."""
        self.keep_finished_run()  # its checkpoints are about to be written
        signature = dict(recipe(self.metrics), **extra, code_version=self.metrics["code_version"],
                         data_source=self.metrics.get("data_source"),
                         sizes=[self.metrics.get(k) for k in ("train_size", "val_size", "test_size")],
                         precision=self.metrics.get("precision"))
        return EpochCheckpoint(self.dir / "checkpoints" / f"{safe_filename(name)}.pt", signature, self.settings.resume, label=name)

    def save_model(self, state_dict: dict, **meta) -> Path:
        """OUT/levelN/model.pt: the chosen model's weights and what it takes to rebuild it (timm name, image size,
        normalization, classes, ...). Loadable with torch.load(path, weights_only=True)."""
        from common.data import CLASSES

        path = self.path("model.pt")
        if is_main_process():
            torch_save_atomic(path, dict(format=MODEL_FORMAT, level=self.level, classes=list(CLASSES),
                                         state_dict={k: v.detach().cpu() for k, v in state_dict.items()}, **meta))
        self.metrics["model_file"] = path.relative_to(self.out_dir).as_posix()
        return path

    def evaluate_test(self, model, batches, device, precision, *more_views):
        """The test set, evaluated: counted in metrics.json (`test_evaluations`), which the checklist expects to
        be 1, after every choice was made on validation. `more_views`: the same test images under other views
        (test-time augmentation, Level 3's mirror), averaged with `batches` by common.training.average_views."""
        from common import training

        self.metrics["test_evaluations"] = self.metrics.get("test_evaluations", 0) + 1
        result = training.average_views([training.evaluate(model, b, device, precision) for b in (batches, *more_views)])
        # every test image's logits, in order: a later level pairs its own right/wrong with these, image by image
        # (common.stats.compare_with_level), and `run.py predict` can be checked against them
        if is_main_process():
            path = save_npz_atomic(self.path("test_predictions.npz"), logits=result.logits.float().numpy(),
                                   labels=result.labels.numpy())
            self.metrics.setdefault("files", {})["test_predictions"] = path.relative_to(self.out_dir).as_posix()
        return result

    def read_test_labels(self, images: dict):
        """The test set's labels, as numpy: for a level that scores its own saved predictions (Level 4). Counted in
        `test_evaluations` like evaluate_test()."""
        self.metrics["test_evaluations"] = self.metrics.get("test_evaluations", 0) + 1
        return images["test"][1].cpu().numpy()

    def epoch_done(self) -> None:
        """After every epoch: metrics.json with status `running` and the epochs so far."""
        self.write("running", summary=False)

    def write(self, status: str, summary: bool = True) -> None:
        self.metrics["status"] = status
        self.metrics["total_seconds"] = self.metrics["resumed_after_seconds"] + time.perf_counter() - self.started
        if not is_main_process():  # under torchrun every process holds the same metrics; rank 0 writes them
            return
        self.keep_finished_run()
        write_metrics(self.out_dir, self.level, self.metrics)
        self.written = True
        if summary:
            write_summary(self.out_dir)

    # -- the end -----------------------------------------------------------------------------------------------
    def _record_failure(self, status: str, error: str, **extra) -> None:
        """Record how the run ended, with what was measured; a failure to write is reported, not raised. A run
        that has written nothing yet, over a finished run, records nothing: the finished run stays as it was."""
        self.metrics.update(error=error, **extra)
        if self.to_keep is not None:
            console.print(f"This run had written nothing yet: the finished run in {self.dir} stays as it was.",
                          highlight=False)
            return
        try:
            self.write(status)
        except OutputError as write_error:
            console.print(f"[bold red]Could not record the run:[/] {write_error}", highlight=False)

    def execute(self, body: Callable[[], None]) -> int:
        """Run the level's body and end the way a user expects: an exit code, a message, never a traceback
        for a problem the user can fix. What was measured is written even when the run stops early; a bug
        (an unexpected exception) is recorded as `failed` and its traceback still shows.

        First of all, before anything is read or written: the level folder's lock (a second run there is refused,
        exit 2), and a finished run found there (--resume: said, exit 0, nothing touched; otherwise kept, moved to
        OUT/previous/ at this run's first write)."""
        try:
            check_writable(self.out_dir)
            if is_main_process():  # under torchrun, rank 0 holds the lock for the whole run
                self.lock.acquire(holder(self.metrics))
        except (FolderInUse, OutputError) as error:
            console.print(f"[bold red]Error:[/] {error}", highlight=False)
            return EXIT_BAD_INPUT
        try:
            finished = finished_run(self.dir)
            if self.settings.resume and finished is not None and not has_checkpoints(self.dir):
                return self._already_finished(finished)
            if not self.settings.resume and is_main_process():
                self.to_keep = finished
            return self._execute(body)
        finally:
            self.lock.release()

    def _already_finished(self, finished: dict) -> int:
        """--resume on a finished run: say so, touch nothing. Exit 0; 2 if the run was made with other flags."""
        again = (f"To train Level {self.level} again, drop --resume (the finished run is then moved to "
                 f"{previous_dir(self.out_dir)}/) or choose another --out-dir.")
        ours, theirs = (json.loads(json.dumps(recipe(m), default=str)) for m in (self.metrics, finished))
        differs = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
        if differs:
            detail = "; ".join(f"--{k.replace('_', '-')}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in differs)
            console.print(f"[bold red]Error:[/] --resume: {self.dir} holds a finished run ({describe(finished, self.dir)})"
                          f" made with other flags ({detail}); --resume continues a run only with its own flags. "
                          f"{again}", highlight=False)
            return EXIT_BAD_INPUT
        console.print(f"Level {self.level} is already complete in {self.dir}: {describe(finished, self.dir)}. Its "
                      f"record: {self.dir / 'metrics.json'}; its model: {self.dir / 'model.pt'}. --resume has nothing "
                      f"to continue: nothing was trained, read or changed. {again}", highlight=False)
        return EXIT_OK

    def _execute(self, body: Callable[[], None]) -> int:
        import torch

        try:
            body()
        except (DataError, SetupError) as error:  # bad input: before training, so nothing is overwritten
            console.print(f"[bold red]Error:[/] {error}", highlight=False)
            if self.written:  # found part-way (a later checkpoint): this run's record must not stay `running`
                self._record_failure("failed", str(error))
            return EXIT_BAD_INPUT
        except OutputError as error:
            console.print(f"[bold red]Error:[/] {error}", highlight=False)
            if self.written:
                self._record_failure("failed", str(error))
            return EXIT_BAD_INPUT
        except TrainingDiverged as error:
            console.print(f"[bold red]Training failed:[/] {error}", highlight=False)
            self._record_failure("failed", str(error))
            return EXIT_FAILED
        except (torch.OutOfMemoryError, MemoryError) as error:
            where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "host (CPU)"
            flags = ["--batch-size"] + [f"--{k.replace('_', '-')}" for k in self.metrics["config"]
                                        if k.endswith("_batch_size")]
            message = (f"Out of {where} memory. Lower {' or '.join(flags)} (now "
                       f"{self.metrics['config'].get('batch_size')}), or --img-size. {len(self.metrics['history'])} "
                       f"epoch(s) were finished and recorded; --resume continues from the last one.")
            console.print(f"[bold red]Error:[/] {message}", highlight=False)
            self._record_failure("failed", message)
            return EXIT_FAILED
        except KeyboardInterrupt:
            if self.to_keep is not None:  # nothing of this run on disk yet, and a finished run in the folder
                console.print("[yellow]Interrupted.[/]")
                self._record_failure("interrupted", "interrupted by the user (Ctrl-C)")
                return EXIT_INTERRUPTED
            console.print("[yellow]Interrupted.[/] Writing what was measured so far "
                          f"({len(self.metrics['history'])} epoch(s)) with status 'interrupted'; --resume continues "
                          f"from the last finished epoch.")
            self._record_failure("interrupted", "interrupted by the user (Ctrl-C)")
            return EXIT_INTERRUPTED
        except Exception as error:  # a bug: record it, then let the traceback show
            self._record_failure("failed", f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            raise
        self.metrics["finished_at"] = time.strftime(TIME_FORMAT)
        self.write("complete")
        shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)  # the result is in model.pt now
        console.print(f"Level {self.level}: test accuracy {self.metrics['test_accuracy']:.2%}"
                      f"{' (smoke run, not comparable)' if self.metrics['quick'] else ''}. "
                      f"Results in {self.dir}/, summary in {self.out_dir / 'summary.md'}", highlight=False)
        return EXIT_OK
