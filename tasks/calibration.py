"""Calibration: expected calibration error, reliability bins and temperature scaling (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass
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


TEMPERATURE_RANGE = (1e-3, 1e3)  # a fitted temperature is clamped into this range (documented in the README)


@dataclass(frozen=True)
class TemperatureFit:
    """A temperature and how it was found: "fitted", "clamped" into TEMPERATURE_RANGE, or "fallback" (T = 1)."""

    temperature: float
    status: str
    reason: str | None = None  # why it was clamped or fell back; None when fitted
    nll_before: float | None = None  # mean NLL on the fitting split at T = 1 ...
    nll_after: float | None = None  # ... and at the returned temperature


def temperature_fit(logits: "torch.Tensor", targets: "torch.Tensor", *, max_iter: int = 200,
                    t_range: tuple[float, float] = TEMPERATURE_RANGE) -> TemperatureFit:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017), and how it was found.

    The NLL is convex in b = 1/T with gradient g(b) = mean(E_p[z] - z_y), non-decreasing in b, and curvature
    mean(Var_p[z]) in closed form: a Newton iteration safeguarded by bisection finds the root of g in a few
    steps (torch.optim's LBFGS gave the same T but its first use imports torch._dynamo, ~1 s).

    The NLL has a minimum at a finite T > 0 unless (a) every image has its true class on top (a perfectly
    separated split: the NLL keeps falling as T -> 0) or (b) the logits do not favour the true class at all
    (g(0) >= 0: it is lowest as T -> infinity). Those fits are degenerate and fall back to T = 1 with the
    reason. A real minimum is kept however small (an under-confident model), clamped into t_range."""
    import torch

    t_min, t_max = t_range
    if len(targets) == 0:
        return TemperatureFit(1.0, "fallback", "no images to fit a temperature on")
    z = logits.detach().double()
    y = targets.long()[:, None]
    z_true = z.gather(1, y).squeeze(1)

    def nll(b: float) -> float:
        return float((torch.logsumexp(b * z, 1) - b * z_true).mean())

    def grad_curv(b: float) -> tuple[float, float]:
        p = torch.softmax(b * z, 1)
        mean_z = (p * z).sum(1)
        return float((mean_z - z_true).mean()), float(((p * z * z).sum(1) - mean_z ** 2).mean())

    def result(b: float | None, status: str, reason: str | None = None) -> TemperatureFit:
        return TemperatureFit(1.0 if b is None else 1.0 / b, status, reason, nll(1.0), nll(1.0 if b is None else b))

    margin = z_true - z.scatter(1, y, float("-inf")).max(1).values
    if bool((margin >= 0).all()):
        return result(None, "fallback", "every image has its true class on top (a perfectly separated split): "
                      "the NLL keeps falling as T -> 0 and has no minimum; T = 1 (no scaling)")
    if float((z.mean(1) - z_true).mean()) >= 0:
        return result(None, "fallback", "the logits do not favour the true class (the NLL is lowest as "
                      "T -> infinity, i.e. uniform predictions); T = 1 (no scaling)")
    lo, hi = 1.0 / t_max, 1.0 / t_min  # the allowed bracket in b = 1/T
    if grad_curv(hi)[0] < 0:
        return result(hi, "clamped", f"the NLL is lowest below T = {t_min:g}; clamped to it")
    if grad_curv(lo)[0] > 0:
        return result(lo, "clamped", f"the NLL is lowest above T = {t_max:g}; clamped to it")
    b = min(max(1.0, lo), hi)
    for _ in range(max_iter):
        g, curvature = grad_curv(b)
        if g == 0:
            break
        lo, hi = (b, hi) if g < 0 else (lo, b)
        newton = b - g / curvature if curvature > 0 else float("nan")
        new_b = newton if lo < newton < hi else (lo * hi) ** 0.5  # Newton inside the bracket, else bisect (log)
        done = abs(new_b - b) <= 1e-12 * b or hi - lo <= 1e-12 * b
        b = new_b
        if done:
            break
    return result(b, "fitted")
