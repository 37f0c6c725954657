"""The built-in sample: scikit-learn's handwritten digits as real PNG files, one folder per class."""

from __future__ import annotations

from pathlib import Path

SAMPLE_PREFIX = "sample:"
SAMPLES = ("digits",)


def materialise_digits(dest: Path, *, size: int = 32) -> int:
    """Write the 1,797 digits (8x8, 17 grey levels) as size x size grayscale PNGs under dest/<digit>/."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = dest / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        big.save(folder / f"digit_{index:04d}.png", optimize=False)
    return len(pixels)


def materialise(name: str, dest: Path, *, size: int = 32) -> int:
    """Write a named built-in sample into dest; returns the number of images."""
    if name == "digits":
        return materialise_digits(dest, size=size)
    raise ValueError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
