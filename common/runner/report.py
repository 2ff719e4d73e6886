"""What a reader of the results sees: scores of predicted probabilities (accuracy, log-loss, calibration),
markdown tables, summary.md sections, and Level 4's figures and report (OUT/level4/report.md).

The report only formats numbers that the run has measured and stored in its metrics dict; nothing in it is
copied from elsewhere, so a reader can check every number against metrics.json and predictions.npz.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from common.data import CLASSES
from common.io import safe_filename, write_text_atomic
from common.stats import describe
from common.runner.summary import precision_text

CALIBRATION_BINS = 15

# ----------------------------------------------------------------------------------------------------------
# Generic


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table: the header row, the separator, then one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x) -> str:
    """A fraction as a percentage with two decimals; None or NaN as a dash."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def duration(seconds) -> str:
    """Seconds below two minutes, minutes above; nothing measured as a dash."""
    if not seconds:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------------------------------------
# Scores of predicted probabilities (N x classes, rows summing to one)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """The mean negative log-probability of the true class (scikit-learn's log_loss, over the ten classes)."""
    from sklearn.metrics import log_loss as sklearn_log_loss

    p = np.clip(probs, 1e-12, 1.0)
    p = p / p.sum(1, keepdims=True)  # float rounding: rows sum to 1 within 1e-7, and sklearn checks
    return float(sklearn_log_loss(labels, p, labels=range(len(CLASSES))))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Per confidence bin (equal widths over (0, 1]; bin b holds confidences in (b/B, (b+1)/B]): the mean
    confidence, the accuracy and the number of images. Confidence is the top-class probability."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return dict(confidence=mean_conf.tolist(), accuracy=accuracy.tolist(), count=count.tolist(), bins=bins)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|: how far confidence is from being a probability of
    being right, averaged over the images (Guo et al., 2017)."""
    r = reliability_bins(probs, labels, bins)
    count = np.array(r["count"])
    filled = count > 0
    gaps = np.abs(np.array(r["accuracy"])[filled] - np.array(r["confidence"])[filled])
    return float((count[filled] * gaps).sum() / count.sum())


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    return dict(accuracy=float((probs.argmax(1) == labels).mean()), log_loss=log_loss(probs, labels),
                ece=expected_calibration_error(probs, labels))


def comparison_row(label: str, is_member: bool, tta: bool, probs: dict, val_labels: np.ndarray,
                   test_labels: np.ndarray, records: list[dict]) -> dict:
    """One row of Level 4's comparison table: a member or an ensemble (`records`: the metrics of the member, or
    of every member of the ensemble), scored on validation and test from its probabilities."""
    val, test = scores(probs["val"], val_labels), scores(probs["test"], test_labels)
    speeds = [r.get("tta_images_per_second" if tta else "images_per_second") for r in records]
    return dict(name=label, kind="member" if is_member else "ensemble", tta=tta,
                val_accuracy=val["accuracy"], val_log_loss=val["log_loss"], val_ece=val["ece"],
                test_accuracy=test["accuracy"], test_log_loss=test["log_loss"], test_ece=test["ece"],
                parameters=sum(r.get("parameters", 0) for r in records),
                train_seconds=sum(r.get("train_seconds", 0.0) for r in records),
                # an ensemble runs every member on every image: its throughput is 1 / Σ (1 / member throughput)
                images_per_second=(1 / sum(1 / s for s in speeds)) if speeds and all(speeds) else None)


def per_class_gains(reference: np.ndarray, ensemble: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Per class: its number of images, the accuracy of the reference (the best member) and of the ensemble
    on them, and the gain (ensemble minus reference), from their probabilities."""
    gains = []
    for c, class_name in enumerate(CLASSES):
        mask = labels == c
        member_acc = float((reference.argmax(1)[mask] == c).mean()) if mask.any() else float("nan")
        ensemble_acc = float((ensemble.argmax(1)[mask] == c).mean()) if mask.any() else float("nan")
        gains.append(dict(name=class_name, images=int(mask.sum()), best_member=member_acc, ensemble=ensemble_acc,
                          gain=ensemble_acc - member_acc))
    return gains


# ----------------------------------------------------------------------------------------------------------
# Level 4: figures


