"""Rebuild a registered version from its lineage: its git commit, its params and dvc.lock (logged with the
run), its data from the DVC remote, then `dvc repro` of everything after ingest, and compare the metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

COMPARED = ("accuracy", "macro_f1")
LINEAGE = "lineage"


class ReproduceError(RuntimeError):
    """The version cannot be rebuilt; the message says what is missing."""


@dataclass(frozen=True)
class Row:
    metric: str
    registered: float
    reproduced: float
    ok: bool


def compare(registered: dict[str, float], reproduced: dict[str, float], *, tolerance: float) -> list[Row]:
    """Pure: each compared metric, equal within tolerance (0 = bit-exact)."""
    rows = []
    for name in COMPARED:
        a, b = registered.get(name), reproduced.get(name)
        ok = a is not None and b is not None and (a == b if tolerance == 0 else abs(a - b) <= tolerance)
        rows.append(Row(name, float("nan") if a is None else a, float("nan") if b is None else b, ok))
    return rows


def log_lineage(client: "MlflowClient", run_id: str, root: Path) -> None:
    """Keep what a rebuild needs with the run: the resolved params and the dvc.lock that produced it."""
    for path in (root / "models/candidate/params.yaml", root / "dvc.lock"):
        if path.exists():
            client.log_artifact(run_id, str(path), LINEAGE)


def params_tracking_is_local(params_file: Path) -> bool:
    """True when the params' tracking URI is a relative local store (it then lands inside the worktree)."""
    import yaml

    uri = (yaml.safe_load(params_file.read_text()).get("register") or {}).get("tracking_uri", "sqlite:///mlflow.db")
    return uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")


def has_remote(root: Path) -> bool:
    """True when a default DVC remote is configured."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return bool(repo.config.get("core", {}).get("remote"))


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise ReproduceError(f"`{' '.join(cmd)}` failed in {cwd}:\n{(res.stdout + res.stderr)[-3000:]}")


def trained_weights(pretrained: str | None, trained_sha256: str | None, *, tree: Path,
                    root: Path) -> tuple[Path | None, str | None]:
    """The local pretrained weights file a version was trained from, as a rebuild in `tree` can use it, or why
    not: (path, None), (None, reason), or (None, None) when there is nothing to check (no local weights, or a
    version trained before their sha256 was recorded). DVC sees only the path in params, never the file, so a
    rebuild would otherwise silently start from other weights. A relative path is the worktree's, or else the
    project's (weights are often not committed)."""
    from tasks.models import weights_file_sha256

    if not trained_sha256 or not pretrained:
        return None, None
    places = [Path(pretrained)] if Path(pretrained).is_absolute() else [tree / pretrained, root / pretrained]
    path = next((p for p in places if p.is_file()), None)
    if path is None:
        return None, f"its pretrained weights file {pretrained} is gone (it had sha256 {trained_sha256})"
    now = weights_file_sha256(str(path))
    if now != trained_sha256:
        return None, f"its pretrained weights file {path} changed: sha256 {now}, trained from {trained_sha256}"
    return path, None


def reproduce(root: Path, client: "MlflowClient", name: str, version: str, *, gpu_tolerance: float = 0.005,
              keep: bool = False) -> tuple[list[Row], Path, float]:
    """Rebuild version in a temporary git worktree; returns (comparison, worktree, tolerance used)."""
    import json

    import mlflow

    mv = client.get_model_version(name, version)
    commit = mv.tags.get("git.commit", "none")
    if commit == "none":
        raise ReproduceError(f"v{version} has no git commit in its lineage: it was not trained in a git checkout")
    run = client.get_run(mv.run_id)
    registered = {k: run.data.metrics.get(f"test/{k}") for k in COMPARED}
    tolerance = gpu_tolerance if run.data.tags.get("device", "cpu") != "cpu" else 0.0
    work = Path(tempfile.mkdtemp(prefix=f"imgclf-reproduce-v{version}-"))
    tree = work / "project"
    # DVC_ROOT from a surrounding DVC run would point the rebuild's store back at that project
    env = {**{k: v for k, v in os.environ.items() if k != "DVC_ROOT"},
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    _run(["git", "worktree", "add", "--detach", str(tree), commit], root, env)
    try:
        lineage = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=LINEAGE,
                                                           dst_path=str(work / "lineage")))
        for item in ("params.yaml", "dvc.lock"):
            if not (lineage / item).exists():
                raise ReproduceError(f"v{version}'s run has no {LINEAGE}/{item}: it cannot be rebuilt exactly")
            shutil.copyfile(lineage / item, tree / item)
        from tasks.config import read_raw

        pretrained = (read_raw(tree / "params.yaml").get("train") or {}).get("pretrained")  # (old params too)
        weights, problem = trained_weights(pretrained, run.data.tags.get("pretrained.sha256"), tree=tree, root=root)
        if problem:
            raise ReproduceError(f"v{version} cannot be rebuilt as it was trained: {problem}")
        if weights is not None and not Path(pretrained).is_absolute() and not (tree / pretrained).is_file():
            (tree / pretrained).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, tree / pretrained)  # the project's uncommitted weights, checked above
        if not params_tracking_is_local(tree / "params.yaml"):
            # The rebuild records into its own throwaway MLflow store, never the shared server's registry.
            from tasks.config import write_overrides

            write_overrides(tree / "params.yaml", {"register.tracking_uri": "sqlite:///mlflow.db"})
        if (root / ".dvc/config.local").exists():
            shutil.copyfile(root / ".dvc/config.local", tree / ".dvc/config.local")
        dvc = [sys.executable, "-m", "dvc"]
        if has_remote(tree):  # a fresh cache: the data must come from the remote, as it would elsewhere
            _run(dvc + ["cache", "dir", "--local", str(work / "cache")], tree, env)
            _run(dvc + ["pull", "ingest"], tree, env)
        else:  # no remote: the project's own cache
            _run(dvc + ["cache", "dir", "--local", str(root / ".dvc/cache")], tree, env)
            _run(dvc + ["checkout", "ingest"], tree, env)
        _run(dvc + ["repro", "--force", "--downstream", "validate"], tree, env)
        reproduced = json.loads((tree / "reports/metrics.json").read_text())
    finally:
        if not keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    return compare(registered, reproduced, tolerance=tolerance), tree, tolerance
