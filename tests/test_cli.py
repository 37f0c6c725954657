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
