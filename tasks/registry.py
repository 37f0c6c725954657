"""Registry side effects: register the candidate (idempotently), gather the gate's inputs, record the
decision, and move aliases with compare-and-set and an audit trail. Decisions live in tasks/gate.py."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.gate import ChampionScore, Decision, GateInput, per_class_recall

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion.history"
LOCK_FILE = Path(".imgclf/registry.lock")


class PromotionConflict(RuntimeError):
    """`champion` moved after the gate compared against it (or a rollback chose its target); nothing was moved."""

    def __init__(self, message: str, *, now: str | None = None, expected: str | None = None) -> None:
        super().__init__(message)
        self.now, self.expected = now, expected


@dataclass(frozen=True)
class Registration:
    version: str
    created: bool
    run_id: str


# ---------------------------------------------------------------- lineage and registration

def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the project, or 'none' outside git."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "none"
    dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    return {"git.commit": commit, "git.dirty": dirty}


def _file_hash(path: Path) -> str:
    from tasks.io import sha256_file

    return sha256_file(path) if path.is_file() else "missing"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def lineage_tags(root: Path, metrics: dict[str, Any], params_digest: str) -> dict[str, str]:
    """Tags that say where a version came from."""
    ingest = _read_json(root / "data/ingest.json") or {}
    validation = _read_json(root / "reports/validation/summary.json") or {}
    tags = {
        **git_state(root),
        "data.hash": str(ingest.get("content_hash", "missing")),
        "data.source": str(ingest.get("source", "missing")),
        "data.time": str(ingest.get("ingested_at", "")),
        "validation": "passed" if validation.get("success") else "failed",
        "test.hash": str(metrics.get("test_hash", "")),
        "params.hash": params_digest,
        "dvc.lock.hash": _file_hash(root / "dvc.lock"),
        "requirements.lock.hash": _file_hash(root / "requirements.lock"),
    }
    for key in ("accuracy", "macro_f1", "ece", "latency_ms_b1"):
        if isinstance(metrics.get(key), (int, float)):
            tags[f"test.{key}"] = f"{float(metrics[key]):.6f}"
    return tags


def find_version_for_run(client: "MlflowClient", name: str, run_id: str) -> str | None:
    """The registered version created from run_id, if any (what makes registration idempotent)."""
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def register(client: "MlflowClient", name: str, *, model_uri: str, run_id: str, tags: dict[str, str]) -> Registration:
    """Register the candidate once per training run and point `challenger` at it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    existing = find_version_for_run(client, name, run_id)
    if existing is not None:
        return Registration(existing, False, run_id)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already exists
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    # A retried task may have registered concurrently: the lowest version for this run wins.
    winner = find_version_for_run(client, name, run_id) or version
    client.set_registered_model_alias(name, CHALLENGER, winner)
    return Registration(winner, winner == version, run_id)


# ---------------------------------------------------------------- aliases

def alias_version(client: "MlflowClient", name: str, alias: str = CHAMPION):
    """The ModelVersion under alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_version(client: "MlflowClient", name: str):
    """The ModelVersion under alias `champion`, or None."""
    return alias_version(client, name, CHAMPION)


def alias_history(client: "MlflowClient", name: str) -> list[dict[str, str]]:
    """Every move of `champion`, oldest first (kept as JSON on the registered model); [] before the model exists."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # nothing registered yet: no moves either
            return []
        raise
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def set_champion(client: "MlflowClient", name: str, version: str, reason: str, *, kind: str = "promote") -> None:
    """Point `champion` at version, note why on the version and append the move (a promote or a rollback) to the
    history."""
    import getpass

    current = champion_version(client, name)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.reason", reason)
    history = alias_history(client, name)
    history.append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "from": str(current.version) if current else "", "to": str(version),
                    "reason": reason, "by": getpass.getuser(), "kind": kind})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def promote_if_unchanged(client: "MlflowClient", name: str, version: str, *, expected: str | None, reason: str,
                         lock_path: Path, kind: str = "promote") -> None:
    """Compare-and-set: move `champion` to version only if it still points at `expected` (kind: "promote" or
    "rollback", as recorded in the history)."""
    from filelock import FileLock

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=120):
        current = champion_version(client, name)
        now = str(current.version) if current else None
        if now != expected:
            was = "v" + expected if expected else "no champion"
            if kind == "promote":  # (a gate is not re-run for a registered version: promote says what to do)
                message = (f"champion is v{now} but the gate compared v{version} against {was}: not promoted "
                           f"(champion moved meanwhile; `imgclf history` shows the move, `imgclf promote {version}` "
                           f"re-checks v{version} against v{now})")
            else:
                message = f"champion is v{now}, not {was} as when the {kind} to v{version} was chosen: nothing moved"
            raise PromotionConflict(message, now=now, expected=expected)
        set_champion(client, name, version, reason, kind=kind)


