"""README.md's generated blocks: the results table, the speed table and the pictures, made from the kept records
(results/, common/runner/filing.py).

The results block also says what data the records ran on (their `data`) and sets each level beside the peers,
the fastest known recipes trained from scratch on the same data (results/cpu/peers.json, common/runner/peers.py).
The README holds three generated blocks, each between marker comments:
`<!-- results:start ... -->` ... `<!-- results:end -->`, and the same for `speed` and `pictures`. `python run.py summary --readme` rewrites them from
results/cpu/*.json and results/gpu/*.json; tests/test_readme.py fails when the README's blocks differ from what this
code makes of the records, so a number typed by hand, or a table left stale, cannot stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.io import write_text_atomic
from common.runner.peers import against_cell, against_header, load_peers, readme_peers
from common.runner.summary import ACCURACY_BARS, LEVELS, compiled_text, result_cells, time_text

TEACHES = {
    1: "transfer learning: a frozen ImageNet backbone and a new linear head",
    2: "per-image augmentation and partial fine-tuning, with a 2×2 ablation",
    3: "a hand-written Squeeze-and-Excitation block; per-class analysis",
    4: "an ensemble of different kinds of models (three by default), modern regularization and TTA",
}
HISTORY_PAGE = "docs/results-history.md"  # the earlier measurements, made before records were kept
RECORDS_PAGE = "docs/records.md"  # how a run is filed as a record


@dataclass
class Picture:
    level: int
    key: str  # the figure's key in the record (a level's run.add_figure)
    title: str
    look_for: str  # the one-line caption: what to look for


# In the README's order. Learning curves: the first level with a record of them among 3, 2, 1 (Level 3's show
# what augmentation does to the gap between train and validation).
PICTURES = [
    *(Picture(level, "curves", f"Level {level}'s learning curves",
              "loss and accuracy per epoch, train against validation. Look at the gap between the two: a widening "
              "gap is overfitting; curves still rising at the end mean more epochs would help.")
      for level in (3, 2, 1)),
    Picture(2, "augmentation", "Level 2's augmentation",
            "each row is a training image and five views of it, drawn by the function training uses. Look at how "
            "each view gets its own crop, flip and colours: the model never sees exactly the same image twice."),
    Picture(3, "confusion_matrix", "Level 3's confusion matrix",
            "row: the true class, column: the prediction, each row summing to 1. Look off the diagonal: the "
            "darkest cells there are the pairs of classes the model mixes up."),
    Picture(3, "top_losses", "Level 3's top losses",
            "the test images the model gets most confidently wrong, with the true class and the prediction. Look "
            "for what they share: unusual poses, clutter, images a person would hesitate over too."),
    Picture(3, "gradcam", "Grad-CAM on Level 3's model",
            "where the final feature map drove the decision, for the most confident right and wrong predictions. "
            "Look whether the heat sits on the object or on the background (it is as coarse as that map)."),
    Picture(3, "se_gates", "Level 3's SE gates",
            "per class, the mean gate the SE block gives each of the channels that differ most between classes. "
            "Look for columns that change from row to row: the block turns channels up or down per image."),
    Picture(4, "accuracy", "Level 4's members and ensembles",
            "test accuracy of each member and ensemble, without and with TTA. Look at the height of the ensembles "
            "against the best member: that difference is what combining models buys."),
    Picture(4, "reliability", "Level 4's reliability diagram",
            "accuracy against confidence. Look at the distance from the diagonal: below it a model is "
            "overconfident, above it underconfident."),
]


def _bar_text(level: int, m: dict | None) -> str:
    bar = f"≥ {ACCURACY_BARS[level]:.0%}"
    if m is None or m.get("test_accuracy") is None:
        return bar
    return f"{bar}: {'met' if m['test_accuracy'] >= ACCURACY_BARS[level] else 'not met'}"


def _model_text(m: dict) -> str:
    """"efficientnet_lite0 at 224 px"; for Level 4 its members, each at its own size when they differ (a member
    trained from scratch sees 32 px)."""
    cfg, members = m.get("config") or {}, m.get("members") or {}
    sizes = {name: r.get("img_size") for name, r in members.items() if r.get("img_size")}
    if sizes and len(set(sizes.values())) > 1:
        return ", ".join(f"{name} at {size} px" for name, size in sizes.items())
    models = ", ".join(members) or (cfg.get("models") or cfg.get("model") or "—").replace(",", ", ")
    size = next(iter(sizes.values()), None) or cfg.get("img_size")
    return f"{models} at {size} px" if size else models


def _accuracy_text(m: dict, link: str) -> str:
    """"**78.32%** ± 0.41 ([record](results/cpu/level1.json))": the test accuracy with one standard error."""
    from common.stats import standard_error

    se = 100 * standard_error(m["test_accuracy"], m["test_size"])
    return f"**{result_cells(m).test}** ± {se:.2f} ([record]({link}))"


def _script_link(level: int) -> str:
    """"[1](levels/level1_baseline.py)": the level's number, linking to its script."""
    root = Path(__file__).resolve().parents[2]  # the repository (this file: common/runner/readme.py)
    script = next(root.glob(f"levels/level{level}_*.py"), None)
    return f"[{level}]({script.relative_to(root).as_posix()})" if script else str(level)


