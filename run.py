"""The runner: `python run.py level N`, `python run.py all`, `python run.py summary`.

Each level is a plain script in levels/; the runner imports it and calls its main() with the flags you give,
so `python run.py level 1 --quick` and `python levels/level1_baseline.py --quick` do exactly the same thing.
`python run.py level N --help` lists the flags.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

LEVEL_FILES = {
    1: "levels/level1_baseline.py",
    2: "levels/level2_intermediate.py",
    3: "levels/level3_advanced.py",
    4: "levels/level4_expert.py",
}
PASS_THROUGH = dict(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                    add_help_option=False)

app = typer.Typer(help="CIFAR-10 in four levels: run a level, all of them, or rebuild the summary.",
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
    spec = importlib.util.spec_from_file_location(f"level{number}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main(argv)


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


if __name__ == "__main__":
    app()
