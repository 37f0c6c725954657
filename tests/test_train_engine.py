"""Training engine: crash-safe resume, OOM halving, batch-size probe, recipe options, fine-tuning."""

import dataclasses
from pathlib import Path

import pytest
import torch

from tasks.models import build_model
from tasks.preprocess import Preprocess
from tasks.train import (TrainingError, class_weights, find_batch_size, fit, load_checkpoint,
                         random_erase, resolve_batch_size, run_key, trivial_augment)

from train_helpers import alternate_splits, blobs, train_config  # tests/train_helpers.py

SPEC = Preprocess.for_mode("L", 16)
_cfg = train_config
_blobs = blobs


def _model(seed: int = 3):
    torch.manual_seed(seed)
    return build_model("smallcnn", num_classes=2, in_channels=1)


def _strip(history):
    return [{k: v for k, v in row.items() if k != "throughput"} for row in history]


class Killed(Exception):
    pass


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9, "mixup_alpha": 0.4, "random_erasing": 0.5,
                                        "scheduler": "cosine", "warmup_epochs": 1}])
def test_killed_run_resumes_from_its_checkpoint_with_bit_identical_results(tmp_path: Path, extra):
    cfg = _cfg(**extra)
    full, full_best = fit(_model(), _blobs(64, 1), _blobs(32, 2), SPEC, cfg)
    ckpt = tmp_path / "ck" / "last.pt"

    def kill_after_two(row):
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        fit(_model(), _blobs(64, 1), _blobs(32, 2), SPEC, cfg, checkpoint=ckpt, on_epoch=kill_after_two)
    assert load_checkpoint(ckpt)["epoch"] == 2
    torch.manual_seed(999)  # a different process state: everything that matters comes from the checkpoint
    resumed, resumed_best = fit(_model(seed=7), _blobs(64, 1), _blobs(32, 2), SPEC, cfg, checkpoint=ckpt)
    assert resumed.resumed_from_epoch == 2
    assert _strip(resumed.history) == _strip(full.history)
    assert resumed.best_epoch == full.best_epoch
    assert all(torch.equal(full_best[k], resumed_best[k]) for k in full_best)


def test_checkpoint_loads_without_pickle_and_holds_the_whole_training_state(tmp_path: Path):
    ckpt = tmp_path / "last.pt"
    fit(_model(), _blobs(32, 1), _blobs(16, 2), SPEC, _cfg(epochs=1, ema_decay=0.5), checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "best_state", "generator", "torch_rng", "ema",
            "history", "batch_size"} <= set(state)
    assert not list(tmp_path.glob(".*.tmp"))


def test_nan_loss_leaves_no_checkpoint_over_good_weights(tmp_path: Path):
    ckpt = tmp_path / "last.pt"
    with pytest.raises(TrainingError, match="loss became"):
        fit(_model(), _blobs(64, 1), _blobs(32, 2), SPEC, _cfg(lr=1e30, optimizer="sgd"), checkpoint=ckpt)
    assert not ckpt.exists()


def test_run_key_changes_with_params_and_with_data(tmp_path: Path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.csv").write_text("path,label\na.png,0\n")
    key = run_key(_cfg(), tmp_path / "splits")
    assert key == run_key(_cfg(), tmp_path / "splits")
    assert key != run_key(_cfg(lr=0.02), tmp_path / "splits")
    (tmp_path / "splits" / "train.csv").write_text("path,label\na.png,1\n")
    assert key != run_key(_cfg(), tmp_path / "splits")


def _oom_after(model, fail_batches: set[int]):
    """Patch forward to raise CUDA OOM for these training batch sizes (as a too-small GPU would)."""
    original = model.forward

    def forward(x):
        if model.training and x.shape[0] in fail_batches:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(x)

    model.forward = forward
    return model


def test_cuda_oom_halves_the_batch_size_and_records_it():
    model = _oom_after(_model(), {32, 16})
    result, _ = fit(model, _blobs(64, 1), _blobs(32, 2), SPEC, _cfg(batch_size=32, epochs=2))
    assert result.batch_size == 8 and result.oom_retries == 2
    assert len(result.history) == 2


def test_cuda_oom_retries_are_bounded():
    model = _oom_after(_model(), {32, 16, 8, 4})
    with pytest.raises(TrainingError, match="out of memory at batch size 4 after 2 retries"):
        fit(model, _blobs(64, 1), _blobs(32, 2), SPEC, _cfg(batch_size=16, epochs=1), max_oom_retries=2)


def test_find_batch_size_returns_the_largest_power_of_two_that_fits():
    assert find_batch_size(lambda b: b <= 100, cap=1024) == 64
    assert find_batch_size(lambda b: True, cap=300) == 256
    with pytest.raises(TrainingError):
        find_batch_size(lambda b: False, cap=8)


def test_auto_batch_size_on_cpu_is_capped_without_probing():
    model = _model()
    assert resolve_batch_size(_cfg(batch_size="auto"), model, SPEC, n_train=10_000, num_classes=2,
                              device="cpu") == 256
    assert resolve_batch_size(_cfg(batch_size="auto"), model, SPEC, n_train=100, num_classes=2,
                              device="cpu") == 64
    result, _ = fit(model, _blobs(64, 1), _blobs(32, 2), SPEC, _cfg(batch_size="auto", epochs=1))
    assert result.batch_size == 64


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    x_val, y_val = _blobs(32, 2)
    # Validation labels swapped: the better the model learns, the worse validation gets.
    result, _ = fit(_model(), _blobs(64, 1), (x_val, 1 - y_val), SPEC, _cfg(epochs=12, patience=2))
    assert result.stopped_early and len(result.history) < 12
    last_best = max(range(len(result.history)), key=lambda i: (result.history[i]["val/accuracy"],
                                                               -result.history[i]["val/loss"]))
    assert len(result.history) == last_best + 1 + 2


def test_cosine_schedule_warms_up_linearly_then_decays():
    result, _ = fit(_model(), _blobs(64, 1), _blobs(32, 2), SPEC,
                    _cfg(epochs=4, scheduler="cosine", warmup_epochs=1, lr=0.01))
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.01)  # end of warmup: the peak
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] and lrs[3] == pytest.approx(0.0, abs=1e-12)


