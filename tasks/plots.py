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


def gallery_mosaic(images: "np.ndarray", overlays: "np.ndarray | None", *, columns: int, aspect: float
                   ) -> tuple["np.ndarray", list[tuple[float, float]]]:
    """N x C x H x W uint8 images (overlays N x H x W in [0, 1], drawn as a jet heat map at 45%) -> one RGB
    float mosaic on white, `columns` wide, each cell `aspect` times as tall as wide with a band for its title
    above the image; and the (x, y) where each title's baseline is centred, in mosaic pixels."""
    import math

    import numpy as np

    n, channels, h, w = images.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    pad = max(1, round(0.05 * w))
    cell_w = w + 2 * pad
    cell_h = max(h + 2 * pad, round(cell_w * aspect))
    band = cell_h - h - pad  # title space above each image
    mosaic = np.ones((rows * cell_h, cols * cell_w, 3), dtype=np.float32)
    rgb = images.astype(np.float32) / 255.0
    rgb = np.repeat(rgb, 3, axis=1) if channels == 1 else rgb[:, :3]
    rgb = rgb.transpose(0, 2, 3, 1)
    if overlays is not None:
        from matplotlib import colormaps

        heat = colormaps["jet"](np.clip(overlays, 0, 1))[..., :3].astype(np.float32)
        rgb = 0.55 * rgb + 0.45 * heat
    anchors = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * cell_h + band, c * cell_w + pad
        mosaic[y:y + h, x:x + w] = rgb[i]
        anchors.append((c * cell_w + cell_w / 2, y - 0.5))
    return mosaic, anchors


def plot_gallery(images: "np.ndarray", titles: Sequence[str], dest: Path, *, suptitle: str,
                 overlays: "np.ndarray | None" = None, columns: int = 6) -> None:
    """A labelled grid of images (N x C x H x W uint8); overlays (N x H x W in [0, 1]) are drawn as heat maps.

    Drawn as one image with the titles over it (one axes, not one per image: ~10x faster to render)."""
    import math

    plt = _pyplot()
    n = len(images)
    cols = min(columns, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    cell_w_in, cell_h_in, head_in = 2.3, 2.6, 0.5
    fig = plt.figure(figsize=(cell_w_in * cols, cell_h_in * rows + head_in))
    fig.suptitle(suptitle, fontsize=10)
    ax = fig.add_axes((0, 0, 1, 1 - head_in / (cell_h_in * rows + head_in)))
    ax.set_axis_off()
    if not n:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)
    else:
        mosaic, anchors = gallery_mosaic(images, overlays, columns=cols, aspect=cell_h_in / cell_w_in)
        ax.imshow(mosaic, interpolation="nearest", aspect="auto")
        for (x, y), title in zip(anchors, titles):
            ax.text(x, y, title, ha="center", va="bottom", fontsize=8)
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
