"""OUT/summary.md: the results table, a section per level, and the evaluation checklist.

Every checkmark is computed from evidence: a number in a level's metrics.json or a file on disk. What no
program can judge is listed as not judged, never ticked; a level that has not run is listed as not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.io import write_text_atomic
from common.records import load_metrics

LEVELS = {
    1: "Transfer learning baseline",
    2: "Augmentation and fine-tuning",
    3: "Custom SE-attention architecture",
    4: "Ensemble of modern models",
}
ACCURACY_BARS = {1: 0.85, 2: 0.90, 3: 0.91, 4: 0.93}  # the seed's evaluation checklist


def meets_bar(level: int, accuracy: float) -> bool:
    """Whether a test accuracy reaches the level's bar. The levels count their accuracy in float32 (a mean of
    right/wrong on the device): 9,000 right of 10,000 is recorded as 0.89999998, which is 90.00% and must meet a
    90% bar. One image of 10,000 is 1e-4, far above float32's rounding (below 1e-7 here)."""
    return accuracy >= ACCURACY_BARS[level] - 1e-6


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
        ok = meets_bar(level, acc)
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


# -- Levels 2 and 3


def precision_text(m: dict) -> str:
    """"training fp32, inference bf16" where the run recorded both: once for Levels 1 to 3, per member for
    Level 4 (one phrase when the members agree); else the device's default. The summary and Level 4's report."""
    chosen = m.get("precision") or {}
    if isinstance(chosen, dict) and "train" in chosen:
        return f"training {chosen['train']}, inference {chosen['inference']}"
    per_member = {name: p for name, p in chosen.items() if isinstance(p, dict) and "train" in p} \
        if isinstance(chosen, dict) else {}
    phrases = {name: f"training {p['train']}, inference {p['inference']}" for name, p in per_member.items()}
    if phrases and len(set(phrases.values())) == 1:
        return next(iter(phrases.values())) + ", every member"
    if phrases:
        return "; ".join(f"{name}: {phrase}" for name, phrase in phrases.items())
    return (m.get("environment") or {}).get("precision", "—")


def time_text(m: dict) -> str:
    """Training time and time in all. A record from before --resume counted earlier processes (metrics without
    resumed_after_seconds) may hold less "in all" than training: it is then only the last process's time."""
    train, total = m.get("train_seconds"), m.get("total_seconds")
    text = f"{_minutes(train)} training, "
    if m.get("resumed_after_seconds"):
        return text + f"{_minutes(total)} in all ({_minutes(m['resumed_after_seconds'])} of it before --resume)"
    if train is not None and total is not None and total < train:
        return text + f"{_minutes(total)} in the last process (resumed; the earlier processes' time not recorded)"
    return text + f"{_minutes(total)} in all"


def compiled_text(m: dict) -> str:
    """", trained with --compile" when the run trained through torch.compile (metrics' `compile`), else ""."""
    return ", trained with `--compile`" if (m.get("compile") or {}).get("used") else ""


def _section(m: dict, heading: str) -> str:
    """The markdown of the level's section whose heading starts with `heading` ("" when there is none)."""
    return next((s.get("markdown", "") for s in m.get("sections", []) if s.get("heading", "").startswith(heading)), "")


def _main_run_name(m: dict) -> str:
    """Level 2's main configuration in words, e.g. "augmentation, whole network"."""
    return m.get("configuration", {}).get("name", "—")


def _augmentation_judge(m: dict, _: Path) -> Verdict:
    steps = m.get("augmentation")
    if steps is None:
        return Verdict(FAIL, "no augmentation recorded")
    if not steps:
        return Verdict(FAIL, f"the main run ({_main_run_name(m)}) trained without "
                             f"augmentation; see the ablation's choice")
    return Verdict(PASS, "per image, on the device, at 32×32: " + "; ".join(steps))


def _partial_fine_tuning_judge(m: dict, _: Path) -> Verdict:
    trainable, head, stage, total = (m.get(k) for k in ("trainable_parameters", "head_parameters",
                                                         "last_stage_parameters", "total_parameters"))
    if None in (trainable, head, stage, total):
        return Verdict(FAIL, "parameter counts not recorded")
    if trainable == head:
        return Verdict(FAIL, f"the main run ({_main_run_name(m)}) trained the head alone: "
                             f"{head:,} of {total:,} parameters")
    if trainable == total:
        return Verdict(FAIL, f"the main run ({_main_run_name(m)}) trained the whole "
                             f"network: {total:,} of {total:,} parameters, nothing frozen")
    ok = trainable == head + stage < total
    return Verdict(PASS if ok else FAIL, f"{trainable:,} of {total:,} parameters trained (last stage {stage:,}, "
                                         f"head {head:,}); the rest frozen, BatchNorm statistics included")


