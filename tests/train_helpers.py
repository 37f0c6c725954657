"""Shared by the training tests: a small TrainConfig, a separable two-class uint8 dataset, split CSVs."""

from pathlib import Path

import torch

from tasks.train import TrainConfig


def train_config(**kw) -> TrainConfig:
    """A 16x16 smallcnn recipe on the CPU; keyword arguments override any field."""
    base = dict(model="smallcnn", image_size=16, epochs=4, batch_size=16, optimizer="adamw", lr=0.01,
                weight_decay=0.0, label_smoothing=0.0, hflip=False, translate=0.1, device="cpu", seed=3)
    return TrainConfig(**{**base, **kw})


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two easily separable classes: bright top half vs bright bottom half."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 16, 16, generator=g) * 60).to(torch.uint8)
    x[y == 0, :, :8] += 150
    x[y == 1, :, 8:] += 150
    return x, y


def alternate_splits(image_folder: Path, splits: Path) -> Path:
    """train.csv / val.csv over an image folder's files, alternating, in the split stage's format."""
    import pandas as pd

    rows = [(f"{p.parent.name}/{p.name}", p.parent.name) for p in sorted(image_folder.rglob("*.png"))]
    splits.mkdir()
    pd.DataFrame(rows[0::2], columns=["path", "label"]).to_csv(splits / "train.csv", index=False)
    pd.DataFrame(rows[1::2], columns=["path", "label"]).to_csv(splits / "val.csv", index=False)
    return splits
