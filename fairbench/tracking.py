"""MLflow: where runs, parameters, metrics, predictions and artifacts go.

The store is always explicit: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else an
embedded SQLite database ``sqlite:///<results-dir>/mlflow.db`` with artifacts beside it.
One experiment per dataset. A run that raises ends FAILED, one interrupted by Ctrl-C ends
KILLED; only a run that completes ends FINISHED. A run whose process was killed outright stays
RUNNING in the store; every run records which process owns it (``fairbench.worker``) and
refreshes a heartbeat tag, so a later command can tell such an orphan from a live run and mark
it KILLED (:func:`end_orphans`).

Several processes may share one embedded SQLite store: its creation and schema migration run
under a lock file beside the database, writes that meet "database is locked" are retried with
backoff, and a store left damaged by an interrupted migration is refused with a clear message
instead of being migrated further.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import fairbench
from fairbench.errors import FairbenchError

TAG_PREFIX = "fairbench."
URI_ENV = "MLFLOW_TRACKING_URI"
WORKER_TAG = f"{TAG_PREFIX}worker"
HEARTBEAT_TAG = f"{TAG_PREFIX}heartbeat"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")
LOCKED_RETRIES = 8
_READY: set[str] = set()
_CLAIMED: ContextVar[str | None] = ContextVar("fairbench_claimed_run", default=None)
T = TypeVar("T")


class Heartbeat:
    """How often a live run or trial says so, and after how long its silence means it is dead.

    Defaults follow Optuna's heartbeat guidance (interval 60 s, grace period twice that); a
    worker on the same machine whose process is gone is recognised at once, whatever the grace.
    """

    interval: int = 60
    grace: int = 120


def safe_name(name: str, what: str) -> str:
    """``name`` if it is safe as part of a file name (letters, digits, ``_.=+-``); else an error."""
    if not SAFE_NAME.fullmatch(name):
        raise FairbenchError(
            f"{what} '{name}': use 1-128 letters, digits and _ . = + - (starting with a letter or digit); "
            "it names files under the results folder"
        )
    return name


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter (single quotes, or double quotes
    when it holds a single quote); a value that no literal can express is an error."""
    value = str(value)
    if "'" not in value and not value.endswith("\\"):
        return f"'{value}'"
    if '"' not in value and not value.endswith("\\"):
        return f'"{value}"'
    raise FairbenchError(f"'{value}' cannot be searched in MLflow: it holds both quote kinds or ends in a backslash")


def tag_filter(status: str | None = None, **tags: Any) -> str:
    """An MLflow filter matching runs whose ``fairbench.<key>`` tags equal ``tags`` (and ``status``)."""
    parts = [f"tags.`{TAG_PREFIX}{key}` = {quote(value)}" for key, value in tags.items()]
    if status is not None:
        parts.append(f"attributes.status = {quote(status)}")
    return " and ".join(parts)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages."""
    return re.sub(r"(//[^/:@]+:)[^@/]*@", r"\1***@", url)


def worker_id() -> str:
    """This process as ``host:pid:start``, the start time telling a reused pid from the original."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def worker_alive(worker: str | None) -> bool | None:
    """Whether the process ``worker`` names still runs: known only on its own machine (else None)."""
    if not worker or worker.count(":") < 2:
        return None
    host, pid, start = worker.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start in ("?", _start_time(int(pid)))


def is_orphan(worker: str | None, beat: float | None, now: float | None = None) -> bool:
    """A RUNNING run or trial is orphaned when its process is known dead, or when its heartbeat
    (unix seconds) is older than the grace period."""
    alive = worker_alive(worker)
    if alive is not None:
        return not alive
    return beat is not None and (now or time.time()) - beat > Heartbeat.grace


def _is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def retry_locked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``, retrying with exponential backoff while SQLite reports "database is locked"."""
    for attempt in range(LOCKED_RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _is_locked(exc) or attempt == LOCKED_RETRIES - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def resolve_tracking_uri(results_dir: str | Path, tracking_uri: str | None = None) -> str:
    """The MLflow store to use: explicit URI, then ``MLFLOW_TRACKING_URI``, then embedded SQLite."""
    uri = tracking_uri or os.environ.get(URI_ENV)
    if uri:
        return uri
    path = Path(results_dir).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed), held across processes of one machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_sqlite_store(path: Path) -> None:
    """Refuse a SQLite MLflow store that an interrupted creation or migration left damaged.

    A healthy store has no tables (new) or has ``alembic_version`` with exactly one row and no
    ``_alembic_tmp_*`` table; anything else would be migrated further and made worse.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    fix = "move it aside (or restore a backup) and run again to start a new store"
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
            check = con.execute("pragma quick_check").fetchone()[0]
            versions = (
                con.execute("select count(*) from alembic_version").fetchone()[0] if "alembic_version" in tables else 0
            )
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise FairbenchError(f"MLflow store {path} is not a readable SQLite database ({exc}); {fix}") from None
    if check != "ok":
        raise FairbenchError(f"MLflow store {path} is damaged (integrity check: {check}); {fix}")
    temporary = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if temporary:
        raise FairbenchError(
            f"MLflow store {path} is damaged: an interrupted schema migration left {', '.join(temporary)}; {fix}"
        )
    if tables and versions != 1:
        raise FairbenchError(
            f"MLflow store {path} is damaged: its schema version table has {versions} rows instead of 1; {fix}"
        )


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as answer:
            answer.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FairbenchError(
            f"cannot reach the MLflow tracking server {redact(uri)} ({reason}); start it or fix --tracking-uri"
        ) from None