def _ablation_judge(m: dict, level_dir: Path) -> Verdict:
    study = m.get("ablation") or {}
    measured = {(a.get("augment"), a.get("fine_tune")) for a in study.get("arms", [])
                if a.get("val_accuracy") is not None}
    figure = figure_judge("ablation")(m, level_dir)
    table = "| configuration |" in _section(m, "Ablation")
    ok = len(measured) == 4 and table and figure.verdict == PASS
    return Verdict(PASS if ok else FAIL, f"{len(measured)} of 4 arms measured on validation, "
                                         f"{study.get('epochs_per_arm', '—')} epoch(s) each; table "
                                         f"{'in this summary' if table else 'missing'}; {figure.evidence}")


def _improvement_analysis_judge(m: dict, _: Path) -> Verdict:
    text = m.get("improvement_analysis") or ""
    present = bool(text) and text in _section(m, "Improvement analysis")
    level1 = m.get("level1_comparison")
    against = (f"compares with Level 1 ({level1['points']:+.2f} points)" if level1
               else "Level 1 not run in this output folder, said so")
    return Verdict(PASS if present else FAIL, f"{len(text.split())} words, written from the measured accuracies; "
                                              f"{against}" if present else "no improvement analysis")


def _se_block_judge(m: dict, _: Path) -> Verdict:
    blocks, params = m.get("se_blocks"), m.get("se_parameters")
    if not blocks:
        return Verdict(FAIL, "no SE block counted in the trained model")
    ok = bool(params) and m.get("se_trained") is True
    return Verdict(PASS if ok else FAIL, f"{blocks} SqueezeExcitation block(s) counted in the trained model "
                                         f"({params:,} parameters, {'trained' if ok else 'not trained'})")


def _per_class_judge(m: dict, level_dir: Path) -> Verdict:
    path = (m.get("files") or {}).get("per_class")
    if not path or not (level_dir.parent / path).is_file():
        return Verdict(FAIL, "no per-class table on disk")
    rows = (level_dir.parent / path).read_text().splitlines()[1:]
    named = {row.split(",")[0] for row in rows}
    from common.data import CLASSES

    ok = set(CLASSES) <= named
    return Verdict(PASS if ok else FAIL, f"`{path}`: precision, recall and F1 for {len(named & set(CLASSES))} of "
                                         f"10 classes")


def _findings_judge(m: dict, _: Path) -> Verdict:
    findings, text = m.get("findings") or {}, _section(m, "Findings")
    pairs = findings.get("confused_pairs") or []
    ok = bool(text) and bool(pairs) and bool(findings.get("best_classes")) and bool(findings.get("worst_classes"))
    if not ok:
        return Verdict(FAIL, "no findings section")
    top = pairs[0]
    return Verdict(PASS, f"written from the numbers: best {findings['best_classes'][0]['class']}, worst "
                         f"{findings['worst_classes'][0]['class']}, most confused {top['pair'][0]}↔{top['pair'][1]}")


CHECKLISTS[2] = [
    ("Test accuracy ≥ 90%", accuracy_judge(2)),
    ("Augmentation pipeline in use (flip, 4-pixel crop, colour jitter; per image)", _augmentation_judge),
    ("Partial fine-tuning: last stage (layer4) + head trained, the rest frozen", _partial_fine_tuning_judge),
    ("Ablation table: augmentation × fine-tuning, on validation", _ablation_judge),
    ("Improvement analysis present", _improvement_analysis_judge),
    ("Training curves (loss and accuracy) plotted", figure_judge("curves")),
    ("Test set used once, after choosing on validation", _test_once_judge),
    ("The improvement analysis's conclusions hold up", None),
]
CHECKLISTS[3] = [
    ("Test accuracy ≥ 91%", accuracy_judge(3)),
    ("Custom architecture: SE block present in the trained model", _se_block_judge),
    ("Per-class precision, recall and F1 table on disk", _per_class_judge),
    ("Normalised confusion matrix with class names on disk", figure_judge("confusion_matrix")),
    ("Findings section present (best and worst classes, confused pairs, change against Level 2)", _findings_judge),
    ("Training curves (loss and accuracy) plotted", figure_judge("curves")),
    ("Test set used once, after choosing the epoch on validation", _test_once_judge),
    ("The findings' interpretation is sound", None),
]


# -- Level 4


def _members_trained_judge(m: dict, level_dir: Path) -> Verdict:
    members = m.get("members") or {}
    saved = bool(m.get("model_file")) and (level_dir.parent / m["model_file"]).is_file()
    done = [name for name, r in members.items() if r.get("status") == "trained" and r.get("best_epoch") and saved]
    ok = len(done) >= 3
    detail = ", ".join(f"{n} ({len(members[n].get('history', []))} epoch(s)"
                       f"{', resumed' if members[n].get('resumed_epochs') else ''})" for n in done)
    from common.members import member_network

    networks = len({member_network(n) for n in done})  # NAME#2 is NAME's network again, with another seed
    copies = f"; {networks} different networks (NAME#2: a copy with another seed)" if networks < len(done) else ""
    return Verdict(PASS if ok else FAIL, f"{len(done)} model(s) trained and saved in `{m.get('model_file')}`: "
                                         f"{detail or 'none'}{copies}")


