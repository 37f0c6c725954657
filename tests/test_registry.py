"""Promotion decision (pure) and the registry side effects against a real sqlite MLflow store."""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from tasks import registry, tracking
from tasks.models import build_model, save_model
from tasks.preprocess import Preprocess
from tasks.registry import Decision, decide_promotion, previous_champion


@pytest.mark.parametrize(
    ("candidate", "champion", "promote"),
    [(0.9, None, True), (0.9, 0.9, True), (0.91, 0.9, True), (0.89, 0.9, False), (float("nan"), None, False)],
)
def test_decide_promotion(candidate, champion, promote):
    decision = decide_promotion(candidate, champion)
    assert isinstance(decision, Decision) and decision.promote is promote and decision.reason


def test_previous_champion_walks_the_history_back():
    history = [{"from": "", "to": "1"}, {"from": "1", "to": "2"}, {"from": "2", "to": "3"}]
    assert previous_champion(history, "3") == "2"
    assert previous_champion(history, "1") is None
    assert previous_champion([], None) is None


def test_tracking_uri_is_made_absolute_against_the_project(tmp_path: Path):
    assert tracking.resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


@pytest.fixture()
def store(tmp_path: Path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    tracking.configure("sqlite:///mlflow.db", "test", tmp_path)
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def _logged_model(tmp_path: Path, seed: int) -> tuple[str, str]:
    import mlflow

    torch.manual_seed(seed)
    model_dir = tmp_path / f"model{seed}"
    save_model(model_dir, build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["dark", "light"], preprocess=Preprocess.for_mode("L", 16))
    with mlflow.start_run() as run:
        uri = tracking.log_serving_model(model_dir)
    return run.info.run_id, uri


def test_registration_is_idempotent_and_champion_moves_are_recorded(tmp_path: Path, store):
    run1, uri1 = _logged_model(tmp_path, 1)
    first = registry.register(store, "m", model_uri=uri1, run_id=run1, tags={"test.accuracy": "0.9"})
    again = registry.register(store, "m", model_uri=uri1, run_id=run1, tags={"test.accuracy": "0.9"})
    assert first.created and not again.created and first.version == again.version == "1"
    assert len(store.search_model_versions("name='m'")) == 1

    assert registry.champion_metric(store, "m", "accuracy") == (None, None)
    registry.set_champion(store, "m", "1", "first")
    assert registry.champion_metric(store, "m", "accuracy") == ("1", 0.9)

    run2, uri2 = _logged_model(tmp_path, 2)
    second = registry.register(store, "m", model_uri=uri2, run_id=run2, tags={"test.accuracy": "0.95"})
    registry.set_champion(store, "m", second.version, "better")
    history = registry.alias_history(store, "m")
    assert [(h["from"], h["to"], h["reason"]) for h in history] == [("", "1", "first"), ("1", "2", "better")]
    assert previous_champion(history, "2") == "1"


def test_served_model_loads_without_pickle_and_predicts_paths_bytes_and_base64(tmp_path: Path, store):
    import base64

    import mlflow

    run_id, uri = _logged_model(tmp_path, 3)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    model = mlflow.pyfunc.load_model(uri)
    img = tmp_path / "x.png"
    Image.new("L", (20, 20), 200).save(img)
    raw = img.read_bytes()
    out = model.predict(pd.DataFrame({"image": [str(img), raw, base64.b64encode(raw).decode()]}))
    assert list(out.columns) == ["label", "probability", "p_dark", "p_light"]
    assert len(out) == 3 and out["label"].nunique() == 1
    assert out["probability"].between(0.5, 1.0).all()
    with pytest.raises(ValueError, match="not a readable file path nor base64"):
        model.predict(pd.DataFrame({"image": ["/no/such/file.png"]}))
