"""Batch inference shared by evaluation, `imgclf predict` and the served pyfunc."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tasks.preprocess import Preprocess, load_tensor, normalize

if TYPE_CHECKING:
    import pandas as pd
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


def predict_sources(model: "nn.Module", spec: Preprocess, classes: Sequence[str],
                    sources: Sequence[str | Path | bytes], *, batch_size: int = 64) -> "pd.DataFrame":
    """Image files or bytes -> DataFrame(label, probability, p_<class>...), one row per input; raises on a bad
    one. Kept for registered versions logged before per-row errors: their own serving.py calls it, and in
    process (imgclf predict, the gate's re-score) it resolves to this module."""
    import pandas as pd
    import torch

    if not sources:
        return pd.DataFrame(columns=["label", "probability", *[f"p_{c}" for c in classes]])
    probs = predict_proba(model, torch.stack([load_tensor(s, spec) for s in sources]), spec, batch_size=batch_size)
    top_p, top_i = probs.max(dim=1)
    frame = pd.DataFrame({"label": [classes[i] for i in top_i.tolist()], "probability": top_p.tolist()})
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, k].tolist()
    return frame
