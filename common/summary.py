"""OUT/summary.md: the results table, a section per level, and the evaluation checklist.

Every checkmark is computed from evidence: a number in a level's metrics.json or a file on disk. What no
program can judge is listed as not judged, never ticked; a level that has not run is listed as not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LEVELS = {
    1: "Transfer learning baseline",
    2: "Augmentation and fine-tuning",
    3: "Custom SE-attention architecture",
    4: "Ensemble of modern models",
}
ACCURACY_BARS = {1: 0.85, 2: 0.90, 3: 0.91, 4: 0.93}  # the seed's evaluation checklist

PASS, FAIL, NOT_JUDGED, NOT_RUN = "pass", "fail", "not judged", "not run"
MARKS = {PASS: "✅", FAIL: "❌", NOT_JUDGED: "➖ not judged", NOT_RUN: "⏳ not run"}


@dataclass
class Verdict:
    verdict: str
    evidence: str


# A checklist item: what it says, and how to judge it from (metrics, level folder). A judge of None marks an
# item that needs a human reader.
Judge = Callable[[dict, Path], Verdict]


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def accuracy_judge(level: int) -> Judge:
    def judge(m: dict, _: Path) -> Verdict:
        acc = m.get("test_accuracy")
        if acc is None:
            return Verdict(FAIL, f"no test accuracy (run {m.get('status')})")
        smoke = f" — smoke run on {m.get('test_size')} test images, not comparable" if m.get("quick") else ""
        ok = acc >= ACCURACY_BARS[level]
        return Verdict(PASS if ok else FAIL, f"{pct(acc)} {'≥' if ok else '<'} {pct(ACCURACY_BARS[level])}{smoke}")
    return judge


def figure_judge(key: str) -> Judge:
    def judge(m: dict, level_dir: Path) -> Verdict:
        path = m.get("figures", {}).get(key)  # relative to the output folder
        if path and (level_dir.parent / path).is_file() and (level_dir.parent / path).stat().st_size > 0:
            return Verdict(PASS, f"`{path}` on disk")
        return Verdict(FAIL, f"no {key} figure on disk" + (f" (`{path}` missing)" if path else ""))
    return judge


def _pretrained_judge(m: dict, _: Path) -> Verdict:
    cfg = m.get("config", {})
    if not cfg.get("pretrained"):
        return Verdict(FAIL, "--no-pretrained: random initialization")
    return Verdict(PASS, f"{cfg.get('model')} with " + (f"weights from `{cfg['weights']}`" if cfg.get("weights")
                                                        else "ImageNet weights from the timm hub"))


def _frozen_backbone_judge(m: dict, _: Path) -> Verdict:
    trainable, head, total = (m.get(k) for k in ("trainable_parameters", "head_parameters", "total_parameters"))
    if trainable is None:
        return Verdict(FAIL, "parameter counts not recorded")
    ok = trainable == head
    return Verdict(PASS if ok else FAIL, f"{trainable:,} of {total:,} parameters trained (head: {head:,})")


def _test_once_judge(m: dict, _: Path) -> Verdict:
    n = m.get("test_evaluations")
    ok = n == 1 and m.get("best_epoch") is not None
    return Verdict(PASS if ok else FAIL, f"test set evaluated {n} time(s); epoch {m.get('best_epoch')} "
                                         f"chosen on validation accuracy")


CHECKLISTS: dict[int, list[tuple[str, Judge | None]]] = {
    1: [
        ("Test accuracy ≥ 85%", accuracy_judge(1)),
        ("ImageNet-pretrained backbone", _pretrained_judge),
        ("Backbone frozen, only the new head trained", _frozen_backbone_judge),
        ("Training curves (loss and accuracy) plotted", figure_judge("curves")),
        ("Test set used once, after choosing the epoch on validation", _test_once_judge),
        ("Results discussed and explained in writing", None),
    ],
}


def judge_level(level: int, metrics: dict | None, level_dir: Path) -> list[tuple[str, Verdict]]:
    items = CHECKLISTS.get(level, [(f"Test accuracy ≥ {ACCURACY_BARS[level]:.0%}", accuracy_judge(level))])
    verdicts = []
    for item, judge in items:
        if metrics is None:
            verdicts.append((item, Verdict(NOT_RUN, "level not run yet")))
        elif judge is None:
            verdicts.append((item, Verdict(NOT_JUDGED, "needs a human reader")))
        else:
            verdicts.append((item, judge(metrics, level_dir)))
    return verdicts


# ----------------------------------------------------------------------------------------------------------


def load_metrics(out_dir: Path) -> dict[int, dict]:
    found = {}
    for level in LEVELS:
        path = Path(out_dir) / f"level{level}" / "metrics.json"
        if path.is_file():
            try:
                found[level] = json.loads(path.read_text())
            except json.JSONDecodeError:
                found[level] = dict(level=level, status=f"unreadable metrics.json ({path})")
    return found


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render_summary(out_dir: Path) -> str:
    out_dir = Path(out_dir)
    runs = load_metrics(out_dir)
    lines = ["# CIFAR-10 in four levels: results", "",
             "Every number below was measured by the run that wrote it; every checkmark is computed from "
             "those numbers and the files on disk. Smoke runs (`--quick`) use a small subset, one epoch and "
             "tiny images: their numbers show that the code works, not what the method achieves.", "",
             "| level | approach | status | test accuracy | val accuracy | training time | device | run |",
             "|---|---|---|---|---|---|---|---|"]
    for level, name in LEVELS.items():
        m = runs.get(level)
        if m is None:
            lines.append(f"| {level} | {name} | not run | — | — | — | — | — |")
            continue
        env = m.get("environment") or {}
        kind = "smoke (not comparable)" if m.get("quick") else "full"
        lines.append(f"| {level} | {m.get('approach', name)} | {m.get('status')} | {pct(m.get('test_accuracy'))} | "
                     f"{pct(m.get('val_accuracy'))} | {_minutes(m.get('train_seconds'))} | "
                     f"{env.get('device', '—')} | {kind} |")

    for level, name in LEVELS.items():
        m = runs.get(level)
        lines += ["", f"## Level {level}: {name}", ""]
        if m is None:
            lines.append(f"Not run yet: `python run.py level {level}`.")
            continue
        lines += _level_section(m, out_dir)

    lines += ["", "## Evaluation checklist", "",
              "✅ met, ❌ not met (with the number), ➖ not judged (needs a human reader), ⏳ not run.", "",
              "| level | item | result | evidence |", "|---|---|---|---|"]
    for level in LEVELS:
        for item, v in judge_level(level, runs.get(level), out_dir / f"level{level}"):
            lines.append(f"| {level} | {item} | {MARKS[v.verdict]} | {v.evidence} |")
    return "\n".join(lines) + "\n"


def _level_section(m: dict, out_dir: Path) -> list[str]:
    cfg, env = m.get("config", {}), m.get("environment") or {}
    lines = []
    if m.get("quick"):
        lines += ["> Smoke run (`--quick`): not comparable with a full run.", ""]
    lines += [f"- Status: **{m.get('status')}**" + (f" — {m['error']}" if m.get("error") else ""),
              f"- Test accuracy: **{pct(m.get('test_accuracy'))}** on {m.get('test_size')} images; "
              f"validation {pct(m.get('val_accuracy'))} on {m.get('val_size')}; trained on {m.get('train_size')}",
              f"- Model: {cfg.get('model')} at {cfg.get('img_size')} px, {cfg.get('epochs')} epoch(s), "
              f"batch {cfg.get('batch_size')}, lr {cfg.get('lr')}",
              f"- Time: {_minutes(m.get('train_seconds'))} training, {_minutes(m.get('total_seconds'))} in all, on "
              f"{env.get('device', '—')} ({env.get('precision', '—')})",
              f"- Command: `{m.get('command', '')}`"]
    for section in m.get("sections", []):
        lines += ["", f"### {section['heading']}", "", section["markdown"]]
    for key, path in m.get("figures", {}).items():
        lines += ["", f"![{key}]({path})" if (out_dir / path).is_file() else f"_{key}: figure missing ({path})_"]
    return lines


def write_summary(out_dir: Path) -> Path:
    from common.results import write_text_atomic

    path = Path(out_dir) / "summary.md"
    write_text_atomic(path, render_summary(out_dir))
    return path
