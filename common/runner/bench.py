"""`python run.py bench`: how close each level's training runs to what the device can do.

For each level's recipe (model, trainable part, image size, batch size, augmentation), on the current device:

- training images per second through the real pipeline: common.training.train_one_epoch over the level's
  own batches (uint8 images on the device, augmented, normalized and resized per batch), against the same
  loop, model, batch and image size fed pre-staged model inputs already on the device: the pipeline-free
  upper bound. pipeline_overhead = 1 - real / upper bound. The two are timed in turns (real, staged, real,
  staged, ...) and the ratio is taken per pair, then the median: a noisy machine (CPU cores shared with
  other work, GPU clocks) then moves both sides of each ratio together;
- evaluation images per second (common.training.evaluate over the real pipeline);
- the FLOPs of one training step (torch.utils.flop_counter: forward and backward, a multiply-add counted as
  2), the FLOP/s achieved and, on a GPU, their fraction of the device's peak (PEAK_TFLOPS, with its source);
- peak memory: host (getrusage; and what the data itself takes) and, on a GPU, device;
- for Level 1, the level's own main() end to end, 5 epochs, with cached features and with the frozen
  backbone run every epoch (--no-cache-features, the seed's way): the speedup, measured in the same run.

With --compile each recipe is also measured with torch.compile, and the table shows what that changes.
With --profile cpu each recipe is also timed four ways (eager or compiled, fp32 or bf16) and, first, in eager fp32
with glibc's default allocator (the baseline); those timings run the real pipeline only, without the staged turns.
The weights are random: speed does not depend on their values, and nothing has to be downloaded.
Writes OUT/bench.json and OUT/bench.md (summary.md links it).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from common.data import load_cifar10, make_splits
from common.device import configure_backends, device_name, select_device, select_precision
from common.io import write_json_atomic, write_text_atomic
from common.progress import console
from common.runner.bench_recipes import collect_recipes
from common.runner.bench_report import judge_targets, print_table, render_markdown
from common.runner.bench_timing import (
    bench_recipe,
    default_allocator_speed,
    measured_matmul_peak,
    peak_flops,
    peak_host_memory,
)
from common.runner.results import environment, provenance

LEVEL_NUMBERS = (1, 2, 3, 4)

# --quick: the smoke profile's image size, and few steps. Level 1's end-to-end comparison runs on train,
# validation and test subsets in the full run's 4:1:1 proportions, so that its ratio carries over to a full
# run (the levels' --quick profile tests on 1,000 images against 2,000 for training, which would weigh the
# one-off test pass twice as much as a full run does).
# On a CPU every step synchronizes anyway, so turns of one step each pair the real and the staged step as
# closely in time as possible (other processes on the machine come and go within seconds); on a GPU a turn
# must be long enough for the pipeline to overlap the device's work, as it does in training.
# four_way_repeats and eval_images: under --profile each recipe is timed five more ways (four training modes, two
# inference batch sizes), two of them compiled; --quick times those with fewer turns and images, because the
# profile's recipes run at full size (128-224 px), where a 1-step turn of lite0 already takes about a second.
QUICK = dict(img_size=64, steps=1, repeats=9, four_way_repeats=5, eval_images=128, level1_sizes=(800, 200, 200))
FULL = dict(img_size=None, steps=20, repeats=5, four_way_repeats=5, eval_images=256, level1_sizes=(None, None, None))
LEVEL1_EPOCHS = 5

# ----------------------------------------------------------------------------------------------------------
# Level 1: cached features against the backbone every epoch, end to end


def level1_speedup(level1_main: Callable[[list[str]], int], model: str, img_size: int, sizes: tuple, data_dir,
                   device_choice: str) -> dict:
    """Level 1's main() twice, as a user runs it: with cached features, and with --no-cache-features.

    The time compared is the level's own record: features (when cached) and the 5 epochs (train_seconds),
    plus the test evaluation (test_seconds), i.e. everything after the data and the model are loaded.
    """
    train, val, test = sizes
    argv = ["--model", model, "--img-size", str(img_size), "--epochs", str(LEVEL1_EPOCHS), "--no-pretrained",
            "--device", device_choice, *(["--data-dir", str(data_dir)] if data_dir else [])]
    for flag, size in (("--train-size", train), ("--val-size", val), ("--test-size", test)):
        if size is not None:
            argv += [flag, str(size)]
    result = dict(epochs=LEVEL1_EPOCHS, model=model, img_size=img_size)
    quiet = console.quiet
    console.quiet = True  # the level's own table would bury the benchmark's
    try:
        with tempfile.TemporaryDirectory() as out:
            for key, flag in (("cached", "--cache-features"), ("recompute", "--no-cache-features")):
                code = level1_main([*argv, flag, "--out-dir", f"{out}/{key}"])
                if code != 0:
                    raise RuntimeError(f"Level 1 {flag} exited with code {code}")
                m = json.loads(Path(f"{out}/{key}/level1/metrics.json").read_text())
                result[f"{key}_seconds"] = m["train_seconds"] + m["test_seconds"]
                result.update(train_size=m["train_size"], val_size=m["val_size"], test_size=m["test_size"])
    finally:
        console.quiet = quiet
    result["speedup"] = result["recompute_seconds"] / result["cached_seconds"]
    return result


# ----------------------------------------------------------------------------------------------------------
# The run


def run_bench(recipe_sources: dict, level1_main: Callable | None = None, quick: bool = False,
              data_dir: str | None = None, out_dir: str = "outputs", device: str = "auto", compile: bool = False,
              levels: list[int] | None = None, model: str | None = None, img_size: int | None = None,
              batch_size: int | None = None, steps: int | None = None, repeats: int | None = None,
              level1_comparison: bool = True, precision_flag: str = "auto", profile_name: str | None = None) -> int:
    """The benchmark. `recipe_sources` maps each level to its bench_recipes function (or to the reason it has
    none); the runner, which knows the levels, collects them, so that common/ never imports a level."""
    from common.data import DataError
    from common.device import SetupError

    started, made = time.perf_counter(), provenance()
    unknown = [n for n in levels or [] if n not in LEVEL_NUMBERS]
    if unknown:
        console.print(f"[bold red]Error:[/] --level {unknown[0]}: levels are 1 to 4.", highlight=False)
        return 2
    profile = dict(QUICK if quick else FULL)
    if profile_name:  # the levels' own recipe under --profile: its image sizes, whatever --quick's
        profile["img_size"] = None
    profile.update({k: v for k, v in dict(img_size=img_size, steps=steps, repeats=repeats).items() if v is not None})
    if repeats is not None:  # --repeats: every timing takes that many turns
        profile["four_way_repeats"] = repeats
    overrides = dict(model=model, img_size=profile["img_size"], batch_size=batch_size, profile=profile_name)
    try:
        dev = select_device(device)
        precision = select_precision(dev, precision_flag)
        recipes, skipped = collect_recipes(recipe_sources, levels or list(LEVEL_NUMBERS), overrides)

        # the data, as every level holds it: uint8 arrays on the host, the splits' uint8 tensors on the device
        before = peak_host_memory()
        arrays, source = load_cifar10(data_dir)
        splits = make_splits(arrays, source)
        data_bytes = sum(a.nbytes for a in arrays.values())
        del arrays
        host = dict(data_bytes=data_bytes, data_load_peak_increase_bytes=peak_host_memory() - before)
        data = {name: (s.images.to(dev), s.labels.to(dev)) for name, s in (("train", splits.train), ("val", splits.val))}
    except (DataError, SetupError) as error:
        console.print(f"[bold red]Error:[/] {error}", highlight=False)
        return 2

    # On a CPU under --profile: each recipe in eager fp32 with the allocator as a process starts, *before*
    # configure_backends() has glibc keep freed memory (common.device.keep_freed_memory): that cannot be
    # undone exactly within a process, so the default comes first. The baseline the speed targets are judged on.
    default_allocator = {}
    if profile_name and dev.type == "cpu":
        console.print("Eager fp32 with glibc's default allocator first (the baseline) ...", highlight=False)
        for recipe in recipes:
            default_allocator[recipe.name] = default_allocator_speed(recipe, data, dev, profile["steps"],
                                                                     profile["four_way_repeats"])
    backends = configure_backends(dev)
    peak, peak_source = peak_flops(dev)
    if peak is None and profile_name:
        peak = measured_matmul_peak(dev)
        peak_source = (f"measured: the best of five 2048 x 2048 fp32 matrix products on this CPU, "
                       f"{peak / 1e9:.0f} GFLOP/s")
    report = dict(environment=dict(environment(dev, precision), **backends), device=device_name(dev),
                  precision=precision.name,
                  precision_flag=precision_flag,
                  profile="quick" if quick else "full", steps=profile["steps"], repeats=profile["repeats"],
                  four_way_repeats=profile["four_way_repeats"] if profile_name else None,
                  eval_images=profile["eval_images"] if profile_name else None,
                  recipe_profile=profile_name,
                  compile=compile, peak_flops_per_second=peak, peak_flops_source=peak_source,
                  host=host, recipes=[], skipped=skipped, level1_cache=None, **made)
    console.print(f"Benchmark on {report['device']} (--precision {precision_flag}), {report['profile']} profile: "
                  f"{profile['steps']} steps x {profile['repeats']} turns per measurement", highlight=False)
    for s in skipped:
        console.print(f"[yellow]Skipped level {s['level']}:[/] {s['reason']}", highlight=False)
    if compile and profile_name:
        console.print(f"--compile: --profile {profile_name} already times every recipe compiled (fp32 and bf16), "
                      f"so nothing is timed twice.", highlight=False)
    for recipe in recipes:
        console.print(f"{recipe.name}: {recipe.model} at {recipe.img_size} px, batch {recipe.batch_size} ...",
                      highlight=False)
        row = bench_recipe(recipe, data, dev, precision_flag, profile["steps"], profile["repeats"], compile,
                           four_way=bool(profile_name), four_way_repeats=profile["four_way_repeats"],
                           eval_images=profile["eval_images"])
        if recipe.name in default_allocator:
            row["default_allocator_eager_fp32"] = default_allocator[recipe.name]
            row["speedup_over_default_allocator"] = {k: v / default_allocator[recipe.name] if v else None
                                                     for k, v in row["speeds"].items()}
        if peak and row["fraction_of_peak"] is None:
            row["peak_flops_per_second"], row["fraction_of_peak"] = peak, row["achieved_flops_per_second"] / peak
        report["recipes"].append(row)
    if level1_comparison and any(r.level == 1 for r in recipes):
        level1_img = next(r.img_size for r in recipes if r.level == 1)
        console.print(f"Level 1: cached features against the backbone every epoch, {LEVEL1_EPOCHS} epochs ...",
                      highlight=False)
        level1_model = next(r.model for r in recipes if r.level == 1)
        report["level1_cache"] = level1_speedup(level1_main, level1_model, level1_img, profile["level1_sizes"],
                                                data_dir, device)
    host["peak_bytes"] = peak_host_memory()
    report["targets"] = judge_targets(report, dev)
    report["total_seconds"] = time.perf_counter() - started  # the whole benchmark, data and compiling included

    out = Path(out_dir)
    write_json_atomic(out / "bench.json", report)
    markdown = render_markdown(report)
    write_text_atomic(out / "bench.md", markdown)
    from common.runner.summary import write_summary

    write_summary(out)
    print_table(report)
    console.print(f"Wrote {out / 'bench.json'} and {out / 'bench.md'} (linked from {out / 'summary.md'})",
                  highlight=False)
    return 0
