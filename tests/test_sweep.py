"""Sweeps and task runners: pure parts, plus one end-to-end `imgclf run --sweep` in a temporary project copy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.project_helpers import VENV_BIN, copy_project, shapes_dataset
from tasks.config import ParamsError, Params, parse_params, read_raw
from tasks.sweep import (check_task_runner, choose_best, experiment_names, parse_sweep_file, resolve_task_runner,
                         set_args, validate_sweep)

REPO = Path(__file__).resolve().parent.parent
RAW = Params().to_dict()


def test_sweep_file_parses_into_validated_overrides(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("- {train.lr: 0.001}\n- {train.lr: 0.003, train.epochs: 20}\n")
    assert parse_sweep_file(f, RAW) == [{"train.lr": 0.001}, {"train.lr": 0.003, "train.epochs": 20}]


@pytest.mark.parametrize("data, msg", [
    ([], "non-empty"), ({"train.lr": 1}, "non-empty"), ([{}], "candidate 0"), (["x"], "candidate 0"),
    ([{"train.nope": 1}], "unknown parameter 'train.nope'"), ([{"train.epochs": "many"}], "train.epochs"),
    ([{"train.lr": 0.1}, {"lr": 0.1}], "candidate 1"), ([{"promote.margin": 0.5}], "not an experiment setting"),
])
def test_invalid_sweeps_are_errors_naming_the_candidate(data, msg):
    with pytest.raises(ParamsError, match=msg):
        validate_sweep(data, RAW)


def test_missing_or_broken_sweep_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        parse_sweep_file(tmp_path / "none.yaml", RAW)
    (tmp_path / "bad.yaml").write_text("- [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        parse_sweep_file(tmp_path / "bad.yaml", RAW)


def test_choose_best_highest_metric_first_on_ties_skips_missing():
    rs = [{"name": "a", "best_val_accuracy": 0.5}, {"name": "b", "best_val_accuracy": 0.9},
          {"name": "c", "best_val_accuracy": 0.9}, {"name": "d", "best_val_accuracy": None},
          {"name": "e", "best_val_accuracy": float("nan")}]
    assert choose_best(rs)["name"] == "b"
    assert choose_best([{"name": "x", "best_val_accuracy": None}, {"name": "y", "best_val_accuracy": 0.0}])["name"] == "y"
    with pytest.raises(ValueError, match="no sweep candidate"):
        choose_best([{"name": "x"}])


def test_set_args_and_experiment_names():
    assert set_args({"train.lr": 0.001, "train.hflip": True, "train.pretrained": None}) == [
        "-S", "train.lr=0.001", "-S", "train.hflip=true", "-S", "train.pretrained=null"]
    assert experiment_names("20250101-000000", 2) == ["sweep-20250101-000000-0", "sweep-20250101-000000-1"]


def test_task_runner_thread_is_the_default():
    from prefect.task_runners import ThreadPoolTaskRunner

    assert Params().schedule.task_runner == "thread"
    assert read_raw(REPO / "params.yaml")["schedule"]["task_runner"] == "thread"
    assert isinstance(resolve_task_runner("thread"), ThreadPoolTaskRunner)


def test_max_parallel_bounds_the_thread_pool_and_the_local_dask_cluster():
    from prefect_dask import DaskTaskRunner

    assert Params().schedule.max_parallel == 2
    assert resolve_task_runner("thread", 3)._max_workers == 3
    dask = resolve_task_runner("dask", 2)
    assert isinstance(dask, DaskTaskRunner)
    assert dask.cluster_kwargs["n_workers"] == 2 and dask.cluster_kwargs["threads_per_worker"] == 1
    with pytest.raises(ParamsError, match="max_parallel"):
        parse_params({**RAW, "schedule": {**RAW["schedule"], "max_parallel": 0}})


@pytest.mark.parametrize("resolve", [resolve_task_runner, check_task_runner])  # the CLI checks before starting
@pytest.mark.parametrize("name, package", [("dask", "prefect-dask"), ("ray", "prefect-ray")])
def test_missing_runner_package_is_a_clear_error(name, package, resolve, monkeypatch):
    monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)  # import fails even if installed
    with pytest.raises(ParamsError, match=f"pip install {package}"):
        resolve(name)


def test_relative_store_resolves_against_dvc_root(monkeypatch, tmp_path):
    """DVC sets DVC_ROOT for stage commands; in `dvc exp run --temp` it is the real project, not the temp copy."""
    from tasks.tracking import artifact_root, resolve_tracking_uri

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_root() == (tmp_path / "mlartifacts").resolve().as_uri()
    assert resolve_tracking_uri("sqlite:///mlflow.db", REPO) == f"sqlite:///{REPO}/mlflow.db"  # explicit root wins
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(REPO / "tasks")
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{REPO}/mlflow.db"


@pytest.mark.parametrize("resolve", [resolve_task_runner, check_task_runner])
def test_unknown_runner_is_an_error(resolve):
    with pytest.raises(ParamsError, match="unknown runner"):
        resolve("spark")


# ---- end to end ----

def _find_exp(node, name: str):
    """The `dvc exp show --json` record of experiment `name` (its layout nests baselines and experiments)."""
    if isinstance(node, dict):
        if node.get("name") == name and isinstance(node.get("data"), dict):
            return node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found = _find_exp(item, name)
            if found is not None:
                return found
    return None


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["thread", "dask"])
def test_sweep_runs_experiments_concurrently_applies_the_best_and_registers_it(tmp_path, runner):
    """Two candidates as `dvc exp run --temp` experiments at the same time (thread pool or a local Dask cluster
    of 2 processes): both end as DVC experiments with params and metrics, each with its MLflow run in the
    project's store (their run times overlap), the best is applied and registered, `dvc status` stays clean."""
    images = shapes_dataset(tmp_path / "images")
    dest, env = copy_project(tmp_path, {
        "ingest.source": str(images), "ingest.watch": str(images), "validate.min_images_per_class": 5,
        "train.epochs": 3, "train.image_size": 24, "train.lr": 0.01,
        "promote.min_accuracy": 0.0, "promote.min_macro_f1": 0.0, "evaluate.bootstrap_samples": 100,
        "evaluate.gradcam": False, "promote.min_onnx_agreement": None,
        "schedule.task_runner": runner, "schedule.max_parallel": 2,
    }, files={"sweep.yaml": "- {train.epochs: 2}\n- {train.epochs: 4}\n"})

    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=dest, env=env, capture_output=True,
                              text=True, check=True).stdout

    # --set applies to every candidate, and stays in params.yaml with the applied winner
    res = subprocess.run([str(VENV_BIN / "imgclf"), "run", "--sweep", "sweep.yaml", "--set", "train.batch_size=16"],
                         cwd=dest, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    names = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("sweep sweep-")]
    assert len(names) == 2 and all(n.startswith("sweep-") for n in names)
    shown = json.loads(dvc("exp", "show", "--json"))
    accs, runs = [], []
    for n, epochs in zip(names, (2, 4)):
        exp = _find_exp(shown, n)
        assert exp is not None, (n, shown)
        params = exp["data"]["params"]["params.yaml"]["data"]
        assert params["train"]["epochs"] == epochs and params["train"]["batch_size"] == 16
        assert "accuracy" in exp["data"]["metrics"]["reports/metrics.json"]["data"]
        read = ("import dvc.api, json, sys; print(json.dumps([json.loads(dvc.api.read(p, rev=sys.argv[1])) for p in "
                "('models/candidate/model.json', 'models/candidate/mlflow.json')]))")
        out = subprocess.run([sys.executable, "-c", read, n], cwd=dest, env=env, capture_output=True, text=True,
                             check=True).stdout
        model, run_info = json.loads(out.strip().splitlines()[-1])
        accs.append(model["best_val_accuracy"])
        runs.append(run_info["run_id"])
    # each candidate has its own MLflow run in the project's store (not in DVC's temporary copy)
    import sqlite3

    with sqlite3.connect(dest / "mlflow.db") as db:
        times = [db.execute("SELECT start_time, end_time, status FROM runs WHERE run_uuid = ?", (r,)).fetchone()
                 for r in runs]
    assert all(t is not None and t[2] == "FINISHED" for t in times), times
    assert max(t[0] for t in times) < min(t[1] for t in times), f"candidates did not overlap: {times}"
    assert not list((dest / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    expected_epochs = 2 if accs[0] >= accs[1] else 4
    params = yaml.safe_load((dest / "params.yaml").read_text())
    assert params["train"]["epochs"] == expected_epochs and params["train"]["batch_size"] == 16
    assert json.loads((dest / "models/candidate/history.json").read_text())[-1]["epoch"] == expected_epochs
    assert json.loads((dest / "models/candidate/mlflow.json").read_text())["run_id"] == runs[(2, 4).index(expected_epochs)]
    assert "model version" in res.stdout and "(new)" in res.stdout
    assert json.loads(dvc("status", "--json")) == {}


def test_the_summary_says_which_set_overrides_a_winning_candidate_replaced():
    from tasks.cli import overrides_note

    sweep = {"best": "sweep-x-1", "candidates": [{"name": "sweep-x-0", "overrides": {"train.lr": 0.1}},
                                                 {"name": "sweep-x-1", "overrides": {"train.epochs": 2}}]}
    note = overrides_note({"train.epochs": 4, "train.batch_size": 8}, sweep)
    assert "kept in params.yaml with the sweep's winner" in note and 'own {"train.epochs": 2} replaced' in note
    assert "replaced" not in overrides_note({"train.batch_size": 8}, sweep)
    assert overrides_note({"train.epochs": 4}, None).endswith("(params.yaml left as it was)")
