"""Stage `evaluate`: everything a reviewer needs to promote or reject the candidate, in numbers and pictures.

Metrics with confidence intervals, calibration (and temperature scaling), per-slice metrics, error analysis
(worst images, Grad-CAM), CPU latency, ONNX export with onnxruntime parity, optional cross-validation with
label quality, and one self-contained HTML report. All of it is logged into the training run in MLflow."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.cv import LABEL_ISSUE_COLUMNS
from tasks.io import replace_dir, sha256_file, staging_dir, write_json, write_text
from tasks.plots import plot_confusion  # noqa: F401  (public: the confusion figure lives with the plots)
from tasks.predict import predict_logits

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from tasks.cv import Groups
    from tasks.preprocess import Preprocess
    from tasks.train import TrainConfig

RAW_DIR = Path("data/raw")
SPLITS_DIR = Path("data/splits")
TEST_SPLIT = SPLITS_DIR / "test.csv"
MANIFEST = Path("data/manifest.csv")
MODEL_DIR = Path("models/candidate")
SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024)
# Seconds of timing (warm-up included) per latency figure; a figure goes past its budget only for its minimum
# runs (tasks.export.latency_floor): 5 when they fit in the budget, 2 when one run does, else 1.
LATENCY_B64_BUDGET_S = 0.3  # batch 64: median within ~5% of a 1 s budget for small models
LATENCY_B1_BUDGET_S = 2.0  # batch 1 (torch and onnxruntime): all 20 runs for small models, ~2 s for a ViT-B


@dataclass(frozen=True)
class Outputs:
    """Where the stage writes (fixed paths for DVC; a temporary root in tests)."""

    reports: Path = Path("reports")
    onnx_dir: Path = Path("models/onnx")

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.reports / "predictions.csv"

    @property
    def slices(self) -> Path:
        return self.reports / "slices.csv"

    @property
    def label_issues(self) -> Path:
        return self.reports / "label_issues.csv"

    @property
    def report(self) -> Path:
        return self.reports / "report.html"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"


class EvaluationError(ValueError):
    """The evaluation cannot run as configured (or on these splits); the message names the setting or file."""


@dataclass(frozen=True)
class EvalConfig:
    """The evaluate section of params.yaml (plus the seed), as plain typed values."""

    batch_size: int = 256
    bootstrap_samples: int = 1000
    calibration_bins: int = 15
    temperature_scaling: bool = True
    worst_n: int = 18
    gradcam: bool = True
    slices: tuple[str, ...] = ("format", "mode", "size_bucket", "folder")
    slice_min_images: int = 10
    latency_repeats: int = 20
    onnx_opset: int = 17
    cv_folds: int = 0
    cv_group_column: str | None = "group"
    cv_val_fraction: float = 0.1
    label_issues_max: int = 24
    seed: int = 42


def config_from_params(params: Any) -> EvalConfig:
    """EvalConfig from the parsed Params."""
    e = params.evaluate
    return EvalConfig(batch_size=e.batch_size, bootstrap_samples=e.bootstrap_samples,
                      calibration_bins=e.calibration_bins, temperature_scaling=e.temperature_scaling,
                      worst_n=e.worst_n, gradcam=e.gradcam, slices=tuple(e.slices),
                      slice_min_images=e.slice_min_images, latency_repeats=e.latency_repeats,
                      onnx_opset=e.onnx_opset, cv_folds=e.cv_folds, cv_group_column=e.cv_group_column,
                      cv_val_fraction=e.cv_val_fraction,
                      label_issues_max=e.label_issues_max, seed=params.base.seed)


# --- numbers -------------------------------------------------------------------------------------------------

def confusion_matrix(pred: "torch.Tensor", targets: "torch.Tensor", num_classes: int) -> "torch.Tensor":
    """Counts, rows true class, columns predicted class (int64, num_classes x num_classes)."""
    import torch

    k = num_classes
    return torch.bincount(targets.long() * k + pred.long(), minlength=k * k).reshape(k, k)


def _safe_div(num: "torch.Tensor", den: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def auroc_ovr(probs: "torch.Tensor", targets: "torch.Tensor") -> list[float | None]:
    """Exact one-vs-rest ROC-AUC per class (Mann-Whitney, ties count half); None for a class without
    positives or without negatives."""
    import numpy as np

    scores, y = probs.double().numpy(), targets.numpy()
    out: list[float | None] = []
    for c in range(scores.shape[1]):
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            out.append(None)
            continue
        _, inverse, counts = np.unique(scores[:, c], return_inverse=True, return_counts=True)
        ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties get their mean rank
        out.append(float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)))
    return out


def compute_metrics(probs: "torch.Tensor", targets: "torch.Tensor", classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5 accuracy, macro/weighted precision, recall, F1, one-vs-rest ROC-AUC, per-class table.

    Computed from the confusion matrix with torchmetrics' multiclass conventions (zero_division 0; macro
    averages skip a class with no true, no predicted image); tests check it against torchmetrics, which is
    not imported here because its import alone costs the stage 2-5 s."""
    import torch

    k, n = len(classes), len(targets)
    cm = confusion_matrix(probs.argmax(1), targets, k).double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    fp, fn = predicted - tp, support - tp
    per = {"precision": _safe_div(tp, tp + fp), "recall": _safe_div(tp, tp + fn),
           "f1": _safe_div(2 * tp, 2 * tp + fp + fn)}
    present = ((tp + fp + fn) > 0).double()
    top5 = probs.topk(min(5, k), dim=1).indices if n else torch.empty(0, 1, dtype=torch.long)
    out: dict[str, Any] = {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "top5_accuracy": float((top5 == targets[:, None]).any(1).double().mean()) if n else 0.0,
    }
    for name, score in per.items():
        out[f"macro_{name}"] = float(_safe_div((score * present).sum(), present.sum()))
        out[f"weighted_{name}"] = float(_safe_div((score * support).sum(), support.sum()))
    defined = [a for a in auroc_ovr(probs, targets) if a is not None]
    out["roc_auc_ovr"] = sum(defined) / len(defined) if defined else float("nan")
    out["n_test"] = int(n)
    out["per_class"] = {c: {"precision": float(per["precision"][i]), "recall": float(per["recall"][i]),
                            "f1": float(per["f1"][i]), "support": int(support[i])} for i, c in enumerate(classes)}
    return out