def plot_ensemble_figures(run, comparison: dict, test_labels: np.ndarray, tta: bool) -> None:
    """accuracy.png (every member and ensemble, without and with TTA), reliability.png (the best member against
    the chosen ensemble) and each trained member's training curves, recorded in run.metrics["figures"]."""
    from common.plots import plot_accuracy_comparison, plot_reliability, plot_training_curves

    metrics, rows = run.metrics, comparison["rows"]
    bars = [dict(label=name, plain=rows[name]["test_accuracy"], tta=rows.get(f"{name} + TTA", {}).get("test_accuracy"))
            for name in [*metrics["members"], "soft vote", "weighted vote"]]
    run.add_figure("accuracy", plot_accuracy_comparison(
        bars, run.path("accuracy.png"), f"Test accuracy on {metrics['test_size']:,} images, without and with TTA"))
    best = comparison["best_member"] + (" + TTA" if tta else "")
    run.add_figure("reliability", plot_reliability(
        {label: reliability_bins(comparison["probs"][label]["test"], test_labels)
         for label in (best, comparison["chosen"])},
        run.path("reliability.png"), f"Reliability on the test set ({CALIBRATION_BINS} bins)"))
    for name, record in metrics["members"].items():
        if record["history"]:
            run.add_figure(f"curves {name}", plot_training_curves(
                record["history"], run.path(f"curves_{safe_filename(name)}.png"),
                f"{name} ({metrics['train_size']:,} training images)"))


# ----------------------------------------------------------------------------------------------------------
# Level 4: tables, summary sections, report


def members_table(metrics: dict) -> str:
    rows = [[name, r["init"], str(len(r["history"])), str(r.get("best_epoch", "—")), pct(r.get("best_val_accuracy")),
             duration(r.get("train_seconds")) + (f" ({r['resumed_epochs']} epoch(s) resumed)"
                                                 if r.get("resumed_epochs") else "")]
            for name, r in metrics["members"].items()]
    return markdown_table(["member", "initialization", "epochs", "best epoch (val)", "val acc at that epoch",
                           "training time"], rows)


def ensemble_comparison_table(metrics: dict) -> str:
    """Every member and ensemble, without and with TTA: accuracy, log-loss, calibration, size, speed."""
    rows = []
    for r in metrics["comparison"]:
        name = r["name"].removesuffix(" + TTA")
        if r["name"] == metrics["chosen"]:
            name = f"**{name}** (chosen)"
        ips = "—" if r["images_per_second"] is None else f"{r['images_per_second']:,.0f}"
        rows.append([name, "yes" if r["tta"] else "no", pct(r["val_accuracy"]), f"{r['val_log_loss']:.4f}",
                     pct(r["test_accuracy"]), f"{r['test_log_loss']:.4f}", pct(r["test_ece"]),
                     f"{r['parameters'] / 1e6:.1f} M", duration(r["train_seconds"]), ips])
    return markdown_table(["model", "TTA", "val acc", "val log-loss", "test acc", "test log-loss", "test ECE",
                           "parameters", "training time", "inference img/s"], rows)


def ensemble_weights_table(metrics: dict) -> str:
    """Each weighted vote's member weights, and the temperature that calibrated each member before the vote
    (records from before calibration have none)."""
    members = list(metrics["members"])
    temperatures = metrics.get("ensemble_temperatures") or {}
    rows = [[ensemble, *(f"{w[n]:.3f}" + (f" (T {temperatures[ensemble][n]:.2f})" if ensemble in temperatures else "")
                         for n in members)] for ensemble, w in metrics["ensemble_weights"].items()]
    return markdown_table(["ensemble", *members], rows)


def disagreement_table(metrics: dict) -> str:
    return markdown_table(["pair", "test images on which their predictions differ"],
                          [[pair, pct(d)] for pair, d in metrics["disagreement"].items()])


def per_class_gain_table(metrics: dict) -> str:
    reference = metrics["best_member"] + (" + TTA" if metrics["chosen"].endswith("TTA") else "")
    rows = [[c["name"], str(c["images"]), pct(c["best_member"]), pct(c["ensemble"]), f"{100 * c['gain']:+.1f}"]
            for c in metrics["per_class"]]
    return markdown_table(["class", "images", f"{reference} (best member)", metrics["chosen"], "gain (points)"], rows)


def ensemble_summary_sections(metrics: dict) -> list[dict]:
    """Level 4's sections of summary.md (metrics["sections"])."""
    return [
        dict(heading="Members", markdown=members_table(metrics)),
        dict(heading="Members and ensembles compared", markdown=ensemble_comparison_table(metrics)),
        dict(heading="Ensemble weights (fitted on validation only)", markdown=ensemble_weights_table(metrics)),
        dict(heading="Pairwise disagreement between members (test, no TTA)", markdown=disagreement_table(metrics)),
        dict(heading="Per-class test accuracy: chosen ensemble against the best member",
             markdown=per_class_gain_table(metrics)),
        dict(heading="Report", markdown="The full write-up: [level4/report.md](level4/report.md)."),
    ]


