"""`imgclf`: the command line. Thin wiring over flows/ and tasks/; heavy imports happen per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

import tasks  # noqa: F401  (telemetry off)
from tasks.config import (NotInProject, ParamsError, load_params, missing_source, parse_overrides, source_from,
                          source_overrides)
from tasks.config import project_root as find_project_root

app = typer.Typer(help="imgclf: image classification pipeline (Prefect + DVC + Great Expectations + torch + MLflow).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
console = Console()


def project_root() -> Path:
    """The project around cwd; outside one, a clear error (exit 2) instead of acting on some other project."""
    try:
        return find_project_root()
    except NotInProject as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


def _params(root: Path):
    try:
        return load_params(root / "params.yaml")
    except ParamsError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


def _client(root: Path):
    import mlflow

    from tasks import tracking

    params = _params(root)
    tracking.configure(params.register_.tracking_uri, params.register_.experiment, root)
    return mlflow.MlflowClient(), params


def _prefect_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


@app.command()
def run(
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a param for this run: section.key=value (repeatable).")] = None,
    source: Annotated[Optional[str], typer.Option(help="Override ingest.source (and ingest.watch) for this run.")] = None,
    promote: Annotated[bool, typer.Option("--promote/--no-promote", help="Allow moving `champion`.")] = True,
    sweep: Annotated[Optional[Path], typer.Option(help="YAML list of override mappings; each is trained and evaluated as a DVC experiment, the best (val accuracy) becomes the candidate.")] = None,
) -> None:
    """One retraining run of the whole flow: ingest, validate, split, train, evaluate, register, promote."""
    root = project_root()
    try:
        overrides = parse_overrides(set_ or [])
        if source:  # (a path as the user typed it, from where they are)
            overrides = {**source_overrides(source_from(source, cwd=Path.cwd(), root=root)), **overrides}
        params = load_params(root / "params.yaml", overrides)
        if problem := missing_source(params.ingest.source, root):
            raise ParamsError(problem)
        candidates = None
        if sweep:
            from tasks.config import apply_overrides, read_raw
            from tasks.sweep import parse_sweep_file

            candidates = parse_sweep_file(sweep, apply_overrides(read_raw(root / "params.yaml"), overrides))
        from tasks.sweep import check_task_runner

        check_task_runner(params.schedule.task_runner)
    except ParamsError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    _prefect_defaults()
    from flows.early import RunBusy, RunFailed, run_retrain  # Prefect itself is imported while stages run

    console.print(f"[bold]imgclf run[/] in {root}" + (f" with overrides {overrides}" if overrides else ""))
    try:
        summary = run_retrain(overrides=overrides, allow_promotion=promote, project_dir=str(root), sweep=candidates,
                              task_runner=params.schedule.task_runner, max_parallel=params.schedule.max_parallel)
    except RunBusy as exc:
        console.print(f"[yellow]{exc}[/]")
        raise typer.Exit(3) from None
    except RunFailed as exc:
        _print_summary(exc.summary)
        console.print(f"[red bold]run failed:[/] {exc}")
        raise typer.Exit(1) from None
    except Exception as exc:  # the stage already printed its own detail
        console.print(f"[red bold]run failed:[/] {exc}" + failure_hint(exc))
        raise typer.Exit(1) from None
    if summary.get("sweep"):
        for cand in summary["sweep"]["candidates"]:
            mark = "  <- candidate" if cand["name"] == summary["sweep"]["best"] else ""
            console.print(f"sweep {cand['name']} {json.dumps(cand['overrides'])}: "
                          f"{summary['sweep']['metric']}={cand[summary['sweep']['metric']]}{mark}")
    _print_summary(summary)


def failure_hint(exc: BaseException) -> str:
    """Pure: where to look when a stage's command failed (its own message is above, among the flow's logs)."""
    from flows.early import stage_command_exit

    failed = stage_command_exit(exc)
    if failed is None:
        return ""
    stage, code = failed
    said = {"train": "training failed", "validate": "Data contract FAILED"}.get(stage, f"{stage} failed")
    return (f" (the {stage} stage's command exited with {code}; its own message, starting \"{said}\", is "
            "printed above the flow's log lines)")


def overrides_note(overrides: dict, sweep: dict | None) -> str:
    """Pure: what became of a run's --set overrides. After a sweep they stay in params.yaml with the winner,
    except where the winning candidate set the same key itself (a candidate's own value wins)."""
    if not sweep:
        return json.dumps(overrides) + "  (params.yaml left as it was)"
    winner = next((c["overrides"] for c in sweep["candidates"] if c["name"] == sweep["best"]), {})
    replaced = {k: winner[k] for k in overrides if k in winner and winner[k] != overrides[k]}
    return (json.dumps(overrides) + "  (kept in params.yaml with the sweep's winner"
            + (f"; the winner's own {json.dumps(replaced)} replaced those" if replaced else "") + ")")


def _print_summary(s: dict) -> None:
    table = Table(title="imgclf run", show_header=False)
    restored = set(s.get("stages_restored") or [])
    table.add_row("stages run", ", ".join(f"{n} (restored from DVC's run-cache)" if n in restored else n
                                          for n in s["stages_run"]) or "none: everything up to date")
    table.add_row("data version", f"{s['data_hash'][:12]} ({s['n_images']} images from {s['data_source']})")
    if s.get("accepted") is not None:
        table.add_row("validation", f"contract passed: {s['accepted']} accepted, {s['quarantined']} quarantined "
                      "(reports/validation/quarantine.csv, summary.md"
                      + (f", Data Docs {s['data_docs']}" if s.get("data_docs") else "") + ")")
    for warning in s.get("split_warnings") or []:
        table.add_row("split warning", warning)
    table.add_row("test accuracy", f"{s['accuracy']:.4f}  (macro F1 {s['macro_f1']:.4f})")
    table.add_row("model version", f"{s['model_name']} v{s['version']}" + (
        "  (new)" if s["registered"] else "  (registered by an earlier run that ended before its gate decided)"
        if s.get("resumed") else "  (already registered, nothing new)"))
    table.add_row("champion", f"v{s['champion']}" + ("  <- promoted" if s["promoted"] else "") if s["champion"] else "none")
    gate = s.get("gate")
    if gate:
        table.add_row("gate", ("passed" if gate["passed"] else "FAILED") + (
            f" against v{gate['compared_with']}" if gate["compared_with"] else " (no champion: floors only)"))
        for check in gate["checks"]:
            if not check["passed"] or check["name"] in ("non_inferiority", "class_recall_drop"):
                table.add_row(f"  {check['name']}", ("pass  " if check["passed"] else "FAIL  ") + (check["detail"] or
                              f"{check['value']} vs {check['threshold']}"))
    table.add_row("decision", s["reason"])
    if s["overrides"]:
        table.add_row("overrides", overrides_note(s["overrides"], s.get("sweep")))
    table.add_row("took", f"{s['seconds']} s")
    console.print(table)
    console.print("Open the MLflow UI: [bold]imgclf ui[/] (or `make ui`) -> http://127.0.0.1:5000")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders to classify.")],
    model: Annotated[Optional[str], typer.Option(help="MLflow model URI; default models:/<register.model_name>@champion.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the predictions CSV.")] = Path("predictions.csv"),
) -> None:
    """Batch predictions from the champion (or any models:/ URI) written as CSV."""
    import pandas as pd

    from tasks import tracking

    root = project_root()
    _, params = _client(root)
    uri = model or f"models:/{params.register_.model_name}@champion"
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.parts))
        elif p.is_file():
            files.append(p)
        else:
            console.print(f"[red]{p}: no such file or folder[/]")
            raise typer.Exit(2)
    try:
        loaded = tracking.load_pyfunc(uri, allow_paths=True)  # our own files, in-process: paths are fine
    except Exception as exc:
        console.print(f"[red]cannot load {uri}:[/] {exc}")
        raise typer.Exit(1) from None
    rows = []
    for start in range(0, len(files), 256):
        chunk = [str(f) for f in files[start:start + 256]]
        try:  # a bad file is a row with `error`
            rows.append(loaded.predict(pd.DataFrame({"image": chunk})).assign(path=chunk))
            continue
        except Exception:  # noqa: BLE001  a version registered before per-row errors raises instead: one by one
            pass
        for f in chunk:
            try:
                rows.append(loaded.predict(pd.DataFrame({"image": [f]})).assign(path=[f]))
            except Exception as exc:  # noqa: BLE001
                rows.append(pd.DataFrame({"path": [f], "error": [f"{type(exc).__name__}: {exc}"]}))
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["path", "label", "probability"])
    if "error" not in frame:
        frame["error"] = None
    frame = frame[["path"] + [c for c in frame.columns if c not in ("path", "error")] + ["error"]]
    frame.to_csv(out, index=False)
    unreadable = int(frame["error"].notna().sum())
    console.print(f"{len(frame) - unreadable} predicted, {unreadable} unreadable -> {out} (model {uri})")
    if unreadable:
        raise typer.Exit(1)