def _ensemble_judge(m: dict, _: Path) -> Verdict:
    rows = {r.get("name"): r for r in m.get("comparison") or []}
    found = [n for n in ("soft vote", "weighted vote") if (rows.get(n) or {}).get("test_accuracy") is not None]
    weights = (m.get("ensemble_weights") or {}).get("weighted vote")
    ok = len(found) == 2 and bool(weights) and m.get("weights_fitted_on") == "validation"
    if not ok:
        return Verdict(FAIL, f"ensembles evaluated: {', '.join(found) or 'none'}")
    return Verdict(PASS, f"soft vote {pct(rows['soft vote']['test_accuracy'])}, weighted vote "
                         f"{pct(rows['weighted vote']['test_accuracy'])} on test; weights fitted on validation ("
                         + ", ".join(f"{k} {w:.2f}" for k, w in weights.items()) + f"); chosen: {m.get('chosen')}")


def _comparison_judge(m: dict, _: Path) -> Verdict:
    members = list(m.get("members") or {})
    rows = {r.get("name"): r for r in m.get("comparison") or []}
    expected = [f"{n}{s}" for s in ("", " + TTA") for n in (*members, "soft vote", "weighted vote")]
    columns = ("val_accuracy", "test_accuracy", "test_log_loss", "test_ece", "parameters", "train_seconds",
               "images_per_second")
    complete = [n for n in expected if n in rows and all(rows[n].get(c) is not None for c in columns)]
    pairs = len(m.get("disagreement") or {})
    table = "| model | TTA |" in _section(m, "Members and ensembles compared")
    per_class = len(m.get("per_class") or [])
    ok = members and len(complete) == len(expected) and table and pairs == len(members) * (len(members) - 1) // 2 \
        and per_class == 10
    return Verdict(PASS if ok else FAIL, f"{len(complete)} of {len(expected)} rows (every member and ensemble, "
                                         f"without and with TTA) with accuracy, log-loss, ECE, parameters, time and "
                                         f"img/s; table {'in this summary' if table else 'missing'}; {pairs} "
                                         f"disagreement pair(s); per-class gains for {per_class} classes")


def _report_judge(m: dict, level_dir: Path) -> Verdict:
    path = m.get("report")
    if not path or not (level_dir.parent / path).is_file():
        return Verdict(FAIL, "no report on disk")
    text = (level_dir.parent / path).read_text()
    sections = ("Motivation", "Methods", "Setup", "Results", "Analysis", "Limitations", "How to reproduce")
    missing = [s for s in sections if f"\n## {s}\n" not in text]
    number = pct(m.get("test_accuracy"))
    ok = not missing and number in text
    return Verdict(PASS if ok else FAIL, f"`{path}`: " + (f"missing {', '.join(missing)}" if missing else
                                                          f"all {len(sections)} sections")
                   + (f"; quotes this run's test accuracy ({number})" if number in text else
                      "; does not quote this run's test accuracy"))


def _figures_judge(m: dict, level_dir: Path) -> Verdict:
    verdicts = [figure_judge(k)(m, level_dir) for k in ("accuracy", "reliability")]
    return Verdict(PASS if all(v.verdict == PASS for v in verdicts) else FAIL, "; ".join(v.evidence for v in verdicts))


def _regularization_judge(m: dict, _: Path) -> Verdict:
    cfg = m.get("config", {})
    used = {"MixUp": cfg.get("mixup"), "CutMix": cfg.get("cutmix"),
            f"label smoothing {cfg.get('label_smoothing')}": (cfg.get("label_smoothing") or 0) > 0,
            f"stochastic depth {cfg.get('drop_path')}": (cfg.get("drop_path") or 0) > 0,
            "AutoAugment (CIFAR-10 policy)": cfg.get("autoaugment")}
    off = [k for k, on in used.items() if not on]
    return Verdict(FAIL if off else PASS, ("off: " + ", ".join(off)) if off else "on: " + ", ".join(used))


ENSEMBLE_GAIN_POINTS = 0.5  # Level 4's target: the ensemble ahead of its best member by at least this, on test


