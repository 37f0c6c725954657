"""The image policy and preprocessing, defined once and shared by training, evaluation and serving."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Means/stds of ImageNet for RGB models; a neutral 0.5 for grayscale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a model input: mode, square side, normalisation. Saved with every model."""

    size: int
    mode: Literal["L", "RGB"]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_mode(cls, mode: Literal["L", "RGB"], size: int) -> "Preprocess":
        if mode == "L":
            return cls(size=size, mode="L", mean=(0.5,), std=(0.5,))
        return cls(size=size, mode="RGB", mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(size=int(data["size"]), mode=data["mode"], mean=tuple(data["mean"]), std=tuple(data["std"]))


# Pixel cap for callers that have no params (serving): the validate stage's default.
DEFAULT_MAX_PIXELS = 50_000_000
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "F", *SIXTEEN_BIT_MODES)


class ImagePolicyError(ValueError):
    """The image is refused by the policy (e.g. over the pixel cap) before it is decoded."""


def open_image(source: str | Path | bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "Image.Image":
    """Open and fully decode an image (first frame), with EXIF orientation applied; over max_pixels is refused."""
    from PIL import Image, ImageOps

    fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with fh:
        img = Image.open(fh)
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImagePolicyError(f"{img.width}x{img.height} exceeds the {max_pixels:,}-pixel cap "
                                   "(refused before decoding)")
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    return img


def to_mode(img: "Image.Image", mode: Literal["L", "RGB"]) -> "Image.Image":
    """Convert any PIL mode explicitly: 16/32-bit rescaled (never clipped), alpha composited on white,
    CMYK/YCbCr/RGBX/1-bit through PIL's own conversions."""
    import numpy as np
    from PIL import Image

    if img.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.rint(arr.clip(0, top) * (255.0 / top)).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert(mode) if img.mode != mode else img


def policy_notes(img: "Image.Image", *, n_frames: int = 1, orientation: int | None = None) -> list[str]:
    """What the policy does to this (opened, not yet converted) image, in words, for the manifest."""
    notes = []
    if n_frames > 1:
        notes.append(f"first of {n_frames} frames used")
    if orientation not in (None, 1):
        notes.append(f"EXIF orientation {orientation} applied")
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        notes.append(f"{img.mode} rescaled to 8-bit (not clipped)")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        notes.append("transparency composited on white")
    if img.mode in ("CMYK", "YCbCr", "RGBX"):
        notes.append(f"{img.mode} converted to RGB")
    return notes


def to_uint8_tensor(img: "Image.Image", spec: Preprocess) -> "torch.Tensor":
    """PIL image -> uint8 tensor C x size x size: shorter side resized to size, then centre-cropped."""
    img = to_mode(img, spec.mode)
    if img.size == (spec.size, spec.size):
        # Resize and crop would return it unchanged; for small images torchvision's per-call dispatch (and its
        # import, ~1.5 s) cost more than the decode itself.
        import numpy as np
        import torch

        arr = torch.from_numpy(np.array(img, copy=True))
        return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
    from torchvision.transforms.v2 import functional as F

    tensor = F.pil_to_tensor(img)
    tensor = F.resize(tensor, [spec.size], antialias=True)
    return F.center_crop(tensor, [spec.size, spec.size])


def load_tensor(source: str | Path | bytes, spec: Preprocess) -> "torch.Tensor":
    """File path or bytes -> uint8 tensor ready to batch."""
    return to_uint8_tensor(open_image(source), spec)


def normalize(batch: "torch.Tensor", spec: Preprocess) -> "torch.Tensor":
    """uint8 N x C x H x W -> float normalised by the spec's mean and std."""
    import torch

    mean = torch.tensor(spec.mean, device=batch.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - mean) / std