def _model_version(client, name: str, version: str):
    """The registered ModelVersion, or a clear error (exit 1) when there is no such version."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        none_yet = not client.search_model_versions(f"name='{name}'", max_results=1)
        console.print(f"[red]{name} has no version {version}[/]"
                      + (" (nothing is registered yet: `imgclf run` registers the first)" if none_yet else ""))
        raise typer.Exit(1) from None


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered version to make champion.")],
    force: Annotated[bool, typer.Option(help="Promote even without a passing, current gate record (recorded).")] = False,
) -> None:
    """Move `champion` to VERSION after re-checking its gate record (compare-and-set, recorded)."""
    from tasks import registry
    from tasks.gate import check_gate_record

    root = project_root()
    client, params = _client(root)
    name = params.register_.model_name
    mv = _model_version(client, name, version)
    current = registry.champion_version(client, name)
    now = str(current.version) if current else None
    if now == str(mv.version):
        console.print(f"{name} v{now} is already champion: nothing to do")
        return
    problem = check_gate_record(mv.tags, champion_now=now)
    if problem and not force:
        console.print(f"[red]not promoted:[/] {problem}" + ("; the override is recorded" if "--force" in problem
                                                            else " (use --force to override; the override is recorded)"))
        raise typer.Exit(1)
    reason = "manual promotion (imgclf promote)" + (f" FORCED over: {problem}" if problem else ": gate record passed")
    _move_champion(client, name, str(mv.version), now=now, reason=reason, root=root, kind="promote",
                   again=f"`imgclf promote {version}` again to check it against v{{now}}")


def _move_champion(client, name: str, version: str, *, now: str | None, reason: str, root: Path, kind: str,
                   again: str) -> None:
    """Move `champion` from `now` to version under the registry lock (compare-and-set) and say so; a move by
    someone else meanwhile changes nothing and ends with exit 1 and `again` (its {now}: the new champion)."""
    from tasks import registry

    try:
        registry.promote_if_unchanged(client, name, version, expected=now, reason=reason,
                                      lock_path=root / registry.LOCK_FILE, kind=kind)
    except registry.PromotionConflict as exc:
        console.print(f"[red]not {'rolled back' if kind == 'rollback' else 'promoted'}:[/] champion moved to "
                      f"v{exc.now} while this command ran (it was {'v' + now if now else 'unset'}; `imgclf history` "
                      f"shows the move): run " + again.format(now=exc.now))
        raise typer.Exit(1) from None
    console.print(f"champion -> {name} v{version} (was {'v' + now if now else 'none'})")


@app.command()
def rollback(
    force: Annotated[bool, typer.Option(help="Roll back even to a version whose gate record did not pass (recorded).")] = False,
) -> None:
    """Undo the latest move of `champion` still in effect; again, the one before it (compare-and-set, recorded)."""
    from tasks import registry
    from tasks.gate import check_gate_passed

    root = project_root()
    client, params = _client(root)
    name = params.register_.model_name
    current = registry.champion_version(client, name)
    now = str(current.version) if current else None
    target = registry.rollback_target(registry.alias_history(client, name), now)
    if target is None:
        console.print("[red]nothing to roll back to:[/] " + (
            "there is no champion yet" if now is None else
            f"no champion before v{now} is recorded (`imgclf history` shows every move)"))
        raise typer.Exit(1)
    problem = check_gate_passed(_model_version(client, name, target).tags)
    if problem and not force:
        console.print(f"[red]not rolled back[/] to v{target}: {problem} (use --force to override; the override is "
                      "recorded)")
        raise typer.Exit(1)
    reason = f"rollback from v{now}" + (f" FORCED over: v{target} {problem}" if problem else "")
    _move_champion(client, name, target, now=now, reason=reason, root=root, kind="rollback",
                   again="`imgclf rollback` again to roll back from v{now}")


@app.command()
def history() -> None:
    """Every move of the `champion` alias: time, from, to, reason, by whom."""
    from tasks import registry

    client, params = _client(project_root())
    table = Table("time (UTC)", "kind", "from", "to", "reason", "by",
                  title=f"{params.register_.model_name}: champion history")
    table.columns[0].no_wrap = True
    # (nothing registered yet is an empty history; any other registry error is worth its message)
    for m in registry.alias_history(client, params.register_.model_name):
        kind = "rollback" if registry.is_rollback(m) else "promote"
        when = m["time"].replace("T", " ").removesuffix("+00:00")  # (recorded in UTC, ISO 8601)
        table.add_row(when, kind, m["from"] or "-", m["to"], m["reason"], m["by"])
    console.print(table)


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """MLflow UI on 127.0.0.1 with the project's store."""
    from tasks import tracking

    root = project_root()
    params = _params(root)
    uri = tracking.resolve_tracking_uri(params.register_.tracking_uri, root)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", tracking.artifact_root(root)]
    console.print(f"MLflow UI on http://127.0.0.1:{port}  (store {uri}); Ctrl-C to stop")
    raise typer.Exit(subprocess.call(cmd, cwd=root))


