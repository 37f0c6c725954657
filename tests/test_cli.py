"""Every command has --help; bad params give a clear error, not a traceback."""

import re
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

    def failed(stage: str) -> ReproductionError:
        try:
            try:
                raise StageCmdFailedError(f"python -m tasks.{stage}", 1)
            except StageCmdFailedError as inner:
                raise ReproductionError(stage) from inner
        except ReproductionError as exc:
            return exc

    hint = failure_hint(failed("split"))
    assert "the split stage's command exited with 1" in hint and '"split failed"' in hint
    assert '"training failed"' in failure_hint(failed("train"))  # what each stage really prints
    assert '"Data contract FAILED"' in failure_hint(failed("validate"))
    assert failure_hint(RuntimeError("gate crashed")) == ""


# ---------------------------------------------------------------- promote / rollback / history, in process

@pytest.fixture()
def registry_project(tmp_path: Path, monkeypatch):
    """A project folder (params.yaml + dvc.yaml) with its own sqlite MLflow store, cwd in it; yields a
    function that registers a version with the given gate tags (no model files: these commands never load one)."""
    import shutil

    import mlflow

    shutil.copy(Path(__file__).resolve().parent.parent / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")  # rich: no line wrapping inside the messages checked
    from tasks import tracking

    tracking.configure("sqlite:///mlflow.db", "imgclf", tmp_path)
    client = mlflow.MlflowClient()

    def add_version(gate: str = "passed", compared_with: str = "") -> str:
        try:
            client.create_registered_model("imgclf")
        except mlflow.exceptions.MlflowException:
            pass  # already there
        tags = {"gate": gate, "gate.compared_with": compared_with, "gate.reasons": f"{gate} in a test"}
        return str(client.create_model_version("imgclf", source=str(tmp_path / "model"), tags=tags).version)

    add_version.client = client
    yield add_version
    mlflow.set_tracking_uri(None)


def _imgclf(*args: str):
    from typer.testing import CliRunner

    from tasks.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception  # a message, not a traceback
    return res.exit_code, " ".join(res.output.split())


def _champion(client) -> str:
    from tasks import registry

    return str(registry.champion_version(client, "imgclf").version)


def test_rollback_twice_never_puts_back_the_version_the_first_one_removed(registry_project):
    """The user's report: v2 failed its gate and was forced in; rollback went to v1, a second rollback to v2."""
    from tasks import registry

    client = registry_project.client
    registry_project("passed"), registry_project("failed", "1")
    registry.set_champion(client, "imgclf", "1", "gate passed (first champion: floors only)")
    assert _imgclf("promote", "2")[0] == 1  # refused: its gate failed
    code, out = _imgclf("promote", "2", "--force")
    assert code == 0 and "champion -> imgclf v2 (was v1)" in out
    code, out = _imgclf("rollback")
    assert code == 0 and "champion -> imgclf v1 (was v2)" in out
    code, out = _imgclf("rollback")
    assert code == 1 and "nothing to roll back to" in out
    assert _champion(client) == "1"
    moves = registry.alias_history(client, "imgclf")
    assert [(m["from"], m["to"], m["kind"]) for m in moves] == [("", "1", "promote"), ("1", "2", "promote"),
                                                                ("2", "1", "rollback")]
    code, out = _imgclf("history")
    kinds = re.findall(r"│ (promote|rollback) +│", out)
    assert code == 0 and kinds == ["promote", "promote", "rollback"], out


def test_rollback_refuses_a_target_whose_gate_failed_unless_forced(registry_project):
    from tasks import registry

    client = registry_project.client
    registry_project("failed"), registry_project("passed", "1")
    registry.set_champion(client, "imgclf", "1", "manual promotion (imgclf promote) FORCED over: failed")
    registry.set_champion(client, "imgclf", "2", "gate passed against v1")
    code, out = _imgclf("rollback")
    assert code == 1 and "not rolled back to v1: its gate record is 'failed'" in out and "--force" in out
    assert _champion(client) == "2"
    code, out = _imgclf("rollback", "--force")
    assert code == 0 and "champion -> imgclf v1 (was v2)" in out
    last = registry.alias_history(client, "imgclf")[-1]
    assert last["kind"] == "rollback" and last["reason"].startswith("rollback from v2 FORCED over: v1")


def test_rollback_does_not_overwrite_a_move_made_while_it_ran(registry_project, monkeypatch):
    """Compare-and-set, like promote: another process promotes v3 after rollback read the champion (v2)."""
    from tasks import registry

    client = registry_project.client
    for _ in range(3):
        registry_project("passed")
    registry.set_champion(client, "imgclf", "1", "first")
    registry.set_champion(client, "imgclf", "2", "better")
    read = registry.alias_history
    raced = []

    def history_then_a_concurrent_move(c, name):
        moves = read(c, name)
        if not raced:
            raced.append(1)
            registry.set_champion(c, name, "3", "another process")
        return moves

    monkeypatch.setattr(registry, "alias_history", history_then_a_concurrent_move)
    code, out = _imgclf("rollback")
    assert code == 1 and "not rolled back: champion moved to v3" in out
    assert _champion(client) == "3"


def test_promote_rollback_and_history_before_anything_is_registered(registry_project):
    code, out = _imgclf("rollback")
    assert code == 1 and "nothing to roll back to: there is no champion yet" in out
    code, out = _imgclf("promote", "1")
    assert code == 1 and "imgclf has no version 1 (nothing is registered yet" in out
    code, out = _imgclf("history")
    assert code == 0 and "champion history" in out


def test_promote_gives_advice_that_works_and_knows_the_champion(registry_project):
    """A version gated when there was no champion, champion now another: `imgclf run` would not gate it again
    ("already registered"), so the advice is to compare and --force. Promoting the champion is a no-op."""
    from tasks import registry

    client = registry_project.client
    registry_project("passed", ""), registry_project("passed", "1")
    registry.set_champion(client, "imgclf", "1", "gate passed (first champion: floors only)")
    registry.set_champion(client, "imgclf", "2", "gate passed against v1")
    code, out = _imgclf("promote", "1")
    assert code == 1 and "no champion (floors only) but champion is now v2" in out
    assert "re-run `imgclf run`" not in out and "--force" in out
    before = registry.alias_history(client, "imgclf")
    code, out = _imgclf("promote", "2")
    assert code == 0 and "imgclf v2 is already champion" in out
    assert _imgclf("promote", "2", "--force")[0] == 0
    assert registry.alias_history(client, "imgclf") == before and _champion(client) == "2"