def gate_pending(version_tags: dict[str, str]) -> bool:
    """Pure: a registered version that has no gate decision on it: the run that registered it ended before its
    gate decided (a crash, a kill, a timeout). The next run for the same training run decides instead of
    calling it "already registered"."""
    return "gate" not in version_tags


def is_rollback(move: dict[str, str]) -> bool:
    """Pure: whether a history entry is a rollback (else a promotion)."""
    if "kind" not in move:  # written before moves had a kind: only the reason says so ("rollback from vN")
        return str(move.get("reason", "")).startswith("rollback")
    return move["kind"] == "rollback"


def rollback_target(history: list[dict[str, str]], current: str | None) -> str | None:
    """Pure: where `imgclf rollback` takes `champion` from current: the history read as an undo stack.

    Each move stacks the version it set; a rollback unstacks the move it undid, so a rollback's own move is
    never a target and a second rollback goes to the champion before the one the first restored. None when
    nothing is below current, or when the history does not end at current (the alias was moved outside it)."""
    stack: list[str] = []
    for move in history:
        frm, to = str(move.get("from") or ""), str(move.get("to") or "")
        if not to or to == frm:
            continue
        if is_rollback(move) and len(stack) >= 2 and stack[-1] == frm and stack[-2] == to:
            stack.pop()
            continue
        # a promotion (or a rollback the stack cannot explain, e.g. written by an older imgclf: undoable too)
        if not frm:
            stack = []  # there was no champion before it: nothing below to return to
        elif not stack or stack[-1] != frm:
            stack.append(frm)  # the alias was moved outside the history; the move still says where it was
        stack.append(to)
    return stack[-2] if len(stack) >= 2 and stack[-1] == current else None


# ---------------------------------------------------------------- gate inputs and record

def duplicate_groups(manifest: "pd.DataFrame", grouped: "pd.DataFrame") -> list[str | None]:
    """Pure: each manifest row's duplicate group: its near-duplicate group from the split stage's groups.csv
    (`grouped`: path, group), else its own sha256; None for a row with no sha256 (a file never read: not
    ingested, say, and so in no split)."""
    group_of = dict(zip(grouped["path"], "g" + grouped["group"].astype(str)))
    return [group_of.get(p) or (f"s{h}" if isinstance(h, str) and h else None)
            for p, h in zip(manifest["path"], manifest["sha256"])]


def cross_split_duplicates(manifest: "pd.DataFrame", splits: dict[str, "pd.DataFrame"]) -> int:
    """Pure: how many duplicate groups (same sha256, or same `group` when the manifest has one) sit in
    more than one split. Rows without a key (None, NaN or empty: a file never read) belong to no group; any
    other key counts, whatever its type."""
    key = "group" if "group" in manifest.columns else "sha256"
    where: dict[str, set[str]] = {}
    lookup = {p: str(k) for p, k in zip(manifest["path"], manifest[key]) if k is not None and k == k and k != ""}
    for split_name, frame in splits.items():
        for path in frame["path"]:
            if path in lookup:
                where.setdefault(lookup[path], set()).add(split_name)
    return sum(1 for names in where.values() if len(names) > 1)


def rescore(model_uri: str, paths: list[Path], *, batch_size: int = 256) -> list[str]:
    """Predicted labels of a registered model for image files (through its pyfunc, as served)."""
    import pandas as pd

    from tasks.tracking import load_pyfunc

    model = load_pyfunc(model_uri, allow_paths=True)
    labels: list[str] = []
    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start:start + batch_size]]
        out = model.predict(pd.DataFrame({"image": chunk}))
        # The test images passed the data contract: one the model cannot read means something is wrong.
        errors = out["error"] if "error" in out else [None] * len(chunk)  # (older versions raise instead)
        bad = [(p, e) for p, e in zip(chunk, errors) if pd.notna(e)]
        if bad:
            raise RuntimeError(f"{model_uri} could not read {len(bad)} test image(s); {bad[0][0]}: {bad[0][1]}")
        labels += [str(v) for v in out["label"]]
    return labels


SEEN = "lineage/seen_sha256.txt"  # on a registered version's run: the images it trained (or chose its epoch) on


def seen_images(manifest: "pd.DataFrame", splits: dict[str, "pd.DataFrame"]) -> list[str]:
    """Pure: the sha256 of every image a model trained on these splits saw: train, and val (it chose the best
    epoch), sorted and unique."""
    sha_of = dict(zip(manifest["path"], manifest["sha256"]))
    return sorted({h for name in ("train", "val") for p in splits[name]["path"]
                   if isinstance(h := sha_of.get(p), str) and h})