def epoch_sizes(member: dict, cfg: dict) -> str:
    """"128", or with progressive resizing (--low-res-epochs) the size of each epoch: "96, 96, 128, 128, 128"."""
    sizes = member.get("train_img_sizes")
    return ", ".join(map(str, sizes)) if sizes else str(member.get("img_size", cfg["img_size"]))


def ensemble_findings(metrics: dict) -> list[str]:
    """Findings written from the numbers: what the ensemble gained, what TTA did, how calibration moved,
    and whether the differences are larger than the test set's sampling noise."""
    rows = {r["name"]: r for r in metrics["comparison"]}
    tta = metrics["chosen"].endswith("TTA")
    reference = metrics["best_member"] + (" + TTA" if tta else "")
    ens, ref = rows[metrics["chosen"]], rows[reference]
    n = metrics["test_size"]
    start = (f"- **Ensemble against the best member.** The chosen ensemble ({metrics['chosen']}) reaches "
             f"{pct(ens['test_accuracy'])} on the {n:,} test images, against {pct(ref['test_accuracy'])} for the best "
             f"single member chosen on validation ({reference}): ")
    paired = metrics.get("gain_over_best_member")
    if paired:  # both scored on the same images: only those on which they differ count
        out = [start + f"{describe(paired)}. Paired on the same images: {paired['only_new']:,} right only for "
               f"the ensemble, {paired['only_old']:,} only for {reference}."]
    else:  # a record from before the paired comparison: the (larger) standard error of one accuracy
        se = math.sqrt(max(ens["test_accuracy"] * (1 - ens["test_accuracy"]), 1e-12) / n)
        gain = ens["test_accuracy"] - ref["test_accuracy"]
        noise = "more than" if abs(gain) > 2 * se else "within"
        out = [start + f"{100 * gain:+.2f} points, {noise} two standard errors of an accuracy measured on {n:,} "
               f"images (±{100 * 2 * se:.2f} points)."]
    members = list(metrics["members"])
    if tta:
        deltas = [rows[f"{k} + TTA"]["test_accuracy"] - rows[k]["test_accuracy"] for k in members]
        out.append("- **Test-time augmentation.** Averaging the mirror image changed the members' test accuracy by "
                   + ", ".join(f"{100 * d:+.2f} ({k})" for k, d in zip(members, deltas))
                   + f" points, at {rows[reference]['images_per_second'] or 0:,.0f} instead of "
                   f"{rows[metrics['best_member']]['images_per_second'] or 0:,.0f} images per second for "
                   f"{metrics['best_member']}.")
    soft = rows["soft vote" + (" + TTA" if tta else "")]
    out.append(f"- **Weighted against equal voting.** Soft voting gives {pct(soft['test_accuracy'])} "
               f"(log-loss {soft['test_log_loss']:.4f}); the weights fitted on validation give "
               f"{pct(ens['test_accuracy'])} (log-loss {ens['test_log_loss']:.4f}). Weights: "
               + ", ".join(f"{k} {w:.2f}" for k, w in metrics["ensemble_weights"][metrics["chosen"]].items()) + ".")
    out.append(f"- **Calibration.** Expected calibration error on test: {pct(ens['test_ece'])} for the ensemble, "
               f"{pct(ref['test_ece'])} for {reference}; log-loss {ens['test_log_loss']:.4f} against "
               f"{ref['test_log_loss']:.4f}.")
    if metrics["disagreement"]:
        pairs = metrics["disagreement"]
        most = max(pairs, key=pairs.get)
        out.append(f"- **Diversity.** The members disagree on {pct(min(pairs.values()))} to {pct(max(pairs.values()))} "
                   f"of the test images (most: {most}). An ensemble can only correct a member where another "
                   f"member answers differently, so this bounds what voting can gain.")
    gains = sorted(metrics["per_class"], key=lambda c: c["gain"])
    up = [c for c in gains if c["gain"] > 0]
    down = [c for c in gains if c["gain"] < 0]
    out.append("- **Per class.** "
               + (f"The ensemble gains most on {up[-1]['name']} ({100 * up[-1]['gain']:+.1f} points)" if up
                  else "The ensemble gains on no class")
               + (f" and loses most on {down[0]['name']} ({100 * down[0]['gain']:+.1f} points)" if down
                  else " and loses on none")
               + f" ({len(up)} classes up, {len(down)} down), with about {n // len(CLASSES):,} test images per class "
               f"(one image is {100 * len(CLASSES) / n:.1f} points).")
    if metrics.get("quick"):
        out.append("- **This is a smoke run** (`--quick`: small subsets, one epoch, small images"
                   + (", random initialization" if not metrics["config"].get("pretrained") else "")
                   + "). Its numbers show that the pipeline works end to end, not what the method achieves.")
    return out


