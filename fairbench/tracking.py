"""MLflow: where runs, parameters, metrics, predictions and artifacts go.

The store is always explicit: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else an
embedded SQLite database ``sqlite:///<results-dir>/mlflow.db`` with artifacts beside it.
One experiment per dataset. A run that raises ends FAILED, one interrupted by Ctrl-C ends
KILLED; only a run that completes ends FINISHED.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fairbench

TAG_PREFIX = "fairbench."
URI_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(results_dir: str | Path, tracking_uri: str | None = None) -> str:
    """The MLflow store to use: explicit URI, then ``MLFLOW_TRACKING_URI``, then embedded SQLite."""
    uri = tracking_uri or os.environ.get(URI_ENV)
    if uri:
        return uri
    path = Path(results_dir).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


def _quiet() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def use_store(tracking_uri: str) -> None:
    """Point MLflow at ``tracking_uri`` without leaking it into ``MLFLOW_TRACKING_URI``.

    MLflow writes the URI into the environment; left there, it would override the default
    store of a later run in the same process that has another results directory.
    """
    import mlflow

    _quiet()
    before = os.environ.get(URI_ENV)
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop(URI_ENV, None)
    else:
        os.environ[URI_ENV] = before


def experiment_id(name: str, tracking_uri: str, results_dir: str | Path) -> str:
    """The id of experiment ``name``, created on first use (artifacts under results-dir for SQLite)."""
    import mlflow

    _quiet()
    use_store(tracking_uri)
    if tracking_uri.startswith("sqlite:"):
        Path(results_dir).mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        location = (Path(results_dir).resolve() / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str | None:
    """The commit of the fairbench source tree, when it is a git checkout."""
    src = Path(fairbench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def base_tags(kind: str, **values: Any) -> dict[str, str]:
    """Tags every fairbench run carries: kind, version, git commit, plus ``values``."""
    tags = {f"{TAG_PREFIX}kind": kind, f"{TAG_PREFIX}version": fairbench.__version__}
    commit = git_commit()
    if commit:
        tags[f"{TAG_PREFIX}git_commit"] = commit
    tags.update({f"{TAG_PREFIX}{k}": str(v) for k, v in values.items() if v is not None})
    return tags


@contextmanager
def tracked_run(
    experiment: str, run_name: str, tags: Mapping[str, str], finished_on: tuple[type[BaseException], ...] = ()
) -> Iterator[Any]:
    """An active MLflow run that ends FINISHED, FAILED (exception) or KILLED (Ctrl-C).

    Exceptions of the types in ``finished_on`` (an early stop that is not a failure, such as a
    pruned tuning trial) end the run FINISHED and propagate.
    """
    import mlflow

    run = mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=dict(tags))
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except finished_on:
        mlflow.end_run("FINISHED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})


def log_metrics(values: Mapping[str, float], prefix: str = "", step: int | None = None) -> None:
    import math

    import mlflow

    clean = {f"{prefix}{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_json(obj: Any, name: str) -> None:
    import mlflow

    mlflow.log_dict(json.loads(json.dumps(obj, default=str)), name)


def log_table(frame: Any, name: str) -> None:
    """Log a pandas DataFrame as a CSV artifact (floats written at full precision)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path))
