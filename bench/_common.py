"""Shared bench helpers: a generated dataset, a temporary copy of the project, timed commands, results."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """Where a figure came from."""
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def write_result(name: str, result: dict) -> None:
    """Print one JSON line and write bench/results/<name>.json."""
    result = {"bench": name, **result, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def make_dataset(dest: Path, *, n_images: int, classes: int = 10, size: int = 32, seed: int = 0) -> Path:
    """n_images grayscale PNGs in class folders, each class a distinct pattern plus noise (learnable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_images):
        k = i % classes
        folder = dest / f"class_{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        angle = np.pi * k / classes
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (0.3 + 0.05 * k) + rng.uniform(0, 6.28))
        arr = np.clip(127 + 90 * wave + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").save(folder / f"img_{i:05d}.png")
    return dest


def env(tmp: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    # The `imgclf` console script must run the copy's code, not whichever checkout the venv was installed from.
    e.update(PYTHONPATH=str(tmp / "project"), PREFECT_HOME=str(tmp / "prefect-home"),
             DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
             PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
             PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""),
             GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
    return e


def project_copy(tmp: Path, overrides: dict) -> Path:
    """The project's tracked files in a fresh git repo under tmp, with params overridden."""
    dest = tmp / "project"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    sys.path.insert(0, str(dest))
    from tasks.config import write_overrides

    write_overrides(dest / "params.yaml", overrides)
    e = env(tmp)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, env=e)
    return dest


def timed(cmd: list[str], cwd: Path, e: dict[str, str]) -> float:
    """Wall seconds of a command that must succeed."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{(res.stdout + res.stderr)[-4000:]}")
    return seconds


def tempdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"imgclf-bench-{name}-"))


def dataset_project(name: str, *, n_images: int, epochs: int) -> tuple[Path, Path, Path, dict[str, str]]:
    """(tmp, dataset, project, env): a generated dataset and a project copy that trains on it for `epochs`
    (gate floors off, so a short run still completes)."""
    tmp = tempdir(name)
    data = make_dataset(tmp / "images", n_images=n_images)
    project = project_copy(tmp, {"ingest.source": str(data), "ingest.watch": str(data), "train.epochs": epochs,
                                 "promote.min_accuracy": 0.0, "promote.min_macro_f1": 0.0})
    return tmp, data, project, env(tmp)


def trained_project(name: str, *, n_images: int, epochs: int) -> tuple[Path, Path, Path, dict[str, str], float]:
    """dataset_project(...) plus the seconds of one real `imgclf run` on it."""
    tmp, data, project, e = dataset_project(name, n_images=n_images, epochs=epochs)
    first = timed([str(BIN / "imgclf"), "run"], project, e)
    return tmp, data, project, e, first
