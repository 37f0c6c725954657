"""Models by name (torchvision's factory, plus one small CNN for small images) and pickle-free weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.io import write_json
from tasks.preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

SMALL_MODELS = ("smallcnn",)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def _small_cnn(in_channels: int, num_classes: int) -> "nn.Module":
    """A compact VGG-style CNN for images of 16-64 px (digits, icons, thumbnails)."""
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(128, num_classes),
    )


def input_mode(model_name: str, dataset_mode: str) -> str:
    """The channel mode a model is fed: small models follow the data, torchvision models take RGB."""
    return dataset_mode if model_name in SMALL_MODELS else "RGB"


def build_model(name: str, *, num_classes: int, in_channels: int = 3) -> "nn.Module":
    """A fresh, randomly initialised model by name."""
    if name in SMALL_MODELS:
        return _small_cnn(in_channels, num_classes)
    import torchvision

    if in_channels != 3:
        raise ValueError(f"torchvision model {name!r} expects 3 input channels, got {in_channels}")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError:
        raise ValueError(f"unknown model {name!r}: use {', '.join(SMALL_MODELS)} or a torchvision.models name "
                         "(see torchvision.models.list_models())") from None


def save_model(directory: Path, model: "nn.Module", *, name: str, classes: list[str],
               preprocess: Preprocess, extra: dict[str, Any] | None = None) -> None:
    """Write weights (safetensors) and everything needed to rebuild and feed the model (model.json)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    write_json(directory / META_FILE, {"model": name, "classes": classes, "preprocess": preprocess.to_dict(),
                                       **(extra or {})})


def load_model(directory: Path, *, device: str = "cpu") -> tuple["nn.Module", dict[str, Any]]:
    """Rebuild a saved model from its name and weights; nothing is unpickled."""
    from safetensors.torch import load_file

    meta = json.loads((Path(directory) / META_FILE).read_text())
    spec = Preprocess.from_dict(meta["preprocess"])
    model = build_model(meta["model"], num_classes=len(meta["classes"]), in_channels=spec.channels)
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE), device=device))
    return model.to(device).eval(), meta
