"""A classifier's test results class by class: precision, recall and F1 per class and the confusion matrix
(scikit-learn), the findings written from those numbers, and the test images with the highest loss.

Level 3 calls these after its test evaluation; every sentence of the findings is computed from the numbers,
with its standard error where two numbers are compared (common/stats.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.data import CLASSES
from common.stats import describe, difference, standard_error


def per_class_results(labels: torch.Tensor, logits: torch.Tensor) -> tuple[list[dict], np.ndarray, str]:
    """-> (precision, recall, F1 and support per class, the confusion matrix's counts (rows: true class,
    columns: predicted class, in CLASSES order), scikit-learn's classification report)."""
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    truth, predicted = labels.numpy(), logits.argmax(1).numpy()
    classes = list(range(len(CLASSES)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=classes,
                                                                     zero_division=0)
    per_class = [dict(**{"class": name}, precision=float(p), recall=float(r), f1=float(f), support=int(n))
                 for name, p, r, f, n in zip(CLASSES, precision, recall, f1, support)]
    counts = confusion_matrix(truth, predicted, labels=classes)
    report = classification_report(truth, predicted, labels=classes, target_names=CLASSES, digits=3, zero_division=0)
    return per_class, counts, report


def per_class_csv(per_class: list[dict]) -> str:
    """per_class.csv's text: one row per class, four decimals."""
    return "class,precision,recall,f1,support\n" + "".join(
        f"{c['class']},{c['precision']:.4f},{c['recall']:.4f},{c['f1']:.4f},{c['support']}\n" for c in per_class)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each row (a true class) divided by its number of images: the share predicted as each class."""
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def findings(per_class: list[dict], counts: np.ndarray, test_size: int) -> dict:
    """The best and worst classes (by F1) and the most confused pairs, from the test set's numbers.

    A pair's confusion counts both directions: the mean of "A predicted as B" and "B predicted as A", each a
    share of its true class (cat <-> dog is the classic CIFAR-10 pair).
    """
    ranked = sorted(per_class, key=lambda c: c["f1"], reverse=True)
    rates = row_normalised(counts)
    pairs = sorted(((i, j) for i in range(len(CLASSES)) for j in range(i + 1, len(CLASSES))),
                   key=lambda ij: rates[ij] + rates[ij[::-1]], reverse=True)
    return dict(
        best_classes=ranked[:2], worst_classes=ranked[::-1][:2],
        confused_pairs=[dict(pair=[CLASSES[i], CLASSES[j]], rate=float(rates[i, j] + rates[j, i]) / 2,
                             a_as_b=float(rates[i, j]), b_as_a=float(rates[j, i]),
                             count=int(counts[i, j] + counts[j, i])) for i, j in pairs[:3]],
        cat_dog_rank=1 + pairs.index((CLASSES.index("cat"), CLASSES.index("dog"))),
        images_per_class=test_size // len(CLASSES))


def per_class_table(per_class: list[dict]) -> str:
    lines = ["| class | precision | recall | F1 | test images |", "|---|---|---|---|---|"]
    lines += [f"| {c['class']} | {100 * c['precision']:.1f}% | {100 * c['recall']:.1f}% | {100 * c['f1']:.1f}% | "
              f"{c['support']} |" for c in per_class]
    return "\n".join(lines)


def findings_text(metrics: dict, level2_text: str) -> str:
    """The findings, as sentences written from the numbers (metrics["findings"], and the SE block's, the
    test-time augmentation's and the SE gates' numbers where the run has them)."""
    f = metrics["findings"]
    n = f["images_per_class"]

    def cls(c: dict) -> str:
        return f"{c['class']} (F1 {100 * c['f1']:.1f}%, recall {100 * c['recall']:.1f}%)"

    gap = difference(f["best_classes"][0]["recall"], f["worst_classes"][0]["recall"], n, n)
    lines = [
        f"- Best classes: {cls(f['best_classes'][0])} and {cls(f['best_classes'][1])}. "
        f"Worst: {cls(f['worst_classes'][0])} and {cls(f['worst_classes'][1])}.",
        f"- Each class has about {n:,} test images, so one class's recall carries a standard error of up to "
        f"{100 * standard_error(0.5, n):.1f} points, and classes close in the ranking are not reliably ordered. "
        f"The best class's recall against the worst's: {describe(gap)}.",
        "- Most confused pairs (the mean of both directions, each a share of its true class): " + "; ".join(
            f"{p['pair'][0]}↔{p['pair'][1]} {100 * p['rate']:.1f}% ({100 * p['a_as_b']:.1f}% of {p['pair'][0]} "
            f"predicted as {p['pair'][1]}, {100 * p['b_as_a']:.1f}% the other way; {p['count']} images)"
            for p in f["confused_pairs"]) + ".",
        "- The original assessment expects cat↔dog to be the most confused pair: " + (
            "so it is here." if f["cat_dog_rank"] == 1 else f"here it ranks {f['cat_dog_rank']} of 45."),
        f"- Test accuracy {100 * metrics['test_accuracy']:.2f}% on {metrics['test_size']:,} images "
        f"(± {100 * standard_error(metrics['test_accuracy'], metrics['test_size']):.2f} points, one standard error). "
        + level2_text,
        f"- The trained model holds {metrics['se_blocks']} SE block(s) ({metrics['se_parameters']:,} parameters"
        f"{', trained' if metrics.get('se_trained') else ', unchanged by training'}).",
    ]
    tta = metrics.get("tta")
    if tta:
        lines.append(
            f"- Test-time augmentation, chosen on validation: {100 * tta['val_accuracy_plain']:.2f}% plain, "
            f"{100 * tta['val_accuracy_tta']:.2f}% averaged with each image's mirror, so the test set was predicted "
            + ("with the mirror (two forward passes per image)." if tta["used"]
               else "plain (the mirror did not help)."))
    gates = metrics.get("se_gates")
    if gates:
        d = gates["most_different"]
        lines.append(
            f"- The SE gates differ by class: channel {d['channel']} of the final feature map averages "
            f"{d['high']:.2f} for {d['high_class']} and {d['low']:.2f} for {d['low_class']} (test images); across "
            f"all {gates['num_channels']:,} channels the gates average {gates['mean_gate']:.2f}, and "
            f"{gates['channels_spread_over_0_1']:,} channels' class means spread over more than 0.1 "
            f"(`se_gates.png`).")
    if metrics.get("quick"):
        lines.append("- Smoke run (`--quick`): small subsets, tiny images; the numbers show that the analysis "
                     "works, not what the architecture achieves.")
    return "\n".join(lines)


def most_confident(logits: torch.Tensor, labels: torch.Tensor, each: int = 4) -> list[dict]:
    """The `each` most confident right, then the `each` most confident wrong test predictions: their position in
    the test split, true and predicted class, the predicted class's probability, and whether it is right."""
    confidence, predicted = logits.float().softmax(1).max(1)
    right = predicted == labels
    picks = []
    for wanted in (True, False):
        candidates = torch.nonzero(right == wanted).flatten()
        picks += candidates[torch.argsort(confidence[candidates], descending=True, stable=True)[:each]].tolist()
    return [dict(test_position=int(i), true=CLASSES[int(labels[i])], predicted=CLASSES[int(predicted[i])],
                 probability=float(confidence[i]), correct=bool(right[i])) for i in picks]


def top_losses(logits: torch.Tensor, labels: torch.Tensor, count: int = 16) -> list[dict]:
    """The `count` test images with the highest cross-entropy loss, highest first: their position in the test
    split, true and predicted class, the predicted class's probability and the loss."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    probabilities = logits.float().softmax(1)
    order = torch.argsort(losses, descending=True, stable=True)[:count]
    return [dict(test_position=int(i), true=CLASSES[int(labels[i])], predicted=CLASSES[int(probabilities[i].argmax())],
                 probability=float(probabilities[i].max()), true_probability=float(probabilities[i, labels[i]]),
                 loss=float(losses[i])) for i in order]
