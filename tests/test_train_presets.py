"""Training presets (transforms.v2, saved with the model) and the per-batch progress callback contract."""

import functools
import math

import pytest
import torch

from tasks.models import build_model
from tasks.preprocess import Preprocess
from tasks.train import BATCH_FIELDS, ProgressReporter, fit, per_image, presets, sample_ops

from train_helpers import alternate_splits, blobs, train_config  # tests/train_helpers.py

SPEC = Preprocess.for_mode("L", 16)
_cfg = functools.partial(train_config, epochs=2)
_blobs = blobs


def _model():
    torch.manual_seed(3)
    return build_model("smallcnn", num_classes=2, in_channels=1)


def test_on_batch_is_called_once_per_batch_with_the_documented_fields():
    rows: list[dict] = []
    result, _ = fit(_model(), _blobs(40, 1), _blobs(16, 2), SPEC, _cfg(), on_batch=rows.append)
    steps = math.ceil(40 / 16)
    assert len(rows) == 2 * steps
    assert all(set(r) == set(BATCH_FIELDS) for r in rows)
    assert [(r["epoch"], r["step"]) for r in rows] == [(e, s) for e in (1, 2) for s in range(1, steps + 1)]
    assert all(r["steps"] == steps and r["epochs"] == 2 for r in rows)
    assert [r["images"] for r in rows[:steps]] == [16, 32, 40]
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and r["lr"] > 0 and r["throughput"] > 0
               for r in rows)
    # the last batch of an epoch: running accuracy is the epoch's, lr is the one the history records
    for epoch_row in result.history:
        last = [r for r in rows if r["epoch"] == epoch_row["epoch"]][-1]
        assert last["accuracy"] == pytest.approx(epoch_row["train/accuracy"])
        assert last["lr"] == epoch_row["lr"]


def test_on_batch_does_not_change_training():
    plain, _ = fit(_model(), _blobs(40, 1), _blobs(16, 2), SPEC, _cfg())
    watched, _ = fit(_model(), _blobs(40, 1), _blobs(16, 2), SPEC, _cfg(), on_batch=lambda row: None)
    strip = lambda h: [{k: v for k, v in r.items() if k != "throughput"} for r in h]  # noqa: E731
    assert strip(plain.history) == strip(watched.history)


def test_reporter_degrades_to_one_line_per_epoch_when_not_a_terminal():
    import io

    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with ProgressReporter(console, 2) as reporter:
        assert reporter.on_batch is None
        reporter.on_epoch({"epoch": 1, "train/loss": 0.5, "val/loss": 0.4, "val/accuracy": 0.9, "lr": 1e-3,
                           "throughput": 100.0})
    assert out.getvalue().splitlines() == ["epoch   1/2  loss 0.5000  val_loss 0.4000  val_acc 0.9000  "
                                           "lr 1.00e-03  100 img/s"]
    live = ProgressReporter(Console(file=io.StringIO(), force_terminal=True), 2)
    assert live.on_batch is not None


def test_default_presets_are_the_eval_decode_plus_the_existing_batch_ops():
    p = presets(_cfg(), SPEC)
    assert [op["op"] for op in p["train"]] == ["Resize", "CenterCrop", "Normalize", "RandomTranslate"]
    assert [op["op"] for op in p["eval"]] == ["Resize", "CenterCrop", "Normalize"]
    assert sample_ops(_cfg(), SPEC) is None  # the digits recipe runs no per-image op


def test_presets_follow_params():
    from tasks.config import Params
    from tasks.train import config_from_params

    params = Params.model_validate({"train": {"random_resized_crop": True, "rrc_scale": [0.25, 0.9],
                                              "auto_augment": "randaugment", "hflip": True,
                                              "random_erasing": 0.25, "mixup_alpha": 0.2, "cutmix_alpha": 1.0}})
    cfg = config_from_params(params)
    p = presets(cfg, Preprocess.for_mode("RGB", cfg.image_size))
    ops = [op["op"] for op in p["train"]]
    assert ops == ["Resize", "CenterCrop", "RandomResizedCrop", "RandAugment", "Normalize", "RandomHorizontalFlip",
                   "RandomTranslate", "RandomErasing", "RandomChoice"]
    assert p["train"][2]["scale"] == [0.25, 0.9]
    assert [m["op"] for m in p["train"][-1]["of"]] == ["MixUp", "CutMix"]


