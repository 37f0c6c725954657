"""Grad-CAM points at the evidence, and knows when a model has no convolution to explain."""

import torch
from torch import nn

from tasks.gradcam import grad_cam, target_layer
from tasks.models import build_model


def _spot_detector() -> nn.Module:
    """Conv (identity) -> ReLU -> global average -> class 0 likes brightness, class 1 dislikes it."""
    conv = nn.Conv2d(1, 1, 1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0), conv.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0], [-1.0]])), head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_heat_map_peaks_where_the_evidence_is():
    model = _spot_detector()
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 1, 1] = 5.0  # top-left spot
    x[1, 0, 6, 5] = 5.0  # bottom-right spot
    cams = grad_cam(model, x, torch.tensor([0, 0]), target_layer(model))
    assert cams.shape == (2, 8, 8) and float(cams.min()) >= 0 and float(cams.max()) <= 1 + 1e-6
    assert divmod(int(cams[0].argmax()), 8) == (1, 1)
    assert divmod(int(cams[1].argmax()), 8) == (6, 5)
    # the class that is hurt by brightness gets no positive evidence at all
    assert float(grad_cam(model, x, torch.tensor([1, 1]), target_layer(model)).max()) == 0.0


def test_target_layer_is_the_last_conv_or_none():
    cnn = build_model("smallcnn", num_classes=3, in_channels=1)
    assert target_layer(cnn) is [m for m in cnn.modules() if isinstance(m, nn.Conv2d)][-1]
    assert target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is None
    patchify = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(2), nn.MultiheadAttention(8, 2))
    assert target_layer(patchify) is None  # a ViT-like model: its conv is only the patch embedding


def test_grad_cam_leaves_the_model_clean():
    model = build_model("smallcnn", num_classes=3, in_channels=1).eval()
    layer = target_layer(model)
    grad_cam(model, torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2]), layer)
    assert not layer._forward_hooks  # hook removed
    assert all(p.grad is None for p in model.parameters())