def bootstrap_ci(pred: "np.ndarray", targets: "np.ndarray", num_classes: int, *, samples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals for accuracy and macro-F1 (resampling test images with replacement)."""
    import numpy as np

    pred, targets = np.asarray(pred), np.asarray(targets)
    n, k = len(targets), num_classes
    if n == 0:
        return {"accuracy": [0.0, 0.0], "macro_f1": [0.0, 0.0]}
    rng = np.random.default_rng(seed)
    acc, f1 = [], []
    chunk = max(1, 4_000_000 // n)  # bounded memory for large test sets
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        idx = rng.integers(0, n, size=(b, n))
        t, p = targets[idx], pred[idx]
        hit = t == p
        acc.append(hit.mean(1))
        row = np.repeat(np.arange(b), n).reshape(b, n) * k
        tp = np.bincount((row + t)[hit], minlength=b * k).reshape(b, k)
        n_true = np.bincount((row + t).ravel(), minlength=b * k).reshape(b, k)
        n_pred = np.bincount((row + p).ravel(), minlength=b * k).reshape(b, k)
        denom = n_true + n_pred
        # Same convention as torchmetrics' macro F1: a class with no true and no predicted image scores 0.
        f1.append((np.divide(2 * tp, denom, out=np.zeros((b, k)), where=denom > 0)).mean(1))
    tail = (1 - level) / 2 * 100
    bounds = lambda x: [float(v) for v in np.percentile(np.concatenate(x), [tail, 100 - tail])]  # noqa: E731
    return {"accuracy": bounds(acc), "macro_f1": bounds(f1)}


# --- slices --------------------------------------------------------------------------------------------------

def size_bucket(width: float, height: float) -> str:
    """The image's shorter side as a coarse bucket: '<32', '32-63', ..., '>=1024'."""
    if width != width or height != height:  # NaN: not in the manifest
        return "unknown"
    side = min(width, height)
    lower = 0
    for edge in SIZE_BUCKETS:
        if side < edge:
            return f"<{edge}" if lower == 0 else f"{lower}-{edge - 1}"
        lower = edge
    return f">={SIZE_BUCKETS[-1]}"


def slice_attributes(manifest: "pd.DataFrame") -> "pd.DataFrame":
    """The manifest plus derived attributes: size_bucket, and folder (sub-folder below the class folder)."""
    frame = manifest.copy()
    if {"width", "height"} <= set(frame.columns):
        frame["size_bucket"] = [size_bucket(w, h) for w, h in zip(frame["width"], frame["height"])]
    frame["folder"] = ["/".join(str(p).split("/")[1:-1]) or "(class folder)" for p in frame["path"]]
    return frame


def slice_metrics(predictions: "pd.DataFrame", attributes: "pd.DataFrame",
                  columns: Sequence[str]) -> list[dict[str, Any]]:
    """Accuracy and macro-F1 for each value of each attribute, with the gap to the overall accuracy."""
    import numpy as np

    missing = [c for c in columns if c not in attributes.columns]
    if missing:
        raise EvaluationError(f"evaluate.slices names attributes the manifest does not have: {missing} "
                         f"(available: {sorted(attributes.columns)})")
    joined = predictions.merge(attributes[["path", *columns]], on="path", how="left")
    correct = (joined["label"] == joined["prediction"]).to_numpy()
    overall = float(correct.mean()) if len(correct) else 0.0
    rows = []
    for column in columns:
        values = joined[column].astype(str).where(joined[column].notna(), "unknown")
        for value in sorted(values.unique()):
            part = joined[values == value]
            hit = correct[(values == value).to_numpy()]
            labels = sorted(set(part["label"]) | set(part["prediction"]))
            f1s = []
            for c in labels:
                tp = int(((part["label"] == c) & (part["prediction"] == c)).sum())
                denom = int((part["label"] == c).sum() + (part["prediction"] == c).sum())
                f1s.append(2 * tp / denom if denom else 0.0)
            acc = float(np.mean(hit))
            rows.append({"attribute": column, "value": value, "n": int(len(part)), "accuracy": acc,
                         "accuracy_delta": acc - overall, "macro_f1": float(np.mean(f1s))})
    return rows


def worst_slice(rows: list[dict[str, Any]], *, min_images: int) -> dict[str, Any] | None:
    """The lowest-accuracy slice among attributes with more than one value and slices big enough to trust."""
    from collections import Counter

    per_attribute = Counter(r["attribute"] for r in rows)
    eligible = [r for r in rows if r["n"] >= min_images and per_attribute[r["attribute"]] > 1]
    if not eligible:
        return None
    worst = min(eligible, key=lambda r: (r["accuracy"], -r["n"]))
    return {k: worst[k] for k in ("attribute", "value", "n", "accuracy", "accuracy_delta")}


# --- the core ------------------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    metrics: dict[str, Any]
    predictions: "pd.DataFrame"
    confusion: list[list[int]]
    classes: list[str] = field(default_factory=list)
    logits: "torch.Tensor | None" = None
    images: "torch.Tensor | None" = None
    targets: "torch.Tensor | None" = None
    reliability: dict[str, Any] = field(default_factory=dict)
    model: "nn.Module | None" = None
    spec: "Preprocess | None" = None
    model_name: str = ""


def evaluate(model_dir: Path, test_csv: Path, raw_dir: Path, *, batch_size: int = 256, val_csv: Path | None = None,
             temperature_scaling: bool = True, calibration_bins: int = 15, bootstrap_samples: int = 1000,
             seed: int = 0) -> Evaluation:
    """Core: load the saved model, score the test split; calibrate on the validation split when given."""
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from tasks.calibration import expected_calibration_error, reliability_bins, temperature_fit
    from tasks.models import load_model
    from tasks.preprocess import Preprocess
    from tasks.train import load_split

    model, meta = load_model(model_dir)
    classes = list(meta["classes"])
    class_index = {c: i for i, c in enumerate(classes)}
    spec = Preprocess.from_dict(meta["preprocess"])
    frame = pd.read_csv(test_csv, dtype={"label": str})
    unknown = sorted(set(frame["label"]) - set(classes))
    if unknown:
        raise EvaluationError(f"{test_csv}: test labels the model was not trained on: {unknown}")
    images, targets = load_split(frame, raw_dir, spec, class_index)
    logits = predict_logits(model, images, spec, batch_size=batch_size)
    probs = torch.softmax(logits, dim=1)
    metrics = compute_metrics(probs, targets, classes)
    pred = logits.argmax(1)
    ci = bootstrap_ci(pred.numpy(), targets.numpy(), len(classes), samples=bootstrap_samples, seed=seed)
    metrics["accuracy_ci95"], metrics["macro_f1_ci95"] = ci["accuracy"], ci["macro_f1"]

    metrics["ece_before"] = expected_calibration_error(probs, targets, n_bins=calibration_bins)
    reliability = {"before": reliability_bins(probs, targets, n_bins=calibration_bins), "after": None}
    metrics["temperature"] = metrics["temperature_status"] = metrics["temperature_note"] = None
    metrics["ece"] = metrics["ece_before"]
    if temperature_scaling and val_csv is not None:
        val = pd.read_csv(val_csv, dtype={"label": str})
        val = val[val["label"].isin(class_index)]
        val_images, val_targets = load_split(val, raw_dir, spec, class_index)
        fit = temperature_fit(predict_logits(model, val_images, spec, batch_size=batch_size), val_targets)
        t = fit.temperature
        scaled = torch.softmax(logits / t, dim=1)
        metrics["temperature"] = t
        # "fitted", "clamped" (into calibration.TEMPERATURE_RANGE) or "fallback" (T = 1: no minimum to fit)
        metrics["temperature_status"], metrics["temperature_note"] = fit.status, fit.reason
        metrics["ece"] = expected_calibration_error(scaled, targets, n_bins=calibration_bins)
        if fit.status != "fallback":  # (a fallback's T = 1 changes nothing: no "after" curve to draw)
            reliability["after"] = reliability_bins(scaled, targets, n_bins=calibration_bins)
    metrics["test_hash"] = sha256_file(test_csv)

    loss = F.cross_entropy(logits, targets, reduction="none")
    predictions = pd.DataFrame({
        "path": frame["path"], "label": frame["label"], "prediction": [classes[i] for i in pred.tolist()],
        "probability": probs.max(1).values.tolist(), "loss": loss.tolist(),
    })
    confusion = confusion_matrix(pred, targets, len(classes)).tolist()
    return Evaluation(metrics=metrics, predictions=predictions, confusion=confusion, classes=classes,
                      logits=logits, images=images, targets=targets, reliability=reliability, model=model,
                      spec=spec, model_name=meta["model"])


def worst_indices(loss: Sequence[float], n: int) -> list[int]:
    """Indices of the n highest losses, highest first (ties: first row first)."""
    return sorted(range(len(loss)), key=lambda i: (-loss[i], i))[:max(0, n)]


# --- writing -------------------------------------------------------------------------------------------------

def plot_data(result: Evaluation, plots: Path) -> None:
    """DVC plot data (`dvc plots show/diff`): confusion rows, reliability bins, per-class scores."""
    import pandas as pd

    write_text(plots / "confusion.csv", result.predictions[["label", "prediction"]].to_csv(index=False))
    rel = result.reliability
    rows = []
    for i, before in enumerate(rel["before"]):
        after = rel["after"][i] if rel["after"] else {}
        rows.append({"bin_center": (before["lower"] + before["upper"]) / 2, "count": before["count"],
                     "confidence_before": before["confidence"], "accuracy_before": before["accuracy"],
                     "confidence_after": after.get("confidence"), "accuracy_after": after.get("accuracy")})
    write_text(plots / "reliability.csv", pd.DataFrame(rows).to_csv(index=False))
    per_class = [{"class": c, **v} for c, v in result.metrics["per_class"].items()]
    write_text(plots / "per_class.csv", pd.DataFrame(per_class).to_csv(index=False))


def error_gallery(result: Evaluation, plots: Path, *, n: int, gradcam: bool, batch_size: int = 64) -> str | None:
    """Worst-N images by loss as a labelled gallery, and Grad-CAM on the same images for CNNs.

    Returns why Grad-CAM was not drawn, or None when it was."""
    import torch

    from tasks.gradcam import grad_cam, target_layer
    from tasks.plots import plot_gallery
    from tasks.preprocess import normalize

    preds = result.predictions
    idx = worst_indices(preds["loss"].tolist(), n)
    titles = [f"{preds['label'][i]} → {preds['prediction'][i]}\np={preds['probability'][i]:.2f} "
              f"loss={preds['loss'][i]:.2f}" for i in idx]
    images = result.images[idx].numpy() if idx else result.images[:0].numpy()
    plot_gallery(images, titles, plots / "worst_loss.png",
                 suptitle=f"Worst {len(idx)} test images by loss (true → predicted)")
    if not gradcam:
        return "Grad-CAM is switched off (evaluate.gradcam: false)."
    layer = target_layer(result.model)
    if layer is None:
        return ("Grad-CAM is drawn for CNNs only; this model has no convolutional feature map "
                "(e.g. a Vision Transformer).")
    if not idx:
        return "No test images."
    pred_idx = result.logits[idx].argmax(1)
    maps = [grad_cam(result.model, normalize(result.images[idx][s:s + batch_size], result.spec),
                     pred_idx[s:s + batch_size], layer) for s in range(0, len(idx), batch_size)]
    plot_gallery(images, titles, plots / "gradcam.png", overlays=torch.cat(maps).numpy(),
                 suptitle="Grad-CAM for the predicted class on the worst images")
    return None


def cv_pool(cfg: EvalConfig, *, splits_dir: Path,
            manifest: "pd.DataFrame | None") -> tuple["pd.DataFrame", "Groups"]:
    """Every split image and its duplicate group (tasks.cv.resolve_groups: split's groups.csv and/or a manifest
    column); raises when evaluate.cv_group_column names groups that exist nowhere."""
    from tasks import cv

    pool = cv.load_pool(splits_dir)
    return pool, cv.resolve_groups(pool, column=cfg.cv_group_column, manifest=manifest,
                                   split_groups=cv.load_split_groups(splits_dir))


def cross_validation(cfg: EvalConfig, train_cfg: "TrainConfig", *, result: Evaluation, pool: "pd.DataFrame",
                     groups: "Groups", raw_dir: Path, plots: Path,
                     log: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]], "pd.DataFrame"]:
    """k-fold CV of the training recipe on all split images (pool, groups: cv_pool's); label issues from its
    out-of-fold predictions."""
    from tasks import cv
    from tasks.plots import plot_cv_folds, plot_gallery
    from tasks.train import load_split

    keep = pool["label"].isin(result.classes).tolist()
    pool = pool[keep].reset_index(drop=True)
    values = None if groups.values is None else [g for g, k in zip(groups.values, keep) if k]
    class_index = {c: i for i, c in enumerate(result.classes)}
    images, targets = load_split(pool, raw_dir, result.spec, class_index)
    log(f"cross-validation groups: {groups.source}" + (f", {groups.grouped_images} images share a group"
                                                        if values is not None else ""))
    if groups.warning:
        log(f"WARNING: {groups.warning}")
    outcome = cv.cross_validate(images, targets, result.classes, result.spec, train_cfg, k=cfg.cv_folds,
                                groups=values, metrics_fn=compute_metrics, val_fraction=cfg.cv_val_fraction,
                                batch_size=cfg.batch_size,
                                on_fold=lambda r: log(f"cv fold {r['fold']}: accuracy {r['accuracy']:.4f}"))
    summary = {**outcome.summary, "group_source": groups.source, "grouped_images": groups.grouped_images,
               **({"group_warning": groups.warning} if groups.warning else {})}
    plot_cv_folds(outcome.folds, plots / "cv_folds.png")
    issues = cv.label_issues(pool["path"].tolist(), targets, outcome.oof_probs, result.classes,
                             limit=cfg.label_issues_max)
    if len(issues):
        at = {p: i for i, p in enumerate(pool["path"])}
        shown = [at[p] for p in issues["path"]]
        titles = [f"{'FLAGGED ' if f else ''}given {g}\nsuspect {s} (p={q:.2f})" for g, s, q, f in
                  zip(issues["given_label"], issues["suspected_label"], issues["suspected_probability"],
                      issues["flagged"])]
        plot_gallery(images[shown].numpy(), titles, plots / "label_issues.png",
                     suptitle="Most likely mislabelled (out-of-fold confident learning); nothing was changed")
    return summary, outcome.folds, issues


