"""Run one sweep candidate as a DVC experiment in DVC's temporary copy of the repo (`dvc exp run --temp`).

`dvc exp run --temp` stashes the candidate, then runs "the first stashed temp experiment": two started at
once can pick up each other's entry. Here the stash and the claim of that very entry happen together under
a short file lock; the pipeline itself then runs outside it, so candidates train concurrently. Stages see
DVC_ROOT = the real project (DVC sets it), which is where tasks.tracking puts the MLflow store.

Run as a process of its own (DVC changes the working directory while it runs an experiment):
    python -m tasks.experiment NAME [-S section.key=value ...]
It prints one JSON line: name, experiment rev, best_val_accuracy, start and end times."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

LOCK_FILE = Path(".imgclf/experiment.lock")
MODEL_JSON = "models/candidate/model.json"


def run_temp_experiment(root: Path, name: str, set_params: list[str]) -> dict[str, Any]:
    """Stash + claim (locked), run in a temp dir (unlocked), collect as experiment `name`; returns its facts."""
    from dvc.repo import Repo, lock_repo
    from dvc.repo.experiments.executor.local import TempDirExecutor
    from dvc.utils.cli_parse import to_path_overrides
    from filelock import FileLock

    lock = root / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    with Repo(str(root)) as repo:
        exps = repo.experiments
        queue = exps.tempdir_queue
        with FileLock(str(lock)), lock_repo(repo):
            # A stash carries tracked files only: a never-committed dvc.lock would leave the copy without
            # the data stages' state (DVC itself adds untracked params files the same way).
            if "dvc.lock" in repo.scm.untracked_files():
                repo.scm.add(["dvc.lock"])
            entry = exps.new(queue, params=to_path_overrides(set_params) if set_params else {}, name=name)
            executor = queue.init_executor(exps, entry, TempDirExecutor, wdir=queue._standalone_tmp_dir)
        started = time.time()
        results = queue._reproduce_entry(entry, executor)
        ended = time.time()
    if not results:
        raise RuntimeError(f"experiment {name} produced no result")
    import dvc.api

    model = json.loads(dvc.api.read(MODEL_JSON, repo=str(root), rev=name))
    rev = next(iter(next(iter(results.values()))), None)
    return {"name": name, "rev": rev, "best_val_accuracy": model.get("best_val_accuracy"),
            "started": started, "ended": ended}


def main(argv: list[str] | None = None) -> None:
    """CLI: run one candidate, print its facts as JSON."""
    ap = argparse.ArgumentParser(prog="python -m tasks.experiment")
    ap.add_argument("name")
    ap.add_argument("-S", "--set-param", action="append", default=[], dest="params")
    ap.add_argument("--root", type=Path, default=Path.cwd())
    args = ap.parse_args(argv)
    try:
        res = run_temp_experiment(args.root.resolve(), args.name, args.params)
    except Exception as exc:  # the failing stage already printed its own detail above: no traceback
        print(f"experiment {args.name} failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(res))


if __name__ == "__main__":
    main()
