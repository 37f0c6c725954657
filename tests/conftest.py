"""Shared fixtures: tiny image datasets written with PIL into tmp_path (no network, no repo data)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE_PATH = REPO_ROOT / "expectations" / "manifest.json"
PARAMS_PATH = REPO_ROOT / "params.yaml"

DEFAULT_CLASSES = ("cat", "dog", "fish")


def write_noise_png(path: Path, *, seed: int, size: int = 16, mode: str = "L") -> Path:
    """Write one PNG of seeded random noise (distinct seed -> distinct bytes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_image_folder(root: Path, *, classes: Iterable[str] = DEFAULT_CLASSES, per_class: int = 12,
                       size: int = 16, mode: str = "L", seed: int = 0) -> Path:
    """Write root/<class>/img_NN.png, per_class distinct noise PNGs per class; return root."""
    for c_index, label in enumerate(classes):
        for i in range(per_class):
            write_noise_png(root / label / f"img_{i:02d}.png",
                            seed=seed * 1_000_003 + c_index * 10_007 + i, size=size, mode=mode)
    return root


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_image_folder(name="images", **kwargs) writes a class-per-folder dataset under tmp_path."""

    def _make(name: str = "images", **kwargs) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)

    return _make


@pytest.fixture
def image_folder(make_image_folder: Callable[..., Path]) -> Path:
    """3 classes (cat, dog, fish) x 12 distinct 16x16 grayscale PNGs under tmp_path/images."""
    return make_image_folder("images")


@pytest.fixture
def suite_path() -> Path:
    """The committed Great Expectations suite for the manifest."""
    return SUITE_PATH
