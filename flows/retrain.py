"""The retraining flow: run the DVC stages as Prefect tasks, then register and (maybe) promote.

Wiring only: every decision lives in tasks/ as a pure function."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task

import tasks  # noqa: F401  (telemetry off)
from tasks.config import load_params, project_root, restore_file, write_overrides, write_resolved

STAGES = ("ingest", "validate", "split", "train", "evaluate")
STAGE_TIMEOUT_S = {"ingest": 3600, "validate": 3600, "split": 600, "train": 24 * 3600, "evaluate": 3600}


def _stage_env() -> None:
    """Stage commands say `python`: make it this interpreter, even when the venv is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _quiet_dvc() -> None:
    """DVC prints its own progress; keep it from echoing through Prefect's handlers and drop git hints."""
    import logging

    logging.getLogger("dvc").propagate = False
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)


def run_stage(root: str, stage: str) -> list[str]:
    """Reproduce one DVC stage if it is stale; returns the stages that actually ran."""
    from dvc.repo import Repo

    _stage_env()
    _quiet_dvc()
    with Repo(root) as repo:
        ran = repo.reproduce(stage, single_item=True)
    return [s.addressing for s in ran]


def register_and_promote(root: str, *, allow_promotion: bool) -> dict[str, Any]:
    """Register the evaluated candidate (idempotent) and move `champion` if the decision says so."""
    import mlflow

    from tasks import registry, tracking

    rootp = Path(root)
    params = load_params(rootp / "params.yaml")
    reg = params.register_
    tracking.configure(reg.tracking_uri, reg.experiment, rootp)
    client = mlflow.MlflowClient()
    run_info = json.loads((rootp / "models/candidate/mlflow.json").read_text())
    metrics = json.loads((rootp / "reports/metrics.json").read_text())
    tags = registry.lineage_tags(rootp, metrics, params.digest())
    registration = registry.register(client, reg.model_name, model_uri=run_info["model_uri"],
                                     run_id=run_info["run_id"], tags=tags)
    out: dict[str, Any] = {"version": registration.version, "registered": registration.created,
                           "run_id": registration.run_id, "model_name": reg.model_name}
    champ_version, champ_value = registry.champion_metric(client, reg.model_name, params.promote.metric)
    out["previous_champion"] = champ_version
    if not registration.created:
        out.update(promoted=False, reason="already registered by an earlier run: nothing new to decide",
                   champion=champ_version)
        return out
    decision = registry.decide_promotion(float(metrics[params.promote.metric]), champ_value,
                                         metric=params.promote.metric)
    promote = decision.promote and allow_promotion
    reason = decision.reason if allow_promotion or not decision.promote else decision.reason + " (promotion disabled)"
    client.set_model_version_tag(reg.model_name, registration.version, "gate", "passed" if decision.promote else "failed")
    client.set_model_version_tag(reg.model_name, registration.version, "gate.reason", reason)
    if promote:
        registry.set_champion(client, reg.model_name, registration.version, reason)
    out.update(promoted=promote, reason=reason, champion=registration.version if promote else champ_version)
    return out


@contextmanager
def overridden(params_file: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """params.yaml carries the overrides for this run only; the original is put back afterwards."""
    if not overrides:
        yield
        return
    original = write_overrides(params_file, overrides)
    try:
        yield
    finally:
        restore_file(params_file, original)


@flow(name="retrain", log_prints=True)
def retrain(overrides: dict[str, Any] | None = None, source: str | None = None, allow_promotion: bool = True,
            project_dir: str | None = None) -> dict[str, Any]:
    """Ingest -> validate -> split -> train -> evaluate (through DVC), then register and promote."""
    logger = get_run_logger()
    root = project_root(Path(project_dir) if project_dir else None)
    overrides = dict(overrides or {})
    if source:
        overrides["ingest.source"] = source
    started = time.time()
    with overridden(root / "params.yaml", overrides):
        params = load_params(root / "params.yaml")
        ran: list[str] = []
        for stage in STAGES:
            stage_task = task(run_stage, name=stage, timeout_seconds=STAGE_TIMEOUT_S[stage],
                              retries=2 if stage == "ingest" else 0, retry_delay_seconds=10)
            did = stage_task(str(root), stage)
            logger.info("%s: %s", stage, "ran" if did else "up to date")
            ran += did
        registry_task = task(register_and_promote, name="register", retries=2, retry_delay_seconds=5,
                             timeout_seconds=600)
        result = registry_task(str(root), allow_promotion=allow_promotion)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    ingest = json.loads((root / "data/ingest.json").read_text())
    summary = {
        "stages_run": ran, "up_to_date": not ran, "data_hash": ingest["content_hash"],
        "data_source": ingest["source"], "n_images": ingest["n_files"],
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "overrides": overrides,
        "seconds": round(time.time() - started, 1), **result,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_resolved(params, root / "runs" / stamp / "params.yaml")
    (root / "runs" / stamp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    print(json.dumps(retrain(), indent=2, default=str))
