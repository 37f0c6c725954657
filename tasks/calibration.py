"""Calibration: expected calibration error, reliability bins and temperature scaling (pure functions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def expected_calibration_error(probs: "torch.Tensor", targets: "torch.Tensor", *, n_bins: int = 15) -> float:
    """Top-label ECE (L1, equal-width confidence bins), binned exactly as torchmetrics'
    multiclass_calibration_error (the tests compare the two; torchmetrics itself is slow to import)."""
    import torch

    if len(targets) == 0:
        return 0.0
    conf, pred = probs.float().max(1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    index = torch.bucketize(conf, edges, right=True) - 1
    count = torch.zeros(n_bins + 1).scatter_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins + 1).scatter_add_(0, index, conf)
    hit_sum = torch.zeros(n_bins + 1).scatter_add_(0, index, correct)
    gap = (torch.nan_to_num(hit_sum / count) - torch.nan_to_num(conf_sum / count)).abs()
    return float((gap * count / count.sum()).sum())


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

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-parameter fit on N x K logits: thread hand-offs cost more than the math
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    temperature = float(log_t.detach().exp())
    # A degenerate fit (e.g. a perfectly separated validation split drives T -> 0) would be worse than none.
    if not (1e-2 <= temperature <= 1e2):
        return 1.0
    return temperature
