"""What `python run.py bench` measured, judged and written up: the targets, bench.md and the table it prints."""

from __future__ import annotations

import torch

from common.progress import console

T4_MEMORY = 16 * 1024**3  # the Colab GPU of the seed: every level's default batch must fit at 224 px
SPEED_KEYS = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16")


def chosen_mode(row: dict) -> str:
    """The way a level trains this recipe, as a key of row["speeds"]: eager or compiled, and its precision.

    A frozen backbone (Level 1's, trainable "head") only predicts, so it runs in the inference precision (bf16
    where the CPU has it in hardware); every other recipe in the training one (see select_precision)."""
    precision = row["precision"]
    mode = precision["inference"] if row["trainable"].startswith("head") else precision["train"]
    return f"{'compiled' if row.get('compile_default') else 'eager'}-{mode}"


# ----------------------------------------------------------------------------------------------------------
# Targets and the report


def judge_targets(report: dict, device: torch.device) -> list[dict]:
    """The issue's targets, each met (True), missed (False) or not measurable here (None), with the number."""
    targets = []
    for r in report["recipes"]:
        targets.append(dict(target=f"{r['name']}: pipeline_overhead ≤ 0.10", met=r["pipeline_overhead"] <= 0.10,
                            value=f"{r['pipeline_overhead']:.3f} (pipeline alone: {r['pipeline_share_estimate']:.3f} "
                                  f"of a step)"))
    for r in report["recipes"]:
        if r.get("default_allocator_eager_fp32") and r["speeds"].get(r["chosen"]):
            gain = r["speedup_over_default_allocator"][r["chosen"]]
            targets.append(dict(target=f"{r['name']}: the chosen way ≥ 1.5x eager fp32 with glibc's default "
                                       f"allocator (the levels before it kept freed memory)", met=gain >= 1.5,
                                value=f"{r['chosen']}: {gain:.2f}x"))
    for r in report["recipes"]:
        if r.get("speeds") and r["speeds"].get("eager-fp32"):
            best = r["speeds"][r["fastest"]] / r["speeds"]["eager-fp32"]
            targets.append(dict(target=f"{r['name']}: the fastest way ≥ 1.5x eager fp32", met=best >= 1.5,
                                value=f"{r['fastest']}: {best:.2f}x"))
    if report["level1_cache"]:
        speedup = report["level1_cache"]["speedup"]
        targets.append(dict(target="Level 1: cached features ≥ 4x faster than the backbone every epoch (5 epochs)",
                            met=speedup >= 4, value=f"{speedup:.2f}x"))
    host = report["host"]
    targets.append(dict(target="Host memory for the data ≤ 1 GB",
                        met=max(host["data_bytes"], host["data_load_peak_increase_bytes"]) <= 1e9,
                        value=f"{host['data_bytes'] / 1e6:.0f} MB of uint8 images; peak resident memory rose by "
                              f"{host['data_load_peak_increase_bytes'] / 1e6:.0f} MB while loading them"))
    at_224 = [r for r in report["recipes"] if r["img_size"] >= 224]
    if device.type == "cuda" and report["precision"] != "fp32" and at_224:
        worst = max(r["peak_device_memory_bytes"] for r in at_224)
        targets.append(dict(target="Every level's default batch fits a 16 GB GPU (T4) at 224 px, mixed precision",
                            met=worst <= T4_MEMORY and len(at_224) == len(report["recipes"]),
                            value=f"largest peak {worst / 2**30:.1f} GiB, measured on {report['device']}"))
    else:
        targets.append(dict(target="Every level's default batch fits a 16 GB GPU (T4) at 224 px, mixed precision",
                            met=None, value="not measured: needs a GPU run at 224 px (python run.py bench)"))
    return targets


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def _rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["recipes"]:
        frac = "—" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.1%}"
        rows.append([r["name"], f"{r['model']} @ {r['img_size']} px, batch {r['batch_size']}",
                     f"{r['precision']['train']} / {r['precision']['inference']}", r["trainable"],
                     r["augmentation"], f"{r['train_images_per_second']:,.1f}",
                     f"{r['upper_bound_images_per_second']:,.1f}", f"{r['pipeline_overhead']:.3f}",
                     f"{r['pipeline_overhead_best_turns']:.3f}",
                     f"{1000 * r['pipeline_seconds_per_batch']:,.1f} ms/batch = {r['pipeline_share_estimate']:.3f}",
                     f"{r['eval_images_per_second']:,.1f}", f"{r['train_flops_per_image'] / 1e9:.2f}",
                     f"{r['achieved_flops_per_second'] / 1e12:.3f}", frac, _mb(r["peak_device_memory_bytes"])])
    return rows


COLUMNS = ["recipe", "model", "precision (train / eval)", "trained", "augmentation", "train img/s (real)", "train img/s (staged)",
           "pipeline_overhead", "(best turns)", "pipeline alone", "eval img/s", "train GFLOP/img", "TFLOP/s", "of peak", "peak device mem"]


