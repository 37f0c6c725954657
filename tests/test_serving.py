"""The served pyfunc (tasks/serving.py): in-process, and against real processes on 127.0.0.1 (an MLflow
tracking server over HTTP, and `mlflow models serve`)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks import registry, tracking
from tasks.models import build_model, save_model
from tasks.preprocess import Preprocess
from tests.project_helpers import stop_group

MLFLOW = [sys.executable, "-m", "mlflow"]
NOT_PATHS = "file paths are not read by a served model"


def _noise_png(size: int, *, seed: int = 0, mode: str = "RGB") -> bytes:
    """PNG bytes of seeded noise (incompressible: a 256x256 RGB one is ~197 KB, ~262 KB as base64)."""
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, "PNG")
    return buf.getvalue()


def _noise_jpeg(*, seed: int = 0) -> bytes:
    """A ~16 KB JPEG (~21 KB as base64; the real one that got HTTP 400 was 13 KB)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _no_nan(constant: str):
    raise AssertionError(f"the served JSON holds a bare {constant} (not JSON); nulls were expected")


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


@pytest.mark.slow
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
    loaded = tracking.load_pyfunc("models:/served@champion", allow_paths=True)
    out = loaded.predict(pd.DataFrame({"image": [str(img)]}))
    assert out.loc[0, "label"] in {"dark", "light"} and out.loc[0, "error"] is None
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
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
        big = _noise_jpeg(seed=1)
        assert len(base64.b64encode(big)) > 13_000
        rows = [base64.b64encode(img.read_bytes()).decode(), base64.b64encode(big).decode(), "not base64!",
                str(img)]  # (a file on the server: not to be read for a client)
        payload = {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read(), parse_constant=_no_nan)
        good, large, bad, path = body["predictions"]
        for row in (good, large):
            assert row["label"] in {"dark", "light"} and row["error"] is None
            assert abs(row["p_dark"] + row["p_light"] - 1.0) < 1e-5
        for row in (bad, path):
            assert row["label"] is None and row["probability"] is None and NOT_PATHS in row["error"]
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


