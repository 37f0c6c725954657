"""Against real processes on 127.0.0.1: an MLflow tracking server over HTTP, and `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks import registry, tracking
from tasks.models import build_model, save_model
from tasks.preprocess import Preprocess
from tests.project_helpers import stop_group

pytestmark = pytest.mark.slow
MLFLOW = [sys.executable, "-m", "mlflow"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {seconds} s")


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Own process group, so teardown stops the server and every worker it forked.
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = _start(MLFLOW + ["server", "--backend-store-uri", f"sqlite:///{tmp}/server.db",
                            "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                            "--port", str(port), "--workers", "1"], env, tmp / "server.log")
    try:
        _wait(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        stop_group(proc)


def test_registry_and_pickle_free_loading_work_over_http(server, monkeypatch):
    import mlflow
    import pandas as pd

    uri, tmp = server
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    tracking.configure(uri, "http-test")
    client = mlflow.MlflowClient()
    torch.manual_seed(0)
    save_model(tmp / "model", build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["dark", "light"], preprocess=Preprocess.for_mode("L", 16))
    with mlflow.start_run() as run:
        model_uri = tracking.log_serving_model(tmp / "model")
    reg = registry.register(client, "served", model_uri=model_uri, run_id=run.info.run_id, tags={"x": "1"})
    assert reg.created and not registry.register(client, "served", model_uri=model_uri, run_id=run.info.run_id,
                                                 tags={}).created
    registry.promote_if_unchanged(client, "served", reg.version, expected=None, reason="first",
                                  lock_path=tmp / "lock")
    assert registry.alias_history(client, "served")[0]["to"] == reg.version
    img = tmp / "light.png"
    Image.new("L", (16, 16), 230).save(img)
    loaded = mlflow.pyfunc.load_model("models:/served@champion")
    out = loaded.predict(pd.DataFrame({"image": [str(img)]}))
    assert out.loc[0, "label"] in {"dark", "light"}
    mlflow.set_tracking_uri(None)


def test_mlflow_models_serve_answers_invocations(server):
    uri, tmp = server  # the champion registered by the test above
    port = _free_port()
    # `mlflow models serve` execs `uvicorn` from PATH: the venv must be active, as the README says.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = _start(MLFLOW + ["models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
                            "-h", "127.0.0.1", "-p", str(port)], env, tmp / "serve.log")
    try:
        _wait(f"http://127.0.0.1:{port}/ping", proc)
        img = tmp / "dark.png"
        Image.new("L", (16, 16), 10).save(img)
        payload = {"dataframe_split": {"columns": ["image"],
                                       "data": [[base64.b64encode(img.read_bytes()).decode()]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        row = body["predictions"][0]
        assert row["label"] in {"dark", "light"}
        assert abs(row["p_dark"] + row["p_light"] - 1.0) < 1e-5
    finally:
        stop_group(proc)
    assert proc.poll() is not None


def test_the_served_model_class_loads_without_mlflow_warnings():
    """MLflow checks a PythonModel's predict hints when its class is defined (on every load of a served model):
    without one it printed a "type hints" UserWarning at every `imgclf predict`."""
    import importlib
    import warnings

    import tasks.serving

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(tasks.serving)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
