"""The HTML report: self-contained, every section present, and it really renders in headless Chromium.

The Chromium test is never skipped: `make test` installs Chromium first (Makefile target `chromium`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks.evaluate import EvalConfig, Outputs, run
from tasks.models import build_model, save_model
from tasks.preprocess import Preprocess
from tasks.report import SECTIONS, render_report
from tasks.train import TrainConfig

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
HEADER_RGB = (31, 59, 87)  # the report's header colour (#1f3b57)


def _project(root: Path) -> dict[str, Path]:
    """3 classes x 9 images (16x16), splits, manifest with two source folders, an untrained smallcnn."""
    rng = np.random.default_rng(0)
    rows = []
    for k, label in enumerate(("bars", "dots", "plain")):
        for i in range(9):
            arr = rng.integers(0, 50, (16, 16), dtype=np.uint8)
            if label == "bars":
                arr[::3] = 220
            elif label == "dots":
                arr[4:12:4, 4:12:4] = 250
            rel = f"{label}/{'phone' if i % 2 else 'scan'}/{i}.png"
            (root / "raw" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, mode="L").save(root / "raw" / rel)
            rows.append({"path": rel, "label": label})
    frame = pd.DataFrame(rows)
    (root / "splits").mkdir()
    for name, rem in (("test", 0), ("val", 1), ("train", 2)):
        frame[frame.index % 3 == rem].to_csv(root / "splits" / f"{name}.csv", index=False)
    frame.assign(format="PNG", mode="L", width=16, height=16, accepted=True).to_csv(root / "manifest.csv",
                                                                                     index=False)
    torch.manual_seed(0)
    save_model(root / "model", build_model("smallcnn", num_classes=3, in_channels=1), name="smallcnn",
               classes=["bars", "dots", "plain"], preprocess=Preprocess.for_mode("L", 16))
    return {"raw": root / "raw", "splits": root / "splits", "model": root / "model",
            "manifest": root / "manifest.csv"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    """One full evaluate run with 3-fold cross-validation on the tiny project; returns (report.html, metrics)."""
    root = tmp_path_factory.mktemp("report")
    p = _project(root)
    out = Outputs(reports=root / "reports", onnx_dir=root / "onnx")
    train_cfg = TrainConfig(model="smallcnn", image_size=16, epochs=2, batch_size=8, optimizer="adamw", lr=0.01,
                            weight_decay=0.0, label_smoothing=0.0, hflip=False, translate=0.0, device="cpu",
                            seed=0)
    cfg = EvalConfig(bootstrap_samples=200, latency_repeats=2, worst_n=6, cv_folds=3, slice_min_images=2)
    metrics = run(cfg, model_dir=p["model"], splits_dir=p["splits"], raw_dir=p["raw"],
                  manifest_path=p["manifest"], out=out, train_cfg=train_cfg, log=lambda _: None)
    return out.report, metrics


def test_cross_validation_results_reach_metrics_and_outputs(report):
    path, metrics = report
    cv = metrics["cv"]
    assert cv["folds"] == 3 and cv["n"] == 27 and set(cv["accuracy"]) == {"mean", "std"}
    issues = pd.read_csv(path.parent / "label_issues.csv")
    assert list(issues.columns) == ["path", "given_label", "suspected_label", "flagged", "label_quality",
                                    "given_probability", "suspected_probability"]
    assert (issues["given_label"] != issues["suspected_label"]).all()
    assert len(issues) == 24  # evaluate.label_issues_max: flagged first, then the lowest label quality
    assert (path.parent / "plots" / "cv_folds.png").is_file()
    assert (path.parent / "plots" / "label_issues.png").is_file()


def test_report_is_self_contained_with_every_section(report):
    path, metrics = report
    html = path.read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    assert "<script" not in html and "<link" not in html and "@import" not in html
    # no external assets: every src/href is an inline data: URI or an in-page anchor
    for ref in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert ref.startswith(("data:image/png;base64,", "#")), ref
    assert html.count("data:image/png;base64,") >= 6  # confusion x2, reliability, worst, Grad-CAM, CV
    assert f"{metrics['accuracy']:.4f}" in html and "bars" in html
    assert "scan" in html and "phone" in html  # the folder slices


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is required for this test: run `make chromium` (make test does it for you)"
    path, _ = report
    png = tmp_path / "shot.png"
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = subprocess.run([*base, f"--screenshot={png}", "--window-size=1280,4000", path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert png.is_file(), shot.stderr[-2000:]
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[:2] == (4000, 1280)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # not blank
    header = image[:40].reshape(-1, 3)
    assert (np.abs(header.astype(int) - HEADER_RGB).sum(1) < 10).mean() > 0.5  # the styled header is drawn
    # the document Chromium actually parsed holds every section and decoded every image
    dom = subprocess.run([*base, "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom, sid


def test_render_report_notes_what_was_not_produced(tmp_path):
    metrics = {
        "accuracy": 0.5, "macro_f1": 0.4, "top5_accuracy": 1.0, "roc_auc_ovr": 0.6, "ece": 0.1, "ece_before": 0.2,
        "temperature": 1.5, "accuracy_ci95": [0.4, 0.6], "macro_f1_ci95": [0.3, 0.5], "n_test": 10,
        "test_hash": "ab" * 32, "per_class": {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.6, "support": 4}},
        "latency_ms_b1": 1.0, "latency_ms_b64": 9.0, "worst_slice": None,
        "onnx": {"top1_agreement": 0.9, "max_abs_logit_diff": 0.5, "latency_ms_b1": 0.5, "torch_latency_ms_b1": 1.0},
    }
    html = render_report(title="t <&>", metrics=metrics, slices=[], plots_dir=tmp_path,
                         gradcam_note="Grad-CAM needs a convolutional layer")
    assert "t &lt;&amp;&gt;" in html and "Grad-CAM needs a convolutional layer" in html
    assert "not produced" in html and "cv_folds" in html  # how to switch cross-validation on
    assert "class='bad'" in html  # ONNX disagreement is shown in red
