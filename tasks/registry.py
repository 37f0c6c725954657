"""Registry side of a run: register the candidate (idempotently), decide, move the `champion` alias."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION = "champion"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide_promotion(candidate: float, champion: float | None, *, metric: str = "accuracy") -> Decision:
    """Pure: promote when there is no champion, or the candidate is not lower on the metric."""
    if candidate != candidate:  # NaN
        return Decision(False, f"candidate {metric} is NaN")
    if champion is None:
        return Decision(True, f"no champion yet; candidate {metric} {candidate:.4f}")
    if candidate >= champion:
        return Decision(True, f"candidate {metric} {candidate:.4f} >= champion's {champion:.4f}")
    return Decision(False, f"candidate {metric} {candidate:.4f} < champion's {champion:.4f}")


@dataclass(frozen=True)
class Registration:
    version: str
    created: bool
    run_id: str


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the project, or 'none' outside git."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "none"
    dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    return {"git.commit": commit, "git.dirty": dirty}


def lineage_tags(root: Path, metrics: dict[str, Any], params_digest: str) -> dict[str, str]:
    """Tags that say where a version came from."""
    import hashlib

    def file_hash(rel: str) -> str:
        path = root / rel
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"

    ingest = json.loads((root / "data/ingest.json").read_text())
    tags = {
        **git_state(root),
        "data.hash": ingest["content_hash"],
        "data.source": ingest["source"],
        "test.hash": str(metrics.get("test_hash", "")),
        "params.hash": params_digest,
        "dvc.lock.hash": file_hash("dvc.lock"),
        "requirements.lock.hash": file_hash("requirements.lock"),
    }
    for key in ("accuracy", "macro_f1"):
        if key in metrics:
            tags[f"test.{key}"] = f"{float(metrics[key]):.6f}"
    return tags


def find_version_for_run(client: "MlflowClient", name: str, run_id: str) -> str | None:
    """The registered version created from run_id, if any (what makes registration idempotent)."""
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def register(client: "MlflowClient", name: str, *, model_uri: str, run_id: str, tags: dict[str, str]) -> Registration:
    """Register the candidate once per training run; a repeat returns the existing version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    existing = find_version_for_run(client, name, run_id)
    if existing is not None:
        return Registration(existing, False, run_id)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already exists
    version = mlflow.register_model(model_uri, name, tags=tags)
    return Registration(str(version.version), True, run_id)


def champion_version(client: "MlflowClient", name: str):
    """The ModelVersion under alias `champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_metric(client: "MlflowClient", name: str, metric: str) -> tuple[str | None, float | None]:
    """(version, metric value) of the current champion."""
    current = champion_version(client, name)
    if current is None:
        return None, None
    value = current.tags.get(f"test.{metric}")
    return str(current.version), float(value) if value is not None else float("nan")


HISTORY_TAG = "champion.history"


def alias_history(client: "MlflowClient", name: str) -> list[dict[str, str]]:
    """Every move of `champion`, oldest first (kept as JSON on the registered model)."""
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def set_champion(client: "MlflowClient", name: str, version: str, reason: str) -> None:
    """Point `champion` at version, note why on the version and append the move to the history."""
    import getpass
    from datetime import datetime, timezone

    current = champion_version(client, name)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.reason", reason)
    history = alias_history(client, name)
    history.append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "from": str(current.version) if current else "", "to": str(version),
                    "reason": reason, "by": getpass.getuser()})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def previous_champion(history: list[dict[str, str]], current: str | None) -> str | None:
    """Pure: the version `champion` pointed at before its latest move to current."""
    for move in reversed(history):
        if move["to"] == current:
            return move["from"] or None
    return None