@pytest.fixture()
def logged(tmp_path: Path, monkeypatch) -> str:
    """A tiny 2-class model logged as serving pyfunc into a store under tmp_path; its model URI."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    tracking.configure("sqlite:///mlflow.db", "serving-test", tmp_path)
    torch.manual_seed(0)
    save_model(tmp_path / "model", build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["dark", "light"], preprocess=Preprocess.for_mode("L", 16))
    with mlflow.start_run():
        uri = tracking.log_serving_model(tmp_path / "model")
    yield uri
    mlflow.set_tracking_uri(None)


def test_base64_images_of_any_size_are_scored(logged):
    """Long base64 strings were first tried as file names: over ~3 KB the OS refused the name (File name too
    long) and the whole request failed."""
    import mlflow

    served = mlflow.pyfunc.load_model(logged)  # as `mlflow models serve` loads it
    png, jpeg = _noise_png(256), _noise_jpeg()
    encoded = [base64.b64encode(b).decode() for b in (png, jpeg)]
    assert len(encoded[0]) > 100_000 and len(encoded[1]) > 13_000
    wrapped = base64.encodebytes(jpeg).decode()  # `base64` without -w0: newlines every 76 characters
    out = served.predict(pd.DataFrame({"image": [*encoded, wrapped, "data:image/jpeg;base64," + encoded[1]]}))
    assert out["error"].isna().all(), out["error"].tolist()
    assert out["label"].isin(["dark", "light"]).all()
    assert out.loc[1, "probability"] == out.loc[2, "probability"] == out.loc[3, "probability"]


def test_a_served_model_reads_no_files_and_in_process_callers_opt_in(logged, tmp_path: Path):
    """A client naming /etc/passwd or a server-side image got it read (and learnt from the error whether a file
    existed). Paths are read only when the loader asks for it with model_config {"allow_paths": True}."""
    import mlflow

    assert mlflow.models.get_model_info(logged).flavors["python_function"].get("config") == {
        "allow_paths": False}, ("log_serving_model must declare model_config={'allow_paths': False}: MLflow "
                                "drops a load-time model_config key the logged model does not declare")
    img = tmp_path / "x.png"
    Image.new("L", (20, 20), 200).save(img)
    missing = tmp_path / "missing.png"
    served = mlflow.pyfunc.load_model(logged)
    out = served.predict(pd.DataFrame({"image": [str(img), "/etc/passwd", str(missing)]}))
    assert out["label"].isna().all() and out["probability"].isna().all()
    # the same answer whether the file exists or not
    assert out["error"].tolist() == [f"not base64 image data ({NOT_PATHS})"] * 3
    for loaded in (tracking.load_pyfunc(logged, allow_paths=True),
                   mlflow.pyfunc.load_model(logged, model_config={"allow_paths": True})):
        out = loaded.predict(pd.DataFrame({"image": [str(img), str(missing), img.read_bytes()]}))
        assert out.loc[0, "label"] in {"dark", "light"} and out.loc[0, "error"] is None
        assert out.loc[0, "probability"] == out.loc[2, "probability"]
        assert out.loc[1, "label"] is None and out.loc[1, "error"] == "neither a readable file nor base64 image data"
    assert tracking.load_pyfunc(logged).predict(pd.DataFrame({"image": [str(img)]})).loc[0, "label"] is None


def test_each_bad_row_gets_its_own_error_and_the_others_are_scored(logged):
    """One bad row failed the whole batch, its reason buried in a server stack trace."""
    import mlflow
    from mlflow.pyfunc.scoring_server import predictions_to_json

    served = mlflow.pyfunc.load_model(logged)
    raw = _noise_png(64, mode="L")
    rows = [raw, "not base64!", base64.b64encode(b"hello, world").decode(), raw[: len(raw) * 2 // 3], "",
            base64.b64encode(raw).decode(), b"", None]
    out = served.predict(pd.DataFrame({"image": rows}))
    assert list(out.columns) == ["label", "probability", "p_dark", "p_light", "error"]
    assert out["error"].tolist() == [
        None, f"not base64 image data ({NOT_PATHS})", "not an image: cannot identify image file",
        "unreadable image: image file is truncated", "empty input", None, "empty input", "empty input"]
    bad = out["error"].notna()
    assert out.loc[bad, ["label", "probability", "p_dark", "p_light"]].isna().all().all()
    clean = served.predict(pd.DataFrame({"image": [raw, raw]}))
    assert clean["error"].isna().all() and clean["probability"].dtype == float
    assert out.loc[[0, 5], "probability"].tolist() == clean["probability"].tolist()
    buf = io.StringIO()
    predictions_to_json(out, buf)  # what the server answers
    answer = json.loads(buf.getvalue(), parse_constant=_no_nan)["predictions"]
    assert answer[1] == {"label": None, "probability": None, "p_dark": None, "p_light": None,
                         "error": f"not base64 image data ({NOT_PATHS})"}
    assert answer[0]["error"] is None and answer[0]["label"] in {"dark", "light"}
    empty = served.predict(pd.DataFrame({"image": []}))
    assert len(empty) == 0 and list(empty.columns) == list(out.columns)


def test_rescore_reads_test_images_and_names_one_it_cannot(logged, tmp_path: Path):
    img, bad = tmp_path / "x.png", tmp_path / "bad.png"
    Image.new("L", (20, 20), 30).save(img)
    bad.write_text("not an image")
    assert len(registry.rescore(logged, [img, img])) == 2
    with pytest.raises(RuntimeError, match=r"could not read 1 test image\(s\); .*bad\.png: not an image"):
        registry.rescore(logged, [img, bad])


def test_imgclf_predict_writes_a_row_per_file_with_its_error(logged, tmp_path: Path, monkeypatch):
    """Unreadable files are rows with `error` (in input order) and a non-zero exit."""
    import shutil

    from typer.testing import CliRunner

    from tasks.cli import app

    shutil.copy(Path(__file__).resolve().parent.parent / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # what makes it a project root (store: its mlflow.db)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    good = tmp_path / "imgs/a.png"
    Image.new("L", (20, 20), 200).save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(app, ["predict", str(bad), "imgs", "--model", logged, "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "1 predicted, 1 unreadable" in res.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["path", "label", "probability", "p_dark", "p_light", "error"]
    assert frame["path"].tolist() == [str(bad), "imgs/a.png"]
    assert frame["error"].tolist()[0] == "not an image: cannot identify image file" and pd.isna(frame["error"][1])
    assert frame["label"].isna().tolist() == [True, False]
    res = CliRunner().invoke(app, ["predict", "imgs", "--model", logged, "--out", str(out)])
    assert res.exit_code == 0 and "1 predicted, 0 unreadable" in res.output, res.output
    assert out.read_text().splitlines()[0] == "path,label,probability,p_dark,p_light,error"


def test_every_input_shape_mlflow_hands_over_is_one_row_per_image():
    import numpy as np
    import pandas as pd

    from tasks.serving import as_frame

    frame = pd.DataFrame({"image": ["a", "b"]})
    assert as_frame(frame) is frame
    assert as_frame({"image": np.array(["a", "b"])})["image"].tolist() == ["a", "b"]  # "inputs": {"image": [...]}
    assert as_frame({"image": "a"})["image"].tolist() == ["a"]
    assert as_frame({"image": None})["image"].tolist() == [None]  # one row, which gets its own error
    assert as_frame(["a", "b", "c"])["image"].tolist() == ["a", "b", "c"]  # "instances": [...]


def test_a_version_registered_before_this_serving_code_still_predicts_in_process(tmp_path: Path, monkeypatch):
    """A registered version runs its own logged serving.py, which imports today's tasks.* in-process (imgclf
    predict, the gate's re-score): a model logged with the serving code of 554aa86 (no model_config, whole-
    batch errors, predict_sources) must load quietly, read paths and score them, and fail a bad file alone."""
    import logging

    import mlflow
    import pandas as pd

    from tasks import registry

    old_code = Path(__file__).parent / "old_versions" / "serving_554aa86.py"
    real = mlflow.pyfunc.log_model
    monkeypatch.setattr(mlflow.pyfunc, "log_model", lambda **kw: real(**{
        **{k: v for k, v in kw.items() if k != "model_config"}, "python_model": str(old_code)}))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    tracking.configure("sqlite:///mlflow.db", "serving-test", tmp_path)
    save_model(tmp_path / "model", build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["dark", "light"], preprocess=Preprocess.for_mode("L", 16))
    with mlflow.start_run():
        uri = tracking.log_serving_model(tmp_path / "model")
    images = []
    for i, shade in enumerate((10, 240)):
        images.append(tmp_path / f"{i}.png")
        Image.new("L", (16, 16), shade).save(images[-1])
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mlflow.pyfunc").addHandler(handler)
    try:
        mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})
        assert any("allow_paths were ignored" in m for m in seen)  # what MLflow says on its own
        seen.clear()
        model = tracking.load_pyfunc(uri, allow_paths=True)
        assert not any("allow_paths were ignored" in m for m in seen)  # kept out of the run's log
        out = model.predict(pd.DataFrame({"image": [str(p) for p in images]}))
        assert list(out.columns) == ["label", "probability", "p_dark", "p_light"] and len(out) == 2
        assert registry.rescore(uri, images) == out["label"].tolist()  # the gate can re-score an old champion
    finally:
        logging.getLogger("mlflow.pyfunc").removeHandler(handler)
        mlflow.set_tracking_uri(None)