def test_legacy_trivial_augment_key_still_means_trivial_and_bad_scales_are_refused():
    from pydantic import ValidationError

    from tasks.config import TrainParams

    assert TrainParams.model_validate({"trivial_augment": True}).auto_augment == "trivial"
    assert TrainParams.model_validate({"trivial_augment": False}).auto_augment == "none"
    with pytest.raises(ValidationError):
        TrainParams.model_validate({"rrc_scale": [0.9, 0.5]})
    with pytest.raises(ValidationError):
        TrainParams.model_validate({"auto_augment": "autoaugment"})


def test_random_resized_crop_changes_pixels_but_keeps_shape_and_dtype():
    x = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    op = sample_ops(_cfg(random_resized_crop=True, rrc_scale=(0.1, 0.3)), Preprocess.for_mode("RGB", 16))
    torch.manual_seed(0)
    out = per_image(x, op)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_randaugment_option_runs_per_image_on_uint8(mode):
    spec = Preprocess.for_mode(mode, 16)
    x = (torch.rand(8, spec.channels, 16, 16) * 255).to(torch.uint8)
    op = sample_ops(_cfg(auto_augment="randaugment"), spec)
    torch.manual_seed(0)
    out = per_image(x, op)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)


def test_in_memory_auto_caches_under_the_cap_and_streams_over_it():
    from tasks.train import use_cache

    spec = Preprocess.for_mode("RGB", 224)  # 150,528 bytes per image
    assert use_cache("auto", 1000, spec, 4.0) and not use_cache("auto", 30_000, spec, 4.0)
    assert use_cache(True, 10**9, spec, 0.001) and not use_cache(False, 1, spec, 4.0)


def test_streaming_and_in_memory_paths_give_the_same_batches_and_the_same_training(tmp_path, image_folder):
    from tasks.train import DecodedFiles, iter_batches, prepare

    splits = alternate_splits(image_folder, tmp_path / "splits")
    kw = dict(raw_dir=image_folder, splits_dir=splits, dataset_mode="L")
    cached = prepare(_cfg(in_memory=True), **kw)
    streamed = prepare(_cfg(in_memory=False), **kw)
    assert cached.in_memory and not streamed.in_memory and isinstance(streamed.train[0], DecodedFiles)
    assert torch.equal(cached.train[1], streamed.train[1]) and cached.classes == streamed.classes
    order = torch.randperm(len(cached.train[1]), generator=torch.Generator().manual_seed(0))
    chunks = list(order.split(5))
    a = list(iter_batches(cached.train[0], chunks))
    b = list(iter_batches(streamed.train[0], chunks, num_workers=2))
    assert [x.shape for x in a] == [x.shape for x in b] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert [cached.train[1][c].tolist() for c in chunks] == [streamed.train[1][c].tolist() for c in chunks]
    assert torch.equal(streamed.train[0][chunks[0]], a[0])  # batch indexing like the cache (lr_find)

    def run(data, cfg):
        torch.manual_seed(3)
        model = build_model("smallcnn", num_classes=3, in_channels=1)
        return fit(model, data.train, data.val, data.spec, cfg)[0].history

    strip = lambda h: [{k: v for k, v in r.items() if k != "throughput"} for r in h]  # noqa: E731
    cfg = _cfg(batch_size=8, in_memory=False, num_workers=1)
    assert strip(run(cached, cfg)) == strip(run(streamed, cfg))


def test_a_run_with_in_memory_false_trains_and_saves(tmp_path, image_folder):
    import json

    from tasks.models import load_model
    from tasks.train import train

    splits = alternate_splits(image_folder, tmp_path / "splits")
    result = train(_cfg(batch_size=8, in_memory=False, num_workers=0), raw_dir=image_folder, splits_dir=splits,
                   dataset_mode="L", out_dir=tmp_path / "m")
    assert len(result.history) == 2 and all(math.isfinite(r["train/loss"]) for r in result.history)
    model, meta = load_model(tmp_path / "m")
    assert meta["classes"] == ["cat", "dog", "fish"]
    assert json.loads((tmp_path / "m" / "model.json").read_text())["presets"]["eval"]
