"""Sweeps and task runners: pure parts, plus one end-to-end `imgclf run --sweep` in a temporary project copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.config import ParamsError, Params, read_raw
from tasks.sweep import (choose_best, experiment_names, parse_sweep_file, resolve_task_runner, set_args,
                         validate_sweep)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
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


@pytest.mark.parametrize("name, package", [("dask", "prefect-dask"), ("ray", "prefect-ray")])
def test_missing_runner_package_is_a_clear_error(name, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)  # import fails even if installed
    with pytest.raises(ParamsError, match=f"pip install {package}"):
        resolve_task_runner(name)


def test_unknown_runner_is_an_error():
    with pytest.raises(ParamsError, match="unknown runner"):
        resolve_task_runner("spark")


# ---- end to end (helpers copied from tests/test_flow.py so its module fixture is not re-run) ----

def _tiny_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("circle", "square", "stripes"):
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
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


@pytest.mark.slow
def test_sweep_runs_experiments_applies_the_best_and_registers_it(tmp_path):
    dest = tmp_path / "project"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "models/", "reports/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    images = tmp_path / "images"
    _tiny_dataset(images)
    from tasks.config import write_overrides

    write_overrides(dest / "params.yaml", {
        "ingest.source": str(images), "ingest.watch": str(images), "validate.min_images_per_class": 5,
        "train.epochs": 3, "train.batch_size": 16, "train.image_size": 24, "train.lr": 0.01,
        "promote.min_accuracy": 0.0, "promote.min_macro_f1": 0.0, "evaluate.bootstrap_samples": 100,
        "evaluate.gradcam": False, "promote.min_onnx_agreement": None,
    })
    (dest / "sweep.yaml").write_text("- {train.epochs: 1}\n- {train.epochs: 2}\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = str(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)

    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=dest, env=env, capture_output=True,
                              text=True, check=True).stdout

    res = subprocess.run([str(VENV_BIN / "imgclf"), "run", "--sweep", "sweep.yaml"], cwd=dest, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    names = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("sweep sweep-")]
    assert len(names) == 2 and all(n.startswith("sweep-") for n in names)
    listed_exps = dvc("exp", "list", "--name-only")
    assert all(n in listed_exps for n in names), listed_exps
    # each experiment's best_val_accuracy, read back from DVC itself
    accs = []
    for n in names:
        out = subprocess.run([sys.executable, "-c", "import dvc.api, json, sys; print(json.loads(dvc.api.read("
                              "'models/candidate/model.json', rev=sys.argv[1]))['best_val_accuracy'])", n],
                             cwd=dest, env=env, capture_output=True, text=True, check=True).stdout
        accs.append(float(out.strip().splitlines()[-1]))
    expected_epochs = 1 if accs[0] >= accs[1] else 2
    assert yaml.safe_load((dest / "params.yaml").read_text())["train"]["epochs"] == expected_epochs
    assert json.loads((dest / "models/candidate/history.json").read_text())[-1]["epoch"] == expected_epochs
    assert "model version" in res.stdout and "(new)" in res.stdout
    assert json.loads(dvc("status", "--json")) == {}
