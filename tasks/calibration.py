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
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    The NLL is convex in b = 1/T, with gradient mean(E_p[z] - z_y) and curvature mean(Var_p[z]) in closed
    form, so a damped Newton iteration in float64 finds it in a few steps; torch.optim's LBFGS gave the same
    T but its first use imports torch._dynamo (~1 s)."""
    import torch

    if len(targets) == 0:
        return 1.0
    z = logits.detach().double()
    z_true = z.gather(1, targets.long()[:, None]).squeeze(1)

    def nll(b: float) -> float:
        return float((torch.logsumexp(b * z, 1) - b * z_true).mean())

    b, loss = 1.0, nll(1.0)
    for _ in range(max_iter):
        p = torch.softmax(b * z, 1)
        mean_z = (p * z).sum(1)
        grad = float((mean_z - z_true).mean())
        curvature = float(((p * z * z).sum(1) - mean_z ** 2).mean())
        step = grad / curvature if curvature > 1e-12 else grad
        while True:  # backtrack: stay positive and never increase the loss
            new_b = b - step
            new_loss = nll(new_b) if new_b > 0 else float("inf")
            if new_loss <= loss or abs(step) < 1e-12:
                break
            step /= 2
        if new_b <= 0 or abs(new_b - b) <= 1e-10 * max(1.0, b) or new_b > 1e4:
            b = new_b if new_b > 0 else b
            break
        b, loss = new_b, new_loss
    temperature = 1.0 / b
    # A degenerate fit (e.g. a perfectly separated validation split drives T -> 0, the loss flattening out
    # before it gets there) would be worse than none.
    if not (1e-2 <= temperature <= 1e2) or nll(1e2) <= nll(b):
        return 1.0
    return temperature
