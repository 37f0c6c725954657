"""Evaluation figures as PNGs (matplotlib, Agg): confusion matrices, reliability diagram, image galleries."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: "Figure", dest: Path, *, dpi: int = 100) -> None:
    """Save a figure atomically (temp file beside dest, then rename) and close it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        tmp.replace(dest)
    finally:
        _pyplot().close(fig)
        tmp.unlink(missing_ok=True)


def plot_confusion(confusion: list[list[int]], classes: list[str], dest: Path, *, normalize: bool = False) -> None:
    """Confusion matrix with class names (rows true, columns predicted): counts, or each row normalised to 1."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(confusion, dtype=float)
    values = counts / np.maximum(counts.sum(1, keepdims=True), 1) if normalize else counts
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title("Confusion matrix, normalised by true class" if normalize else "Confusion matrix (counts)")
    top = values.max(initial=0)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if counts[i, j]:
                text = f"{v:.2f}" if normalize else str(int(v))
                ax.text(j, i, text, ha="center", va="center", color="white" if v > top / 2 else "black",
                        fontsize=7 if normalize else 8)
    fig.tight_layout()
    save_figure(fig, dest)


def plot_reliability(before: list[dict[str, Any]], after: list[dict[str, Any]] | None, dest: Path, *,
                     ece_before: float, ece_after: float | None, temperature: float | None) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, before (and after) scaling."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    width = before[0]["upper"] - before[0]["lower"] if before else 0.1
    series = [("before", before, ece_before, "tab:orange")]
    if after is not None:
        series.append((f"after T={temperature:.2f}", after, ece_after, "tab:blue"))
    for name, bins, ece, colour in series:
        filled = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", color=colour,
                label=f"{name} (ECE {ece:.3f})")
    hist.bar([b["lower"] + width / 2 for b in before], [b["count"] for b in before], width=width * 0.9,
             color="tab:orange", alpha=0.7)
    ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1.02), ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability diagram (test split)")
    hist.set_xlabel("confidence (top-1 probability)"), hist.set_ylabel("images")
    fig.tight_layout()
    save_figure(fig, dest)


def _as_display(image: "np.ndarray") -> tuple["np.ndarray", str | None]:
    """C x H x W uint8 -> an array imshow understands, and the colormap to use."""
    if image.shape[0] == 1:
        return image[0], "gray"
    return image.transpose(1, 2, 0), None


def plot_gallery(images: "np.ndarray", titles: Sequence[str], dest: Path, *, suptitle: str,
                 overlays: "np.ndarray | None" = None, columns: int = 6) -> None:
    """A labelled grid of images (N x C x H x W uint8); overlays (N x H x W in [0, 1]) are drawn as heat maps."""
    import math

    plt = _pyplot()
    n = max(len(images), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.6 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, title) in enumerate(zip(images, titles)):
        ax = axes.flat[i]
        shown, cmap = _as_display(image)
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        if overlays is not None:
            ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(title, fontsize=8)
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    save_figure(fig, dest)


def plot_cv_folds(folds: list[dict[str, Any]], dest: Path, *, metrics: Sequence[str] = ("accuracy", "macro_f1")
                  ) -> None:
    """Per-fold metrics as grouped bars, so one bad fold stands out."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(folds) + 2), 3.5))
    x = np.arange(len(folds))
    width = 0.8 / len(metrics)
    for j, name in enumerate(metrics):
        ax.bar(x + j * width, [f[name] for f in folds], width=width, label=name)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, [f"fold {f['fold']}" for f in folds])
    ax.set_ylim(0, 1.02), ax.legend(fontsize=8), ax.set_title("Cross-validation: metrics per fold")
    fig.tight_layout()
    save_figure(fig, dest)
