"""Calibration: expected calibration error, reliability bins and temperature scaling (pure functions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def expected_calibration_error(probs: "torch.Tensor", targets: "torch.Tensor", *, n_bins: int = 15) -> float:
    """Top-label ECE (L1, equal-width confidence bins) via torchmetrics."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if len(targets) == 0:
        return 0.0
    return float(multiclass_calibration_error(probs, targets, num_classes=probs.shape[1], n_bins=n_bins,
                                              norm="l1"))


def reliability_bins(probs: "torch.Tensor", targets: "torch.Tensor", *, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: its range, mean confidence, accuracy and count (empty bins kept)."""
    import torch

    conf, pred = probs.max(1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first bin.
    index = (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    rows = []
    for i in range(n_bins):
        mask = index == i
        n = int(mask.sum())
        rows.append({"bin": i, "lower": float(edges[i]), "upper": float(edges[i + 1]), "count": n,
                     "confidence": float(conf[mask].mean()) if n else None,
                     "accuracy": float(correct[mask].mean()) if n else None})
    return rows


def fit_temperature(logits: "torch.Tensor", targets: "torch.Tensor", *, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017), fitted with LBFGS."""
    import torch
    import torch.nn.functional as F

    if len(targets) == 0:
        return 1.0
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> "torch.Tensor":
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    temperature = float(log_t.detach().exp())
    # A degenerate fit (e.g. a perfectly separated validation split drives T -> 0) would be worse than none.
    if not (1e-2 <= temperature <= 1e2):
        return 1.0
    return temperature