def _levels_text(levels: list[int]) -> str:
    """"Level 2", "Levels 1 and 3", "Levels 1, 2, 3 and 4"."""
    names = [str(level) for level in levels]
    return f"Level {names[0]}" if len(names) == 1 else f"Levels {', '.join(names[:-1])} and {names[-1]}"


def readme_data(cpu: dict[int, dict]) -> str:
    """The line under the results table that says what the records' data is: their `data` descriptions, grouped
    (one phrase when every level ran on the same images)."""
    groups: dict[tuple, list[int]] = {}
    for level, m in sorted(cpu.items()):
        d = m.get("data") or {}
        key = tuple(d.get(k) for k in ("layout", "files", "train_images", "test_images", "fingerprint")) \
            + (m.get("train_size"), m.get("val_size"), bool(d.get("described")))
        groups.setdefault(key, []).append(level)
    phrases = []
    for (layout, files, train, test, fingerprint, train_size, val_size, added), levels in groups.items():
        if fingerprint is None:
            phrases.append(f"{_levels_text(levels)}: the record does not describe its data")
            continue
        what = f"an image folder of {files} files" if layout == "image folder" else f"the {layout}, {files}"
        phrases.append(f"{_levels_text(levels)} ran on {what}: {train:,} training images (the "
                       f"levels train on {train_size:,} and validate on the other {val_size:,}) and {test:,} test "
                       f"images, content fingerprint `{fingerprint}` (the sha256 of the decoded images and labels)"
                       + (", described from that folder when the records, made before runs described their data, "
                          "were converted" if added else ""))
    return "**Data**: " + ("; ".join(phrases) if phrases else "no record kept yet") + "."


def readme_results(cpu: dict[int, dict], gpu: dict[int, dict], peers: dict | None = None) -> list[str]:
    """The README's results table: a row per level, the CPU profile's kept record (or "not yet recorded"), its
    distance from the peers on the same data (results/cpu/peers.json), and the GPU recipe's (or "unmeasured");
    then what the data is, and the peers."""
    lines = [f"| level | what it teaches | CPU profile: test accuracy | {against_header(peers)} | bar | time "
             f"| hardware | model | GPU recipe |", "|---|---|---|---|---|---|---|---|---|"]
    for level in LEVELS:
        m, g = cpu.get(level), gpu.get(level)
        number = _script_link(level)
        on_gpu = "unmeasured: no GPU run recorded" if g is None else \
            f"{_accuracy_text(g, f'results/gpu/level{level}.json')}, {time_text(g)} on {result_cells(g).device}"
        if m is None:
            lines.append(f"| {number} | {TEACHES[level]} | not yet recorded ([earlier measurements]"
                         f"({HISTORY_PAGE}#level-{level})) | — | {_bar_text(level, None)} | — | — | — | "
                         f"{on_gpu} |")
            continue
        lines.append(f"| {number} | {TEACHES[level]} | {_accuracy_text(m, f'results/cpu/level{level}.json')} | "
                     f"{against_cell(m, peers)} | {_bar_text(level, m)} | {time_text(m)}{compiled_text(m)} | "
                     f"{result_cells(m).device} | {_model_text(m)} | {on_gpu} |")
    fingerprints = {(m.get("data") or {}).get("fingerprint") for m in cpu.values()}
    return [*lines, "", readme_data(cpu), "", *readme_peers(peers, next(iter(fingerprints)) if len(fingerprints) == 1
                                                             else None)]


