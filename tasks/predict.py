"""Batch inference shared by evaluation, `imgclf predict` and the served pyfunc."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.preprocess import Preprocess, normalize

if TYPE_CHECKING:
    import torch
    from torch import nn


def predict_logits(model: "nn.Module", images: "torch.Tensor", spec: Preprocess, *,
                   batch_size: int = 256) -> "torch.Tensor":
    """uint8 N x C x H x W -> raw float logits N x K on the CPU (eval mode, no grad)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(model(normalize(images[start:start + batch_size].to(device), spec)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def predict_proba(model: "nn.Module", images: "torch.Tensor", spec: Preprocess, *,
                  batch_size: int = 256) -> "torch.Tensor":
    """uint8 N x C x H x W -> class probabilities N x K."""
    import torch

    logits = predict_logits(model, images, spec, batch_size=batch_size)
    return torch.softmax(logits, dim=1) if logits.numel() else logits
