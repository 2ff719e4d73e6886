"""Figures more than one level draws. matplotlib runs headless (Agg): no display is needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.io import save_figure


def plot_training_curves(history: list[dict], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch, train and validation, side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_ax.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    acc_ax.plot(epochs, [100 * h["val_accuracy"] for h in history], "o-", label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion_matrix(matrix, class_names, path: Path, title: str) -> Path:
    """A row-normalised confusion matrix: row = true class, column = predicted class, each cell the share of
    that true class predicted as that column (the diagonal is per-class recall)."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i][j] > 0.5 else "black")
    return save_figure(fig, path)


def plot_ablation(labels: list[str], accuracies: list[float], errors: list[float], path: Path, title: str,
                  highlight: int | None = None) -> Path:
    """Validation accuracy per configuration (fractions), with ±1 standard error bars; `highlight` marks one bar."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = ["tab:orange" if i == highlight else "tab:blue" for i in range(len(labels))]
    bars = ax.bar(range(len(labels)), [100 * a for a in accuracies], yerr=[100 * e for e in errors], capsize=4,
                  color=colors)
    low = max(0.0, 100 * min(accuracies) - 15)
    ax.set(xticks=range(len(labels)), ylabel="validation accuracy (%)", title=title,
           ylim=(low, min(100, 100 * max(accuracies) + 8)))
    for bar, acc in zip(bars, accuracies):  # the value halfway up the visible bar, clear of the error bar
        ax.text(bar.get_x() + bar.get_width() / 2, (low + 100 * acc) / 2, f"{100 * acc:.1f}%", ha="center",
                va="center", color="white", fontweight="bold")
    if highlight is not None:
        bars[highlight].set_label("chosen")
        ax.legend(loc="upper left")
    ax.set_xticklabels(labels)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_accuracy_comparison(bars: list[dict], path: Path, title: str) -> Path:
    """Horizontal bars, one pair per model or ensemble: test accuracy without and with test-time augmentation.

    bars: [{"label": name, "plain": accuracy, "tta": accuracy or None}], accuracies as fractions. The axis
    starts a few points below the lowest bar, so that differences of a point stay visible; it is labelled.
    """
    import numpy as np

    labels = [b["label"] for b in bars]
    plain = np.array([100 * b["plain"] for b in bars])
    tta = np.array([np.nan if b.get("tta") is None else 100 * b["tta"] for b in bars])
    y = np.arange(len(bars))
    height = 0.38 if not np.isnan(tta).all() else 0.7
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.2))
    ax.barh(y - (height / 2 if height < 0.7 else 0), plain, height, label="no TTA")
    if not np.isnan(tta).all():
        ax.barh(y + height / 2, tta, height, label="with TTA")
    for values, offset in ((plain, -height / 2 if height < 0.7 else 0), (tta, height / 2)):
        for yi, v in zip(y, values):
            if not np.isnan(v):
                ax.text(v, yi + offset, f" {v:.2f}%", va="center", fontsize=8)
    low = np.nanmin(np.concatenate([plain, tta]))
    ax.set_xlim(max(0.0, low - 5), min(100.0, np.nanmax(np.concatenate([plain, tta])) + 4))
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy (%)", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1 - 0.3 / len(bars)), ncol=2, frameon=False)
    return save_figure(fig, path)


def plot_reliability(curves: dict[str, dict], path: Path, title: str) -> Path:
    """A reliability diagram: accuracy against mean confidence per confidence bin, one line per model, and the
    diagonal of perfect calibration. curves: name -> {"confidence", "accuracy", "count"} per bin (empty bins
    are NaN and left out); the lower panel shows how many images fall in each bin."""
    import numpy as np

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for name, c in curves.items():
        conf, acc, count = (np.array(c[k], dtype=float) for k in ("confidence", "accuracy", "count"))
        filled = count > 0
        ax.plot(conf[filled], acc[filled], "o-", label=name)
        hist.stairs(count, np.linspace(0, 1, len(count) + 1), label=name)
    ax.set(ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="confidence (top-class probability)", ylabel="images")
    hist.grid(alpha=0.3)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Looking at images: what augmentation does, what the model gets most wrong, where it looks


def _show(ax, image) -> None:
    """A uint8 3 x 32 x 32 image (tensor or array), without axes."""
    import numpy as np

    ax.imshow(np.asarray(image).transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_augmentation(originals, views, class_names: list[str], steps: list[str], path: Path, title: str) -> Path:
    """Each original (uint8 N x 3 x 32 x 32) in the first column, then its views (uint8 N x V x 3 x 32 x 32):
    what the augmentation function drew for it. `steps` names the transforms, in order."""
    n, v = views.shape[0], views.shape[1]
    fig, axes = plt.subplots(n, v + 1, figsize=(1.35 * (v + 1), 1.45 * n + 1.0), squeeze=False)
    for i in range(n):
        _show(axes[i][0], originals[i])
        axes[i][0].set_ylabel(class_names[i], fontsize=9)
        for j in range(v):
            _show(axes[i][j + 1], views[i][j])
    axes[0][0].set_title("original", fontsize=9)
    for j in range(v):
        axes[0][j + 1].set_title(f"view {j + 1}", fontsize=9)
    fig.suptitle(title + "\n" + "  →  ".join(steps), fontsize=9)
    return save_figure(fig, path)


def plot_top_losses(images, true_names: list[str], predicted_names: list[str], probabilities: list[float],
                    losses: list[float], path: Path, title: str, columns: int = 4) -> Path:
    """Test images with the highest loss, each titled: true class, predicted class and its probability, loss."""
    n = len(true_names)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.55 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(ax for row in axes for ax in row):
        if k >= n:
            ax.axis("off")
            continue
        _show(ax, images[k])
        ax.set_title(f"true: {true_names[k]}\npredicted: {predicted_names[k]} ({100 * probabilities[k]:.0f}%)\n"
                     f"loss {losses[k]:.2f}", fontsize=8, color="tab:red" if true_names[k] != predicted_names[k]
                     else "black")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_se_gates(class_means, channels: list[int], class_names: list[str], path: Path, title: str) -> Path:
    """A heatmap: classes x channels, each cell the mean SE gate of that channel over the class's images."""
    import numpy as np

    means = np.asarray(class_means)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(channels) + 2.5), 4.6))
    image = ax.imshow(means, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="mean gate (0: channel switched off, 1: kept)")
    ax.set_xticks(range(len(channels)), [str(c) for c in channels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="channel of the final feature map (ordered by how much its mean gate differs between classes)",
           title=title)
    return save_figure(fig, path)


def plot_gradcam(images, maps, titles: list[str], correct: list[bool], path: Path, title: str,
                 columns: int = 4) -> Path:
    """Each image (uint8 N x 3 x 32 x 32) next to its Grad-CAM map (N x 32 x 32 in [0, 1]) laid over it.
    Titles of correct predictions are green, of wrong ones red."""
    import numpy as np

    n = len(titles)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.0 * 2 * columns, 2.3 * rows + 0.6), squeeze=False)
    for k in range(rows * columns):
        image_ax, map_ax = axes[k // columns][2 * (k % columns)], axes[k // columns][2 * (k % columns) + 1]
        if k >= n:
            image_ax.axis("off")
            map_ax.axis("off")
            continue
        _show(image_ax, images[k])
        _show(map_ax, images[k])
        map_ax.imshow(np.asarray(maps[k]), cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        image_ax.set_title(titles[k], fontsize=8, color="tab:green" if correct[k] else "tab:red", loc="left")
        map_ax.set_title("Grad-CAM", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
