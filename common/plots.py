"""Figures more than one level draws. matplotlib runs headless (Agg): no display is needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.results import save_figure  # noqa: E402


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