def unseen(test_sha256: list[str | None], seen: set[str]) -> list[int]:
    """Pure: indices of the test images whose bytes are not among `seen` (an image with no sha256 counts as
    unseen): what a champion trained on `seen` is compared with a candidate on, when the split moved under it."""
    return [i for i, h in enumerate(test_sha256) if not (isinstance(h, str) and h in seen)]


def log_seen(client: "MlflowClient", run_id: str, root: Path) -> None:
    """Record on a registered run which images it saw (SEEN), for later gates to compare it fairly."""
    import pandas as pd

    manifest = pd.read_csv(root / "data/manifest.csv", dtype={"path": str, "sha256": str})
    splits = {s: pd.read_csv(root / f"data/splits/{s}.csv", dtype={"path": str}) for s in ("train", "val")}
    client.log_text(run_id, "".join(h + "\n" for h in seen_images(manifest, splits)), SEEN)


def _seen_by(run_id: str) -> set[str] | None:
    """What a registered run recorded as seen; None when it recorded nothing (registered before SEEN existed)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{SEEN}")
    except (MlflowException, OSError):
        return None
    return set(text.split())


def gate_input(root: Path, client: "MlflowClient", name: str, *, candidate_version: str) -> GateInput:
    """Everything the gate needs, read from the project's outputs and the registry.

    The champion is re-scored on the candidate's test images that it never saw: after a data change some
    images it trained on may be test images now (boundary groups of the stable split move; a champion of
    other splits), which would flatter it."""
    import pandas as pd

    from tasks.io import sha256_file

    metrics = _read_json(root / "reports/metrics.json")
    validation = _read_json(root / "reports/validation/summary.json")
    ingest = _read_json(root / "data/ingest.json") or {}
    test_csv = root / "data/splits/test.csv"
    splits = {s: pd.read_csv(root / f"data/splits/{s}.csv", dtype={"label": str}) for s in ("train", "val", "test")}
    manifest = pd.read_csv(root / "data/manifest.csv", dtype={"label": str, "sha256": str})
    groups_csv = root / "data/splits/groups.csv"
    if groups_csv.exists():  # near-duplicate groups from the split stage; other images are their own group
        manifest["group"] = duplicate_groups(manifest, pd.read_csv(groups_csv, dtype=str))
    predictions = pd.read_csv(root / "reports/predictions.csv", dtype={"label": str, "prediction": str})
    candidate_correct = (predictions["label"] == predictions["prediction"]).tolist()

    champion = None
    current = champion_version(client, name)
    if current is not None and str(current.version) != candidate_version:
        seen = _seen_by(current.run_id)
        sha_of = dict(zip(manifest["path"], manifest["sha256"]))
        paths, labels = predictions["path"].tolist(), predictions["label"].tolist()
        idx = unseen([sha_of.get(p) for p in paths], seen) if seen is not None else list(range(len(paths)))
        labels_on = [labels[i] for i in idx]
        predicted = predictions["prediction"].tolist()
        candidate_on = [predicted[i] for i in idx]
        try:
            champ_pred = rescore(f"models:/{name}/{current.version}", [root / "data/raw" / paths[i] for i in idx])
            correct = [a == b for a, b in zip(labels_on, champ_pred)]
            recall = per_class_recall(labels_on, champ_pred)
        except Exception as exc:  # the gate must refuse, not crash, when the champion cannot be re-scored
            correct, recall = [], {}
            client.set_model_version_tag(name, candidate_version, "gate.champion_error", str(exc)[:500])
        champion = ChampionScore(
            version=str(current.version), correct=correct, per_class_recall=recall,
            data_time=current.tags.get("data.time") or None, compared=idx,
            candidate_per_class_recall=per_class_recall(labels_on, candidate_on),
            excluded=len(paths) - len(idx), seen_known=seen is not None)
    return GateInput(
        metrics=metrics, candidate_correct=candidate_correct, test_hash_now=sha256_file(test_csv),
        validation_passed=None if validation is None else bool(validation.get("success")),
        leakage=cross_split_duplicates(manifest, splits), data_time=ingest.get("ingested_at") or None,
        champion=champion,
    )


def record_decision(client: "MlflowClient", name: str, version: str, run_id: str, decision: Decision) -> None:
    """The decision as JSON + markdown on the training run, and summarised as tags on the version."""
    client.log_dict(run_id, decision.to_dict(), "gate/decision.json")
    client.log_text(run_id, decision.markdown(), "gate/decision.md")
    client.set_model_version_tag(name, version, "gate", "passed" if decision.passed else "failed")
    client.set_model_version_tag(name, version, "gate.reasons", "; ".join(decision.reasons)[:4900] or "all checks passed")
    client.set_model_version_tag(name, version, "gate.compared_with", decision.compared_with or "")
