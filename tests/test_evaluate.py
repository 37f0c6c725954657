"""Metrics on hand-computable inputs, and the evaluate core on a saved model."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from tasks.evaluate import compute_metrics, evaluate, plot_confusion
from tasks.models import build_model, save_model
from tasks.preprocess import Preprocess


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
    assert m["per_class"]["dog"]["support"] == 3 and m["n_test"] == 4


def test_evaluate_scores_every_test_image_and_writes_a_confusion_png(tmp_path: Path):
    raw = tmp_path / "raw"
    rows = []
    for label, value in (("dark", 20), ("light", 230)):
        (raw / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (16, 16), value + i).save(raw / label / f"{i}.png")
            rows.append({"path": f"{label}/{i}.png", "label": label})
    test_csv = tmp_path / "test.csv"
    pd.DataFrame(rows).to_csv(test_csv, index=False)
    torch.manual_seed(0)
    save_model(tmp_path / "model", build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["dark", "light"], preprocess=Preprocess.for_mode("L", 16))
    result = evaluate(tmp_path / "model", test_csv, raw)
    assert result.metrics["n_test"] == 6
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert list(result.predictions.columns) == ["path", "label", "prediction", "probability", "loss"]
    assert sum(map(sum, result.confusion)) == 6
    assert len(result.metrics["test_hash"]) == 64
    plot_confusion(result.confusion, ["dark", "light"], tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").size[0] > 100


def test_evaluate_refuses_test_labels_the_model_never_saw(tmp_path: Path):
    (tmp_path / "raw" / "zebra").mkdir(parents=True)
    Image.new("L", (16, 16)).save(tmp_path / "raw" / "zebra" / "z.png")
    pd.DataFrame([{"path": "zebra/z.png", "label": "zebra"}]).to_csv(tmp_path / "t.csv", index=False)
    save_model(tmp_path / "m", build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["a", "b"], preprocess=Preprocess.for_mode("L", 16))
    with pytest.raises(ValueError, match="zebra"):
        evaluate(tmp_path / "m", tmp_path / "t.csv", tmp_path / "raw")
