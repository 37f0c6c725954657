"""End to end: the real `imgclf` CLI runs the Prefect flow over DVC in a temporary copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _tiny_dataset(root: Path) -> None:
    """3 visually distinct classes x 15 images, 24x24: enough for a tiny model to learn something."""
    rng = np.random.default_rng(0)
    for k, label in enumerate(("circle", "square", "stripes")):
        (root / label).mkdir(parents=True)
        for i in range(15):
            arr = rng.integers(0, 40, (24, 24), dtype=np.uint8)
            if label == "circle":
                yy, xx = np.mgrid[:24, :24]
                arr[(yy - 12) ** 2 + (xx - 12) ** 2 < 40 + i] = 220
            elif label == "square":
                arr[6:18, 6 + i % 3:18] = 220
            else:
                arr[::4 + i % 2] = 220
            Image.fromarray(arr, mode="L").save(root / label / f"{label}_{i:02d}.png")


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DVC_"))}
    # The venv's bin is deliberately NOT on PATH: the flow must still run stages with this interpreter.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the project's committed + untracked (not ignored) files, in a fresh git repo."""
    tmp = tmp_path_factory.mktemp("e2e")
    dest = tmp / "project"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "models/", "reports/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    images = tmp / "images"
    _tiny_dataset(images)
    sys.path.insert(0, str(dest))
    from tasks.config import write_overrides

    sys.path.remove(str(dest))
    write_overrides(dest / "params.yaml", {
        "ingest.source": str(images), "ingest.watch": str(images), "validate.min_images_per_class": 5,
        "train.epochs": 3, "train.batch_size": 16, "train.image_size": 24, "train.lr": 0.01,
        "promote.min_accuracy": 0.0, "promote.min_macro_f1": 0.0,
    })
    env = _env(tmp)
    env["PYTHONPATH"] = str(dest)  # the CLI imports the copy's code, not the installed checkout's
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    # A local folder as the DVC remote: runs that register a model push there, `reproduce` pulls from it.
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(tmp / "dvc-remote")],
                   cwd=dest, check=True, env=env, capture_output=True)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest, env


def imgclf(project: tuple[Path, dict[str, str]], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    root, env = project
    return subprocess.run([str(VENV_BIN / "imgclf"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _versions(root: Path) -> list[dict]:
    code = (
        "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); c = mlflow.MlflowClient();"
        "vs = c.search_model_versions(\"name='imgclf'\");"
        "ch = c.get_model_version_by_alias('imgclf', 'champion').version;"
        "al = lambda a: str(c.get_model_version_by_alias('imgclf', a).version);"
        "print(json.dumps([{'version': str(v.version), 'champion': str(v.version) == str(ch),"
        " 'challenger': str(v.version) == al('challenger'), 'tags': v.tags} for v in vs]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return sorted(json.loads(out.stdout.strip().splitlines()[-1]), key=lambda v: int(v["version"]))


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
    res = imgclf(project, "predict", "data/raw/circle/circle_00.png", str(bad), "--out", str(out))
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
    import signal
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
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
            except ProcessLookupError:
                pass
    assert all(p.poll() is not None for p in procs)
    versions = _versions(root)
    assert len(versions) == 4 and versions[3]["tags"]["gate"] == "passed"