def check_reachable(uri: str) -> None:
    """Fail fast, writing nothing, when a tracking server URI does not answer."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri)


def _create_sqlite_store(path: Path) -> None:
    """Create and migrate a new SQLite store in a temporary file, then move it into place, so a
    process killed during creation leaves no half-built store behind (call under the lock)."""
    import mlflow

    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    retry_locked(mlflow.MlflowClient(f"sqlite:///{tmp}").search_experiments, max_results=1)
    os.replace(tmp, path)


def open_store(uri: str, create: bool = True) -> None:
    """Make the store at ``uri`` ready once per process: a server must answer; an embedded SQLite
    store is checked for damage, and created when missing, under a lock, one process at a time.
    With ``create=False`` a missing SQLite store is an error and nothing is written."""
    if uri in _READY:
        return
    import mlflow

    check_reachable(uri)
    path = sqlite_path(uri)
    if path is not None and not create and not path.exists():
        raise FairbenchError(f"no MLflow store at {uri}; pass the --results-dir or --tracking-uri the runs used")
    try:
        if path is not None:
            with file_lock(path.with_name(path.name + ".lock")):
                if not path.exists():
                    _create_sqlite_store(path)
                check_sqlite_store(path)
                retry_locked(mlflow.MlflowClient(uri).search_experiments, max_results=1)
        elif not uri.startswith(("http://", "https://")):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except FairbenchError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FairbenchError(f"cannot open the MLflow store {redact(uri)}: {first}") from None
    _READY.add(uri)


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
    open_store(tracking_uri)
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
    found = retry_locked(client.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        location = (Path(results_dir).resolve() / "artifacts").as_uri()
    try:
        return retry_locked(client.create_experiment, name, artifact_location=location)
    except Exception:
        found = retry_locked(client.get_experiment_by_name, name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


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
    tags = {f"{TAG_PREFIX}kind": kind, f"{TAG_PREFIX}version": fairbench.__version__, WORKER_TAG: worker_id()}
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
    pruned tuning trial) end the run FINISHED and propagate. Inside :func:`claimed` the run
    claimed there is continued instead of a new one started. While the run is active a thread
    refreshes its heartbeat tag.
    """
    import mlflow

    tags = {**tags, WORKER_TAG: worker_id(), HEARTBEAT_TAG: str(int(time.time()))}
    claimed_id = _CLAIMED.get()
    if claimed_id is not None:
        run = retry_locked(mlflow.start_run, run_id=claimed_id, tags=tags)
    else:
        run = retry_locked(mlflow.start_run, experiment_id=experiment, run_name=run_name, tags=tags)
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(mlflow.MlflowClient(), run.info.run_id, stop), daemon=True)
    beat.start()
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except finished_on:
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        stop.set()
        beat.join()
        retry_locked(mlflow.end_run, status)


def _beat(client: Any, run_id: str, stop: threading.Event) -> None:
    while not stop.wait(Heartbeat.interval):
        with contextlib.suppress(Exception):
            retry_locked(client.set_tag, run_id, HEARTBEAT_TAG, str(int(time.time())))


@contextmanager
def claimed(run_id: str) -> Iterator[None]:
    """Within this block, :func:`tracked_run` continues the already created run ``run_id``."""
    token = _CLAIMED.set(run_id)
    try:
        yield
    finally:
        _CLAIMED.reset(token)


def end_orphans(client: Any, runs: list[Any], status: str = "KILLED") -> list[str]:
    """Mark every RUNNING run in ``runs`` whose worker is gone ``status``; returns their ids."""
    ended = []
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        beat = run.data.tags.get(HEARTBEAT_TAG)
        if is_orphan(run.data.tags.get(WORKER_TAG), float(beat) if beat else None):
            retry_locked(client.set_terminated, run.info.run_id, status)
            ended.append(run.info.run_id)
    return ended


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    retry_locked(mlflow.log_params, {k: ("None" if v is None else v) for k, v in params.items()})


def log_metrics(values: Mapping[str, float], prefix: str = "", step: int | None = None) -> None:
    import math

    import mlflow

    clean = {f"{prefix}{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    if clean:
        retry_locked(mlflow.log_metrics, clean, step=step)


def log_json(obj: Any, name: str) -> None:
    import mlflow

    retry_locked(mlflow.log_dict, json.loads(json.dumps(obj, default=str)), name)


def log_table(frame: Any, name: str) -> None:
    """Log a pandas DataFrame as a CSV artifact (floats written at full precision)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        frame.to_csv(path, index=False)
        retry_locked(mlflow.log_artifact, str(path))