SLICE_COLUMNS = ["attribute", "value", "n", "accuracy", "accuracy_delta", "macro_f1"]


# --- latency -------------------------------------------------------------------------------------------------

def speed(result: Evaluation, *, repeats: int) -> dict[str, Any]:
    """Eager torch CPU latency per batch of 1 and of 64, the runs each median is of, and the thread count.

    Each figure is timed within its budget (LATENCY_B1_BUDGET_S, LATENCY_B64_BUDGET_S; see time_call): for a
    large model 20 runs, or even 5, of a batch of 64 would take longer than the rest of the evaluation."""
    import torch

    from tasks.export import torch_latency

    b1 = torch_latency(result.model, result.spec, batch=1, repeats=repeats, budget_s=LATENCY_B1_BUDGET_S)
    b64 = torch_latency(result.model, result.spec, batch=64, repeats=repeats, budget_s=LATENCY_B64_BUDGET_S)
    return {"latency_ms_b1": b1.ms, "latency_ms_b64": b64.ms, "latency_runs_b1": b1.runs,
            "latency_runs_b64": b64.runs, "latency_threads": torch.get_num_threads()}


def export(result: Evaluation, cfg: EvalConfig, folder: Path, *, torch_b1: float) -> dict[str, Any]:
    """models/onnx content: the ONNX file plus the class map and preprocessing to feed it; returns parity."""
    from tasks.export import check_onnx

    parity = check_onnx(result.model, result.spec, result.images, result.logits, folder / "model.onnx",
                        opset=cfg.onnx_opset, batch_size=cfg.batch_size, repeats=cfg.latency_repeats,
                        torch_latency_ms_b1=torch_b1, budget_s=LATENCY_B1_BUDGET_S)
    write_json(folder / "model.json", {
        "model": result.model_name, "classes": result.classes, "preprocess": result.spec.to_dict(),
        "input": "float32 N x C x S x S, normalised with preprocess.mean/std", "output": "logits N x K",
        "opset": cfg.onnx_opset})
    return parity


