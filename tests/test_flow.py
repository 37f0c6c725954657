"""End to end: the real `imgclf` CLI runs the Prefect flow over DVC in a temporary copy of the project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.project_helpers import VENV_BIN, copy_project, mlflow_query, shapes_dataset, stop_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the project in a fresh git repo, with a local folder as its DVC remote: runs that register
    a model push there, `reproduce` pulls from it."""
    tmp = tmp_path_factory.mktemp("e2e")
    images = shapes_dataset(tmp / "images")
    # a file in no class folder: ingest refuses it, so the manifest has a row without a sha256 (this once crashed
    # the gate whenever the split stage found near-duplicate groups, as it does in this dataset)
    (images / "stray.png").write_bytes((images / "circle" / "circle_000.png").read_bytes())
    return copy_project(tmp, {
        "ingest.source": str(images), "ingest.watch": str(images), "validate.min_images_per_class": 5,
        "train.epochs": 3, "train.batch_size": 16, "train.image_size": 24, "train.lr": 0.01,
        "promote.min_accuracy": 0.0, "promote.min_macro_f1": 0.0,
    }, remote=tmp / "dvc-remote")


def imgclf(project: tuple[Path, dict[str, str]], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    root, env = project
    return subprocess.run([str(VENV_BIN / "imgclf"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _versions(root: Path) -> list[dict]:
    versions = mlflow_query(root, (
        "vs = c.search_model_versions(\"name='imgclf'\");"
        "ch = c.get_model_version_by_alias('imgclf', 'champion').version;"
        "al = lambda a: str(c.get_model_version_by_alias('imgclf', a).version);"
        "print(json.dumps([{'version': str(v.version), 'champion': str(v.version) == str(ch),"
        " 'challenger': str(v.version) == al('challenger'), 'tags': v.tags} for v in vs]))"))
    return sorted(versions, key=lambda v: int(v["version"]))


def test_first_run_trains_registers_and_crowns_a_champion(project):
    root, env = project
    res = imgclf(project, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ingest, validate, split, train, evaluate" in res.stdout
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "macro_f1" in metrics
    for out in ("data/raw/circle", "data/manifest.csv", "data/splits/test.csv", "models/candidate/model.safetensors",
                "models/candidate/model.json", "reports/plots/confusion_matrix.png", "reports/validation/summary.md"):
        assert (root / out).exists(), out
    versions = _versions(root)
    assert [v["version"] for v in versions] == ["1"] and versions[0]["champion"]
    tags = versions[0]["tags"]
    assert tags["data.hash"] == json.loads((root / "data/ingest.json").read_text())["content_hash"]
    assert tags["test.hash"] == metrics["test_hash"] and len(tags["git.commit"]) == 40
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}


def test_second_run_with_nothing_changed_trains_and_registers_nothing(project):
    root, _ = project
    mtime = (root / "models/candidate/model.safetensors").stat().st_mtime_ns
    res = imgclf(project, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "everything up to date" in res.stdout and "already registered" in res.stdout
    assert (root / "models/candidate/model.safetensors").stat().st_mtime_ns == mtime
    assert [v["version"] for v in _versions(root)] == ["1"]


def test_a_registered_version_whose_gate_never_decided_is_decided_by_the_next_run(project):
    """As if the run that registered v1 had died (crash, kill, timeout) before its gate decided: the next run,
    with nothing to retrain, decides and promotes, instead of calling it "already registered" for good."""
    root, _ = project
    mlflow_query(root, "c.delete_model_version_tag('imgclf', '1', 'gate');"
                       "c.delete_registered_model_alias('imgclf', 'champion'); print('[]')")
    assert "gate" not in mlflow_query(root, "print(json.dumps(c.get_model_version('imgclf', '1').tags))")
    res = imgclf(project, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "everything up to date" in res.stdout
    assert "registered by an earlier run that ended before its gate decided: deciding now" in res.stdout + res.stderr
    versions = _versions(root)
    assert [v["version"] for v in versions] == ["1"]
    assert versions[0]["tags"]["gate"] == "passed" and versions[0]["champion"]
    again = imgclf(project, "run")  # decided now: the next run has nothing to do
    assert again.returncode == 0 and "already registered" in again.stdout, again.stdout + again.stderr


def test_registered_run_pushed_its_data_and_reproduces_exactly(project):
    root, _ = project
    remote = root.parent / "dvc-remote"
    assert remote.is_dir() and sum(1 for p in remote.rglob("*") if p.is_file()) > 40  # images + outputs
    assert _versions(root)[0]["tags"]["dvc.remote"] == "local"
    res = imgclf(project, "reproduce", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exact match required (CPU)" in res.stdout and "reproduced" in res.stdout
    listed = subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1  # the temporary worktree is gone


def test_approval_mode_leaves_a_passing_candidate_as_challenger(project):
    root, _ = project
    before = (root / "params.yaml").read_bytes()
    res = imgclf(project, "run", "--set", "train.epochs=2", "--set", "promote.margin=0.99",
                 "--set", "promote.max_class_recall_drop=1", "--set", "promote.require_approval=true")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (root / "params.yaml").read_bytes() == before  # overrides were for that run only
    assert json.loads((root / "models/candidate/history.json").read_text())[-1]["epoch"] == 2
    versions = _versions(root)
    assert [v["version"] for v in versions] == ["1", "2"]
    assert versions[1]["tags"]["gate"] == "passed" and versions[1]["tags"]["gate.compared_with"] == "1"
    assert versions[0]["champion"] and versions[1]["challenger"]
    assert "imgclf promote 2" in res.stdout


def test_predict_uses_the_champion_without_unpickling(project, tmp_path):
    root, _ = project
    out = tmp_path / "pred.csv"
    res = imgclf(project, "predict", "data/raw/circle", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("path,label,probability") and len(lines) == 16
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    res = imgclf(project, "predict", "data/raw/circle/circle_000.png", str(bad), "--out", str(out))
    assert res.returncode == 1 and "1 predicted, 1 unreadable" in res.stdout
    import pandas as pd

    frame = pd.read_csv(out)
    assert len(frame) == 2 and frame["error"].notna().tolist() == [False, True]


def test_manual_promote_history_and_rollback(project):
    root, _ = project
    res = imgclf(project, "promote", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _versions(root)[1]["champion"]
    res = imgclf(project, "history")
    assert res.returncode == 0 and "manual promotion" in res.stdout
    res = imgclf(project, "rollback")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _versions(root)[0]["champion"]
    again = imgclf(project, "promote", "2")  # its gate compared against v1, champion is v1 again: allowed
    assert again.returncode == 0
    imgclf(project, "rollback")


def test_a_failing_gate_registers_but_never_promotes_and_fails_the_run(project):
    root, _ = project
    res = imgclf(project, "run", "--set", "train.epochs=1", "--set", "promote.max_latency_ms_b1=0.0001")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "gate FAILED" in res.stdout and "max_latency_ms_b1" in res.stdout
    versions = _versions(root)
    assert [v["version"] for v in versions] == ["1", "2", "3"]
    assert versions[2]["tags"]["gate"] == "failed" and versions[0]["champion"]
    refused = imgclf(project, "promote", "3")
    assert refused.returncode == 1 and "gate record is 'failed'" in refused.stdout


def test_failed_data_contract_stops_before_training(project):
    root, _ = project
    weights = (root / "models/candidate/model.safetensors").read_bytes()
    res = imgclf(project, "run", "--set", "validate.min_images_per_class=100")
    assert res.returncode == 1
    assert "Data contract FAILED" in res.stdout + res.stderr
    assert "class_count" in (root / "reports/validation/summary.md").read_text()
    assert (root / "models/candidate/model.safetensors").read_bytes() == weights
    assert len(_versions(root)) == 3


def test_a_deployment_on_a_real_prefect_server_runs_and_registers(project, tmp_path):
    """`prefect server start` + `imgclf schedule` (flow.serve) + a run triggered through the API."""
    import socket
    import time
    import urllib.request

    root, env = project
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect-server-home"), "PREFECT_API_URL": api}
    procs = []

    def start(cmd, log):
        procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=(tmp_path / log).open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))

    def wait_until(check, seconds, what):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(1)
        raise AssertionError(f"{what} not ready after {seconds} s: " + "".join(
            (tmp_path / p).read_text()[-3000:] for p in ("server.log", "serve.log") if (tmp_path / p).exists()))

    def healthy():
        try:
            return urllib.request.urlopen(f"{api}/health", timeout=2).status == 200
        except OSError:
            return False

    prefect = str(VENV_BIN / "prefect")
    try:
        start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server.log")
        wait_until(healthy, 120, "prefect server")
        start([str(VENV_BIN / "imgclf"), "schedule"], "serve.log")
        listed = lambda: subprocess.run([prefect, "deployment", "ls"], env=env, capture_output=True,  # noqa: E731
                                        text=True).stdout
        wait_until(lambda: "scheduled" in listed(), 120, "served deployment")
        overrides = json.dumps({"overrides": {"train.epochs": 4, "promote.margin": 0.99,
                                              "promote.max_class_recall_drop": 1}})
        run = subprocess.run([prefect, "deployment", "run", "retrain/scheduled", "--params", overrides,
                              "--watch", "--watch-timeout", "400"], env=env, capture_output=True, text=True,
                             timeout=450)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Completed" in run.stdout + run.stderr
    finally:
        for p in procs:
            stop_group(p, wait=30)
    assert all(p.poll() is not None for p in procs)
    versions = _versions(root)
    assert len(versions) == 4 and versions[3]["tags"]["gate"] == "passed"
