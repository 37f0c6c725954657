"""Every command has --help; bad params give a clear error, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

IMGCLF = str(Path(sys.executable).parent / "imgclf")
COMMANDS = ["run", "predict", "promote", "rollback", "history", "ui", "schedule", "server", "reproduce", "lr-find"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    res = subprocess.run([IMGCLF, command, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Usage" in res.stdout


def test_top_level_help_lists_every_command():
    res = subprocess.run([IMGCLF, "--help"], capture_output=True, text=True, timeout=60)
    assert all(c in res.stdout for c in COMMANDS)


def test_unknown_override_is_a_clear_error():
    res = subprocess.run([IMGCLF, "run", "--set", "train.nope=1"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2 and "unknown parameter 'train.nope'" in res.stdout


def test_schedule_without_a_server_explains_what_to_do(monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    res = subprocess.run([IMGCLF, "schedule"], capture_output=True, text=True, timeout=60, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2 and "prefect server start" in res.stdout


def test_lr_find_runs_on_the_projects_splits_with_overrides_for_this_test_only(tmp_path):
    """`imgclf lr-find --set ...` in a project whose splits exist: plot + JSON, params.yaml untouched."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    repo = Path(__file__).resolve().parent.parent
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # what makes it a project root
    rng = np.random.default_rng(0)
    rows = []
    for label in ("dark", "light"):
        (tmp_path / "data/raw" / label).mkdir(parents=True)
        for i in range(24):
            base = 40 if label == "dark" else 200
            Image.fromarray(rng.integers(base - 30, base + 30, (12, 12), dtype=np.uint8), mode="L").save(
                tmp_path / "data/raw" / label / f"{i}.png")
            rows.append((f"{label}/{i}.png", label))
    (tmp_path / "data/splits").mkdir()
    for name, part in (("train", rows[::2]), ("val", rows[1::2])):
        (tmp_path / f"data/splits/{name}.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in part))
    (tmp_path / "data/manifest.csv").write_text(
        "path,label,mode,accepted\n" + "".join(f"{p},{lab},L,True\n" for p, lab in rows))
    before = (tmp_path / "params.yaml").read_bytes()
    res = subprocess.run([IMGCLF, "lr-find", "--set", "train.image_size=12", "--set", "train.batch_size=8"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "suggested lr" in res.stdout and (tmp_path / "reports/lr_find.png").is_file()
    result = json.loads((tmp_path / "reports/lr_find.json").read_text())
    assert min(result["lrs"]) <= result["suggested_lr"] <= max(result["lrs"])
    assert (result["image_size"], result["batch_size"]) == (12, 8)  # the recipe tested: params + overrides
    assert (tmp_path / "params.yaml").read_bytes() == before
    bad = subprocess.run([IMGCLF, "lr-find", "--set", "train.nope=1"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert bad.returncode == 2 and "unknown parameter 'train.nope'" in bad.stdout


def test_a_failed_stage_points_at_its_own_message():
    from dvc.exceptions import ReproductionError
    from dvc.stage.exceptions import StageCmdFailedError

    from tasks.cli import failure_hint

    try:
        try:
            raise StageCmdFailedError("python -m tasks.split", 1)
        except StageCmdFailedError as inner:
            raise ReproductionError("split") from inner
    except ReproductionError as exc:
        hint = failure_hint(exc)
    assert "the split stage's command exited with 1" in hint and '"split failed"' in hint
    assert failure_hint(RuntimeError("gate crashed")) == ""