def draw(result: Evaluation, cfg: EvalConfig, plots: Path) -> str | None:
    """Every always-present figure and the DVC plot data; returns why Grad-CAM was skipped, if it was."""
    from tasks.plots import plot_reliability

    m = result.metrics
    plot_confusion(result.confusion, result.classes, plots / "confusion_matrix.png")
    plot_confusion(result.confusion, result.classes, plots / "confusion_matrix_normalized.png", normalize=True)
    plot_reliability(result.reliability["before"], result.reliability["after"], plots / "reliability.png",
                     ece_before=m["ece_before"],
                     ece_after=m["ece"] if result.reliability["after"] is not None else None,
                     temperature=m["temperature"])
    plot_data(result, plots)
    return error_gallery(result, plots, n=cfg.worst_n, gradcam=cfg.gradcam)


def run(cfg: EvalConfig, *, model_dir: Path, splits_dir: Path, raw_dir: Path, manifest_path: Path | None,
        out: Outputs, train_cfg: "TrainConfig | None" = None, title: str = "imgclf candidate",
        log: Callable[[str], None] = print, before_timing: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Evaluate and write every output; returns metrics.json's content. Outputs appear only when complete.

    before_timing: called before the latency timing (e.g. to wait for the caller's background work)."""
    import shutil

    import pandas as pd

    from tasks.report import render_report

    if cfg.cv_folds and train_cfg is None:
        raise EvaluationError("evaluate.cv_folds needs the training recipe (train params)")
    manifest = (pd.read_csv(manifest_path, dtype={"label": str}) if manifest_path and manifest_path.is_file()
                else None)
    if cfg.slices and manifest is None:
        raise EvaluationError(f"evaluate.slices needs the manifest ({manifest_path}); or set evaluate.slices: []")
    # before anything slow: a cv_group_column that names no groups is an error, not a silently ungrouped CV
    try:
        pool, groups = cv_pool(cfg, splits_dir=splits_dir, manifest=manifest) if cfg.cv_folds else (None, None)
    except ValueError as exc:  # evaluate.cv_group_column names groups that exist nowhere
        raise EvaluationError(str(exc)) from None
    result = evaluate(model_dir, splits_dir / "test.csv", raw_dir, batch_size=cfg.batch_size,
                      val_csv=splits_dir / "val.csv", temperature_scaling=cfg.temperature_scaling,
                      calibration_bins=cfg.calibration_bins, bootstrap_samples=cfg.bootstrap_samples, seed=cfg.seed)
    m = result.metrics
    if m.get("temperature_note"):
        log(f"temperature scaling ({m['temperature_status']}): {m['temperature_note']}")
    slices = (slice_metrics(result.predictions, slice_attributes(manifest), cfg.slices)
              if cfg.slices else [])
    m["worst_slice"] = worst_slice(slices, min_images=cfg.slice_min_images)
    if before_timing is not None:
        before_timing()
    m.update(speed(result, repeats=cfg.latency_repeats))
    onnx_stage, plots = staging_dir(out.onnx_dir), staging_dir(out.plots)
    try:
        m["onnx"] = export(result, cfg, onnx_stage, torch_b1=m["latency_ms_b1"])
        gradcam_note = draw(result, cfg, plots)
        folds: list[dict[str, Any]] = []
        issues = pd.DataFrame(columns=LABEL_ISSUE_COLUMNS)  # header only when cross-validation is off
        if cfg.cv_folds:
            m["cv"], folds, issues = cross_validation(cfg, train_cfg, result=result, pool=pool, groups=groups,
                                                      raw_dir=raw_dir, plots=plots, log=log)
        m["status"] = "ok"
        html = render_report(title=title, metrics=m, slices=slices, plots_dir=plots, gradcam_note=gradcam_note,
                             cv_folds=folds, label_issues=issues.to_dict("records") if cfg.cv_folds else None)
    except BaseException:
        shutil.rmtree(onnx_stage, ignore_errors=True)
        shutil.rmtree(plots, ignore_errors=True)
        raise
    replace_dir(onnx_stage, out.onnx_dir)
    replace_dir(plots, out.plots)
    write_text(out.predictions, result.predictions.to_csv(index=False))
    write_text(out.slices, pd.DataFrame(slices, columns=SLICE_COLUMNS).to_csv(index=False))
    write_text(out.label_issues, issues.to_csv(index=False))
    write_text(out.report, html)
    write_json(out.metrics, m)  # last: its presence means every other output is complete
    return m


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json -> MLflow metric names: test/<name>, test/onnx/<name>, test/cv/<name>_mean|_std, ..."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            flat[f"test/{key}"] = float(value)
        elif isinstance(value, list) and len(value) == 2 and key.endswith("_ci95"):
            flat[f"test/{key}_low"], flat[f"test/{key}_high"] = float(value[0]), float(value[1])
    for key, value in metrics["onnx"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"test/onnx/{key}"] = float(value)
    for cls, row in metrics["per_class"].items():
        for key in ("precision", "recall", "f1"):
            flat[f"test/{key}/{cls}"] = float(row[key])
    for key, value in (metrics.get("cv") or {}).items():
        if isinstance(value, dict):
            flat[f"cv/{key}_mean"], flat[f"cv/{key}_std"] = float(value["mean"]), float(value["std"])
    if metrics.get("worst_slice"):
        flat["test/worst_slice_accuracy"] = float(metrics["worst_slice"]["accuracy"])
    return flat


def log_to_mlflow(run_id: str, metrics: dict[str, Any], out: Outputs) -> None:
    """Metrics, plots, the report and the ONNX model into the training run."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat_metrics(metrics))
        mlflow.set_tags({"test_hash": metrics["test_hash"], "evaluate.status": metrics["status"],
                         **({"evaluate.temperature_status": metrics["temperature_status"]}
                            if metrics.get("temperature_status") else {})})
        for path in (out.metrics, out.predictions, out.slices, out.label_issues, out.report):
            mlflow.log_artifact(str(path), "reports")
        mlflow.log_artifacts(str(out.plots), "plots")
        mlflow.log_artifacts(str(out.onnx_dir), "onnx")


def main() -> None:
    """DVC stage entry point: evaluate, write the reports, then log into the training run in MLflow."""
    import time

    from rich.console import Console

    from tasks import tracking
    from tasks.config import load_params
    from tasks.train import config_from_params as train_config

    params = load_params()
    console = Console(stderr=True)
    started = time.perf_counter()
    run_info = json.loads((MODEL_DIR / "mlflow.json").read_text())
    out = Outputs()
    import torch  # noqa: F401  (first: an import holds the GIL, a thread importing mlflow beside it gains nothing)

    # Importing mlflow and opening its store takes seconds of Python: done in a thread while the images are
    # decoded and scored (both release the GIL), and finished before anything is timed.
    mlflow_ready = tracking.Background(tracking.configure, params.register_.tracking_uri, params.register_.experiment)
    try:
        metrics = run(config_from_params(params), model_dir=MODEL_DIR, splits_dir=SPLITS_DIR, raw_dir=RAW_DIR,
                      manifest_path=MANIFEST, out=out, train_cfg=train_config(params),
                      title=f"{params.register_.model_name} candidate, MLflow run {run_info['run_id']}",
                      log=lambda msg: console.print(msg), before_timing=mlflow_ready.result)
    except EvaluationError as exc:
        console.print(f"[red]evaluate failed:[/] {exc}")
        raise SystemExit(1) from None
    log_to_mlflow(run_info["run_id"], metrics, out)
    onnx = metrics["onnx"]
    console.print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f} [{metrics['accuracy_ci95'][0]:.4f}, "
        f"{metrics['accuracy_ci95'][1]:.4f}], macro F1 {metrics['macro_f1']:.4f}, ECE {metrics['ece']:.4f} "
        f"on {metrics['n_test']} images; ONNX agreement {onnx['top1_agreement']:.4f}; "
        f"{metrics['latency_ms_b1']:.2f} ms/batch-1 CPU; report {out.report} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    from tasks.stagehost import check_no_arguments, run_main

    check_no_arguments("tasks.evaluate")
    run_main("tasks.evaluate", main)
