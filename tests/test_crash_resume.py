"""Crash safety and multi-process training through the real launchers: `imgclf run` killed with SIGKILL in the
middle of training resumes on the next `imgclf run` and ends bit-identical to an uninterrupted run; `torchrun`
runs the train stage as two gloo processes that write one model and one MLflow run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.project_helpers import VENV_BIN, copy_project, mlflow_query, shapes_dataset, stop_group

pytestmark = pytest.mark.slow
METRICS = ("accuracy", "macro_f1", "weighted_f1", "roc_auc_ovr", "ece_before", "temperature", "n_test")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("crash")
    images = shapes_dataset(tmp / "images", per_class=80, size=32)
    return copy_project(tmp, {
        "ingest.source": str(images), "ingest.watch": str(images), "validate.min_images_per_class": 5,
        "train.epochs": 12, "train.batch_size": 16, "train.image_size": 32, "train.lr": 0.01, "train.device": "cpu",
        "train.patience": 0, "evaluate.bootstrap_samples": 200,
        "promote.min_accuracy": 0.0, "promote.min_macro_f1": 0.0,
    })


def _train_runs(root: Path) -> list[dict]:
    return mlflow_query(root, (
        "e = c.get_experiment_by_name('imgclf');"
        "rs = c.search_runs([e.experiment_id], \"tags.`imgclf.stage` = 'train'\", order_by=['attributes.start_time'])"
        " if e else [];"
        "print(json.dumps([{'id': r.info.run_id, 'tags': r.data.tags, 'metrics': r.data.metrics, 'status': r.info.status} for r in rs]))"))


def _dvc(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`dvc ...` as a user runs it: from the activated venv (its python first on PATH)."""
    path = f"{VENV_BIN}:{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env={**env, "PATH": path},
                          capture_output=True, text=True, timeout=600)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_killed_mid_training_resumes_and_ends_like_an_uninterrupted_run(project):
    root, env = project
    proc = subprocess.Popen([str(VENV_BIN / "imgclf"), "run"], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not list((root / ".imgclf" / "checkpoints").glob("*/last.pt")):
            assert proc.poll() is None, "the run ended before its first checkpoint: make training longer"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        stop_group(proc, signal.SIGKILL)  # a crash: no cleanup handler runs
    assert not (root / "models" / "candidate" / "model.safetensors").exists()
    assert mlflow_query(root, "print(json.dumps(len(c.search_registered_models())))") == 0  # nothing registered

    resumed = subprocess.run([str(VENV_BIN / "imgclf"), "run"], cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    last = _train_runs(root)[-1]
    assert last["status"] == "FINISHED"
    assert int(last["tags"]["imgclf.resumed_from_epoch"]) >= 1, last["tags"]
    assert not list((root / ".imgclf" / "checkpoints").glob("*/last.pt"))  # removed once the model is saved
    weights = _sha(root / "models" / "candidate" / "model.safetensors")
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    history = json.loads((root / "models" / "candidate" / "history.json").read_text())

    # The uninterrupted reference: the same stages forced to run again from scratch, in the same project.
    fresh = _dvc(root, env, "repro", "-f", "-s", "train")
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert _train_runs(root)[-1]["tags"]["imgclf.resumed_from_epoch"] == "0"
    assert _sha(root / "models" / "candidate" / "model.safetensors") == weights
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("throughput", "seconds")} for row in h]  # noqa: E731
    assert strip(json.loads((root / "models" / "candidate" / "history.json").read_text())) == strip(history)
    fresh_eval = _dvc(root, env, "repro", "-f", "-s", "evaluate")
    assert fresh_eval.returncode == 0, fresh_eval.stdout[-3000:] + fresh_eval.stderr[-3000:]
    again = json.loads((root / "reports" / "metrics.json").read_text())
    assert {k: again[k] for k in METRICS} == {k: metrics[k] for k in METRICS}
    assert again["per_class"] == metrics["per_class"]


def test_torchrun_trains_the_stage_with_two_gloo_processes(project):
    root, env = project
    prepared = _dvc(root, env, "repro", "split")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    before = len(_train_runs(root))
    (root / "models" / "candidate" / "model.safetensors").unlink(missing_ok=True)
    run = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nnodes=1", "--nproc_per_node=2",
                          "-m", "tasks.train"], cwd=root, env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = _train_runs(root)
    assert len(runs) == before + 1  # rank 0 alone tracks
    assert runs[-1]["status"] == "FINISHED" and runs[-1]["tags"]["world_size"] == "2"
    metrics = runs[-1]["metrics"]
    assert metrics["epochs_run"] == 12 and 0 < metrics["tracking_seconds"] < metrics["train_seconds"]
    steps = mlflow_query(root, f"print(json.dumps([m.step for m in c.get_metric_history('{runs[-1]['id']}', 'val/accuracy')]))")
    assert sorted(steps) == list(range(1, 13))  # every epoch's (asynchronously logged) row reached the store
    assert metrics["tracking_fraction"] == pytest.approx(metrics["tracking_seconds"] / metrics["train_seconds"])
    meta = json.loads((root / "models" / "candidate" / "model.json").read_text())
    history = json.loads((root / "models" / "candidate" / "history.json").read_text())
    assert len(history) == 12 and history[-1]["val/accuracy"] >= 0.9
    assert (root / "models" / "candidate" / "model.safetensors").stat().st_size > 0 and meta["classes"]