def _ensemble_gain_judge(m: dict, _: Path) -> Verdict:
    gain, reference = m.get("gain_over_best_member"), m.get("best_member")
    if not gain or gain.get("points") is None:
        return Verdict(FAIL, "no gain over the best member recorded")
    if str(m.get("chosen", "")).endswith("TTA"):
        reference = f"{reference} + TTA"
    ok = gain["points"] >= ENSEMBLE_GAIN_POINTS
    return Verdict(PASS if ok else FAIL, f"{gain['points']:+.2f} points {'≥' if ok else '<'} "
                                         f"+{ENSEMBLE_GAIN_POINTS:.2f} over {reference} (± "
                                         f"{gain.get('standard_error_points', 0):.2f}, paired on the same test images)")


CHECKLISTS[4] = [
    ("Test accuracy ≥ 93%", accuracy_judge(4)),
    ("At least three models trained", _members_trained_judge),
    ("Ensemble implemented and evaluated (soft and weighted voting, weights fitted on validation)", _ensemble_judge),
    (f"Ensemble ahead of its best member by ≥ {ENSEMBLE_GAIN_POINTS} points on test", _ensemble_gain_judge),
    ("Comparative table: every member and ensemble, with and without TTA", _comparison_judge),
    ("Report present with its sections (motivation, methods, setup, results, analysis, limitations, "
     "reproduction)", _report_judge),
    ("Accuracy comparison chart and reliability diagram", _figures_judge),
    ("Modern regularization on (MixUp, CutMix, label smoothing, stochastic depth, AutoAugment)",
     _regularization_judge),
    ("The report's analysis is sound and its conclusions follow from the numbers", None),
]


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


def status_text(m: dict) -> str:
    """The status, with how far a run that did not complete got (its finished epochs)."""
    status = m.get("status") or "—"
    if status in ("running", "interrupted", "failed"):
        epochs = (m.get("config") or {}).get("epochs")
        done = len(m.get("history") or [])
        if m.get("members") is not None:  # Level 4: the epochs of every member, the one in training included
            done = sum(len(r.get("history") or []) for r in m["members"].values())
            names = [n.strip() for n in str(m["config"].get("models", "")).split(",") if n.strip()]
            # the from-scratch member has its own epoch count (--cifarnet-epochs)
            epochs = sum(m["config"].get("cifarnet_epochs", epochs) if n == "cifarnet" else epochs
                         for n in names) or epochs
        status += f" after {done}" + (f" of {epochs}" if epochs else "") + " epoch(s)"
    if m.get("recorded_status") == "running" and m.get("status") == "interrupted":
        status += " (killed: its process is gone)"
    return status


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@dataclass
class ResultCells:
    """One run's numbers as the results tables show them: summary.md's and the README's share this, so the two
    format a record the same way."""
    status: str
    test: str
    val: str
    train_time: str
    device: str
    kind: str


def result_cells(m: dict) -> ResultCells:
    return ResultCells(status=status_text(m), test=pct(m.get("test_accuracy")), val=pct(m.get("val_accuracy")),
                       train_time=_minutes(m.get("train_seconds")),
                       device=(m.get("environment") or {}).get("device", "—"),
                       kind="smoke (not comparable)" if m.get("quick") else "full")


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
        c = result_cells(m)
        lines.append(f"| {level} | {m.get('approach', name)} | {c.status} | {c.test} | {c.val} | {c.train_time} | "
                     f"{c.device} | {c.kind} |")
    if (out_dir / "bench.md").is_file():  # written by `python run.py bench`
        lines += ["", "Speed: [the benchmark](bench.md) (training throughput against the device's limit, per level)."]

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
    lines += [f"- Status: **{status_text(m)}**" + (f" — {m['error']}" if m.get("error") else ""),
              f"- Test accuracy: **{pct(m.get('test_accuracy'))}** on {m.get('test_size')} images; "
              f"validation {pct(m.get('val_accuracy'))} on {m.get('val_size')}; trained on {m.get('train_size')}",
              f"- Model: {cfg.get('model')} at {cfg.get('img_size')} px, {cfg.get('epochs')} epoch(s), "
              f"batch {cfg.get('batch_size')}, lr {cfg.get('lr')}" if not m.get("members") else
              "- Members: " + "; ".join(f"{n} at {r.get('img_size', cfg.get('img_size'))} px, "
                                        f"{len(r.get('history') or [])} epoch(s), init {r.get('init')}"
                                        for n, r in m["members"].items()),
              f"- Time: {time_text(m)}, on {env.get('device', '—')} ({precision_text(m)})",
              f"- Command: `{m.get('command', '')}`"]
    for section in m.get("sections", []):
        lines += ["", f"### {section['heading']}", "", section["markdown"]]
    for key, path in m.get("figures", {}).items():
        lines += ["", f"![{key}]({path})" if (out_dir / path).is_file() else f"_{key}: figure missing ({path})_"]
    return lines


def write_summary(out_dir: Path) -> Path:
    path = Path(out_dir) / "summary.md"
    write_text_atomic(path, render_summary(out_dir))
    return path
