"""Stage `evaluate`: score the candidate on the test split; metrics, predictions and a confusion matrix."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.io import sha256_file, write_json, write_text

if TYPE_CHECKING:
    import pandas as pd
    import torch

RAW_DIR = Path("data/raw")
TEST_SPLIT = Path("data/splits/test.csv")
MODEL_DIR = Path("models/candidate")
METRICS = Path("reports/metrics.json")
PREDICTIONS = Path("reports/predictions.csv")
PLOTS_DIR = Path("reports/plots")


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    predictions: "pd.DataFrame"
    confusion: list[list[int]]


def compute_metrics(probs: "torch.Tensor", targets: "torch.Tensor", classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and a per-class table from probabilities (torchmetrics)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    k = len(classes)
    per = {name: fn(probs, targets, num_classes=k, average="none")
           for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall),
                            ("f1", multiclass_f1_score))}
    support = [int((targets == i).sum()) for i in range(k)]
    return {
        "accuracy": float(multiclass_accuracy(probs, targets, num_classes=k, average="micro")),
        "macro_f1": float(multiclass_f1_score(probs, targets, num_classes=k, average="macro")),
        "n_test": int(len(targets)),
        "per_class": {c: {"precision": float(per["precision"][i]), "recall": float(per["recall"][i]),
                          "f1": float(per["f1"][i]), "support": support[i]} for i, c in enumerate(classes)},
    }


def evaluate(model_dir: Path, test_csv: Path, raw_dir: Path, *, batch_size: int = 256) -> Evaluation:
    """Core: load the saved model, predict the test split, compute metrics."""
    import pandas as pd
    import torch
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    from tasks.models import load_model
    from tasks.predict import predict_proba
    from tasks.preprocess import Preprocess
    from tasks.train import load_split

    model, meta = load_model(model_dir)
    classes = list(meta["classes"])
    spec = Preprocess.from_dict(meta["preprocess"])
    frame = pd.read_csv(test_csv, dtype={"label": str})
    unknown = sorted(set(frame["label"]) - set(classes))
    if unknown:
        raise ValueError(f"{test_csv}: test labels the model was not trained on: {unknown}")
    images, targets = load_split(frame, raw_dir, spec, {c: i for i, c in enumerate(classes)})
    probs = predict_proba(model, images, spec, batch_size=batch_size)
    metrics = compute_metrics(probs, targets, classes)
    metrics["test_hash"] = sha256_file(test_csv)
    pred = probs.argmax(1)
    loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), targets, reduction="none")
    predictions = pd.DataFrame({
        "path": frame["path"], "label": frame["label"], "prediction": [classes[i] for i in pred.tolist()],
        "probability": probs.max(1).values.tolist(), "loss": loss.tolist(),
    })
    confusion = multiclass_confusion_matrix(pred, targets, num_classes=len(classes)).tolist()
    return Evaluation(metrics=metrics, predictions=predictions, confusion=confusion)


def plot_confusion(confusion: list[list[int]], classes: list[str], dest: Path) -> None:
    """Confusion matrix (counts) with class names as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("Confusion matrix (test split)")
    top = max((max(r) for r in confusion), default=0)
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black",
                        fontsize=8)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def write_outputs(result: Evaluation, classes: list[str]) -> None:
    """metrics.json, predictions.csv, the confusion PNG and DVC plot data."""
    write_json(METRICS, result.metrics)
    write_text(PREDICTIONS, result.predictions.to_csv(index=False))
    plot_confusion(result.confusion, classes, PLOTS_DIR / "confusion_matrix.png")
    write_text(PLOTS_DIR / "confusion.csv", result.predictions[["label", "prediction"]].to_csv(index=False))


def main() -> None:
    """DVC stage entry point: evaluate, then log into the training run in MLflow."""
    import mlflow
    from rich.console import Console

    from tasks import tracking
    from tasks.config import load_params

    params = load_params()
    console = Console(stderr=True)
    result = evaluate(MODEL_DIR, TEST_SPLIT, RAW_DIR, batch_size=params.evaluate.batch_size)
    classes = list(result.metrics["per_class"])
    write_outputs(result, classes)
    run_info = json.loads((MODEL_DIR / "mlflow.json").read_text())
    tracking.configure(params.register_.tracking_uri, params.register_.experiment)
    with mlflow.start_run(run_id=run_info["run_id"]):
        flat = {f"test/{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        flat.update({f"test/recall/{c}": m["recall"] for c, m in result.metrics["per_class"].items()})
        mlflow.log_metrics(flat)
        mlflow.set_tag("test_hash", result.metrics["test_hash"])
        mlflow.log_artifact(str(METRICS), "reports")
        mlflow.log_artifact(str(PREDICTIONS), "reports")
        mlflow.log_artifact(str(PLOTS_DIR / "confusion_matrix.png"), "plots")
    console.print(f"evaluate: test accuracy {result.metrics['accuracy']:.4f}, macro F1 "
                  f"{result.metrics['macro_f1']:.4f} on {result.metrics['n_test']} images")


if __name__ == "__main__":
    main()