def render_markdown(report: dict) -> str:
    lines = ["# Benchmark", "",
             f"Measured by `python run.py bench{' --quick' if report['profile'] == 'quick' else ''}"
             f"{' --compile' if report['compile'] else ''}` on **{report['device']}** (--precision "
             f"{report.get('precision_flag', report['precision'])}: each recipe's choice in the precision column), "
             f"torch {report['environment']['torch']}, {report['profile']} profile: each figure is the median of "
             f"{report['repeats']} turns of {report['steps']} training steps, real pipeline and pre-staged inputs "
             f"in alternation. Random weights (speed does not depend on them).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    lines += ["", "- **pipeline_overhead** = 1 − real / staged: the share of training throughput lost to the input "
              "pipeline (batch slicing, augmentation, normalization, resize) against the "
              "same training step fed model inputs already on the device: the median over the turns of each "
              "turn's ratio. **(best turns)**: the same from the fastest real and the fastest staged turn, a "
              "cross-check (noise from other work on the machine can only slow a turn down). **pipeline alone**: "
              "the batches made without training, per batch (median), and as a share of a real step, "
              "pipeline / (pipeline + staged step): what the overhead is where the two run one after the other "
              "(a CPU), an upper bound where they overlap (a GPU).",
              "- **TFLOP/s**: the training step's FLOPs (PyTorch's FlopCounterMode, forward and backward, a "
              "multiply-add counted as 2) times the real images per second. Peak: "
              f"{report['peak_flops_source']}."]
    compiled = [r for r in report["recipes"] if r["compiled"]]
    if compiled:
        lines += ["", "## torch.compile", "", "| recipe | eager img/s | compiled img/s | speedup | compiled "
                  "pipeline_overhead | compile + warm-up |", "|---|---|---|---|---|---|"]
        for r in compiled:
            c = r["compiled"]
            lines.append(f"| {r['name']} | {r['train_images_per_second']:,.1f} | {c['train_images_per_second']:,.1f}"
                         f" | {c['speedup_over_eager']:.2f}x | {c['pipeline_overhead']:.3f} | "
                         f"{c['compile_and_warmup_seconds']:.0f} s |")
    four_way = [r for r in report["recipes"] if r.get("speeds")]
    if four_way:
        def cell(r, key):
            value = r["speeds"][key]
            return "—" if value is None else f"{value:,.1f}" + (" **fastest**" if key == r["fastest"] else "")

        lines += ["", f"## `--profile {report['recipe_profile']}`: each recipe four ways", "",
                  "Training images per second through the real pipeline (the median of "
                  f"{report.get('four_way_repeats') or report['repeats']} turns), for each way "
                  "to run the same recipe; — where a way cannot run here (reasons below). **levels use**: what "
                  "the levels run by default (--precision auto, --no-compile).", "",
                  "| recipe | model | eager fp32 | eager bf16 | compiled fp32 | compiled bf16 | compile s "
                  "(paid back in 1 epoch?) | TFLOP/s (of peak) | levels use |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in four_way:
            payback = "; ".join(f"{k.split('-')[1]} {v['compile_seconds']:.0f} s "
                                f"({'yes' if v['paid_back_in_one_epoch'] else 'no'})"
                                for k, v in (r.get("compile_payback") or {}).items()) or "—"
            frac = "" if r["fraction_of_peak"] is None else f" ({r['fraction_of_peak']:.0%})"
            lines.append(f"| {r['name']} | {r['model']} @ {r['img_size']} px, batch {r['batch_size']} | "
                         + " | ".join(cell(r, k) for k in SPEED_KEYS)
                         + f" | {payback} | {r['achieved_flops_per_second'] / 1e12:.3f}{frac} | {r['chosen']} |")
        sizes = sorted({int(b) for r in four_way for b in r.get("eval_batch_speeds", {})})
        if sizes:
            lines += ["", "Inference images per second (validation, test, Level 1's feature pass) by batch size, on "
                      f"{report.get('eval_images') or 256} validation images; **levels use** the recipe's own batch.", "",
                      "| recipe | " + " | ".join(f"batch {b}" for b in sizes) + " | levels use |",
                      "|---|" + "---|" * (len(sizes) + 1)]
            for r in four_way:
                speeds = r.get("eval_batch_speeds", {})
                lines.append(f"| {r['name']} | " + " | ".join(f"{speeds[str(b)]:,.1f}" if str(b) in speeds else "—"
                                                               for b in sizes) + f" | batch {r['eval_batch_size']} |")
        baseline = [r for r in four_way if r.get("default_allocator_eager_fp32")]
        if baseline:
            allocator = report["environment"].get("allocator", "?")
            lines += ["", "The same speeds against the baseline: eager fp32 with glibc's default allocator, timed "
                      "first, before the process switched to what the levels use: "
                      f"{allocator} (common.device.keep_freed_memory says why).", "",
                      "| recipe | eager fp32, default allocator | eager fp32 | levels use | levels use / baseline |",
                      "|---|---|---|---|---|"]
            for r in baseline:
                chosen = r["speeds"].get(r["chosen"])
                gain = r["speedup_over_default_allocator"].get(r["chosen"])
                lines.append(f"| {r['name']} | {r['default_allocator_eager_fp32']:,.1f} | "
                             f"{r['speeds']['eager-fp32']:,.1f} | {r['chosen']}: "
                             + ("—" if chosen is None else f"{chosen:,.1f}") + " | "
                             + ("—" if gain is None else f"{gain:.2f}x") + " |")
        notes = {note for r in four_way for note in r["notes"].values()}
        lines += [""] + [f"- —: {note}." for note in sorted(notes)]
        lines.append(f"- Peak: {report['peak_flops_source']}.")
    precisions = [r for r in report["recipes"] if r.get("cpu_precisions")]
    if precisions:
        lines += ["", "## CPU: fp32 against bf16", "",
                  "The same recipe in fp32 and under bf16 autocast (images per second; the median of the turns). "
                  "`--precision auto` uses bf16 for inference on a CPU with bf16 hardware, and for training only "
                  "where it is faster (not for models with depthwise convolutions).", "",
                  "| recipe | train fp32 | train bf16 | bf16 / fp32 | eval fp32 | eval bf16 | bf16 / fp32 | auto chose |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in precisions:
            c, chosen = r["cpu_precisions"], r["precision"]
            lines.append(f"| {r['name']} | {c['fp32']['train_images_per_second']:,.1f} | "
                         f"{c['bf16']['train_images_per_second']:,.1f} | {c['bf16_train_speedup']:.2f}x | "
                         f"{c['fp32']['eval_images_per_second']:,.1f} | {c['bf16']['eval_images_per_second']:,.1f} | "
                         f"{c['bf16_eval_speedup']:.2f}x | train {chosen['train']}, inference {chosen['inference']} |")
    l1 = report["level1_cache"]
    if l1:
        lines += ["", "## Level 1: cached features against the backbone every epoch", "",
                  f"Level 1's own run ({l1['model']} at {l1['img_size']} px, {l1['epochs']} epochs, "
                  f"{l1['train_size']:,} / {l1['val_size']:,} / {l1['test_size']:,} train / validation / test "
                  f"images), features (when cached), training, validation and the test evaluation: "
                  f"**{l1['cached_seconds']:.1f} s** with cached features, **{l1['recompute_seconds']:.1f} s** "
                  f"running the frozen backbone every epoch (the original assessment's way): **{l1['speedup']:.2f}x**."]
    host = report["host"]
    lines += ["", "## Memory", "",
              f"- Host: the data (all 60,000 images, uint8) takes {host['data_bytes'] / 1e6:.0f} MB; peak resident "
              f"memory rose by {host['data_load_peak_increase_bytes'] / 1e6:.0f} MB while loading it; the whole "
              f"benchmark process peaked at {host['peak_bytes'] / 1e6:,.0f} MB (models, PyTorch and all).",
              "- Device: " + ("peak allocated per recipe in the table (training at the recipe's batch, with the "
                              "train split on the device)." if report["environment"]["device_type"] == "cuda"
                              else "not measured (no GPU in this run).")]
    lines += ["", "## Targets", "", "| target | met | value |", "|---|---|---|"]
    for t in report["targets"]:
        mark = {True: "✅", False: "❌", None: "➖ not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {mark} | {t['value']} |")
    for s in report["skipped"]:
        lines.append(f"\nSkipped level {s['level']}: {s['reason']}.")
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Benchmark: {report['device']} (--precision {report.get('precision_flag', report['precision'])}), "
                        f"{report['profile']} profile",
                  title_justify="left")
    shown = [i for i, name in enumerate(COLUMNS)  # the others are in bench.md (and precision in the lines below)
             if name not in ("precision (train / eval)", "trained", "augmentation")]
    for i in shown:
        table.add_column(COLUMNS[i], justify="left" if i < 2 else "right")
    for row in _rows(report):
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    for r in report["recipes"]:
        if r.get("cpu_precisions"):
            c = r["cpu_precisions"]
            console.print(f"{r['name']}, bf16 against fp32 on this CPU: training {c['bf16_train_speedup']:.2f}x, "
                          f"evaluation {c['bf16_eval_speedup']:.2f}x; auto chose training {r['precision']['train']}, "
                          f"inference {r['precision']['inference']}", highlight=False)
    l1 = report["level1_cache"]
    if l1:
        console.print(f"Level 1, {l1['epochs']} epochs end to end: cached features {l1['cached_seconds']:.1f} s, "
                      f"backbone every epoch {l1['recompute_seconds']:.1f} s: {l1['speedup']:.2f}x", highlight=False)
    for r in report["recipes"]:
        if r["compiled"]:
            console.print(f"torch.compile, {r['name']}: {r['compiled']['speedup_over_eager']:.2f}x over eager",
                          highlight=False)
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        console.print(f"target {mark}: {t['target']} ({t['value']})", highlight=False)
