"""MLflow wiring: where the store is, which experiment, the pyfunc artifact. Imports mlflow lazily."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tasks.config import project_root

SERVING_CODE = Path(__file__).with_name("serving.py")
# The serving model needs these at load time; pinned so logging skips requirement inference (~9 s).
SERVING_REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1", "safetensors", "pillow", "pandas", "numpy",
                        "pyyaml", "pydantic")


def tracking_root(root: Path | None = None) -> Path:
    """The project a relative store belongs to: `root` if given, else $DVC_ROOT, else the project around cwd.

    DVC sets DVC_ROOT for every stage command, and for `dvc exp run --temp`/`--queue` it is the real project,
    not DVC's temporary copy: candidates running there still log to the project's own store."""
    if root is not None:
        return root
    env = os.environ.get("DVC_ROOT")
    return Path(env) if env else project_root()


def resolve_tracking_uri(uri: str, root: Path | None = None) -> str:
    """Make a relative sqlite/file store absolute against the project root; leave servers alone."""
    root = tracking_root(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return str((root / uri).resolve())
    return uri


def artifact_root(root: Path | None = None) -> str:
    """Local artifact store beside the sqlite database."""
    return (tracking_root(root) / "mlartifacts").resolve().as_uri()


def configure(tracking_uri: str, experiment: str, root: Path | None = None) -> str:
    """Point mlflow at the store and experiment (created with the project's artifact root); returns its id."""
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    uri = resolve_tracking_uri(tracking_uri, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    local = uri.startswith(("sqlite:", "/", "file:"))
    try:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_root(root) if local else None)
    except Exception:  # created concurrently by another process: use theirs
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        exp_id = found.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1} for mlflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@contextmanager
def requirements_checked_by_version() -> Iterator[None]:
    """Inside: MLflow checks a model's pip requirements against this environment without first mapping every
    installed module to its distribution.

    Logging or loading a pyfunc model warns when the environment does not satisfy the model's requirements.
    Before checking, MLflow builds a module -> distribution map of everything installed
    (importlib_metadata.packages_distributions(): ~1.3 s here, a quarter of a short train stage, and again in
    every process that loads a model). The check itself asks importlib.metadata.version(requirement) and only
    falls back on the map for a distribution it cannot find: with an empty map it still warns about a missing
    or mismatched package. The map is an MLflow internal (3.17): if it moves, nothing is patched and MLflow
    scans as before; a map already built is left alone, and the empty one is dropped on the way out."""
    from mlflow.utils import requirements_utils as ru

    if getattr(ru, "_MODULES_TO_PACKAGES", False) is not None or not hasattr(ru, "_PACKAGES_TO_MODULES"):
        yield
        return
    ru._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        ru._MODULES_TO_PACKAGES = None
        ru._PACKAGES_TO_MODULES = None


def load_pyfunc(model_uri: str, *, allow_paths: bool = False) -> Any:
    """mlflow.pyfunc.load_model, with the requirement check by version (see requirements_checked_by_version).

    allow_paths=True lets the serving model read image files named in its input (model_config
    {"allow_paths": True}): for in-process callers naming their own files, never for a model that serves
    clients. Versions logged before the option existed read paths anyway; MLflow ignores the key for them
    (with a warning) and loads them as before."""
    import logging

    import mlflow

    def not_the_old_versions_notice(record: logging.LogRecord) -> bool:  # (they read paths without being asked)
        return not str(record.msg).startswith("Argument(s) allow_paths were ignored")

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    pyfunc_log.addFilter(not_the_old_versions_notice)
    try:
        with requirements_checked_by_version():
            return mlflow.pyfunc.load_model(model_uri, model_config={"allow_paths": True} if allow_paths else None)
    finally:
        pyfunc_log.removeFilter(not_the_old_versions_notice)


def log_serving_model(model_dir: Path) -> str:
    """Log the candidate as a pickle-free pyfunc (models from code + safetensors); returns its model URI."""
    import warnings

    import mlflow

    warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
    with requirements_checked_by_version():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=list(SERVING_REQUIREMENTS),
            # declared so that a loader may set it: MLflow drops model_config keys the model did not log
            model_config={"allow_paths": False},
        )
    return info.model_uri


class Background:
    """fn(*args) in a daemon thread; result() joins and returns its value or raises its exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        import threading

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread by result())
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def ensure_local_store(root: Path) -> None:
    """Create a local store's schema and the experiment now (train and register would each wait for it);
    remote stores are left alone. Silent on errors: train and register report them in context."""
    from tasks.config import load_params

    try:
        params = load_params(root / "params.yaml")
        uri = params.register_.tracking_uri
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            configure(uri, params.register_.experiment, root)
    except Exception:  # noqa: BLE001
        pass


def main() -> None:
    """`python -m tasks.tracking [ROOT]`: ensure_local_store for the project at ROOT (default: around cwd)."""
    import sys

    ensure_local_store(Path(sys.argv[1]) if len(sys.argv) > 1 else project_root())


if __name__ == "__main__":
    from tasks.stagehost import run_main

    run_main("tasks.tracking", main)
