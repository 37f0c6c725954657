"""Training core on tiny in-memory tensors: it learns, it is deterministic, it refuses NaN."""

import dataclasses
import functools

import pytest
import torch

from tasks.models import build_model
from tasks.preprocess import Preprocess
from tasks.train import TrainConfig, TrainingError, augment, fit, resolve_device

from train_helpers import blobs, train_config  # tests/train_helpers.py

SPEC = Preprocess.for_mode("L", 16)
_cfg = functools.partial(train_config, translate=0.0)
_blobs = blobs


def _fit(cfg: TrainConfig):
    torch.manual_seed(cfg.seed)
    model = build_model("smallcnn", num_classes=2, in_channels=1)
    return fit(model, _blobs(64, 1), _blobs(32, 2), SPEC, cfg)


def test_fit_learns_a_separable_problem_and_records_every_epoch():
    result, best = _fit(_cfg())
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.best_val_accuracy >= 0.9
    assert set(result.history[0]) >= {"train/loss", "val/loss", "val/accuracy", "lr", "throughput"}
    assert best and all(torch.isfinite(v.float()).all() for v in best.values())


def test_same_seed_gives_identical_history_on_cpu():
    a, _ = _fit(_cfg(epochs=2, translate=0.1, hflip=True))
    b, _ = _fit(_cfg(epochs=2, translate=0.1, hflip=True))
    strip = lambda h: [{k: v for k, v in row.items() if k != "throughput"} for row in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)


def test_nan_loss_stops_training_with_a_clear_error():
    with pytest.raises(TrainingError, match="loss became (nan|inf)"):
        _fit(_cfg(lr=1e30, optimizer="sgd"))


def test_augment_keeps_shape_and_changes_pixels_but_not_without_augmentation():
    x = torch.randn(8, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    shifted = augment(x, translate=0.2, hflip=True, generator=g)
    assert shifted.shape == x.shape and not torch.allclose(shifted, x)
    assert torch.equal(augment(x, translate=0.0, hflip=False, generator=g), x)


def test_device_resolution_honours_an_explicit_choice():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in {"cpu", "cuda", "mps"}
    assert dataclasses.asdict(_cfg())["device"] == "cpu"


def test_an_explicit_device_that_is_not_there_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="train.device is cuda but torch sees no CUDA device"):
        resolve_device("cuda")