def _family(model_name: str) -> str:
    """"efficientnet" for efficientnet_lite0+se, "resnet50" for resnet50+se, "vit" for vit_small_patch16_224."""
    return re.split(r"[_+.]", model_name)[0]


def _one_family_caveat(members: list[str]) -> str:
    """What the motivation must add when every member comes from one family (the CPU profile's three
    EfficientNet-Lites): their mistakes are more alike than those of different architectures."""
    families = {_family(m) for m in members}
    if len(members) < 2 or len(families) > 1:
        return ""
    return (f" This run's members are one family ({families.pop()}) at different sizes, not different "
            "architectures: they share their inductive biases, so they tend to make more of the same mistakes, "
            "and an ensemble of them is expected to gain less than one of different architectures.")


def render_ensemble_report(metrics: dict, title: str) -> str:
    """OUT/level4/report.md: motivation, methods, setup, results, analysis, limitations, how to reproduce."""
    cfg, env = metrics["config"], metrics["environment"]
    members = list(metrics["members"])
    figures = "\n\n".join(f"![{k}]({Path(p).relative_to('level4').as_posix()})"
                          for k, p in metrics["figures"].items() if k in ("accuracy", "reliability"))
    command = metrics["command"]
    fresh_command = " ".join(part for part in command.split(" ") if part != "--resume")
    lines = [
        f"# {title}: report", "",
        "> Every number below was measured by the run that wrote this file "
        f"(`{command}`); nothing is copied from elsewhere." + (" **Smoke run**: not comparable with a full run."
                                                                if metrics.get("quick") else ""), "",
        "## Motivation", "",
        "A single network's errors come partly from its inductive biases: a CNN looks at local texture first, a "
        "Vision Transformer relates patches across the whole image from the first layer. Networks built on "
        "different principles tend to make different mistakes, and averaging their predicted probabilities "
        "cancels some of them. This level asks how much an ensemble of three architectures, each fine-tuned with "
        "modern regularization, gains over its best member on CIFAR-10, what test-time augmentation adds, and "
        "what it all costs in parameters, training time and inference speed." + _one_family_caveat(members), "",
        "## Methods", "",
        f"- **Members**: {', '.join(members)}. `NAME+se` is Level 3's network: NAME with a Squeeze-and-Excitation "
        "block on its final feature map. Each timm member gets a fresh 10-way head and is fine-tuned "
        + (f"with its stem and first {cfg['frozen_stages']} stages frozen at their pretrained weights "
           f"(--frozen-stages {cfg['frozen_stages']}: no backward pass through them). "
           if cfg.get("frozen_stages") else "in full (every parameter trains). ") + "Initial weights: "
        + ", ".join(f"{n} {r['init']}" for n, r in metrics["members"].items()) + "."
        + (f" `cifarnet` is trained from scratch at 32 px with airbench's recipe (common/cifarnet.py): widths "
           f"{cfg.get('cifarnet_widths')}, {cfg.get('cifarnet_epochs')} epochs of batch {cfg.get('cifarnet_batch_size')}, "
           "Nesterov SGD with lookahead, warm-up then linear decay, label smoothing 0.2, alternating flip and "
           "2-px translation; the optimization and regularization lines below are the other members'."
           if "cifarnet" in members else ""),
        f"- **Optimization**: {cfg['optimizer']} (lr {cfg['lr']}, weight decay {cfg['weight_decay']}), linear warm-up "
        f"over {cfg['warmup']:.0%} of the steps then cosine to zero, {cfg['epochs']} epoch(s), batch {cfg['batch_size']}; "
        "the epoch with the best validation accuracy is kept.",
        f"- **Regularization**: MixUp {'on (α 0.8)' if cfg['mixup'] else 'off'}, CutMix "
        f"{'on (α 1.0)' if cfg['cutmix'] else 'off'} "
        + ("(timm's Mixup: one of the two per batch, soft targets and soft-target cross-entropy)"
           if cfg["mixup"] or cfg["cutmix"] else "(cross-entropy against the labels, no mixing)")
        + f", label smoothing {cfg['label_smoothing']}, stochastic depth (drop path) "
        f"{cfg['drop_path']}, AutoAugment CIFAR-10 policy {'on' if cfg['autoaugment'] else 'off'} (per image at "
        "32×32, before the random crop and flip, then the resize), Level 2's colour jitter "
        f"{'on' if cfg.get('color_jitter') else 'off'} (after the crop and flip).",
        f"- **Test-time augmentation**: views {', '.join(metrics['tta_views'])}"
        + "".join(f"; {n}: {', '.join(r['tta_views'])}" for n, r in metrics["members"].items()
                  if r.get("tta_views") and r["tta_views"] != metrics["tta_views"])
        + "; the probabilities of a member's views are averaged.",
        "- **Ensembles**: soft voting (the mean of the members' probabilities) and weighted soft voting: each "
        "member calibrated first by a temperature T (softmax(log p / T), fitted on validation log-loss), weights "
        + ("minimizing the validation log-loss (L-BFGS over softmax-parametrized weights)"
           if cfg["weighting"] == "logloss" else "proportional to validation accuracy")
        + ", fitted on validation predictions and labels only. The headline ensemble is fixed in advance: "
        f"**{metrics['chosen']}**.",
        f"- **Metrics**: accuracy, log-loss (scikit-learn), expected calibration error ({metrics['calibration_bins']} "
        "equal-width confidence bins), parameters, training time (sum of the epochs), inference images per second "
        "(test set, after a warm-up batch; an ensemble runs every member).", "",
        "## Setup", "",
        f"- **Splits**: {metrics['train_size']:,} training images (from the official 50,000, stratified, split seed "
        f"42), {metrics['val_size']:,} validation images (choice of epoch, ensemble weights), "
        f"{metrics['test_size']:,} test images (the official test set, scored once at the end).",
        f"- **Hardware**: {env['device']}, {precision_text(metrics)}; torch {env['torch']}, timm {env['timm']}.",
        "- **Budget**: " + ", ".join(f"{n} {len(r['history'])} epoch(s) at {epoch_sizes(r, cfg)} px"
                                     for n, r in metrics["members"].items()) + "; training took "
        f"{duration(metrics['train_seconds'])} for the {len(members)} members together.",
        f"- **Seed**: {cfg['seed']} (initialization, shuffling, augmentation); the split is fixed.", "",
        "## Results", "",
        "### Members", "", members_table(metrics), "",
        "### Members and ensembles, without and with TTA", "", ensemble_comparison_table(metrics), "",
        "### Ensemble weights (fitted on validation only)", "", ensemble_weights_table(metrics), "",
        "### Pairwise disagreement (test, no TTA)", "", disagreement_table(metrics), "",
        "### Per-class test accuracy: chosen ensemble against the best member", "", per_class_gain_table(metrics), "",
        figures, "",
        "## Analysis", "", *ensemble_findings(metrics), "",
        "## Limitations", "",
        "- One seed: the spread between runs of the same recipe is not measured, so small differences between "
        "rows may not repeat.",
        "- The validation set chooses each member's epoch and fits the ensemble weights, so the validation "
        "numbers of the members and of the weighted vote are slightly optimistic; the test numbers are not.",
        f"- Full fine-tuning of every member at {cfg['img_size']} px is the expensive part; the recipe (learning "
        "rate, epochs) is shared by the members rather than tuned for each.",
        "- No exponential moving average of weights for the fine-tuned members"
        + (" (cifarnet's lookahead is one)." if "cifarnet" in members else " (optional in the plan; not built)."),
        "- Inference speed is measured on this run's hardware and precision, with the preprocessing included.", "",
        "## How to reproduce", "",
        "```bash", f"python {fresh_command}",
        f"python {fresh_command} --resume   # after an interruption: continues each member from its last finished "
        "epoch",
        "```", "",
        f"Seed {cfg['seed']}; the split seed is always 42. The members and the chosen ensemble: "
        f"`{metrics.get('model_file', 'level4/model.pt')}`; every probability behind these tables: "
        "`level4/predictions.npz`; every number: `level4/metrics.json`.",
    ]
    return "\n".join(lines) + "\n"


def write_ensemble_report(run, title: str) -> None:
    """OUT/level4/report.md, and Level 4's sections of summary.md (metrics["sections"]), from run.metrics.

    The members may train in different precisions (common.device.select_precision): the record's
    environment then names each member's."""
    metrics = run.metrics
    trained_in = {name: p["train"] for name, p in metrics["precision"].items()}
    metrics["environment"]["precision"] = (next(iter(trained_in.values())) if len(set(trained_in.values())) == 1
                                           else ", ".join(f"{p} ({name})" for name, p in trained_in.items()))
    metrics["sections"] = ensemble_summary_sections(metrics)
    report = run.path("report.md")
    write_text_atomic(report, render_ensemble_report(metrics, title))
    metrics["report"] = report.relative_to(run.out_dir).as_posix()
