"""The retraining flow: run the DVC stages as Prefect tasks, then register and (maybe) promote.

Wiring only: every decision lives in tasks/ as a pure function."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

import tasks  # noqa: F401  (telemetry off)
from flows.early import (RunFailed, WhileStageRuns, _quiet_dvc, _stage_env, host_started_by_dvc, import_mlflow,
                         RESTORED, overridden, run_lock, run_stage, stage_command_exit, stage_outcome,
                         worth_retrying)
from tasks.config import ParamsError, load_params, project_root, source_overrides, write_resolved
from tasks.stagehost import serving, start_current

STAGES = ("ingest", "validate", "split", "train", "evaluate")
STAGE_TIMEOUT_S = {"ingest": 3600, "validate": 3600, "split": 600, "train": 24 * 3600, "evaluate": 3600}


def run_experiment(root: str, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one sweep candidate as the DVC experiment `name` (in DVC's temp copy of the repo).

    Its own process (tasks.experiment): candidates run side by side, as many as the task runner allows;
    MLflow still logs to the project's store (stages get DVC_ROOT = the project)."""
    import subprocess

    from tasks.sweep import set_args

    _stage_env()
    cmd = [sys.executable, "-m", "tasks.experiment", name, "--root", root, *set_args(overrides)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"experiment {name} failed:\n{proc.stdout[-2500:]}\n{proc.stderr[-2500:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "overrides": overrides}


def apply_experiment(root: str, name: str) -> None:
    """Make the chosen experiment the workspace's state (params, dvc.lock and outputs)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], cwd=root, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp apply {name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")


def run_sweep(root: Path, candidates: list[dict[str, Any]], logger) -> dict[str, Any]:
    """Each candidate as a mapped task (parallel as far as the task runner allows); the best is applied."""
    from prefect import unmapped

    from tasks.sweep import METRIC, choose_best, experiment_names

    _client(root)  # create the MLflow store and experiment once: concurrent first-time creation races
    names = experiment_names(time.strftime("%Y%m%d-%H%M%S"), len(candidates))
    exp_task = task(run_experiment, name="experiment", timeout_seconds=STAGE_TIMEOUT_S["train"],
                    task_run_name="experiment-{name}")
    futures = exp_task.map(unmapped(str(root)), names, candidates)
    results = [f.result() for f in futures]
    best = choose_best(results)
    for res in results:
        logger.info("sweep %s %s: %s=%s%s", res["name"], res["overrides"], METRIC, res[METRIC],
                    "  <- best" if res is best else "")
    task(apply_experiment, name="apply-best")(str(root), best["name"])
    return {"candidates": results, "best": best["name"], "metric": METRIC}


def _client(root: Path):
    import mlflow

    from tasks import tracking

    params = load_params(root / "params.yaml")
    tracking.configure(params.register_.tracking_uri, params.register_.experiment, root)
    return mlflow.MlflowClient(), params


def register_candidate(root: str) -> dict[str, Any]:
    """Register the evaluated candidate (idempotent per training run) with lineage tags."""
    from tasks import registry

    rootp = Path(root)
    client, params = _client(rootp)
    run_info = json.loads((rootp / "models/candidate/mlflow.json").read_text())
    metrics = json.loads((rootp / "reports/metrics.json").read_text())
    tags = registry.lineage_tags(rootp, metrics, params.digest())
    name = params.register_.model_name
    reg = registry.register(client, name, model_uri=run_info["model_uri"], run_id=run_info["run_id"], tags=tags)
    # registered by a run that ended before its gate decided (its lineage may be missing too): decide now
    pending = not reg.created and registry.gate_pending(client.get_model_version(name, reg.version).tags)
    if reg.created or pending:
        from tasks.reproduce import log_lineage

        log_lineage(client, reg.run_id, rootp)  # (the same training run's outputs: rewriting them is idempotent)
        registry.log_seen(client, reg.run_id, rootp)
    return {"version": reg.version, "registered": reg.created, "gate_pending": pending, "run_id": reg.run_id,
            "model_name": name}


def gate(root: str, version: str, run_id: str) -> dict[str, Any]:
    """Gather the facts, decide (pure), record the decision on the run, the version and in Prefect."""
    from prefect.artifacts import create_markdown_artifact

    from tasks import gate as gate_core
    from tasks import registry

    rootp = Path(root)
    client, params = _client(rootp)
    name = params.register_.model_name
    facts = registry.gate_input(rootp, client, name, candidate_version=version)
    decision = gate_core.decide(facts, params.promote.policy(params.base.seed))
    registry.record_decision(client, name, version, run_id, decision)
    create_markdown_artifact(decision.markdown(), key="gate-decision",
                             description=f"{name} v{version}: promotion gate")
    return decision.to_dict()


def promote(root: str, version: str, expected: str | None, reason: str) -> str | None:
    """Compare-and-set the `champion` alias; returns the conflict message when it moved meanwhile."""
    from tasks import registry

    rootp = Path(root)
    client, params = _client(rootp)
    try:
        registry.promote_if_unchanged(client, params.register_.model_name, version, expected=expected,
                                      reason=reason, lock_path=rootp / registry.LOCK_FILE)
    except registry.PromotionConflict as exc:  # not transient: no retry, a clear message instead
        return str(exc)
    return None


def push(root: str) -> str | None:
    """Push data and outputs to the default DVC remote, if one is configured; returns its name."""
    from dvc.repo import Repo

    from tasks.reproduce import has_remote

    if not has_remote(Path(root)):
        return None
    _quiet_dvc()
    with Repo(root) as repo:
        repo.push()
        return str(repo.config["core"]["remote"])


def register_gate_promote(root: str, *, allow_promotion: bool) -> dict[str, Any]:
    """Register, gate and (if allowed and passing) promote; returns what happened."""
    from tasks import registry

    params = load_params(Path(root) / "params.yaml")
    out = task(register_candidate, name="register", retries=2, retry_delay_seconds=5, timeout_seconds=600)(root)
    client, _ = _client(Path(root))
    current = registry.champion_version(client, out["model_name"])
    out["champion"] = str(current.version) if current else None
    if not out["registered"]:
        if not out["gate_pending"]:
            out.update(promoted=False, gate=None, reason="already registered by an earlier run: nothing new to decide")
            return out
        out["resumed"] = True
        get_run_logger().warning("%s v%s was registered by an earlier run that ended before its gate decided: "
                                 "deciding now", out["model_name"], out["version"])
    remote = task(push, name="push", retries=3, retry_delay_seconds=10, timeout_seconds=3600)(root)
    out["dvc_remote"] = remote
    if remote:
        client.set_model_version_tag(out["model_name"], out["version"], "dvc.remote", remote)
    decision = task(gate, name="gate", retries=1, retry_delay_seconds=5, timeout_seconds=1800)(
        root, out["version"], out["run_id"])
    out["gate"] = decision
    if not decision["passed"]:
        out.update(promoted=False, reason="gate FAILED: " + "; ".join(decision["reasons"]))
        return out
    if not allow_promotion or params.promote.require_approval:
        why = "promotion disabled for this run" if not allow_promotion else "promote.require_approval is true"
        out.update(promoted=False, reason=f"gate passed; stays `challenger` ({why}): imgclf promote {out['version']}")
        return out
    against = decision["compared_with"]
    reason = "gate passed" + (f" against v{against}" if against else " (first champion: floors only)")
    conflict = task(promote, name="promote", retries=2, retry_delay_seconds=5, timeout_seconds=300)(
        root, out["version"], against, reason)
    if conflict:
        out.update(promoted=False, reason=conflict, conflict=True)
        return out
    out.update(promoted=True, champion=out["version"], reason=reason)
    from tasks.summary import notify

    notify("promoted", {"model": out["model_name"], "version": out["version"], "previous": against,
                        "reason": reason}, url=params.schedule.webhook_url)
    return out


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


class StageFailed(RuntimeError):
    """A stage's command failed; it printed its own message (its traceback, if any, is DVC's, not news)."""


def stage_failure(exc: BaseException) -> BaseException:
    """Pure: what the flow raises when a stage task failed: a one-line StageFailed when the stage's command
    exited with an error (DVC's frames around it say nothing the stage did not print), else exc itself."""
    failed = stage_command_exit(exc)
    if failed is None:
        return exc
    return StageFailed(f"{failed[0]} failed")


def run_overrides(source: str | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Pure: the params overrides of one run: its `source` (and what DVC watches for it), then `overrides`."""
    return {**(source_overrides(source) if source else {}), **(overrides or {})}


def _notify_failure(flow, flow_run, state) -> None:
    """Flow hook: tell someone a run failed (webhook from params, else the log)."""
    from tasks.summary import notify

    try:
        root = project_root(Path(flow_run.parameters.get("project_dir") or "."))
        # with the run's overrides: params.yaml has been put back by now, and the webhook may be one of them;
        # unless an override is what failed the run: then params.yaml's own webhook
        overrides = run_overrides(flow_run.parameters.get("source"), flow_run.parameters.get("overrides"))
        try:
            url = load_params(root / "params.yaml", overrides).schedule.webhook_url
        except ParamsError:
            url = load_params(root / "params.yaml").schedule.webhook_url
    except Exception:
        url = None
    notify("failed", {"flow_run": flow_run.name, "state": state.name, "message": str(state.message)[:2000]},
           url=url)


def _publish(root: Path, summary: dict[str, Any]) -> None:
    """Prefect artifacts with stable keys, so each run's report accumulates in the UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks import tracking
    from tasks.summary import per_class_rows, run_markdown

    params = load_params(root / "params.yaml")
    validation_file = root / "reports/validation/summary.json"
    validation = json.loads(validation_file.read_text()) if validation_file.exists() else None
    run_file = root / "models/candidate/mlflow.json"
    experiment = json.loads(run_file.read_text()).get("experiment_id") if run_file.exists() else None
    uri = tracking.resolve_tracking_uri(params.register_.tracking_uri, root)
    create_markdown_artifact(run_markdown(summary, validation=validation, tracking_uri=uri, experiment_id=experiment),
                             key="retrain-summary", description="imgclf run summary")
    rows = per_class_rows(json.loads((root / "reports/metrics.json").read_text()))
    if rows:
        create_table_artifact(rows, key="per-class-metrics", description="test split, per class")


def settled(line: str) -> Any:
    """A stage's task when its command failed before the flow started in a way a second run cannot change: it
    ends Failed with that line (a state, not an exception: nothing new to show a traceback of)."""
    from prefect.states import Failed

    return Failed(message=line)


def checked_early(stage: str, did: list[str]) -> list[str]:
    """A stage's task when DVC already handled it before the flow started (flows/early.py): its outcome."""
    return did


def temporary_api() -> bool:
    """True when a flow started here would start Prefect's temporary API server (no PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


@flow(name="retrain", log_prints=True, on_failure=[_notify_failure], on_crashed=[_notify_failure])
def retrain(overrides: dict[str, Any] | None = None, source: str | None = None, allow_promotion: bool = True,
            project_dir: str | None = None, sweep: list[dict[str, Any]] | None = None,
            ran_early: dict[str, list[str]] | None = None, started_at: float | None = None,
            failed_early: dict[str, str] | None = None) -> dict[str, Any]:
    """Ingest -> validate -> split -> train -> evaluate (through DVC), then register and promote.

    With `sweep` (a list of override dicts), train+evaluate run once per candidate as DVC experiments
    and the best by validation accuracy is applied to the workspace before registering. `ran_early`
    ({stage: stages DVC ran}) is what flows/early.run_retrain had DVC run (or find up to date) for this run
    before the flow started; those stages are still tasks here, reporting that outcome without asking DVC again
    (the stages after them check their own dependencies, so the run stays consistent with dvc.lock)."""
    logger = get_run_logger()
    root = project_root(Path(project_dir) if project_dir else None)
    overrides = run_overrides(source, overrides)
    started = started_at or time.time()  # (imgclf run: when it began, before its early stages and Prefect's start)
    wait_s = load_params(root / "params.yaml").schedule.wait_for_lock_s
    with run_lock(root, wait_s), overridden(root / "params.yaml", overrides) as params_state, \
            serving(root, start=False) as host, host_started_by_dvc(host):
        params = load_params(root / "params.yaml")
        ran: list[str] = []  # stage names DVC ran or restored from its run-cache (restored: those of the latter)
        restored: list[str] = []
        swept = None
        if sweep:
            from tasks.sweep import validate_sweep
            from tasks.config import read_raw

            sweep = validate_sweep(sweep, read_raw(root / "params.yaml"))
        # register, gate and promote need MLflow (~2 s of imports): import it while train's command runs (not
        # opening the store: train may be creating it)
        warm = None if sweep else WhileStageRuns("train", import_mlflow)
        early = ran_early or {}
        try:
            for stage in (STAGES[:3] if sweep else STAGES):
                if stage in (failed_early or {}):  # its command failed early, and would again: no second run
                    task(settled, name=stage)(failed_early[stage], return_state=True)
                    raise StageFailed(failed_early[stage])
                if stage in early:  # DVC already ran (or found up to date) this stage for this run
                    did = task(checked_early, name=stage)(stage, early[stage])
                else:
                    stage_task = task(run_stage, name=stage, timeout_seconds=STAGE_TIMEOUT_S[stage],
                                      retries=2 if stage == "ingest" else 0, retry_delay_seconds=10,
                                      retry_condition_fn=worth_retrying)
                    try:
                        did = stage_task(str(root), stage)
                    except Exception as exc:
                        failure = stage_failure(exc)
                        if failure is exc:
                            raise
                        raise failure from None  # (its context, DVC's error, is kept for failure_hint)
                logger.info("%s: %s", stage, stage_outcome(did)
                            + (" (through DVC while Prefect started)" if stage in early else ""))
                ran += [d.removesuffix(RESTORED) for d in did]
                restored += [d.removesuffix(RESTORED) for d in did if d.endswith(RESTORED)]
        finally:
            if warm:
                warm.cancel()  # train's command never started: nothing to import ahead
        if sweep:
            start_current()  # the experiments' stages run in other processes' DVC: start the host for them now
            swept = run_sweep(root, sweep, logger)
            params_state["keep"] = True  # the winner, as applied, is the workspace's state now
            params = load_params(root / "params.yaml")
            ran += ["train", "evaluate"]
        result = register_gate_promote(str(root), allow_promotion=allow_promotion)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    ingest = json.loads((root / "data/ingest.json").read_text())
    validation = _read(root / "reports/validation/summary.json")
    split_summary = _read(root / "data/splits/summary.json")
    summary = {
        "stages_run": ran, "stages_restored": restored, "up_to_date": not ran, "data_hash": ingest["content_hash"],
        "data_source": ingest["source"], "n_images": ingest["n_files"],
        "accepted": validation.get("accepted"), "quarantined": validation.get("quarantined"),
        "data_docs": validation.get("data_docs"), "split_warnings": split_summary.get("warnings", []),
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "overrides": overrides,
        "seconds": round(time.time() - started, 1), **result,
    }
    if swept:
        summary["sweep"] = swept
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_resolved(params, root / "runs" / stamp / "params.yaml")
    (root / "runs" / stamp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _publish(root, summary)
    if not ran:
        logger.info("up to date: no new data, code or params; nothing trained, nothing registered")
    if (summary.get("gate") and not summary["gate"]["passed"]) or summary.get("conflict"):
        raise RunFailed(summary["reason"], summary)
    return summary


if __name__ == "__main__":
    print(json.dumps(retrain(), indent=2, default=str))
