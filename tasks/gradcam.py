"""Grad-CAM (Selvaraju et al. 2017) for CNNs with one forward hook: where in the image did the model look?"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def target_layer(model: "nn.Module") -> "nn.Module | None":
    """The last Conv2d of a CNN (the usual Grad-CAM layer); None for models without convolutions and for
    attention models (ViT's only Conv2d is its patch embedding, where Grad-CAM says nothing useful)."""
    from torch import nn

    modules = list(model.modules())
    if any("Attention" in type(m).__name__ for m in modules):
        return None
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(model: "nn.Module", batch: "torch.Tensor", classes: "torch.Tensor", layer: "nn.Module") -> "torch.Tensor":
    """Normalised input batch + class per image -> N x H x W heat maps in [0, 1] at the input's resolution."""
    import torch
    import torch.nn.functional as F

    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.__setitem__("act", output))
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(batch.detach().clone().requires_grad_(True))  # a graph even if weights are frozen
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            # Images are independent in eval mode, so one gradient call gives every image its own gradient;
            # autograd.grad (not backward) leaves the parameters' .grad untouched.
            (grad,) = torch.autograd.grad(score, captured["act"])
    finally:
        handle.remove()
    act, grad = captured["act"].detach(), grad.detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu()
