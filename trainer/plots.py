"""Plots people look at: training curves, confusion matrices, the melanoma ROC (matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dermedge.files import atomic_path


def new_figure(**kw):
    """``(pyplot, plt.subplots(**kw))`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(**kw)


def save_figure(plt, fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG atomically (temp file, then rename) and close it."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.tight_layout()
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def plot_curves(history, path: str | Path, *, best_epoch: int | None = None) -> None:
    """Loss (train/val) and validation balanced accuracy / melanoma AUC per epoch."""
    plt, (fig, (ax1, ax2)) = new_figure(ncols=2, figsize=(10, 4))
    ep = np.asarray(history["epoch"])
    for col, style in (("loss", "-"), ("val_loss", "--")):
        if col in history:
            ax1.plot(ep, np.asarray(history[col], float), style, marker="o", label=col)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for col in ("val_balanced_accuracy", "val_accuracy", "val_melanoma_auc"):
        if col in history:
            ax2.plot(ep, np.asarray(history[col], float), marker="o", label=col)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    if "phase" in history:
        phases = list(history["phase"])
        if "head" in phases and "finetune" in phases:
            boundary = ep[phases.index("finetune")] - 0.5
            for ax in (ax1, ax2):
                ax.axvline(boundary, color="grey", lw=0.8, ls=":")
    if best_epoch is not None:
        ax2.axvline(best_epoch, color="green", lw=1, ls="--", label=f"best (epoch {best_epoch})")
    ax2.legend(loc="lower right")
    fig.suptitle("training curves")
    save_figure(plt, fig, path)


def plot_confusion(cm, labels: Sequence[str], path: str | Path, *, normalize: bool) -> None:
    """Confusion matrix ``cm[true, pred]``; ``normalize`` divides each row by its support."""
    cm = np.asarray(cm, dtype=float)
    if normalize:
        support = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    plt, (fig, ax) = new_figure(figsize=(6.2, 5.4))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            text = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > 0.6 * top else "black")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    save_figure(plt, fig, path)


def plot_roc(fpr, tpr, path: str | Path, *, auc: float | None = None,
             operating_point: tuple[float, float] | None = None) -> None:
    """ROC of the melanoma head; ``operating_point`` = (sensitivity, specificity)."""
    plt, (fig, ax) = new_figure(figsize=(5, 5))
    label = f"AUC = {auc:.3f}" if auc is not None and np.isfinite(auc) else "ROC"
    ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    if operating_point is not None and all(v is not None for v in operating_point):
        sens, spec = operating_point
        ax.plot([1 - spec], [sens], "o", color="red",
                label=f"threshold: sens {sens:.2f}, spec {spec:.2f}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    ax.set_title("melanoma head ROC")
    save_figure(plt, fig, path)