def test_grad_clip_is_applied(monkeypatch):
    norms = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: norms.append(max_norm) or original(params, max_norm))
    fit(_model(), _blobs(32, 1), _blobs(16, 2), SPEC, _cfg(epochs=1, grad_clip=0.5))
    assert norms == [0.5, 0.5]


def test_balanced_class_weights_follow_inverse_frequency():
    w = class_weights(torch.tensor([0, 0, 0, 1]), 2, "balanced")
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0]))
    assert class_weights(torch.tensor([0, 1]), 2, "none") is None


@pytest.mark.parametrize("extra", [{"ema_decay": 0.8}, {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
                                   {"class_weights": "balanced", "random_erasing": 0.3, "auto_augment": "trivial"},
                                   {"auto_augment": "randaugment", "random_resized_crop": True,
                                    "rrc_scale": (0.5, 1.0)}])
def test_recipe_options_still_learn(extra):
    result, best = fit(_model(), _blobs(64, 1), _blobs(32, 2), SPEC, _cfg(epochs=5, **extra))
    assert result.best_val_accuracy >= 0.9
    model = _model()
    model.load_state_dict(best)


def test_cpu_training_runs_channels_last_and_returns_weights_any_model_loads():
    model = _model()
    _, best = fit(model, _blobs(64, 1), _blobs(32, 2), SPEC, _cfg(epochs=1, translate=0.0))
    conv = model[3].weight  # 32 x 32 x 3 x 3: the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fresh = _model(seed=9)
    fresh.load_state_dict(best)  # the one epoch is the best one
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), model.eval()(x), atol=1e-5)


def test_ema_weights_are_the_ones_returned():
    plain, plain_best = fit(_model(), _blobs(64, 1), _blobs(32, 2), SPEC, _cfg(epochs=2, translate=0.0))
    ema, ema_best = fit(_model(), _blobs(64, 1), _blobs(32, 2), SPEC,
                        _cfg(epochs=2, translate=0.0, ema_decay=0.9))
    assert [h["train/loss"] for h in plain.history] == [h["train/loss"] for h in ema.history]
    assert not torch.equal(plain_best["0.weight"], ema_best["0.weight"])


