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


def build_model(name: str, *, num_classes: int, in_channels: int = 3, pretrained: str | None = None,
                image_size: int | None = None) -> "nn.Module":
    """A model by name: random init, or `pretrained` (torchvision weights name or local state_dict file)
    with its classifier head replaced for num_classes. image_size matters to Vision Transformers only (their
    position embeddings are sized for it): any multiple of the patch size from scratch, 224 with weights."""
    if name in SMALL_MODELS:
        model = _small_cnn(in_channels, num_classes)
        if pretrained:
            load_backbone(model, pretrained)
        return model
    import torchvision

    if in_channels != 3:
        raise ValueError(f"torchvision model {name!r} expects 3 input channels, got {in_channels}")
    named_weights = bool(pretrained) and not _is_weights_file(pretrained)
    sized = {}
    if image_size and name.startswith("vit_"):
        if named_weights and image_size != VIT_WEIGHTS_SIZE:
            raise ValueError(f"{name} with torchvision weights {pretrained!r} takes {VIT_WEIGHTS_SIZE}-pixel images, "
                             f"but train.image_size is {image_size}")
        sized = {} if named_weights else {"image_size": image_size}
    try:
        if named_weights:
            # A torchvision weights name (DEFAULT, IMAGENET1K_V1, ...): downloaded once into the torch cache.
            model = torchvision.models.get_model(name, weights=pretrained)
            replace_head(model, num_classes)
            return model
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **sized)
    except AssertionError as exc:  # torchvision asserts, e.g. a ViT's image size not a multiple of its patch
        raise ValueError(f"cannot build {name!r} for {image_size}-pixel images: {exc}") from None
    except ValueError as exc:
        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown model {name!r}: use {', '.join(SMALL_MODELS)} or a torchvision.models name "
                             "(see torchvision.models.list_models())") from None
        raise ValueError(f"cannot build {name!r} with weights {pretrained!r}: {exc}") from None
    if pretrained:
        load_backbone(model, pretrained)
    return model


def weights_file_sha256(pretrained: str | None) -> str | None:
    """sha256 of a local pretrained weights file; None without one (no weights, a torchvision weights name, or
    a file that is not there: building the model says so)."""
    if not pretrained or not _is_weights_file(pretrained) or not Path(pretrained).is_file():
        return None
    from tasks.io import sha256_file

    return sha256_file(Path(pretrained))


VIT_WEIGHTS_SIZE = 224  # the image size torchvision's ViT weights were trained at (and fix)


def _is_weights_file(pretrained: str) -> bool:
    return pretrained.endswith((".pth", ".pt", ".safetensors", ".bin")) or Path(pretrained).is_file()


def head_name(model: "nn.Module") -> str:
    """Dotted name of the final classification layer (resnet fc, *.classifier[-1], vit heads.head, ...)."""
    from torch import nn

    names = dict(model.named_modules())
    for candidate in ("fc", "heads.head", "head"):
        if isinstance(names.get(candidate), nn.Linear):
            return candidate
    classifier = names.get("classifier")
    if isinstance(classifier, nn.Linear):
        return "classifier"
    if isinstance(classifier, nn.Sequential):
        return f"classifier.{len(classifier) - 1}"
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot find the classifier head of {type(model).__name__}")
    return linears[-1]


def replace_head(model: "nn.Module", num_classes: int) -> None:
    """Swap the classifier head for a freshly initialised one with num_classes outputs."""
    from torch import nn

    name = head_name(model)
    old = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def read_state_dict(path: str | Path) -> dict[str, "torch.Tensor"]:
    """A state_dict from .safetensors or a torch file (weights_only: nothing is unpickled)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    return state


def load_backbone(model: "nn.Module", path: str | Path) -> list[str]:
    """Copy every weight but the head from a file into model; return the head keys left as initialised."""
    state = read_state_dict(path)
    head = head_name(model) + "."
    own = model.state_dict()
    missing = [k for k in own if not k.startswith(head) and k not in state]
    bad = [k for k in own if not k.startswith(head) and k in state and state[k].shape != own[k].shape]
    if missing or bad:
        raise ValueError(f"{path}: does not fit {type(model).__name__}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(bad)} shape mismatches "
                         f"(e.g. {bad[:3]})")
    own.update({k: v for k, v in state.items() if k in own and not k.startswith(head)})
    model.load_state_dict(own)
    return [k for k in own if k.startswith(head)]


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


def channels_last(device: str) -> bool:
    """Whether the model and its batches run in channels_last memory format on this device: on CUDA
    (tensor cores) and on CPU, where oneDNN's convolutions are faster that way (measured per training step:
    smallcnn 1.25x, MobileNetV3 1.5x, EfficientNet-B0 1.5x, ResNet-18 about even, ConvNeXt and ViT even); not
    on MPS. Inference too (load_model: evaluation, `imgclf predict`, serving), measured on CPU: smallcnn 1.8x
    per batch of 256, EfficientNet-B0 1.5x, MobileNetV3 1.3x, ResNet-18 1.25x per batch of 16, batch 1 even to
    1.3x, ViT even. The saved weights are the same either way (save_model writes them contiguous)."""
    return device.split(":")[0] in {"cuda", "cpu"}


def load_model(directory: Path, *, device: str = "cpu") -> tuple["nn.Module", dict[str, Any]]:
    """Rebuild a saved model from its name and weights, for inference on device (channels_last where that is
    faster: see channels_last); nothing is unpickled."""
    import torch
    from safetensors.torch import load_file

    meta = json.loads((Path(directory) / META_FILE).read_text())
    spec = Preprocess.from_dict(meta["preprocess"])
    model = build_model(meta["model"], num_classes=len(meta["classes"]), in_channels=spec.channels,
                        image_size=spec.size)
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE), device=device))
    model.to(device)
    if channels_last(device):
        model.to(memory_format=torch.channels_last)
    return model.eval(), meta