@app.command()
def schedule() -> None:
    """Serve the flow on the cron in params.yaml (needs a Prefect server: PREFECT_API_URL)."""
    root = project_root()
    params = _params(root)
    if not os.environ.get("PREFECT_API_URL"):
        console.print("[red]Schedules need a Prefect server.[/] Start one with `prefect server start` and set "
                      "PREFECT_API_URL=http://127.0.0.1:4200/api (the temporary server runs no scheduler).")
        raise typer.Exit(2)
    from prefect.schedules import Cron

    from flows.retrain import retrain

    console.print(f"serving flow 'retrain' on cron {params.schedule.cron!r} ({params.schedule.timezone}); Ctrl-C to stop")
    from tasks.sweep import resolve_task_runner

    try:
        runner = resolve_task_runner(params.schedule.task_runner, params.schedule.max_parallel)
    except ParamsError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    retrain.with_options(task_runner=runner).serve(name="scheduled", schedules=[Cron(params.schedule.cron, timezone=params.schedule.timezone)],
                  parameters={"project_dir": str(root)})


@app.command()
def reproduce(
    version: Annotated[str, typer.Argument(help="Registered version to rebuild.")],
    keep: Annotated[bool, typer.Option(help="Keep the temporary worktree for inspection.")] = False,
    gpu_tolerance: Annotated[float, typer.Option(help="Allowed metric difference for GPU-trained versions.")] = 0.005,
) -> None:
    """Rebuild VERSION from its commit, params, dvc.lock and DVC data; check the metrics match."""
    from tasks.reproduce import ReproduceError
    from tasks.reproduce import reproduce as rebuild

    root = project_root()
    client, params = _client(root)
    console.print(f"rebuilding {params.register_.model_name} v{version} in a temporary git worktree ...")
    try:
        rows, tree, tol = rebuild(root, client, params.register_.model_name, version, gpu_tolerance=gpu_tolerance,
                                  keep=keep)
    except ReproduceError as exc:
        console.print(f"[red]cannot reproduce:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table("metric", "registered", "reproduced", "match", title=f"v{version}: "
                  + ("exact match required (CPU)" if tol == 0 else f"tolerance {tol} (GPU)"))
    for r in rows:
        table.add_row(r.metric, f"{r.registered:.6f}", f"{r.reproduced:.6f}", "yes" if r.ok else "[red]NO[/]")
    console.print(table)
    if keep:
        console.print(f"worktree kept at {tree} (remove with `git worktree remove --force {tree}`)")
    ok = all(r.ok for r in rows)
    console.print("reproduced" if ok else "[red]NOT reproduced[/]")
    raise typer.Exit(0 if ok else 1)


@app.command("lr-find")
def lr_find(
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a param for this test only: section.key=value (repeatable), e.g. train.model=resnet18.")] = None,
) -> None:
    """Learning-rate range test on the train split: reports/lr_find.png + .json and a suggested train.lr."""
    root = project_root()
    try:
        overrides = parse_overrides(set_ or [])
        load_params(root / "params.yaml", overrides)
    except ParamsError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if not (root / "data/splits/train.csv").exists():
        console.print("[red]no data/splits yet:[/] run `imgclf run` (or `dvc repro split`) first")
        raise typer.Exit(2)
    os.chdir(root)
    from tasks.lr_find import main as run_lr_find

    run_lr_find(overrides)


@app.command()
def server(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 4200) -> None:
    """Start a Prefect server on 127.0.0.1 (for `imgclf schedule`, deployments and the Prefect UI)."""
    console.print(f"Prefect server on http://127.0.0.1:{port} ; in another shell: "
                  f"export PREFECT_API_URL=http://127.0.0.1:{port}/api && imgclf schedule")
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    main()
