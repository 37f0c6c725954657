"""`imgclf run`: Prefect is imported and its temporary API server starts in the background while the first
stages run through DVC (flows/early.py). Fast tests with the stages, the server and the flow replaced; the
real thing runs in tests/test_flow.py (every `imgclf run` there takes this path)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import flows.early as early
import flows.retrain as rt
import flows.temporary_server as ts


class FakeServer:
    """Becomes ready after `after` readiness checks."""

    def __init__(self, after: int) -> None:
        self.after, self.checks, self.waited = after, 0, False

    @property
    def ready(self) -> bool:
        self.checks += 1
        return self.checks > self.after

    def wait(self) -> None:
        self.waited = True


class Opened:
    """A store process that has finished."""

    def __init__(self) -> None:
        self.waited = False

    def wait(self) -> int:
        self.waited = True
        return 0


REPO = Path(__file__).resolve().parent.parent


def held_elsewhere(root: Path) -> bool:
    """Whether another holder (this process's run_lock is re-entrant, so: a lock of its own) would be refused."""
    from filelock import FileLock, Timeout

    other = FileLock(str(root / ".imgclf" / "run.lock"))
    try:
        other.acquire(timeout=0)
    except Timeout:
        return True
    other.release()
    return False


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


def test_early_stages_run_under_the_lock_and_overrides_until_the_server_is_up(project, monkeypatch):
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(early, "open_mlflow_store", lambda root: Opened())

    def fake_stage(root: str, stage: str) -> list[str]:
        assert held_elsewhere(Path(root))  # the lock is held while a stage runs early
        seen.append((stage, (Path(root) / "params.yaml").read_text()))
        return [stage] if stage != "validate" else []

    monkeypatch.setattr(early, "run_stage", fake_stage)
    done = early.run_early_stages(project, FakeServer(after=2), {"train.epochs": 3})
    assert done == {"ingest": ["ingest"], "validate": []}  # the server was up before split
    assert [s for s, _ in seen] == ["ingest", "validate"] and all("\n  epochs: 3\n" in p for _, p in seen)
    assert (project / "params.yaml").read_text() == (REPO / "params.yaml").read_text()  # put back for the flow
    assert not held_elsewhere(project)  # and released


@pytest.mark.parametrize("runs", [True, False])
def test_the_mlflow_store_is_created_once_a_stage_runs_and_awaited(project, monkeypatch, runs):
    """Only a run that changes something needs the store; the early phase ends with it created."""
    import logging
    import time

    import dvc.repo  # noqa: F401  (DVC's logging set up, as in a run)

    order: list[str] = []

    class Slow(Opened):
        def wait(self) -> int:
            time.sleep(0.3)
            order.append("store ready")
            return super().wait()

    def fake_stage(root: str, stage: str) -> list[str]:
        if runs and stage == "validate":  # DVC starts validate's command; ingest was up to date
            logging.getLogger("dvc.stage.run").info("Running stage '%s':", stage)
        order.append(stage)
        return [stage] if runs and stage == "validate" else []

    monkeypatch.setattr(early, "open_mlflow_store", lambda root: order.append("store") or Slow())
    monkeypatch.setattr(early, "run_stage", fake_stage)
    early.run_early_stages(project, FakeServer(after=10), {})
    if runs:
        assert order.index("store") > order.index("ingest") and order[-1] == "store ready"
    else:
        assert order == list(early.EARLY_STAGES)


def test_a_failing_early_stage_is_left_to_the_flow(project, monkeypatch):
    def fake_stage(root: str, stage: str) -> list[str]:
        if stage == "validate":
            raise RuntimeError("contract failed")
        return [stage]

    monkeypatch.setattr(early, "run_stage", fake_stage)
    monkeypatch.setattr(early, "open_mlflow_store", lambda root: Opened())
    assert early.run_early_stages(project, FakeServer(after=10), {}) == {"ingest": ["ingest"]}


def test_ingest_is_retried_unless_its_command_says_trying_again_cannot_help():
    from types import SimpleNamespace

    from dvc.exceptions import ReproductionError
    from dvc.stage.exceptions import StageCmdFailedError

    from tasks.ingest import NOT_RETRYABLE_EXIT

    def failed(code: int | None) -> SimpleNamespace:
        try:
            try:
                raise StageCmdFailedError("python -m tasks.ingest", code)
            except StageCmdFailedError as inner:
                raise ReproductionError("ingest") from inner
        except ReproductionError as exc:
            return SimpleNamespace(data=exc)

    assert early.stage_command_exit(failed(NOT_RETRYABLE_EXIT).data) == ("ingest", NOT_RETRYABLE_EXIT)
    assert not early.worth_retrying(None, None, failed(NOT_RETRYABLE_EXIT))  # a missing or empty source
    assert early.worth_retrying(None, None, failed(1))  # a download that failed, say
    assert early.worth_retrying(None, None, SimpleNamespace(data=OSError("mount went away")))
    assert early.stage_command_exit(RuntimeError("other")) is None
    for stopped in (-2, -15, 130):  # Ctrl-C or kill reached the command: the user stopped it
        assert not early.worth_retrying(None, None, failed(stopped))


def _one_stage_project(tmp_path: Path, monkeypatch, stage: str, script: str) -> Path:
    """A real git + DVC project whose one stage `stage` runs `script` (reading param n) and writes out.txt;
    the working folder is its root, as in a run."""
    import subprocess
    import sys

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    root = tmp_path / "p"
    root.mkdir()
    (root / "params.yaml").write_text("n: 1\n")
    (root / f"{stage}.py").write_text(script)
    (root / "dvc.yaml").write_text(f"stages:\n  {stage}:\n    cmd: python {stage}.py\n    deps: [{stage}.py]\n"
                                   "    params: [n]\n    outs: [out.txt]\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    monkeypatch.chdir(root)
    return root


def test_a_stage_dvc_restores_from_its_run_cache_is_reported_as_restored_not_ran(tmp_path, monkeypatch):
    """A real DVC project: a stage runs, its param changes (runs again), then changes back (restored)."""
    root = _one_stage_project(tmp_path, monkeypatch, "make",
                              "import yaml\nopen('out.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['n']))\n")
    outcomes = []
    for n in (1, 2, 1):
        (root / "params.yaml").write_text(f"n: {n}\n")
        did = early.run_stage(str(root), "make")
        outcomes.append(early.stage_outcome(did))
        assert (root / "out.txt").read_text() == str(n)
    assert outcomes == ["ran", "ran", "restored from DVC's run-cache"]
    assert early.stage_outcome(early.run_stage(str(root), "make")) == "up to date"
    assert early.stage_outcome(["train", "evaluate" + early.RESTORED]) == "ran"  # one of them really ran
    (root / "sub").mkdir()
    monkeypatch.chdir(root / "sub")  # `imgclf run` started in a folder inside the project
    (root / "params.yaml").write_text("n: 2\n")
    assert early.run_stage(str(root), "make") == ["make" + early.RESTORED]


def test_a_run_never_restores_ingest_from_the_run_cache(tmp_path, monkeypatch):
    """Source A -> B -> A: the run ingests A again (a fresh ingested_at), instead of DVC bringing back the first
    ingest of A with its old time, which the gate would take for data older than the champion's."""
    root = _one_stage_project(tmp_path, monkeypatch, "ingest", "import time, yaml\n"
                              "n = yaml.safe_load(open('params.yaml'))['n']\n"
                              "open('out.txt', 'w').write(f'{n} {time.time_ns()}')\n")
    taken = []
    for n in (1, 2, 1):
        (root / "params.yaml").write_text(f"n: {n}\n")
        assert early.run_stage(str(root), "ingest") == ["ingest"]  # ran, every time
        taken.append((root / "out.txt").read_text())
    assert taken[2].split()[0] == "1" and taken[2] != taken[0]  # A again, taken anew


def test_nothing_runs_early_while_another_run_holds_the_lock(project, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(early, "run_stage", lambda root, stage: pytest.fail("ran a stage without the lock"))
    (project / ".imgclf").mkdir()
    with FileLock(str(project / ".imgclf" / "run.lock")):  # another run's
        assert early.run_early_stages(project, FakeServer(after=10), {}) == {}


class FakeFlow:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.runner = None

    def with_options(self, task_runner: Any) -> "FakeFlow":
        self.runner = task_runner
        return self

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append({**kwargs, "lock_held": held_elsewhere(Path(kwargs["project_dir"]))})
        return {"ok": True}


@pytest.mark.parametrize("api_url", [None, "http://127.0.0.1:4200/api"])
def test_run_retrain_starts_early_unless_a_server_is_configured(project, monkeypatch, api_url):
    import tasks.sweep

    flow, server = FakeFlow(), FakeServer(after=1)
    if api_url:
        monkeypatch.setenv("PREFECT_API_URL", api_url)
    else:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(rt, "retrain", flow)
    monkeypatch.setattr(early, "PrefectStart", lambda: server)
    monkeypatch.setattr(tasks.sweep, "resolve_task_runner", lambda name, n: f"{name} runner x{n}")
    monkeypatch.setattr(early, "run_stage", lambda root, stage: [stage])
    monkeypatch.setattr(early, "open_mlflow_store", lambda root: Opened())
    out = early.run_retrain(overrides={"train.epochs": 3}, project_dir=str(project), task_runner="thread",
                            max_parallel=2)
    assert out == {"ok": True} and flow.runner == "thread runner x2" and server.waited
    (call,) = flow.calls
    assert call["overrides"] == {"train.epochs": 3} and call["project_dir"] == str(project)
    assert call["started_at"] <= time.time()  # "took" counts the early phase and Prefect's start too
    if api_url:
        assert "ran_early" not in call and server.checks == 0
        assert not call["lock_held"]  # the flow takes it itself
    else:
        assert call["ran_early"] == {"ingest": ["ingest"]}
        assert call["lock_held"]  # from before the early stages until the flow is done: no run can slip in
    assert not held_elsewhere(project)


def test_a_run_after_one_that_started_the_server_still_runs_stages_early(project, monkeypatch, request):
    """The URL this process set for its own temporary server is not a configured server."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    request.addfinalizer(ts.stop)
    import tasks.sweep
    from test_temporary_server import HEALTH, spawner

    monkeypatch.setattr(ts.TemporaryServer, "_spawn", spawner(HEALTH))
    ts.ensure_started()
    flow = FakeFlow()
    monkeypatch.setattr(rt, "retrain", flow)
    monkeypatch.setattr(early, "PrefectStart", lambda: FakeServer(after=1))
    monkeypatch.setattr(tasks.sweep, "resolve_task_runner", lambda name, n: name)
    monkeypatch.setattr(early, "run_stage", lambda root, stage: [stage])
    monkeypatch.setattr(early, "open_mlflow_store", lambda root: Opened())
    early.run_retrain(project_dir=str(project))
    assert flow.calls[0]["ran_early"] == {"ingest": ["ingest"]}


def test_prefect_start_imports_the_flow_in_the_background(monkeypatch):
    monkeypatch.setattr(rt, "temporary_api", lambda: False)  # (the real server start runs in test_flow.py)
    start = early.PrefectStart()
    start.wait()
    assert start.ready and start.error is None


def test_the_flow_reports_early_stages_as_tasks_without_asking_dvc_again(project, monkeypatch):
    """The real flow (Prefect test harness) with DVC replaced: a stage DVC handled early (ran, or found up to
    date) is still a task, with DVC's outcome, and DVC is asked only about the stages after it."""
    import json

    from prefect.testing.utilities import prefect_test_harness

    asked: list[str] = []
    outcome = {"train": ["train"], "evaluate": ["evaluate" + early.RESTORED]}  # evaluate: from DVC's run-cache
    monkeypatch.setattr(rt, "run_stage", lambda root, stage: asked.append(stage) or outcome.get(stage, []))
    monkeypatch.setattr(rt, "register_gate_promote", lambda root, allow_promotion: {"promoted": False})
    monkeypatch.setattr(rt, "_publish", lambda root, summary: None)
    for rel, content in {"reports/metrics.json": {"accuracy": 1.0, "macro_f1": 1.0},
                         "data/ingest.json": {"content_hash": "abc", "source": "x", "n_files": 1}}.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(json.dumps(content))
    with prefect_test_harness(server_startup_timeout=120):
        summary = rt.retrain(project_dir=str(project), ran_early={"ingest": ["ingest"], "validate": []})
        from prefect import get_client

        with get_client(sync_client=True) as client:
            tasks_run = {t.name.rsplit("-", 1)[0] for t in client.read_task_runs() if t.state.is_completed()}
    assert asked == ["split", "train", "evaluate"]
    assert summary["stages_run"] == ["ingest", "train", "evaluate"]  # plain stage names
    assert summary["stages_restored"] == ["evaluate"]
    assert set(rt.STAGES) <= tasks_run


def test_the_local_mlflow_store_is_created_early_by_its_own_process(project, monkeypatch):
    import sqlite3

    monkeypatch.delenv("IMGCLF_STAGE_HOST", raising=False)
    assert early.open_mlflow_store(project).wait() == 0
    tables = {r[0] for r in sqlite3.connect(project / "mlflow.db").execute("select name from sqlite_master")}
    assert {"experiments", "runs"} <= tables
    names = [r[0] for r in sqlite3.connect(project / "mlflow.db").execute("select name from experiments")]
    assert "imgclf" in names
    (project / "empty").mkdir()
    assert early.open_mlflow_store(project / "empty").wait() == 0  # no params there: nothing (train reports it)
    assert list((project / "empty").iterdir()) == []


def test_work_waits_for_the_stage_command_to_start(monkeypatch):
    """The flow loads MLflow while train's command runs: only after DVC says it started that command."""
    import logging
    import threading

    import dvc.repo  # noqa: F401  (DVC's logging set up, as in the flow)

    done = threading.Event()
    dvc_log = logging.getLogger("dvc.stage.run")
    warm = early.WhileStageRuns("train", done.set)
    dvc_log.info("Running stage '%s':", "split")
    assert not done.wait(0.3)  # another stage's command
    dvc_log.info("Running stage '%s':", "train")
    assert done.wait(10)
    warm.thread.join(10)
    assert warm.handler not in logging.getLogger("dvc").handlers

    skipped = threading.Event()
    warm = early.WhileStageRuns("train", skipped.set)
    warm.cancel()  # train was up to date: its command never ran
    warm.thread.join(10)
    dvc_log.info("Running stage '%s':", "train")
    assert not warm.thread.is_alive() and not skipped.is_set()


def test_the_stage_host_starts_when_dvc_runs_a_stage_command():
    """A run in which nothing changes never starts the host (its imports cost seconds of CPU); the first stage
    command DVC runs starts it, in DVC's thread, before the command exists."""
    import logging

    import dvc.repo  # noqa: F401  (DVC's logging set up, as in a run)

    class Host:
        starts = 0

        def start(self) -> None:
            self.starts += 1

    host, dvc_log = Host(), logging.getLogger("dvc.stage.run")
    with early.host_started_by_dvc(host):
        dvc_log.info("Stage '%s' didn't change, skipping", "ingest")
        assert host.starts == 0
        dvc_log.info("Running stage '%s':", "validate")
        assert host.starts == 1  # synchronously
    dvc_log.info("Running stage '%s':", "train")
    assert host.starts == 1  # the run is over
    with early.host_started_by_dvc(None):  # warm stages off
        dvc_log.info("Running stage '%s':", "train")


def test_the_failure_notice_goes_to_a_webhook_given_as_an_override(project, monkeypatch):
    """params.yaml is put back before the flow's failure hook runs: the hook applies the run's overrides."""
    from types import SimpleNamespace

    import tasks.summary

    sent: list[tuple[str, str | None]] = []
    monkeypatch.setattr(tasks.summary, "notify", lambda event, payload, url=None: sent.append((event, url)))
    run = SimpleNamespace(name="r", parameters={"project_dir": str(project), "source": None,
                                                "overrides": {"schedule.webhook_url": "http://127.0.0.1:9/hook"}})
    rt._notify_failure(None, run, SimpleNamespace(name="Failed", message="boom"))
    assert sent == [("failed", "http://127.0.0.1:9/hook")]
    assert rt.run_overrides("/data/x.csv", {"train.epochs": 2}) == {
        "ingest.source": "/data/x.csv", "ingest.watch": "/data", "train.epochs": 2}


def test_a_failed_stage_command_ends_the_flow_with_one_line_not_dvcs_traceback():
    from dvc.exceptions import ReproductionError
    from dvc.stage.exceptions import StageCmdFailedError

    try:
        try:
            raise StageCmdFailedError("python -m tasks.validate", 1)
        except StageCmdFailedError as inner:
            raise ReproductionError("validate") from inner
    except ReproductionError as exc:
        failure = rt.stage_failure(exc)
    assert isinstance(failure, rt.StageFailed) and str(failure) == "validate failed"
    other = OSError("disk full")
    assert rt.stage_failure(other) is other  # anything else keeps its own traceback


def test_the_failure_notice_falls_back_to_params_webhook_when_an_override_is_what_failed(project, monkeypatch):
    from types import SimpleNamespace

    import tasks.summary
    from tasks.config import write_overrides

    write_overrides(project / "params.yaml", {"schedule.webhook_url": "http://127.0.0.1:9/from-params"})
    sent: list[str | None] = []
    monkeypatch.setattr(tasks.summary, "notify", lambda event, payload, url=None: sent.append(url))
    run = SimpleNamespace(name="r", parameters={"project_dir": str(project), "overrides": {"train.epochs": -1}})
    rt._notify_failure(None, run, SimpleNamespace(name="Failed", message="invalid train.epochs"))
    assert sent == ["http://127.0.0.1:9/from-params"]


def _command_failed(stage: str, code: int) -> Exception:
    from dvc.exceptions import ReproductionError
    from dvc.stage.exceptions import StageCmdFailedError

    try:
        try:
            raise StageCmdFailedError(f"python -m tasks.{stage}", code)
        except StageCmdFailedError as inner:
            raise ReproductionError(stage) from inner
    except ReproductionError as exc:
        return exc


def test_an_early_failure_a_second_run_cannot_change_is_handed_to_the_flow(project, monkeypatch):
    from tasks.ingest import NOT_RETRYABLE_EXIT

    assert early.settled_failure("validate", _command_failed("validate", 1)).startswith("validate failed")
    assert early.settled_failure("ingest", _command_failed("ingest", NOT_RETRYABLE_EXIT))
    assert early.settled_failure("ingest", _command_failed("ingest", 1)) is None  # a download: worth a retry
    assert early.settled_failure("split", OSError("no space left")) is None  # not the command's own failure
    assert "ingest was interrupted" in early.settled_failure("ingest", _command_failed("ingest", -2))

    def stage(root: str, name: str) -> list[str]:
        if name == "validate":
            raise _command_failed("validate", 1)
        return [name]

    monkeypatch.setattr(early, "run_stage", stage)
    monkeypatch.setattr(early, "open_mlflow_store", lambda root: Opened())
    failed: dict[str, str] = {}
    assert early.run_early_stages(project, FakeServer(after=10), {}, failed) == {"ingest": ["ingest"]}
    assert list(failed) == ["validate"] and "exited with 1" in failed["validate"]


def test_the_flow_ends_on_a_settled_early_failure_without_running_the_stage_again(project, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    asked: list[str] = []
    monkeypatch.setattr(rt, "run_stage", lambda root, stage: asked.append(stage) or [])
    line = "validate failed (its command exited with 1 while Prefect started; its message is above)"
    with prefect_test_harness(server_startup_timeout=120):
        with pytest.raises(rt.StageFailed, match=r"validate failed \(its command exited with 1"):
            rt.retrain(project_dir=str(project), ran_early={"ingest": ["ingest"]}, failed_early={"validate": line})
        from prefect import get_client

        with get_client(sync_client=True) as client:
            failed = {t.name.rsplit("-", 1)[0] for t in client.read_task_runs() if t.state.is_failed()}
    assert asked == [] and failed == {"validate"}  # recorded as the failed task, not run again
