"""The runner: `python run.py level N`, `python run.py all`, `python run.py summary`, `python run.py bench`,
`python run.py predict IMAGE`, `python run.py record --level N` (file a finished run in results/; `summary
--readme` regenerates the README's table from those records) and `python run.py status` (also what `python
run.py` alone shows).

Each level is a plain script in levels/; the runner imports it as a module (levels.levelN_...) and calls its
main() with the flags you give, so `python run.py level 1 --quick` and `python levels/level1_baseline.py --quick`
do exactly the same thing. `python run.py level N --help` lists the flags.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

LEVEL_MODULES = {
    1: "level1_baseline",
    2: "level2_intermediate",
    3: "level3_advanced",
    4: "level4_expert",
}
LEVEL_FILES = {number: f"levels/{name}.py" for number, name in LEVEL_MODULES.items()}


def load_level(number: int):
    """A level's module, imported once (levels.level2_intermediate is the same object everywhere)."""
    return importlib.import_module(f"levels.{LEVEL_MODULES[number]}")


PASS_THROUGH = dict(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                    add_help_option=False)

app = typer.Typer(help="CIFAR-10 in four levels: run a level, all of them, rebuild the summary, benchmark, predict "
                  "an image, or see where each level stands (`python run.py` alone: the status table).",
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback(invoke_without_command=True)
def overview(ctx: typer.Context) -> None:
    """With no command: the status of the four levels in ./outputs (as `python run.py status`)."""
    if ctx.invoked_subcommand is None:
        raise typer.Exit(show_status(Path("outputs")))


def _run_level(number: int, argv: list[str]) -> int:
    from common.progress import console

    if number not in LEVEL_FILES:
        console.print(f"[bold red]Error:[/] there is no level {number}; levels are 1 to 4.")
        return 2
    path = ROOT / LEVEL_FILES[number]
    if not path.is_file():
        console.print(f"[bold red]Error:[/] level {number} is not built yet ({LEVEL_FILES[number]} does not exist).")
        return 2
    return load_level(number).main(argv)


@app.command(**PASS_THROUGH)
def level(ctx: typer.Context, number: int = typer.Argument(..., help="1 to 4")) -> None:
    """Run one level. Every flag after the number goes to the level (see `python run.py level N --help`)."""
    raise typer.Exit(_run_level(number, ctx.args))


@app.command("all", **PASS_THROUGH)
def all_levels(ctx: typer.Context) -> None:
    """Run every level that is built, in order, with the same flags; stop at the first that does not complete."""
    from common.progress import console

    started = time.perf_counter()
    for number, path in LEVEL_FILES.items():
        if (ROOT / path).is_file():
            console.rule(f"[bold]Level {number} of {len(LEVEL_FILES)}[/] ({path}) — "
                         f"{_duration(time.perf_counter() - started)} elapsed overall")
            code = _run_level(number, ctx.args)
            if code != 0:
                raise typer.Exit(code)


@app.command()
def summary(
    out_dir: Path = typer.Option(Path("outputs"), help="the folder the levels wrote to"),
    readme: bool = typer.Option(False, "--readme", help="instead: regenerate README.md's results table and pictures "
                                "from the kept records in results/ (see docs/records.md)"),
    check: bool = typer.Option(False, "--check", help="with --readme: change nothing, exit 1 if README.md is stale"),
) -> None:
    """Rebuild OUT/summary.md from the saved results, without training; or, with --readme, the README's table."""
    console = _light_console()
    if readme:
        from common.runner.readme import render_readme, write_readme

        path = ROOT / "README.md"
        if check:
            stale = render_readme(path.read_text()) != path.read_text()
            console.print(f"{path.name} is {'stale: run python run.py summary --readme' if stale else 'up to date'}"
                          f" (its results table and pictures against results/)", highlight=False)
            raise typer.Exit(1 if stale else 0)
        changed = write_readme(path)
        console.print(f"{'Rewrote' if changed else 'Unchanged:'} {path.name}'s results table and pictures, from "
                      f"results/", highlight=False)
        return
    from common.runner.summary import write_summary

    path = write_summary(out_dir)
    console.print(f"Wrote {path}")


@app.command()
def record(
    level: int | None = typer.Option(None, help="the level whose run to file (1 to 4)"),
    from_dir: Path = typer.Option(Path("outputs"), "--from", help="the output folder the run wrote to"),
    commit: str | None = typer.Option(None, help="the commit the run ran, when its code matches none (a run "
                                      "started from uncommitted code); the record says it was not verified"),
    convert_kept: bool = typer.Option(False, "--convert-kept", help="instead: bring every kept record in results/ "
                                      "up to date: local paths as placeholders (DATA, OUT, WEIGHTS/...), a level "
                                      "record's data described from its folder where that folder is here; "
                                      "idempotent"),
    peers: bool = typer.Option(False, "--peers", help="instead: write results/cpu/peers.json, the peers' numbers "
                               "on the same data (common/runner/peers.py), with the JPEG copy at --data-dir described"),
    data_dir: str | None = typer.Option(None, help="with --peers: the JPEG copy (default: $CIFAR10_DIR, else ./data)"),
) -> None:
    """File a finished full-data run as a kept record: results/<cpu|gpu>/levelN.json, its figures as small PNGs
    in docs/img, then README.md's results table and pictures regenerated. Refuses smoke, partial or unfinished
    runs. See docs/records.md."""
    from common.runner.filing import RESULTS_DIR, FilingError, file_run
    from common.runner.readme import write_readme

    console = _light_console()
    if convert_kept or peers:
        if convert_kept:
            from common.runner.placeholders import convert_kept as convert

            for path, notes in convert(RESULTS_DIR):
                console.print(f"{path.relative_to(ROOT)}: {'; '.join(notes)}", highlight=False)
        if peers:
            from common.runner.peers import write_peers_record

            path, said = write_peers_record(RESULTS_DIR, data_dir)
            console.print(f"Wrote {path.relative_to(ROOT)}: {said}", highlight=False)
        changed = write_readme(ROOT / "README.md")
        console.print(f"README.md's generated blocks {'regenerated' if changed else 'unchanged'}. Commit the records "
                      "and the README together.", highlight=False)
        return
    if level not in LEVEL_FILES:
        console.print(f"[bold red]Error:[/] {'--level is needed' if level is None else f'there is no level {level}'}"
                      "; levels are 1 to 4.", highlight=False)
        raise typer.Exit(2)
    try:
        filed = file_run(from_dir, level, commit)
    except FilingError as problem:
        console.print(f"[bold red]Error:[/] {problem}", highlight=False)
        raise typer.Exit(2)
    console.print(f"Filed level {level}: {filed.record.relative_to(ROOT)} (commit {filed.commit[:12]}"
                  f"{'' if filed.commit_verified else ', NOT verified: its code differs from the run'}), "
                  f"{len(filed.figures)} figure(s) in docs/img; local paths as placeholders"
                  + "".join(f"; {note}" for note in filed.notes), highlight=False)
    write_readme(ROOT / "README.md")
    console.print("README.md's results table and pictures regenerated. Commit the record, its figures and the "
                  "README together.", highlight=False)


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="smoke profile for a CPU: 64 px, 1 step x 9 turns, Level 1's "
                               "comparison on 800 / 200 / 200 images; with --profile, the profile's own sizes and "
                               "5 turns for each of the four ways"),
    data_dir: str | None = typer.Option(None, help="CIFAR-10 location, as for the levels (default: $CIFAR10_DIR, "
                                        "else ./data)"),
    out_dir: Path = typer.Option(Path("outputs"), help="where bench.json and bench.md go"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    compile: bool = typer.Option(False, "--compile", help="also measure every recipe with torch.compile"),
    level: list[int] | None = typer.Option(None, help="only this level (repeat the flag for several)"),
    model: str | None = typer.Option(None, help="one timm model for every recipe instead of each level's own"),
    img_size: int | None = typer.Option(None, help="image size for every recipe (default: each level's; 64 "
                                        "with --quick)"),
    batch_size: int | None = typer.Option(None, help="batch size for every recipe (default: each level's)"),
    steps: int | None = typer.Option(None, help="training steps per timed turn"),
    repeats: int | None = typer.Option(None, help="timed turns (real and staged, alternating); medians kept"),
    level1_comparison: bool = typer.Option(True, help="run Level 1 end to end, cached features against the "
                                           "backbone every epoch"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16, as for the levels (on a CPU with bf16 "
                                  "hardware every recipe is also timed in fp32 and in bf16)"),
    profile: str | None = typer.Option(None, help="'cpu': the recipes that --profile cpu trains, each timed four "
                                       "ways (eager and compiled, fp32 and bf16)"),
) -> None:
    """Measure each level's training speed against the device's limit: writes OUT/bench.json and OUT/bench.md."""
    from common.runner.bench import run_bench

    sources, level1_main = {}, None
    for number, path in LEVEL_FILES.items():
        if not (ROOT / path).is_file():
            sources[number] = f"{path} does not exist (level not built yet)"
            continue
        try:
            module = load_level(number)
            sources[number] = getattr(module, "bench_recipes", None) or f"{path} has no bench_recipes()"
            level1_main = module.main if number == 1 else level1_main
        except Exception as error:  # a level being rewritten must not stop the benchmark of the others
            sources[number] = f"{path} could not be imported ({type(error).__name__}: {error})"
    raise typer.Exit(run_bench(sources, level1_main, quick=quick, data_dir=data_dir, out_dir=str(out_dir), device=device, compile=compile,
                               levels=level, model=model, img_size=img_size, batch_size=batch_size, steps=steps,
                               repeats=repeats, level1_comparison=level1_comparison, precision_flag=precision,
                               profile_name=profile))


# ----------------------------------------------------------------------------------------------------------
# Where each level stands


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _next_command(number: int, m: dict | None, out_dir: Path) -> str:
    """What to run next for a level, given its record (None: not run)."""
    where = "" if out_dir == Path("outputs") else f" --out-dir {out_dir}"
    status = (m or {}).get("status")
    if m is None:
        return f"python run.py level {number}{where}"
    if status == "running":
        pid = (m.get("process") or {}).get("pid")
        return f"none yet: it is running (pid {pid}); check again with python run.py status{where}"
    if status == "interrupted":
        command = m.get("command") or f"run.py level {number}{where}"
        return f"python {command}" + ("" if "--resume" in command.split() else " --resume")
    if status == "complete":
        return f"python run.py predict IMAGE --level {number}{where}"
    return f"python {m.get('command') or f'run.py level {number}{where}'}"  # failed: fix, then run it again


def status_table(out_dir: Path):
    """The four levels as a rich Table: status, test accuracy against its bar, training time, when, what next."""
    from rich.table import Table

    from common.records import load_metrics
    from common.runner.summary import ACCURACY_BARS, LEVELS, meets_bar, status_text

    runs = load_metrics(out_dir) if out_dir.is_dir() else {}
    colours = {"complete": "green", "running": "cyan", "interrupted": "yellow", "failed": "red"}
    table = Table(title=f"CIFAR-10 in four levels — {out_dir}", title_justify="left")
    for column in ("level", "status", "test accuracy", "bar", "training time", "started", "next"):
        table.add_column(column, overflow="fold")
    for number in LEVEL_FILES:
        m = runs.get(number)
        bar = ACCURACY_BARS[number]
        if m is None:
            status, accuracy, verdict, trained, started = "[dim]not run[/]", "—", f"— (≥ {bar:.0%})", "—", "—"
        else:
            colour = colours.get(m.get("status"), "red")
            status = f"[{colour}]{status_text(m)}[/]"
            acc = m.get("test_accuracy")
            accuracy = "—" if acc is None else f"{acc:.2%}" + (f" on {m.get('test_size'):,}" if m.get("quick") else "")
            verdict = f"— (≥ {bar:.0%})" if acc is None else (
                f"[green]met[/] (≥ {bar:.0%})" if meets_bar(number, acc) else f"[red]not met[/] (< {bar:.0%})")
            if m.get("quick") and acc is not None:
                verdict += " smoke run"
            trained, started = _duration(m.get("train_seconds")), m.get("started_at") or "—"
        table.add_row(f"{number} {LEVELS[number]}", status, accuracy, verdict, trained, started,
                      _next_command(number, m, out_dir))
    return table


def _light_console():
    """A rich console like common.progress.console, without importing torch (status and predict's errors are instant)."""
    from rich.console import Console

    return Console(soft_wrap=True)


def show_status(out_dir: Path) -> int:
    console = _light_console()
    console.print(status_table(out_dir))
    if not out_dir.is_dir():
        console.print(f"Nothing has run in '{out_dir}' yet (use --out-dir for another folder).", highlight=False)
    return 0


@app.command()
def compare(
    new: Path = typer.Argument(..., help="a level's folder, e.g. outputs/level3 (its metrics.json)"),
    old: Path = typer.Argument(..., help="another level's folder to compare it with, e.g. other-outputs/level2"),
    save: Path | None = typer.Option(None, help="also write the comparison, and what each run was (command, "
                                     "commit, device, accuracy), to this JSON file"),
) -> None:
    """Is one run's test accuracy really different from another's? The change in points with its standard error,
    paired image by image where both runs kept their test predictions, and what makes the two not like for like.
    The runs may be in different output folders (a level compares itself with the level before it only in its
    own folder)."""
    import json

    from common.stats import compare_runs

    console = _light_console()
    runs = []
    for folder in (new, old):
        path = folder / "metrics.json"
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as problem:
            console.print(f"[bold red]Error:[/] no readable {path} ({problem.__class__.__name__}): give a level's "
                          f"folder, such as outputs/level3.", highlight=False)
            raise typer.Exit(2)
        if m.get("status") != "complete" or m.get("test_accuracy") is None:
            console.print(f"[bold red]Error:[/] {path} is not a finished run (status {m.get('status')}).",
                          highlight=False)
            raise typer.Exit(2)
        runs.append(m)
    text, comparison = compare_runs(runs[0], new.parent, runs[1], old.parent, f"Level {runs[1].get('level')} in {old}")
    text = (f"Level {runs[0].get('level')} in {new}: {100 * runs[0]['test_accuracy']:.2f}% on "
            f"{runs[0]['test_size']:,} test images. {text}")
    console.print(text, highlight=False)
    if save:
        from common.io import write_json_atomic

        def identity(m: dict) -> dict:
            return {key: m.get(key) for key in ("level", "title", "test_accuracy", "test_size", "train_size",
                                                "train_seconds", "command", "code_version", "started_at")} | dict(
                device=(m.get("environment") or {}).get("device"), config=m.get("config"))

        write_json_atomic(save, dict(new=identity(runs[0]), old=identity(runs[1]), comparison=comparison, text=text))
        console.print(f"Wrote {save}", highlight=False)


@app.command()
def status(out_dir: Path = typer.Option(Path("outputs"), help="the folder the levels wrote to")) -> None:
    """Where each level stands: status, test accuracy against its bar, training time, when, and what to run next."""
    raise typer.Exit(show_status(out_dir))


# ----------------------------------------------------------------------------------------------------------
# Predict


def _build_se(entry: dict, num_classes: int):
    """Level 3's SE network, for common.runner.predict (common/ does not import levels/; the runner may)."""
    from levels.level3_advanced import build_se_model

    return build_se_model(entry["model"], False, None, num_classes=num_classes,
                          se_in_layer4=bool(entry.get("se_in_layer4", False)), reduction=int(entry.get("reduction", 16)))


@app.command()
def predict(
    images: list[Path] | None = typer.Argument(None, help="image files of any size and format PIL reads"),
    level: int | None = typer.Option(None, help="the level whose model to use (default: the highest complete one)"),
    out_dir: Path = typer.Option(Path("outputs"), help="the folder the levels wrote to"),
    test_index: int | None = typer.Option(None, help="also predict image K (0-9999) of the CIFAR-10 test set, "
                                          "with its true class"),
    data_dir: str | None = typer.Option(None, help="CIFAR-10 location for --test-index (default: $CIFAR10_DIR, "
                                        "else ./data)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    top: int = typer.Option(3, help="how many classes to show"),
) -> None:
    """Classify image files (or a test image) with a level's saved model: the top classes and their probabilities."""
    raise typer.Exit(run_predict(images or [], level, out_dir, test_index, data_dir, device, top))


def run_predict(images: list[Path], level: int | None, out_dir: Path, test_index: int | None, data_dir: str | None,
                device: str, top: int) -> int:
    from rich.table import Table

    from common.runner.predict import PredictError, find_model, load_image, load_saved_model, predict_probabilities

    console = _light_console()

    def error(message: str) -> int:
        console.print(f"[bold red]Error:[/] {message}", highlight=False)
        return 2

    if not images and test_index is None:
        return error("give one or more image files, or --test-index K (a CIFAR-10 test image).")
    if device not in ("auto", "cpu", "cuda"):
        return error(f"--device must be auto, cpu or cuda, not '{device}'.")
    if top < 1:
        return error(f"--top must be at least 1, not {top}.")
    try:
        find_model(out_dir, level)
    except PredictError as problem:
        return error(str(problem))
    import torch

    from common.data import DataError

    if device == "cuda" and not torch.cuda.is_available():
        return error("--device cuda was asked for, but PyTorch sees no CUDA GPU here. Use --device auto or cpu.")
    device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    if device == "cpu":  # a few single images: one thread is as fast, and never fights a training run for the cores
        torch.set_num_threads(1)
    try:
        number, path, warning = find_model(out_dir, level)
        saved = load_saved_model(path, builders={"se": _build_se}, device=device)
    except PredictError as problem:
        return error(str(problem))
    if warning:
        console.print(f"[yellow]Note:[/] {warning}", highlight=False)
    console.print(f"Level {number}: {saved.description} ({path})", highlight=False)

    def show(what: str, pixels, caption: str, truth: int | None = None) -> None:
        probabilities = predict_probabilities(saved, pixels[None])[0]
        values, classes = probabilities.topk(min(top, len(saved.classes)))
        if truth is not None:
            caption += f"; true class: {saved.classes[truth]} " + (
                "(predicted)" if int(classes[0]) == truth else "(not the top prediction)")
        table = Table(title=what, title_justify="left", caption=caption, caption_justify="left")
        table.add_column("#", justify="right")
        table.add_column("class")
        table.add_column("probability", justify="right")
        for rank, (p, c) in enumerate(zip(values.tolist(), classes.tolist()), start=1):
            table.add_row(str(rank), saved.classes[c] + (" ✓" if c == truth else ""), f"{p:.2%}")
        console.print(table)

    if test_index is not None:
        from common.data import load_splits

        try:
            test = load_splits(data_dir).test
        except DataError as problem:
            return error(str(problem))
        if not 0 <= test_index < len(test):
            return error(f"--test-index {test_index}: the test set has images 0 to {len(test) - 1}.")
        show(f"test image {test_index}", test.images[test_index], "32 x 32 CIFAR-10 test image",
             int(test.labels[test_index]))
    failed = 0
    for image_path in images:
        try:
            pixels, (width, height) = load_image(image_path)
        except PredictError as problem:
            error(str(problem))
            failed += 1
            continue
        show(str(image_path), pixels, "32 x 32, as is" if (width, height) == (32, 32) else
             f"{width} x {height}, centre square shrunk to 32 x 32 (Lanczos)")
    return 2 if failed else 0


if __name__ == "__main__":
    app()
