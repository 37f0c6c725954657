"""A disposable copy of this project for end-to-end tests: files, params, git repo, environment, a dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def process_ends(pid: int, within_s: float = 15) -> bool:
    """Whether process pid ends (is gone, or a zombie its parent has not reaped yet) within within_s."""
    import time

    deadline = time.monotonic() + within_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":  # (after the name, which may hold spaces)
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def shapes_dataset(root: Path, *, per_class: int = 15, size: int = 24) -> Path:
    """3 visually distinct classes (circle, square, stripes) of grayscale PNGs: a tiny model learns them."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    c, s = size // 2, size // 4
    for label in ("circle", "square", "stripes"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 40, (size, size), dtype=np.uint8)
            if label == "circle":
                arr[(yy - c) ** 2 + (xx - c) ** 2 < (size * size) // 14 + i % 20] = 220
            elif label == "square":
                arr[s:size - s, s + i % 3:size - s] = 220
            else:
                arr[::4 + i % 2] = 220
            Image.fromarray(arr, mode="L").save(root / label / f"{label}_{i:03d}.png")
    return root


def project_env(tmp: Path) -> dict[str, str]:
    """Prefect/DVC state under tmp; the venv's bin NOT on PATH (stages must still use this interpreter)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DVC_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def copy_project(tmp: Path, overrides: dict, *, remote: Path | None = None,
                 files: dict[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """The project's committed + untracked (not ignored) files in tmp/project, a fresh git repo with params
    overridden (and `files`, relative path -> text, added); returns (root, env) where env runs the copy's code
    (PYTHONPATH) with Prefect/DVC state under tmp. With `remote`, a local folder is the default DVC remote."""
    dest = tmp / "project"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "models/", "reports/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    sys.path.insert(0, str(dest))
    try:
        from tasks.config import write_overrides

        write_overrides(dest / "params.yaml", overrides)
    finally:
        sys.path.remove(str(dest))
    for rel, text in (files or {}).items():
        (dest / rel).write_text(text)
    env = project_env(tmp)
    env["PYTHONPATH"] = str(dest)  # the CLI imports the copy's code, not the installed checkout's
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    if remote is not None:
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)],
                       cwd=dest, check=True, env=env, capture_output=True)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest, env


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 20) -> None:
    """Signal a process started with start_new_session=True and everything it started; SIGKILL stragglers."""
    if proc.poll() is None or sig == signal.SIGKILL:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=wait)


def mlflow_query(root: Path, code: str) -> object:
    """Run `code` in a fresh interpreter against the copy's MLflow store (with `json`, `mlflow` and a client `c`
    in scope); it prints one JSON value, returned decoded."""
    prelude = "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); c = mlflow.MlflowClient();"
    out = subprocess.run([sys.executable, "-c", prelude + code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
