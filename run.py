"""The runner: `python run.py level N`, `python run.py all`, `python run.py summary`, `python run.py bench`.

Each level is a plain script in levels/; the runner imports it as a module (levels.levelN_...) and calls its
main() with the flags you give, so `python run.py level 1 --quick` and `python levels/level1_baseline.py --quick`
do exactly the same thing. `python run.py level N --help` lists the flags.
"""

from __future__ import annotations

import importlib
import sys
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

app = typer.Typer(help="CIFAR-10 in four levels: run a level, all of them, rebuild the summary, or benchmark.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


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
    for number, path in LEVEL_FILES.items():
        if (ROOT / path).is_file():
            code = _run_level(number, ctx.args)
            if code != 0:
                raise typer.Exit(code)


@app.command()
def summary(out_dir: Path = typer.Option(Path("outputs"), help="the folder the levels wrote to")) -> None:
    """Rebuild OUT/summary.md from the saved results, without training."""
    from common.progress import console
    from common.summary import write_summary

    path = write_summary(out_dir)
    console.print(f"Wrote {path}")


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="smoke profile for a CPU: 64 px, 1 step x 9 turns, Level 1's "
                               "comparison on 800 / 200 / 200 images"),
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
) -> None:
    """Measure each level's training speed against the device's limit: writes OUT/bench.json and OUT/bench.md."""
    from common.bench import run_bench

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
                               repeats=repeats, level1_comparison=level1_comparison))


if __name__ == "__main__":
    app()