def readme_pictures(cpu: dict[int, dict]) -> list[str]:
    """The README's pictures: each figure the records kept in docs/img (see PICTURES), with its caption."""
    lines, curves_shown = [], False
    for picture in PICTURES:
        path = ((cpu.get(picture.level) or {}).get("record") or {}).get("figures", {}).get(picture.key)
        if path is None or (picture.key == "curves" and curves_shown):
            continue
        curves_shown = curves_shown or picture.key == "curves"
        lines += [f"![{picture.title}]({path})", "", f"*{picture.title}*: {picture.look_for}", ""]
    if not lines:
        return ["No run has been filed as a record yet, so there are no pictures here yet. Every run draws its own",
                f"in `outputs/levelN/`; filing a finished full-data run ([how results are kept]({RECORDS_PAGE})) "
                "puts them here."]
    return lines[:-1]


def readme_speed(results_dir: Path) -> list[str]:
    """The README's speed table: each kept benchmark (results/cpu/bench/*.json, written by `python run.py bench
    --profile cpu`), every recipe's training images/s four ways, and the way the levels use."""
    import json

    from common.runner.bench_report import chosen_mode

    lines, runs = [], []
    for path in sorted(Path(results_dir).glob("*/bench/*.json")):
        report = json.loads(path.read_text())
        link = f"[record]({path.relative_to(Path(results_dir).parent).as_posix()})"
        if report.get("total_seconds") is not None:  # benchmarks before 7 December did not keep how long they took
            runs.append(f"- {link}: `python {report['command']}`, {report['started_at']}, "
                        f"{report['total_seconds'] / 60:.1f} min in all, on {report['device']}.")
        for r in report.get("recipes", []):
            if not r.get("speeds"):
                continue
            cells = ["—" if r["speeds"].get(k) is None else f"{r['speeds'][k]:,.0f}"
                     for k in ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16")]
            compile_s = ", ".join(f"{v['compile_seconds']:.0f} s" for v in (r.get("compile_payback") or {}).values())
            baseline = r.get("default_allocator_eager_fp32")  # benchmarks before keep_freed_memory() lack it
            gain = (r.get("speedup_over_default_allocator") or {}).get(chosen_mode(r))
            lines.append(f"| {r['name']} | {r['model']} @ {r['img_size']} px, batch {r['batch_size']} | "
                         + ("—" if baseline is None else f"{baseline:,.0f}") + " | "
                         + " | ".join(cells) + f" | {compile_s or '—'} | {r['fraction_of_peak']:.0%} | "
                         f"{chosen_mode(r)}" + ("" if gain is None else f" ({gain:.2f}x)")
                         + f" | {report['device']} | {link} |")
    if not lines:
        return ["No benchmark has been kept yet (`python run.py bench --profile cpu`, then copy its bench.json "
                "into results/cpu/bench/)."]
    return ["| recipe | model | baseline | eager fp32 | eager bf16 | compiled fp32 | compiled bf16 | compile | of peak "
            "| the levels use (÷ baseline) | hardware | |", "|---|---|---|---|---|---|---|---|---|---|---|---|", *lines,
            *([""] + runs if runs else [])]


def _replace_block(text: str, name: str, body: list[str]) -> str:
    import re

    pattern = re.compile(rf"(<!-- {name}:start[^\n]*-->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no `<!-- {name}:start -->` ... `<!-- {name}:end -->` block")
    return pattern.sub(lambda found: found.group(1) + "\n".join(body) + "\n" + found.group(2), text, count=1)


def render_readme(text: str, results_dir: Path | None = None) -> str:
    """The README's text with its results table and pictures made from the records in `results_dir`."""
    from common.runner.filing import RESULTS_DIR, load_records

    results_dir = results_dir or RESULTS_DIR
    cpu, gpu = load_records("cpu", results_dir), load_records("gpu", results_dir)
    text = _replace_block(text, "results", readme_results(cpu, gpu, load_peers(results_dir)))
    text = _replace_block(text, "speed", readme_speed(results_dir))
    return _replace_block(text, "pictures", readme_pictures(cpu))


def write_readme(readme: Path, results_dir: Path | None = None) -> bool:
    """Regenerate the README's blocks from the records; True when that changed the file."""
    text = readme.read_text()
    new = render_readme(text, results_dir)
    if new != text:
        write_text_atomic(readme, new)
    return new != text
