"""Metrics on hand-computable inputs, slices, the evaluate core, and the whole stage on a tiny saved model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks.evaluate import (
    LATENCY_B1_BUDGET_S,
    LATENCY_B64_BUDGET_S,
    EvalConfig,
    Outputs,
    bootstrap_ci,
    compute_metrics,
    evaluate,
    flat_metrics,
    plot_confusion,
    run,
    size_bucket,
    slice_attributes,
    slice_metrics,
    worst_indices,
    worst_slice,
)
from tasks.export import keep_timing, latency_floor, time_call
from tasks.models import build_model, save_model
from tasks.preprocess import Preprocess

CONTRACT_KEYS = {"accuracy", "macro_f1", "top5_accuracy", "weighted_f1", "macro_precision", "macro_recall",
                 "roc_auc_ovr", "ece", "ece_before", "accuracy_ci95", "macro_f1_ci95", "n_test", "test_hash",
                 "per_class", "latency_ms_b1", "latency_ms_b64", "onnx", "status"}


def test_compute_metrics_matches_a_hand_count():
    # 4 samples, 2 classes: predictions 0,0,1,1 for targets 0,1,1,1 -> accuracy 3/4
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    targets = torch.tensor([0, 1, 1, 1])
    m = compute_metrics(probs, targets, ["cat", "dog"])
    assert m["accuracy"] == pytest.approx(0.75)
    # class cat: P=1/2, R=1, F1=2/3; class dog: P=1, R=2/3, F1=0.8
    assert m["per_class"]["cat"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["dog"]["recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["macro_precision"] == pytest.approx(0.75) and m["macro_recall"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["weighted_f1"] == pytest.approx((2 / 3 * 1 + 0.8 * 3) / 4)
    assert m["per_class"]["dog"]["support"] == 3 and m["n_test"] == 4
    # AUC for "dog" scores: positives .2 .7 .9 vs negative .1 -> every pair ranked right
    assert m["roc_auc_ovr"] == pytest.approx(1.0)
    assert m["top5_accuracy"] == pytest.approx(1.0)  # k=2 < 5: top-k is capped at the class count


def test_top5_accuracy_counts_a_hit_anywhere_in_the_five_best():
    probs = torch.eye(7)[[6, 6]] * 0.5 + torch.tensor([0.0, 0.1, 0.09, 0.08, 0.07, 0.06, 0.0]) * 0.1
    # target 1 is in the top five for both rows, target 0 never is
    assert compute_metrics(probs, torch.tensor([1, 1]), list("abcdefg"))["top5_accuracy"] == pytest.approx(1.0)
    assert compute_metrics(probs, torch.tensor([0, 0]), list("abcdefg"))["top5_accuracy"] == pytest.approx(0.0)


def test_roc_auc_leaves_out_classes_without_test_images():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    m = compute_metrics(probs, torch.tensor([0, 1, 0]), ["a", "b", "c"])
    assert m["roc_auc_ovr"] == pytest.approx(1.0)


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 400)
    pred = np.where(rng.random(400) < 0.8, targets, (targets + 1) % 3)
    small = bootstrap_ci(pred[:50], targets[:50], 3, samples=500, seed=1)
    big = bootstrap_ci(pred, targets, 3, samples=500, seed=1)
    acc = (pred == targets).mean()
    assert big["accuracy"][0] < acc < big["accuracy"][1]
    assert big["accuracy"][1] - big["accuracy"][0] < small["accuracy"][1] - small["accuracy"][0]
    assert 0 <= big["macro_f1"][0] <= big["macro_f1"][1] <= 1
    assert bootstrap_ci(pred, targets, 3, samples=500, seed=1) == big  # seeded
    perfect = bootstrap_ci(targets, targets, 3, samples=200)
    assert perfect == {"accuracy": [1.0, 1.0], "macro_f1": [1.0, 1.0]}


def test_bootstrap_macro_f1_agrees_with_torchmetrics_on_the_full_sample():
    # With one "resample" equal to the data itself the interval collapses onto the point estimate.
    targets = np.array([0, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 1])
    m = compute_metrics(torch.nn.functional.one_hot(torch.tensor(pred), 3).float(), torch.tensor(targets),
                        ["a", "b", "c"])

    class Identity:
        def integers(self, low, high, size):
            return np.tile(np.arange(high), (size[0], 1))

    import tasks.evaluate as ev

    real = np.random.default_rng
    try:
        np.random.default_rng = lambda seed=None: Identity()  # type: ignore[assignment]
        ci = ev.bootstrap_ci(pred, targets, 3, samples=3)
    finally:
        np.random.default_rng = real
    assert ci["macro_f1"][0] == pytest.approx(m["macro_f1"])
    assert ci["accuracy"][0] == pytest.approx(m["accuracy"])


def test_size_buckets_use_the_shorter_side():
    assert size_bucket(16, 500) == "<32"
    assert size_bucket(32, 32) == "32-63"
    assert size_bucket(300, 640) == "256-511"
    assert size_bucket(4000, 3000) == ">=1024"
    assert size_bucket(float("nan"), 3) == "unknown"


def test_slice_metrics_reveal_a_regression_hidden_in_the_average():
    manifest = pd.DataFrame({
        "path": [f"{c}/{src}/{i}.png" for c in ("a", "b") for src in ("phone", "scanner") for i in range(10)],
        "label": [c for c in ("a", "b") for _ in range(20)], "format": "PNG", "mode": "L",
        "width": 32, "height": 32,
    })
    preds = manifest[["path", "label"]].copy()
    preds["prediction"] = preds["label"]
    wrong = preds["path"].str.contains("phone") & preds["path"].str.endswith(("0.png", "1.png", "2.png", "3.png"))
    preds.loc[wrong, "prediction"] = preds.loc[wrong, "label"].map({"a": "b", "b": "a"})
    rows = slice_metrics(preds, slice_attributes(manifest), ["folder", "format", "size_bucket"])
    by = {(r["attribute"], r["value"]): r for r in rows}
    assert by[("folder", "phone")]["accuracy"] == pytest.approx(0.6)
    assert by[("folder", "scanner")]["accuracy"] == pytest.approx(1.0)
    assert by[("folder", "phone")]["accuracy_delta"] == pytest.approx(0.6 - 0.8)
    assert by[("format", "PNG")]["n"] == 40 and by[("size_bucket", "32-63")]["accuracy"] == pytest.approx(0.8)
    worst = worst_slice(rows, min_images=5)
    assert (worst["attribute"], worst["value"]) == ("folder", "phone")  # single-valued attributes never win
    assert worst_slice(rows, min_images=100) is None
    with pytest.raises(ValueError, match="camera"):
        slice_metrics(preds, slice_attributes(manifest), ["camera"])


def test_worst_indices_are_highest_loss_first():
    assert worst_indices([0.1, 3.0, 0.5, 3.0], 3) == [1, 3, 2]
    assert worst_indices([1.0], 0) == []


def _tiny_project(tmp_path: Path, *, per_class: int = 6) -> dict[str, Path]:
    """Two classes (dark/light) of 16x16 images, splits, manifest and an (untrained) saved smallcnn."""
    raw = tmp_path / "raw"
    rows = []
    for label, value in (("dark", 20), ("light", 230)):
        (raw / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (16, 16), value + 3 * i).save(raw / label / f"{i}.png")
            rows.append({"path": f"{label}/{i}.png", "label": label})
    frame = pd.DataFrame(rows)
    splits = tmp_path / "splits"
    splits.mkdir()
    frame[frame.index % 3 == 0].to_csv(splits / "test.csv", index=False)
    frame[frame.index % 3 == 1].to_csv(splits / "val.csv", index=False)
    frame[frame.index % 3 == 2].to_csv(splits / "train.csv", index=False)
    manifest = frame.assign(format="PNG", mode="L", width=16, height=16, accepted=True)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    torch.manual_seed(0)
    save_model(tmp_path / "model", build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["dark", "light"], preprocess=Preprocess.for_mode("L", 16))
    return {"raw": raw, "splits": splits, "model": tmp_path / "model", "manifest": tmp_path / "manifest.csv"}


def test_evaluate_scores_every_test_image_and_calibrates_on_validation(tmp_path: Path):
    p = _tiny_project(tmp_path)
    result = evaluate(p["model"], p["splits"] / "test.csv", p["raw"], val_csv=p["splits"] / "val.csv",
                      bootstrap_samples=200)
    m = result.metrics
    assert m["n_test"] == 4 and 0.0 <= m["accuracy"] <= 1.0
    assert list(result.predictions.columns) == ["path", "label", "prediction", "probability", "loss"]
    assert sum(map(sum, result.confusion)) == 4
    assert len(m["test_hash"]) == 64
    assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
    assert m["temperature"] > 0 and 0 <= m["ece"] <= 1 and 0 <= m["ece_before"] <= 1
    # loss is the cross-entropy of the probability given to the true label
    row = result.predictions.iloc[0]
    p_true = row["probability"] if row["label"] == row["prediction"] else None
    if p_true is not None:
        assert row["loss"] == pytest.approx(-np.log(p_true), rel=1e-4)
    plot_confusion(result.confusion, ["dark", "light"], tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").size[0] > 100


def test_without_temperature_scaling_ece_is_the_uncalibrated_one(tmp_path: Path):
    p = _tiny_project(tmp_path)
    m = evaluate(p["model"], p["splits"] / "test.csv", p["raw"], val_csv=p["splits"] / "val.csv",
                 temperature_scaling=False, bootstrap_samples=100).metrics
    assert m["temperature"] is None and m["ece"] == m["ece_before"]


def test_evaluate_refuses_test_labels_the_model_never_saw(tmp_path: Path):
    (tmp_path / "raw" / "zebra").mkdir(parents=True)
    Image.new("L", (16, 16)).save(tmp_path / "raw" / "zebra" / "z.png")
    pd.DataFrame([{"path": "zebra/z.png", "label": "zebra"}]).to_csv(tmp_path / "t.csv", index=False)
    save_model(tmp_path / "m", build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["a", "b"], preprocess=Preprocess.for_mode("L", 16))
    with pytest.raises(ValueError, match="zebra"):
        evaluate(tmp_path / "m", tmp_path / "t.csv", tmp_path / "raw")


def test_run_writes_every_output_with_the_metrics_contract(tmp_path: Path, monkeypatch):
    import tasks.evaluate as ev

    p = _tiny_project(tmp_path)
    out = Outputs(reports=tmp_path / "reports", onnx_dir=tmp_path / "onnx")
    cfg = EvalConfig(bootstrap_samples=100, latency_repeats=2, worst_n=3, slices=("format", "folder"))
    order: list[str] = []
    real_speed = ev.speed
    monkeypatch.setattr(ev, "speed", lambda *a, **k: order.append("timing") or real_speed(*a, **k))
    m = run(cfg, model_dir=p["model"], splits_dir=p["splits"], raw_dir=p["raw"], manifest_path=p["manifest"],
            out=out, log=lambda _: None, before_timing=lambda: order.append("settled"))
    assert order == ["settled", "timing"]  # the caller's background work is done before latency is timed
    assert CONTRACT_KEYS <= set(m) and m["status"] == "ok"
    assert json.loads(out.metrics.read_text()) == json.loads(json.dumps(m))
    assert isinstance(m["n_test"], int) and len(m["accuracy_ci95"]) == 2 and len(m["macro_f1_ci95"]) == 2
    assert set(m["per_class"]["dark"]) == {"precision", "recall", "f1", "support"}
    assert {"top1_agreement", "max_abs_logit_diff", "latency_ms_b1", "torch_latency_ms_b1"} <= set(m["onnx"])
    assert m["onnx"]["top1_agreement"] == 1.0 and m["onnx"]["max_abs_logit_diff"] < 1e-3
    assert m["latency_ms_b1"] > 0 and m["latency_ms_b64"] > 0
    # how many runs each median is of (at most evaluate.latency_repeats, at least one)
    assert 1 <= m["latency_runs_b1"] <= 2 and 1 <= m["latency_runs_b64"] <= 2 and 1 <= m["onnx"]["latency_runs_b1"] <= 2
    assert m["temperature_status"] in ("fitted", "clamped", "fallback")
    assert "cv" not in m
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "reliability.png", "worst_loss.png",
                 "gradcam.png", "confusion.csv", "reliability.csv", "per_class.csv"):
        assert (out.plots / name).is_file(), name
    assert list(pd.read_csv(out.predictions).columns)[:5] == ["path", "label", "prediction", "probability", "loss"]
    assert list(pd.read_csv(out.label_issues).columns)[:3] == ["path", "given_label", "suspected_label"]
    assert len(pd.read_csv(out.label_issues)) == 0  # cross-validation off: header only
    assert set(pd.read_csv(out.slices)["attribute"]) == {"format", "folder"}
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size > 1000
    assert json.loads((tmp_path / "onnx" / "model.json").read_text())["classes"] == ["dark", "light"]
    html = out.report.read_text()
    assert 'id="speed-export"' in html and "data:image/png;base64," in html
    # nothing half-written is left behind (staging folders are swapped in, temp files renamed)
    assert not [q for q in tmp_path.rglob(".*") if q.name.startswith(".")]
    flat = flat_metrics(m)
    assert flat["test/accuracy"] == m["accuracy"] and "test/onnx/top1_agreement" in flat
    assert "test/accuracy_ci95_low" in flat and "test/f1/dark" in flat
    assert flat["test/latency_runs_b64"] == m["latency_runs_b64"] and "test/onnx/latency_runs_b1" in flat


def test_a_failing_run_leaves_the_previous_outputs_alone(tmp_path: Path, monkeypatch):
    p = _tiny_project(tmp_path)
    out = Outputs(reports=tmp_path / "reports", onnx_dir=tmp_path / "onnx")
    (out.plots).mkdir(parents=True)
    (out.plots / "old.png").write_bytes(b"old")
    import tasks.export

    def boom(*a, **k):
        raise RuntimeError("export failed")

    monkeypatch.setattr(tasks.export, "export_onnx", boom)
    with pytest.raises(RuntimeError, match="export failed"):
        run(EvalConfig(bootstrap_samples=100, latency_repeats=1), model_dir=p["model"], splits_dir=p["splits"],
            raw_dir=p["raw"], manifest_path=p["manifest"], out=out, log=lambda _: None)
    assert (out.plots / "old.png").read_bytes() == b"old" and not out.metrics.exists()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["manifest.csv", "model", "raw", "reports", "splits"]


def test_evaluate_params_are_validated_and_off_by_default():
    from tasks.config import ParamsError, load_params

    repo = Path(__file__).resolve().parent.parent / "params.yaml"
    params = load_params(repo)
    assert params.evaluate.cv_folds == 0  # cross-validation trains k models: never on by default
    assert EvalConfig().slices == tuple(params.evaluate.slices)
    with pytest.raises(ParamsError, match="evaluate.cv_folds"):
        load_params(repo, {"evaluate.cv_folds": 1})
    with pytest.raises(ParamsError, match="evaluate.nope"):
        load_params(repo, {"evaluate.nope": 1})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_metrics_and_confusion_match_torchmetrics(seed):
    """The metrics are computed without importing torchmetrics (slow to import); same numbers, including a class
    that is never predicted, one that never occurs, and tied scores."""
    import warnings

    from torchmetrics.functional.classification import (multiclass_accuracy, multiclass_auroc,
                                                        multiclass_confusion_matrix, multiclass_f1_score,
                                                        multiclass_precision, multiclass_recall)

    from tasks.evaluate import confusion_matrix

    g = torch.Generator().manual_seed(seed)
    k, n = 7, 300
    targets = torch.randint(0, k - 1, (n,), generator=g)  # class k-1 never occurs
    logits = torch.randn(n, k, generator=g) + 2.0 * torch.nn.functional.one_hot(targets, k)
    logits[:, 3] -= 100  # class 3 is never predicted
    probs = torch.softmax(logits.round(decimals=1), 1)  # rounding makes ties in the scores
    m = compute_metrics(probs, targets, [f"c{i}" for i in range(k)])
    assert m["accuracy"] == pytest.approx(float(multiclass_accuracy(probs, targets, num_classes=k, average="micro")))
    assert m["top5_accuracy"] == pytest.approx(float(multiclass_accuracy(probs, targets, num_classes=k,
                                                                         average="micro", top_k=5)))
    for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
        for avg in ("macro", "weighted"):
            assert m[f"{avg}_{name}"] == pytest.approx(float(fn(probs, targets, num_classes=k, average=avg)), abs=1e-6)
        per = fn(probs, targets, num_classes=k, average="none")
        assert [m["per_class"][f"c{i}"][name] for i in range(k)] == pytest.approx(per.tolist(), abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        auroc = multiclass_auroc(probs, targets, num_classes=k, average="none")
    assert m["roc_auc_ovr"] == pytest.approx(sum(auroc[: k - 1].tolist()) / (k - 1), abs=1e-5)
    pred = probs.argmax(1)
    assert torch.equal(confusion_matrix(pred, targets, k), multiclass_confusion_matrix(pred, targets, num_classes=k))


def test_gallery_mosaic_places_every_image_under_its_title_and_blends_overlays(tmp_path: Path):
    import numpy as np
    from PIL import Image

    from tasks.plots import gallery_mosaic, plot_gallery

    images = np.stack([np.full((1, 4, 4), v, dtype=np.uint8) for v in (0, 128, 255)])
    mosaic, anchors = gallery_mosaic(images, None, columns=2, aspect=1.5)
    pad, cell_w = 1, 6
    cell_h = 9  # 1.5 x 6; the image sits at the bottom of its cell, its title band above
    assert mosaic.shape == (2 * cell_h, 2 * cell_w, 3)
    for i, v in enumerate((0, 128, 255)):
        r, c = divmod(i, 2)
        y, x = r * cell_h + cell_h - 4 - pad, c * cell_w + pad
        assert np.allclose(mosaic[y:y + 4, x:x + 4], v / 255)
        assert anchors[i] == (c * cell_w + cell_w / 2, y - 0.5)  # the title's baseline just above its image
    assert np.all(mosaic[cell_h:, cell_w:] == 1.0)  # the empty fourth cell stays white
    hot = np.ones((3, 4, 4))
    blended, _ = gallery_mosaic(images, hot, columns=2, aspect=1.5)
    y = cell_h - 4 - pad
    assert np.allclose(blended[y, pad], 0.45 * np.array([0.5, 0.0, 0.0]), atol=0.01)  # black + 45% jet(1)

    plot_gallery(images, ["a", "b", "c"], tmp_path / "g.png", suptitle="s", columns=2)
    with Image.open(tmp_path / "g.png") as png:
        assert png.size == (460, 570)  # 2 x 2.3 in by 2 x 2.6 + 0.5 in at 100 dpi
        assert np.asarray(png.convert("L")).min() < 10  # the black image is drawn
    plot_gallery(images[:0], [], tmp_path / "empty.png", suptitle="s")
    assert (tmp_path / "empty.png").stat().st_size > 0


class FakeClock:
    """A clock that moves only when the timed call runs: run_s[i] seconds for the i-th call (the last repeats)."""

    def __init__(self, *run_s: float):
        self.now, self.calls, self.run_s = 0.0, 0, run_s

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        self.now += self.run_s[min(self.calls, len(self.run_s) - 1)]
        self.calls += 1


def test_a_huge_model_is_warmed_up_once_and_timed_once():
    # ViT-B/16 at 224 px on 2 CPU cores: ~15.6 s per batch of 64; the old floor of 5 runs after 3 warm-ups
    # spent ~125 s on this one figure
    clock = FakeClock(15.6)
    lat = time_call(clock.call, repeats=20, budget_s=LATENCY_B64_BUDGET_S, clock=clock)
    assert (lat.warmup, lat.runs, clock.calls) == (1, 1, 2)
    assert lat.ms == pytest.approx(15600) and lat.seconds == pytest.approx(31.2)


def test_a_run_within_the_budget_gets_two_runs_and_a_cheap_one_keeps_the_floor_of_five():
    mid = FakeClock(0.2)  # one run fits the 0.3 s budget, five do not
    lat = time_call(mid.call, repeats=20, budget_s=0.3, clock=mid)
    assert (lat.warmup, lat.runs) == (2, 2)
    cheap = FakeClock(0.055)  # five runs fit: the budget is passed after 3 runs, the floor asks for 5
    lat = time_call(cheap.call, repeats=20, budget_s=0.3, clock=cheap)
    assert (lat.warmup, lat.runs) == (3, 5)


def test_fast_calls_stop_at_repeats_or_at_the_budget():
    fast = FakeClock(0.001)
    assert time_call(fast.call, repeats=20, budget_s=0.3, clock=fast).runs == 20
    many = FakeClock(0.01)
    lat = time_call(many.call, repeats=1000, budget_s=0.3, clock=many)
    assert 5 <= lat.runs < 1000 and lat.seconds <= 0.3 + 0.01 + 1e-9  # stops on the first run past the budget
    assert time_call(FakeClock(0.01).call, repeats=0, budget_s=1, clock=FakeClock(0)).runs == 1  # never zero


def test_a_slow_first_call_is_a_warm_up_not_a_timed_run():
    clock = FakeClock(10.0, 0.01)  # one-off start-up cost on the first call only
    lat = time_call(clock.call, repeats=20, budget_s=LATENCY_B1_BUDGET_S, clock=clock)
    assert lat.warmup == 1 and lat.runs == 5 and lat.ms == pytest.approx(10)


def test_latency_floor_and_keep_timing_decisions():
    assert latency_floor(0.01, budget_s=0.3) == 5
    assert latency_floor(0.2, budget_s=0.3) == 2
    assert latency_floor(15.6, budget_s=0.3) == 1
    assert keep_timing([], 100.0, repeats=20, budget_s=0.3)  # always one run
    assert not keep_timing([15.6], 31.2, repeats=20, budget_s=0.3)
    assert keep_timing([0.2], 0.6, repeats=20, budget_s=0.3) and not keep_timing([0.2] * 2, 0.8, repeats=20,
                                                                                    budget_s=0.3)
    assert keep_timing([0.01] * 3, 0.2, repeats=20, budget_s=0.3)  # within budget
    assert not keep_timing([0.01] * 3, 0.2, repeats=3, budget_s=0.3)  # repeats reached


def test_a_degenerate_temperature_fit_says_why_in_metrics_and_log(tmp_path: Path, monkeypatch):
    import tasks.calibration as calibration

    p = _tiny_project(tmp_path)
    out = Outputs(reports=tmp_path / "reports", onnx_dir=tmp_path / "onnx")
    reason = "every image has its true class on top (a perfectly separated split)"
    monkeypatch.setattr(calibration, "temperature_fit",
                        lambda *a, **k: calibration.TemperatureFit(1.0, "fallback", reason))
    lines: list[str] = []
    m = run(EvalConfig(bootstrap_samples=50, latency_repeats=1, worst_n=2, slices=()), model_dir=p["model"],
            splits_dir=p["splits"], raw_dir=p["raw"], manifest_path=p["manifest"], out=out, log=lines.append)
    assert m["temperature"] == 1.0 and m["temperature_status"] == "fallback" and m["temperature_note"] == reason
    assert any("fallback" in line and reason in line for line in lines)
    assert json.loads(out.metrics.read_text())["temperature_note"] == reason
    import pandas as pd

    reliability = pd.read_csv(out.reports / "plots" / "reliability.csv")
    assert reliability["confidence_after"].isna().all()  # no "after" curve for a T = 1 that changed nothing


def _with_split_groups(p: dict[str, Path]) -> None:
    """data/splits/groups.csv as the split stage writes it: dark/0 and dark/3 are near-duplicates."""
    pd.DataFrame({"path": ["dark/0.png", "dark/3.png"], "label": ["dark", "dark"], "group": [0, 0],
                  "split": ["test", "test"], "sha256": ["x", "y"], "phash": ["", ""]}).to_csv(
        p["splits"] / "groups.csv", index=False)


def _cv_run(tmp_path: Path, p: dict[str, Path], lines: list[str]) -> dict:
    from tasks.train import TrainConfig

    train_cfg = TrainConfig(model="smallcnn", image_size=16, epochs=1, batch_size=4, optimizer="adamw", lr=0.01,
                            weight_decay=0.0, label_smoothing=0.0, hflip=False, translate=0.0, device="cpu",
                            seed=0)
    cfg = EvalConfig(bootstrap_samples=50, latency_repeats=1, worst_n=2, slices=(), gradcam=False, cv_folds=2,
                     label_issues_max=3)
    assert cfg.cv_group_column == "group"  # the default
    out = Outputs(reports=tmp_path / "reports", onnx_dir=tmp_path / "onnx")
    return run(cfg, model_dir=p["model"], splits_dir=p["splits"], raw_dir=p["raw"], manifest_path=p["manifest"],
               out=out, train_cfg=train_cfg, log=lines.append)


def test_cross_validation_uses_the_split_stages_groups_by_default(tmp_path: Path):
    """The manifest has no `group` column (it never does): the default groups are split's groups.csv."""
    p = _tiny_project(tmp_path)
    _with_split_groups(p)
    assert "group" not in pd.read_csv(p["manifest"]).columns
    lines: list[str] = []
    m = _cv_run(tmp_path, p, lines)
    assert m["cv"]["grouped"] is True and "groups.csv" in m["cv"]["group_source"]
    assert m["cv"]["grouped_images"] == 2 and "group_warning" not in m["cv"]
    assert any("groups.csv" in line for line in lines)


def test_splits_without_groups_csv_cross_validate_ungrouped_with_a_warning_in_metrics(tmp_path: Path):
    p = _tiny_project(tmp_path)  # splits made before the split stage wrote groups.csv (or by hand)
    lines: list[str] = []
    m = _cv_run(tmp_path, p, lines)
    assert m["cv"]["grouped"] is False and "NOT group-aware" in m["cv"]["group_warning"]
    assert any(line.startswith("WARNING") and "groups.csv" in line for line in lines)


def test_a_group_column_found_nowhere_stops_the_run_before_any_work(tmp_path: Path, monkeypatch):
    import tasks.evaluate as ev

    p = _tiny_project(tmp_path)
    _with_split_groups(p)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking the groups"))
    out = Outputs(reports=tmp_path / "reports", onnx_dir=tmp_path / "onnx")
    from tasks.evaluate import EvaluationError

    with pytest.raises(EvaluationError, match="cv_group_column='source_id'.*manifest.*groups.csv.*null"):
        run(EvalConfig(cv_folds=2, slices=(), cv_group_column="source_id"), model_dir=p["model"],
            splits_dir=p["splits"], raw_dir=p["raw"], manifest_path=p["manifest"], out=out, train_cfg=object(),
            log=lambda _: None)