def test_random_erase_zeroes_rectangles_only_when_on():
    x = torch.ones(16, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    erased = random_erase(x, p=1.0, generator=g)
    per_image = (erased == 0).flatten(1).sum(1)
    assert erased.shape == x.shape and bool((per_image > 0).all())
    assert torch.equal(random_erase(x, p=0.0, generator=g), x)


def test_trivial_augment_works_on_uint8_batches():
    x = (torch.rand(4, 1, 16, 16) * 255).to(torch.uint8)
    torch.manual_seed(0)
    out = trivial_augment(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_freeze_epochs_train_the_head_only_then_everything_with_a_lower_backbone_lr(tmp_path: Path):
    source = _model(seed=11)
    weights = tmp_path / "w.pth"
    torch.save(source.state_dict(), weights)
    model = build_model("smallcnn", num_classes=2, in_channels=1, pretrained=str(weights))
    head_before = model.state_dict()["20.weight"].clone()
    snapshots = []
    cfg = _cfg(epochs=3, freeze_epochs=1, pretrained=str(weights), backbone_lr_mult=0.1, translate=0.0)
    fit(model, _blobs(64, 1), _blobs(32, 2), SPEC, cfg,
        on_epoch=lambda row: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert torch.equal(snapshots[0]["0.weight"], source.state_dict()["0.weight"])  # backbone frozen in epoch 1
    assert not torch.equal(snapshots[0]["20.weight"], head_before)  # the head trained
    assert not torch.equal(snapshots[1]["0.weight"], source.state_dict()["0.weight"])  # unfrozen in epoch 2


def test_param_groups_give_the_backbone_a_scaled_lr():
    from tasks.train import _param_groups

    model = _model()
    groups, backbone = _param_groups(model, _cfg(pretrained="x.pth", backbone_lr_mult=0.1, lr=0.01))
    assert [g["lr"] for g in groups] == pytest.approx([0.001, 0.01])
    assert len(groups[1]["params"]) == 2 and len(backbone) == len(list(model.parameters())) - 2
    assert dataclasses.asdict(_cfg())["pretrained"] is None


def test_lr_find_sweeps_upward_stops_on_divergence_and_suggests_an_lr_inside_the_range():
    from tasks.lr_find import lr_find, suggest_lr

    result = lr_find(_model(), _blobs(64, 1), SPEC, _cfg(batch_size=16), start_lr=1e-5, end_lr=10.0, steps=60)
    assert result.lrs == sorted(result.lrs) and len(result.lrs) == len(result.losses) >= 10
    assert result.lrs[0] <= result.suggested_lr <= result.lrs[-1]
    assert suggest_lr([1e-3, 1e-2, 1e-1, 1.0], [1.0, 0.9, 0.2, 0.15]) == pytest.approx(1e-2)


def test_train_stage_core_resumes_after_a_kill_and_cleans_up_its_checkpoint(tmp_path: Path, image_folder: Path):
    from tasks.models import load_model
    from tasks.train import train

    splits = alternate_splits(image_folder, tmp_path / "splits")
    cfg = _cfg(epochs=3, batch_size=8)
    root = tmp_path / "checkpoints"
    kw = dict(raw_dir=image_folder, splits_dir=splits, dataset_mode="L", checkpoint_root=root)

    def kill_after_one(row):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, out_dir=tmp_path / "a", on_epoch=kill_after_one, **kw)
    assert len(list(root.glob("*/last.pt"))) == 1 and not (tmp_path / "a").exists()
    resumed = train(cfg, out_dir=tmp_path / "a", **kw)
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 3
    assert not list(root.glob("*/last.pt"))
    fresh = train(cfg, out_dir=tmp_path / "b", **kw)
    assert fresh.resumed_from_epoch == 0
    assert _strip(fresh.history) == _strip(resumed.history)
    model, meta = load_model(tmp_path / "a")
    assert meta["classes"] == ["cat", "dog", "fish"] and meta["batch_size"] == 8


def test_train_stage_core_saves_the_resolved_presets_in_model_json(tmp_path: Path, image_folder: Path):
    import json

    from tasks.train import presets, train

    splits = alternate_splits(image_folder, tmp_path / "splits")
    cfg = _cfg(epochs=1, batch_size=8, random_resized_crop=True, rrc_scale=(0.3, 1.0), auto_augment="randaugment")
    train(cfg, raw_dir=image_folder, splits_dir=splits, dataset_mode="L", out_dir=tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert {"model", "classes", "preprocess", "presets"} <= set(meta)
    assert meta["presets"] == json.loads(json.dumps(presets(cfg, SPEC)))
    ops = [op["op"] for op in meta["presets"]["train"]]
    assert ops[:4] == ["Resize", "CenterCrop", "RandomResizedCrop", "RandAugment"]
    rrc = meta["presets"]["train"][2]
    assert rrc["scale"] == [0.3, 1.0] and rrc["size"] == [16, 16]
    assert [op["op"] for op in meta["presets"]["eval"]] == ["Resize", "CenterCrop", "Normalize"]
    assert meta["presets"]["eval"][0]["shorter_side"] == meta["preprocess"]["size"] == 16


def test_a_pinned_weights_file_that_changed_stops_training_before_it_starts(tmp_path: Path):
    """DVC sees train.pretrained's path, not the file: train.pretrained_sha256 pins its bytes."""
    from tasks.io import sha256_file
    from tasks.models import weights_file_sha256
    from tasks.train import train

    weights = tmp_path / "w.pth"
    torch.save(_model(seed=11).state_dict(), weights)
    pinned = sha256_file(weights)
    assert weights_file_sha256(str(weights)) == pinned
    assert weights_file_sha256("DEFAULT") is None and weights_file_sha256(None) is None
    torch.save(_model(seed=12).state_dict(), weights)  # the file is replaced under the same name
    cfg = _cfg(pretrained=str(weights), pretrained_sha256=pinned)
    with pytest.raises(TrainingError, match=f"its sha256 is {sha256_file(weights)}, not train.pretrained_sha256 {pinned}"):
        train(cfg, raw_dir=tmp_path / "raw", splits_dir=tmp_path / "splits", dataset_mode="L", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_built_is_a_training_error_naming_it(tmp_path: Path, image_folder: Path):
    from tasks.train import train

    splits = alternate_splits(image_folder, tmp_path / "splits")
    with pytest.raises(TrainingError, match="unknown model 'notamodel'"):
        train(_cfg(model="notamodel"), raw_dir=image_folder, splits_dir=splits, dataset_mode="L",
              out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()
