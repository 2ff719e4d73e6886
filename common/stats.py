"""Is a difference between two accuracies real? Standard errors and the "within noise" verdict.

An accuracy measured on n images is a proportion, with a standard error of sqrt(p(1 - p) / n): on 10,000
test images, 90% carries ± 0.3 points. Levels 2 to 4 compare configurations and levels with this, and say
"within noise" rather than rank two numbers that the test set cannot tell apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.records import load_metrics


def standard_error(accuracy: float, n: int) -> float:
    """One standard error of an accuracy measured on n images: sqrt(p(1 - p) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / max(n, 1))


def difference(new: float, old: float, n_new: int, n_old: int) -> dict:
    """new - old in points, with the standard error of that difference (the two measurements taken as
    independent); beyond noise when it is more than two standard errors."""
    se = math.hypot(standard_error(new, n_new), standard_error(old, n_old))
    return dict(points=100 * (new - old), standard_error_points=100 * se, beyond_noise=abs(new - old) > 2 * se)


def paired_difference(new_correct, old_correct) -> dict:
    """new - old in points when both were scored on the same images (arrays of right/wrong per image): only the
    images on which they differ carry information. b images right only for new, c only for old, n in all:
    the difference is (b - c) / n, its standard error sqrt((b + c) / n - ((b - c) / n)^2) / sqrt(n) (the
    paired, McNemar-style one; smaller than difference()'s when the two mostly agree)."""
    new_correct, old_correct = np.asarray(new_correct, bool), np.asarray(old_correct, bool)
    n = max(len(new_correct), 1)
    b, c = int((new_correct & ~old_correct).sum()), int((~new_correct & old_correct).sum())
    d = (b - c) / n
    se = math.sqrt(max((b + c) / n - d * d, 0.0) / n)
    return dict(points=100 * d, standard_error_points=100 * se, beyond_noise=abs(d) > 2 * se,
                only_new=b, only_old=c)


def describe(d: dict) -> str:
    verdict = "beyond noise" if d["beyond_noise"] else "within noise"
    return (f"{d['points']:+.2f} points ({verdict}; one standard error of the difference: "
            f"{d['standard_error_points']:.2f})")


def compare_with_level(level: int, metrics: dict, out_dir: Path) -> tuple[str, dict | None]:
    """A sentence comparing this run's test accuracy with an earlier level's, from that level's metrics.json
    in the same output folder, naming what makes the two runs not like for like."""
    earlier = load_metrics(out_dir).get(level)
    if not earlier or earlier.get("status") != "complete" or earlier.get("test_accuracy") is None:
        return (f"Level {level} has no completed run in `{out_dir}`: run it (`python run.py level {level}` with the "
                f"same flags) to see the change against it.", None)
    text, d = compare_runs(metrics, out_dir, earlier, out_dir, f"Level {level}")
    return text, dict(level=level, **d)


def compare_runs(metrics: dict, root: Path, earlier: dict, earlier_root: Path, name: str) -> tuple[str, dict]:
    """`metrics` against `earlier` (two runs' metrics.json, each with the output folder its file paths are
    relative to): the change in test accuracy, paired image by image where both kept their test predictions,
    and what makes the two runs not like for like."""
    paired = paired_correct(metrics, root, earlier, earlier_root)
    if paired is not None:  # both kept every test image's logits, on the same images: pair them
        d = dict(paired_difference(*paired), paired=True)
    else:
        d = dict(difference(metrics["test_accuracy"], earlier["test_accuracy"], metrics["test_size"],
                            earlier["test_size"]), paired=False)
    ours, theirs = metrics["config"], earlier.get("config", {})
    unlike = [f"{key} {theirs.get(key)} there, {ours.get(key)} here"
              for key in ("model", "img_size", "epochs", "seed", "weights", "pretrained")
              if theirs.get(key) != ours.get(key)]
    unlike += [f"{key} {earlier.get(key)} there, {metrics.get(key)} here"
               for key in ("train_size", "test_size", "quick") if earlier.get(key) != metrics.get(key)]
    views = [m.get("test_views") or ["identity"] for m in (earlier, metrics)]  # test-time augmentation
    if views[0] != views[1]:
        unlike.append(f"test views {'+'.join(views[0])} there, {'+'.join(views[1])} here")
    if "augmentation" in earlier and bool(earlier["augmentation"]) != bool(metrics.get("augmentation")):
        unlike.append(f"{'with' if earlier['augmentation'] else 'without'} augmentation there, "
                      f"{'with' if metrics.get('augmentation') else 'without'} here")
    text = (f"Against {name} ({100 * earlier['test_accuracy']:.2f}% on {earlier['test_size']:,} test images): "
            f"{describe(d)}"
            + (f", paired on the same test images ({d['only_new']} right only here, {d['only_old']} only there)."
               if d["paired"] else ", the two taken as independent (no per-image predictions kept for both)."))
    if unlike:
        text += " Not a like-for-like comparison: " + "; ".join(unlike) + "."
    return text, dict(test_accuracy=earlier["test_accuracy"], like_for_like=not unlike, **d)


def paired_correct(metrics: dict, root: Path, earlier: dict, earlier_root: Path):
    """(ours right, theirs right) per test image, from both runs' test_predictions.npz, or None when either is
    missing or the two were not scored on the same images in the same order (their labels differ)."""
    arrays = []
    for m, folder in ((metrics, root), (earlier, earlier_root)):
        name = m.get("files", {}).get("test_predictions")
        if not name or not (Path(folder) / name).is_file():
            return None
        with np.load(Path(folder) / name) as saved:
            arrays.append((saved["logits"].argmax(1), saved["labels"]))
    (ours, labels), (theirs, their_labels) = arrays
    if labels.shape != their_labels.shape or not np.array_equal(labels, their_labels):
        return None
    return ours == labels, theirs == labels
