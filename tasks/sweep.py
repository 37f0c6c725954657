"""Sweeps and task runners: pure parts (parse a sweep file, pick the best candidate, resolve a runner).

The flow (flows/retrain.py) only wires these: each candidate runs as a DVC experiment in a mapped task."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from tasks.config import ParamsError, apply_overrides, parse_params

TASK_RUNNERS = {
    "thread": ("prefect.task_runners", "ThreadPoolTaskRunner", "prefect"),
    "dask": ("prefect_dask", "DaskTaskRunner", "prefect-dask"),  # installed with imgclf
    "ray": ("prefect_ray", "RayTaskRunner", "prefect-ray"),
}
METRIC = "best_val_accuracy"


def validate_sweep(candidates: Any, raw_params: dict[str, Any]) -> list[dict[str, Any]]:
    """Check a list of override dicts against params (unknown keys, invalid values are errors); returns them."""
    if not isinstance(candidates, list) or not candidates:
        raise ParamsError("a sweep is a non-empty YAML list of override mappings, e.g. [{train.lr: 0.001}]")
    out: list[dict[str, Any]] = []
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict) or not cand:
            raise ParamsError(f"sweep candidate {i}: expected a non-empty mapping of section.key: value")
        for key in cand:
            if not isinstance(key, str) or "." not in key:
                raise ParamsError(f"sweep candidate {i}: key {key!r} must look like section.key")
            if key.startswith("schedule.") or key.startswith(("register.", "promote.")):
                raise ParamsError(f"sweep candidate {i}: {key!r} is not an experiment setting (only data/train/"
                                  "evaluate sections can vary between candidates)")
        try:
            parse_params(apply_overrides(raw_params, cand))
        except ParamsError as exc:
            raise ParamsError(f"sweep candidate {i}: {exc}") from None
        out.append(dict(cand))
    return out


def parse_sweep_file(path: Path | str, raw_params: dict[str, Any]) -> list[dict[str, Any]]:
    """Read a sweep YAML file (a list of override mappings) and validate it against raw params."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: sweep file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_sweep(data, raw_params)


def set_args(overrides: dict[str, Any]) -> list[str]:
    """`dvc exp run -S` arguments for one candidate (values as YAML scalars)."""
    args: list[str] = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")].strip()
        text = text.removesuffix("...").strip()
        args += ["-S", f"{key}={text}"]
    return args


def experiment_names(stamp: str, n: int) -> list[str]:
    """`sweep-<runstamp>-<i>` for each candidate (valid git ref names)."""
    return [f"sweep-{stamp}-{i}" for i in range(n)]


def choose_best(results: list[dict[str, Any]], metric: str = METRIC) -> dict[str, Any]:
    """The result with the highest metric; ties go to the earliest. Missing or NaN metrics never win."""
    best: dict[str, Any] | None = None
    for res in results:
        value = res.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if best is None or value > best[metric]:
            best = res
    if best is None:
        raise ValueError(f"no sweep candidate reported {metric}")
    return best


def check_task_runner(name: str) -> None:
    """The errors resolve_task_runner would raise, without importing anything: checked before a run starts."""
    import importlib.util

    if name not in TASK_RUNNERS:
        raise ParamsError(f"schedule.task_runner: unknown runner {name!r} (one of {', '.join(TASK_RUNNERS)})")
    module, _, package = TASK_RUNNERS[name]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise ParamsError(f"schedule.task_runner is {name!r} but {package} is not installed: pip install {package}")


def resolve_task_runner(name: str, max_parallel: int | None = None):
    """A Prefect task runner instance by name, running at most max_parallel tasks at once (None: its default).

    Dask gets a local cluster of max_parallel single-threaded worker processes; Ray its local default. The
    optional packages are imported lazily."""
    import importlib

    check_task_runner(name)
    module, cls, package = TASK_RUNNERS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ParamsError(f"schedule.task_runner is {name!r} but {package} is not installed: "
                          f"pip install {package}") from None
    kwargs: dict[str, Any] = {}
    if max_parallel is not None and name == "thread":
        kwargs = {"max_workers": max_parallel}
    elif max_parallel is not None and name == "dask":
        kwargs = {"cluster_kwargs": {"n_workers": max_parallel, "threads_per_worker": 1, "processes": True,
                                     "dashboard_address": None}}
    return getattr(mod, cls)(**kwargs)
