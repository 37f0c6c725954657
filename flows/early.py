"""What `imgclf run` does before the flow starts, without importing Prefect: hold the run lock, apply the
run's overrides, and run the first stages through DVC while Prefect is imported and its temporary API server
starts in the background. Also the pieces the flow shares with it (run lock, overrides, one DVC stage).

Wiring only: every decision lives in tasks/ as a pure function."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import tasks  # noqa: F401  (telemetry off)
from tasks.config import project_root, restore_file, write_overrides

# Stages `imgclf run` may run through DVC while Prefect starts (never train/evaluate:
# they are long and their timeouts matter).
EARLY_STAGES = ("ingest", "validate", "split")


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


RESTORED = " (restored from DVC's run-cache)"  # marks a stage DVC brought back instead of running its command
# Stages whose last committed outputs come back when their command fails. DVC deletes a stage's outputs before
# running it; ingest's are the data snapshot, and a failed ingest writes nothing (it stages, then renames), so
# putting the last good snapshot back is always right. (Not `persist: true` in dvc.yaml: with the project's
# hard-link cache DVC would then copy every image of data/raw before each ingest, ~0.5 ms a file.)
PUT_BACK_ON_FAILURE = ("ingest",)
# Stages a run never restores from DVC's run-cache: an ingest restored for a source that went back to an earlier
# state (A -> B -> A) would bring back that ingest's `ingested_at`, and the gate would take the data for older
# than the champion's. A run ingests again instead (validate, split and train may still be restored).
NO_RUN_CACHE = ("ingest",)


def stage_target(root: str, stage: str) -> str:
    """DVC's name for a stage of root's dvc.yaml from any working folder (a bare name is looked up in the
    working folder's dvc.yaml, which fails when a run starts in a subfolder of the project)."""
    return f"{os.path.join(root, 'dvc.yaml')}:{stage}"


def outputs_to_put_back(outs: list[Any]) -> bool:
    """Pure: whether a failed stage's outputs (DVC Output objects: .hash_info from dvc.lock, .exists) should be
    checked out again: all of them were committed once (a first run has nothing to put back) and one is missing
    (DVC deleted them before the command; when they all exist DVC failed before that, or after the command
    succeeded: then they are new data, not to be replaced)."""
    return bool(outs) and all(bool(out.hash_info) for out in outs) and not all(out.exists for out in outs)


def put_back_outputs(repo: Any, root: str, stage: str) -> None:
    """After `stage` failed: its last committed outputs, linked back from DVC's cache (`dvc checkout <stage>`)
    when outputs_to_put_back says so. Never raises: the stage's own failure is what the run reports."""
    target = stage_target(root, stage)
    try:
        if not outputs_to_put_back(repo.stage.load_one(os.path.join(root, "dvc.yaml"), stage).outs):
            return
        repo.checkout(targets=[target])
    except Exception as exc:  # noqa: BLE001
        print(f"{stage} failed and its last outputs could not be put back ({exc}): run `dvc checkout {stage}` "
              f"(or `dvc pull {stage}` when the cache lacks them)", file=sys.stderr)
        return
    print(f"{stage} failed: its last good outputs are back in place (dvc checkout {stage})", file=sys.stderr)


def run_stage(root: str, stage: str) -> list[str]:
    """Reproduce one DVC stage if it is stale; returns the stages that DVC ran or restored from its run-cache
    (those marked with RESTORED: their command did not run). When a PUT_BACK_ON_FAILURE stage fails, its last
    outputs are put back before the failure is raised."""
    import logging

    from dvc.repo import Repo

    _stage_env()
    _quiet_dvc()
    restored: set[str] = set()

    def note(record: logging.LogRecord) -> None:
        if restored_from_cache(record):
            restored.add(str(record.args[0]))

    handler = logging.Handler()
    handler.emit = note  # type: ignore[method-assign]
    logging.getLogger("dvc").addHandler(handler)
    try:
        with Repo(root) as repo:
            try:
                ran = repo.reproduce(stage_target(root, stage), single_item=True,
                                     run_cache=stage not in NO_RUN_CACHE)
            except Exception:
                if stage in PUT_BACK_ON_FAILURE:
                    put_back_outputs(repo, root, stage)
                raise
    finally:
        logging.getLogger("dvc").removeHandler(handler)
    return [s.name + (RESTORED if s.addressing in restored else "") for s in ran]


def restored_from_cache(record: Any) -> bool:
    """A DVC log record saying it restores a stage's outputs from its run-cache instead of running it."""
    return record.msg == "Stage '%s' is cached - skipping run, checking out outputs" and bool(record.args)


def stage_outcome(did: list[str]) -> str:
    """Pure: how the run log describes what DVC did with a stage (run_stage's list for it)."""
    if not did:
        return "up to date"
    return "restored from DVC's run-cache" if all(d.endswith(RESTORED) for d in did) else "ran"


def stage_command_exit(exc: BaseException | None) -> tuple[str, int] | None:
    """Pure: (stage, exit code) when exc is (or was caused by) DVC's "failed to run: python -m tasks.<stage>,
    exited with <code>" (DVC keeps the code only in that text); None for any other failure."""
    import re

    while exc is not None:
        found = re.search(r"failed to run: python -m tasks\.(\w+), exited with (-?\d+)", str(exc))
        if found:
            return found.group(1), int(found.group(2))
        exc = exc.__cause__ or exc.__context__
    return None


# A stage command stopped by SIGINT or SIGTERM (Ctrl-C, `kill`; DVC reports -N, a shell 128+N): the user's
# choice, never tried again.
INTERRUPTED_EXITS = (-2, -15, 130, 143)


def retry_cannot_help(code: int) -> bool:
    """Pure: a stage command's exit code that running it again cannot change: ingest's for a missing, empty or
    malformed source, or an interrupt."""
    from tasks.ingest import NOT_RETRYABLE_EXIT

    return code == NOT_RETRYABLE_EXIT or code in INTERRUPTED_EXITS


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn for stage tasks: not when the stage's command said trying again cannot help
    (retry_cannot_help); anything else (a network error) may pass."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    failed = stage_command_exit(exc)
    return not (failed and retry_cannot_help(failed[1]))


def starts_stage(record: Any, stage: str | None = None) -> bool:
    """A DVC log record saying it is about to run `stage`'s command (any stage's, for None)."""
    return record.msg == "Running stage '%s':" and bool(record.args) and stage in (None, record.args[0])


class WhileStageRuns:
    """fn() in a background thread once DVC starts `stage`'s command (any stage's, for None: its "Running stage"
    log line), when this process only waits for that command; never, if no such command starts (cancel()).

    For work this process needs later that would otherwise compete, for this process's GIL, with DVC's own
    hashing before and after the command, or that only a run that changes something needs."""

    def __init__(self, stage: str | None, fn: Callable[[], Any]) -> None:
        import logging

        self.stage, self.fn = stage, fn
        self.started, self.cancelled = threading.Event(), False
        self.handler = logging.Handler()
        self.handler.emit = self._record  # type: ignore[method-assign]
        logging.getLogger("dvc").addHandler(self.handler)
        self.thread = threading.Thread(target=self._run, name=f"while-{stage}", daemon=True)
        self.thread.start()

    def _record(self, record: Any) -> None:
        if starts_stage(record, self.stage):
            self.started.set()

    def _run(self) -> None:
        import logging

        try:
            self.started.wait()
            if not self.cancelled:
                self.fn()
        except Exception:  # noqa: BLE001  (the work is redone, and its errors reported, where it is needed)
            pass
        finally:
            logging.getLogger("dvc").removeHandler(self.handler)

    def cancel(self) -> None:
        """The stage is over: if its command never started, skip fn."""
        if not self.started.is_set():
            self.cancelled = True
            self.started.set()

    def finish(self) -> None:
        """cancel(), then wait for fn if it started."""
        self.cancel()
        self.thread.join()


@contextmanager
def host_started_by_dvc(host: Any) -> Iterator[None]:
    """Start the stage host (tasks/stagehost.py) when DVC is about to run a stage's command. In DVC's own
    thread, before the command starts, so its socket is there when the command looks; a run in which nothing
    changes never pays the host's imports."""
    import logging

    class Hook(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if starts_stage(record):
                host.start()

    hook = Hook()
    if host is not None:
        logging.getLogger("dvc").addHandler(hook)
    try:
        yield
    finally:
        logging.getLogger("dvc").removeHandler(hook)


@contextmanager
def overridden(params_file: Path, overrides: dict[str, Any]) -> Iterator[dict[str, bool]]:
    """params.yaml carries the overrides for this run only; the original is put back afterwards.

    Unless the caller sets state["keep"]: a sweep's applied winner (`dvc exp apply`) then stays, overrides
    included, so params.yaml keeps matching dvc.lock and the outputs."""
    state = {"keep": False}
    if not overrides:
        yield state
        return
    original = write_overrides(params_file, overrides)
    try:
        yield state
    finally:
        if not state["keep"]:
            restore_file(params_file, original)


class RunBusy(RuntimeError):
    """Another run holds the project's run lock."""


_HELD: dict[str, list[int]] = {}  # run-lock path -> [holding thread, depth] (run_lock is re-entrant per thread)
_HELD_GUARD = threading.Lock()


@contextmanager
def run_lock(root: Path, wait_s: float) -> Iterator[None]:
    """One run at a time per project: a second run waits up to wait_s, then exits with a clear message.

    Re-entrant within a thread: `imgclf run` takes it before its early stages and keeps it until its flow
    (which takes it again) has ended, so no other run can start in between. Another thread of the same
    process is another run: it is refused like one in another process."""
    from filelock import FileLock, Timeout

    path = root / ".imgclf" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    me = threading.get_ident()
    with _HELD_GUARD:
        nested = key in _HELD and _HELD[key][0] == me
        if nested:
            _HELD[key][1] += 1
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise RunBusy(f"another imgclf run is in progress in {root} (it holds {path}); not started. "
                      "Set schedule.wait_for_lock_s to wait instead.") from None
    with _HELD_GUARD:
        _HELD[key] = [me, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        lock.release()


class RunFailed(RuntimeError):
    """The flow did its work but must end Failed (gate refused, promotion conflict); carries the summary."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class PrefectStart:
    """Prefect and the flow, imported in a background thread (~1 s of imports), and, when the flow would use
    Prefect's temporary API server (no PREFECT_API_URL), that server started there too (seconds more), by
    flows/temporary_server.py: the same server command Prefect runs, without importing the server here. Once
    it answers, this process's Prefect settings point at it, so the flow's client finds an API URL.

    Join (`wait()`) before any Prefect API call. A failed import or start is left for the flow to raise (and
    report) again, in context."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="prefect-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from flows.retrain import temporary_api

            if temporary_api():
                from flows.temporary_server import ensure_started

                ensure_started()
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    @property
    def ready(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()


def settled_failure(stage: str, exc: BaseException) -> str | None:
    """Pure: for a stage whose command failed in a way running it again cannot change (a failed contract, a
    missing source, an interrupt: anything but ingest's retryable download), the one line the flow ends with;
    else None."""
    failed = stage_command_exit(exc)
    if failed is None or (stage == "ingest" and not retry_cannot_help(failed[1])):
        return None
    if failed[1] in INTERRUPTED_EXITS:
        return f"{stage} was interrupted (its command exited with {failed[1]} while Prefect started)"
    return f"{stage} failed (its command exited with {failed[1]} while Prefect started; its message is above)"


def run_early_stages(root: Path, server: "PrefectStart", overrides: dict[str, Any],
                     failed: dict[str, str] | None = None) -> dict[str, list[str]]:
    """While the server starts: hold the run lock, apply the overrides and run EARLY_STAGES through DVC,
    stopping once the server is up or at the first stage that fails. The flow runs a failed stage again as a
    task, with its retries, logs and failure hooks; unless running it again cannot change the outcome: then
    `failed` gets its settled_failure line, and the flow's task for it fails with that, without a second run.
    Nothing runs when another run holds the lock."""

    done: dict[str, list[str]] = {}
    with ExitStack() as stack:
        try:
            stack.enter_context(run_lock(root, 0))
        except RunBusy:
            return done  # the flow waits for the lock (or refuses) and reports it, as without an early start
        stack.enter_context(overridden(root / "params.yaml", overrides))
        # Only a run that changes something needs the store: create it once a stage's command starts.
        store = WhileStageRuns(None, lambda: open_mlflow_store(root).wait())
        for stage in EARLY_STAGES:
            if server.ready:
                break
            try:
                done[stage] = run_stage(str(root), stage)
            except Exception as exc:  # noqa: BLE001
                if failed is not None and (line := settled_failure(stage, exc)):
                    failed[stage] = line
                break
        store.finish()
    return done


def import_mlflow() -> None:
    """MLflow's modules, imported ahead of need (~2 s); the store itself is not opened (a stage may be creating
    it)."""
    import importlib

    importlib.import_module("mlflow.store.tracking.sqlalchemy_store")


def open_mlflow_store(root: Path) -> "subprocess.Popen[bytes]":
    """Create the local MLflow store and experiment in a process of its own (`python -m tasks.tracking`, warm
    under the stage host), off the critical path and away from this process: its imports would hold this
    process's GIL against DVC's, and SQLAlchemy configures mappers process-wide (configured while Prefect's
    server ORM was half-imported, every later MLflow query failed)."""
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "tasks.tracking", str(root)], cwd=str(root))


def run_retrain(*, overrides: dict[str, Any] | None = None, allow_promotion: bool = True,
                project_dir: str | None = None, sweep: list[dict[str, Any]] | None = None,
                task_runner: str = "thread", max_parallel: int | None = None) -> dict[str, Any]:
    """`imgclf run`: the retrain flow, with Prefect's imports and its temporary server's start hidden behind
    the first stages (they run through DVC meanwhile; the flow still has a task for each, reporting DVC's outcome).

    With PREFECT_API_URL in the environment (a real server), nothing runs early: the flow runs every stage."""
    from tasks.stagehost import serving

    from flows.temporary_server import flow_settings, started_here

    started_at = time.time()  # the run's "took" counts the early stages and Prefect's start too
    root = project_root(Path(project_dir) if project_dir else None)
    # a server the user configured (not this process's own temporary one): the flow runs every stage itself
    configured_server = bool(os.environ.get("PREFECT_API_URL")) and not started_here()
    # stage commands run in warm, preloaded processes (tasks/stagehost.py), once one has to run
    with ExitStack() as held, serving(root, start=False) as host, host_started_by_dvc(host):
        prefect = PrefectStart()
        early: dict[str, list[str]] = {}
        failed_early: dict[str, str] = {}
        try:
            if not configured_server:
                try:  # held until the flow has ended: no other run may start between the early stages and it
                    held.enter_context(run_lock(root, 0))
                except RunBusy:
                    pass  # the flow waits for the lock (schedule.wait_for_lock_s) or refuses, and reports it
                else:
                    early = run_early_stages(root, prefect, overrides or {}, failed_early)
            if not any(early.values()):  # nothing ran yet (maybe nothing will): register comes soon and needs
                threading.Thread(target=import_mlflow, name="import-mlflow", daemon=True).start()  # MLflow
        finally:
            prefect.wait()
        from flows.retrain import retrain
        from tasks.sweep import resolve_task_runner

        flow_fn = retrain.with_options(task_runner=resolve_task_runner(task_runner, max_parallel))
        kwargs: dict[str, Any] = dict(overrides=overrides, allow_promotion=allow_promotion,
                                      project_dir=project_dir, sweep=sweep, started_at=started_at)
        with flow_settings():
            return flow_fn(**kwargs, **({"ran_early": early} if early else {}),
                           **({"failed_early": failed_early} if failed_early else {}))
