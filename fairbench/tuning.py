"""Optuna studies over a method's search space, on validation metrics only.

Every method gets the same budget: ``trials`` finished trials (complete or pruned) per study,
over its own ``search_space(trial)`` plus the shared learning rate and weight decay. The study
lives in an Optuna storage (a URL: embedded SQLite by default, PostgreSQL to share it between
machines); the same command resumes it, and several workers started on one storage share it.

Each trial is one MLflow run (kind ``trial``) nested under one run per study (kind ``study``).
Trials never score the test split.

Sampling is reproducible per trial: the sampler that draws trial ``n`` is seeded from
``sampler_seed`` and ``n``, so a resumed study draws what an uninterrupted one would, and
workers sharing a study draw different points.

Options given in the base configuration (``-o`` or a suite's method options) are fixed: they are
taken out of the search space and used as given. Objective directions come from
:data:`DIRECTIONS`, a table per metric, never from the metric's spelling.

Workers die: every trial records its worker and beats a heartbeat in the storage (Optuna's
heartbeat, ``heartbeat_interval`` / ``grace_period``). Before it asks for a trial a worker fails
the trials of dead workers (a worker on the same machine whose process is gone at once, others
once their heartbeat is older than the grace period), queues each for one retry with the same
parameters, and marks their MLflow runs KILLED, so a dead worker never holds the budget.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fairbench import options, registry, tracking
from fairbench.config import RunConfig
from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.experiment import resolve, run_experiment

COUNTED = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
WORKER_ATTR = "worker"

# Direction of every metric a tuning objective may name (fairbench.metrics), by its position:
# ``val/<metric>``, ``val/<attribute>/<metric>`` and ``val/<attribute>/<metric>/<group>``.
DIRECTIONS: dict[str, dict[str, str]] = {
    "overall": {
        "auc": "maximize",
        "ap": "maximize",
        "accuracy": "maximize",
        "tpr": "maximize",
        "fpr": "minimize",
        "bce": "minimize",
        "ece": "minimize",
        "epoch_auc": "maximize",
    },
    "attribute": {
        "auc_gap": "minimize",
        "tpr_gap": "minimize",
        "fpr_gap": "minimize",
        "eo_gap": "minimize",
        "dp_gap": "minimize",
        "worst_auc": "maximize",
        "es_auc": "maximize",
    },
    "group": {"auc": "maximize", "tpr": "maximize", "fpr": "minimize", "ece": "minimize"},
}


@dataclass
class TuneConfig:
    """A study: the base run configuration, the budget and how to search."""

    base: RunConfig
    trials: int = 20
    objectives: list[str] = field(default_factory=lambda: ["val/auc"])
    storage: str | None = None
    study_name: str | None = None
    pruner: Literal["median", "hyperband", "none"] = "median"
    timeout: float | None = None
    sampler_seed: int = 0
    extra_tags: dict[str, str] = field(default_factory=dict)
    heartbeat_interval: int = tracking.Heartbeat.interval
    grace_period: int = tracking.Heartbeat.grace

    def name(self) -> str:
        return tracking.safe_name(self.study_name or f"{self.base.method}-{self.base.dataset}", "study name")

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.base.results_dir).resolve() / 'optuna.db'}"


@dataclass
class TuneResult:
    study: Any
    best: list[dict[str, Any]]  # one entry (single objective) or the Pareto front
    parent_run_id: str
    new_trials: int


def direction(objective: str, attributes: dict[str, list[str]] | None = None) -> str:
    """``minimize`` or ``maximize`` for a validation metric, from :data:`DIRECTIONS`.

    With ``attributes`` (attribute -> groups), attribute and group names are checked too.
    """
    parts = objective.split("/")
    if parts[0] != "val" or len(parts) < 2:
        raise FairbenchError(
            f"objective '{objective}': tuning uses validation metrics only; use e.g. val/auc or val/sex/eo_gap"
        )
    where = {2: "overall", 3: "attribute", 4: "group"}.get(len(parts))
    table = DIRECTIONS.get(where or "", {})
    metric = parts[2] if len(parts) >= 3 else parts[1]
    if where is None or metric not in table:
        known = ", ".join(
            [f"val/{m}" for m in DIRECTIONS["overall"]]
            + [f"val/<attr>/{m}" for m in DIRECTIONS["attribute"]]
            + [f"val/<attr>/{m}/<group>" for m in DIRECTIONS["group"]]
        )
        raise FairbenchError(f"objective '{objective}' is not a metric fairbench can tune; use one of: {known}")
    if attributes is not None and len(parts) >= 3:
        if parts[1] not in attributes:
            raise FairbenchError(
                f"objective '{objective}': no attribute '{parts[1]}'; attributes: {', '.join(attributes)}"
            )
        if len(parts) == 4 and parts[3] not in attributes[parts[1]]:
            raise FairbenchError(
                f"objective '{objective}': attribute '{parts[1]}' has no group '{parts[3]}'; "
                f"groups: {', '.join(attributes[parts[1]])}"
            )
    return table[metric]


def shared_space(trial: Any) -> dict[str, float]:
    """The knobs every method tunes alike: learning rate and weight decay (log scale)."""
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    }


def check_objectives(objectives: list[str], attributes: dict[str, list[str]]) -> list[str]:
    """The direction of each objective; an unknown metric, attribute or group is an error."""
    return [direction(name, attributes) for name in objectives]


class FixedOptions:
    """A trial whose suggestions for fixed option names return the fixed value without sampling,
    so a fixed option is neither searched nor recorded among the trial's tuned parameters."""

    def __init__(self, trial: Any, fixed: dict[str, Any]) -> None:
        self._trial = trial
        self._fixed = fixed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def _suggest(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        if name in self._fixed:
            return self._fixed[name]
        return getattr(self._trial, kind)(name, *args, **kwargs)

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._suggest("suggest_float", name, *args, **kwargs)

    def suggest_int(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._suggest("suggest_int", name, *args, **kwargs)

    def suggest_categorical(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._suggest("suggest_categorical", name, *args, **kwargs)


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


_ENGINES: dict[str, Any] = {}


@contextlib.contextmanager
def study_lock(storage_url: str, name: str) -> Iterator[None]:
    """Serialise 'count, then claim' between the workers of study ``name``.

    SQLite: a lock file beside the database (workers on one machine). PostgreSQL: a session
    advisory lock in the database itself, so workers on many machines take turns; the server
    releases it if the worker dies. Other storages are not locked (the budget may then be
    exceeded by one trial per extra worker at the very end).
    """
    path = tracking.sqlite_path(storage_url)
    if path is not None:
        with tracking.file_lock(path.with_suffix(".lock")):
            yield
        return
    if not storage_url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    key = zlib.crc32(name.encode()) - 2**31
    try:
        if storage_url not in _ENGINES:
            _ENGINES[storage_url] = sqlalchemy.create_engine(
                storage_url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10}
            )
        conn = _ENGINES[storage_url].connect()
    except Exception as exc:
        raise storage_error(storage_url, exc) from None
    with conn:
        conn.execute(sqlalchemy.text("select pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("select pg_advisory_unlock(:key)"), {"key": key})


def open_storage(url: str, heartbeat_interval: int, grace_period: int) -> Any:
    """Optuna's RDB storage at ``url`` with heartbeats on, a dead worker's trial retried once.

    Call under :func:`study_lock`: a new SQLite database is created beside its final name and
    moved into place, so a worker killed while creating it leaves none half-built."""
    import optuna

    if grace_period <= heartbeat_interval:
        raise FairbenchError(
            f"--grace-period {grace_period} must exceed --heartbeat-interval {heartbeat_interval} "
            "(a live worker beats once per interval)"
        )
    engine: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    path = tracking.sqlite_path(url)
    try:
        if path is not None and not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            optuna.storages.RDBStorage(f"sqlite:///{tmp}").engine.dispose()
            os.replace(tmp, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as exc:
        raise storage_error(url, exc) from None


def storage_error(url: str, exc: Exception) -> FairbenchError:
    """One line saying which storage failed and why, without its password."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return FairbenchError(
        f"cannot open the Optuna storage {tracking.redact(url)}: {tracking.redact(first)}; fix --storage "
        "(e.g. sqlite:///results/optuna.db or postgresql+psycopg://user:password@host/db)"
    )


def _trial_id(study: Any, number: int) -> int:
    storage = study._storage
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def reap_dead_trials(study: Any) -> list[int]:
    """Fail the RUNNING trials of dead workers and queue each for one retry; returns their numbers.

    Optuna's heartbeat check covers every worker; a worker on this machine whose process is
    gone is failed at once, without waiting for the grace period.
    """
    import optuna

    running = optuna.trial.TrialState.RUNNING
    before = {t.number for t in study.get_trials(deepcopy=False, states=(running,))}
    storage = study._storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    for trial in study.get_trials(deepcopy=False, states=(running,)):
        if tracking.worker_alive(trial.user_attrs.get(WORKER_ATTR)) is False:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(_trial_id(study, trial.number), state=optuna.trial.TrialState.FAIL):
                    retry(study, copy.deepcopy(trial))
    return sorted(before - {t.number for t in study.get_trials(deepcopy=False, states=(running,))})


def end_dead_trial_runs(name: str) -> list[str]:
    """Mark the MLflow runs of dead workers' trials of study ``name`` KILLED."""
    import mlflow

    client = mlflow.MlflowClient()
    ids = [e.experiment_id for e in tracking.retry_locked(client.search_experiments)]
    if not ids:
        return []
    runs = tracking.retry_locked(
        client.search_runs, ids, filter_string=tracking.tag_filter(status="RUNNING", study=name, kind="trial")
    )
    return tracking.end_orphans(client, runs)


@contextlib.contextmanager
def heartbeat(study: Any, number: int, interval: int) -> Iterator[None]:
    """Record trial ``number``'s heartbeat in the storage now and every ``interval`` s until the block ends."""
    storage = study._storage
    trial_id = _trial_id(study, number)
    storage.record_heartbeat(trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _parent_run(study: Any, cfg: TuneConfig, base: RunConfig) -> str:
    """The study's MLflow run (kind ``study``), created once and reused by every worker."""
    import mlflow

    parent = study.user_attrs.get("mlflow_run_id")
    client = mlflow.MlflowClient()
    if parent is not None:
        with contextlib.suppress(Exception):
            tracking.retry_locked(client.update_run, parent, status="RUNNING")
            return parent
    experiment = tracking.experiment_id(
        base.dataset, tracking.resolve_tracking_uri(base.results_dir, base.tracking_uri), base.results_dir
    )
    tags = tracking.base_tags(
        "study",
        method=base.method,
        dataset=base.dataset,
        study=cfg.name(),
        **{k.removeprefix(tracking.TAG_PREFIX): v for k, v in cfg.extra_tags.items()},
    )
    run = client.create_run(experiment, run_name=f"study-{cfg.name()}", tags=tags)
    params = {
        "trials": cfg.trials,
        "objectives": ",".join(cfg.objectives),
        "pruner": cfg.pruner,
        "sampler_seed": cfg.sampler_seed,
        "storage": cfg.storage_url(),
        **base.params(),
    }
    for k, v in params.items():
        client.log_param(run.info.run_id, k, "None" if v is None else v)
    study.set_user_attr("mlflow_run_id", run.info.run_id)
    return run.info.run_id


def _counted(study: Any) -> int:
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, s) for s in COUNTED)
    return len(study.get_trials(deepcopy=False, states=states))


def tune(cfg: TuneConfig, progress: bool = False) -> TuneResult:
    """Run (or resume) the study until it holds ``cfg.trials`` finished trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = cfg.name()
    fixed = dict(cfg.base.method_options)
    base = resolve(cfg.base)
    method_cls = registry.methods.get(base.method)
    unknown = set(fixed) - set(options.declared(method_cls))
    if unknown:
        raise UnknownNameError(f"method '{base.method}' has no option(s) {', '.join(sorted(unknown))}")
    options.validate(method_cls, fixed, f"method '{base.method}'")
    directions = check_objectives(cfg.objectives, dict(registry.datasets.get(base.dataset).attributes))
    multi = len(cfg.objectives) > 1
    tracking.Heartbeat.interval, tracking.Heartbeat.grace = cfg.heartbeat_interval, cfg.grace_period
    uri = tracking.resolve_tracking_uri(base.results_dir, base.tracking_uri)
    tracking.check_reachable(uri)
    storage_url = cfg.storage_url()
    sqlite = tracking.sqlite_path(storage_url)
    if sqlite is not None:
        sqlite.parent.mkdir(parents=True, exist_ok=True)
    with study_lock(storage_url, name):
        storage = open_storage(storage_url, cfg.heartbeat_interval, cfg.grace_period)
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            directions=directions,
            pruner=optuna.pruners.NopPruner() if multi else _pruner(cfg.pruner),
            load_if_exists=True,
        )
        if [d.name.lower() for d in study.directions] != directions:
            raise FairbenchError(
                f"study '{name}' exists with other objectives; pass another --study-name or the same objectives"
            )
        tracking.use_store(uri)
        parent = _parent_run(study, cfg, base)
    started = time.monotonic()
    new = 0
    status = "FINISHED"
    try:
        while cfg.timeout is None or time.monotonic() - started < cfg.timeout:
            with study_lock(storage_url, name):
                reap_dead_trials(study)
                end_dead_trial_runs(name)
                if _counted(study) >= cfg.trials:
                    break
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    trial = study.ask()
                trial.set_user_attr(WORKER_ATTR, tracking.worker_id())
            study.sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed * 1_000_003 + trial.number)
            with heartbeat(study, trial.number, cfg.heartbeat_interval):
                _run_trial(study, trial, cfg, base, method_cls, parent, multi, progress, fixed)
            new += 1
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close_parent(study, cfg, parent, multi, status)
    return TuneResult(study=study, best=best_trials(study, cfg.objectives), parent_run_id=parent, new_trials=new)


def _run_trial(study, trial, cfg: TuneConfig, base: RunConfig, method_cls, parent: str, multi: bool, progress, fixed):
    import optuna

    shared = shared_space(trial)
    own = method_cls.search_space(FixedOptions(trial, fixed))
    config = replace(
        copy.deepcopy(base),
        method_options={**base.method_options, **own},
        train=replace(base.train, **shared),
        bootstrap=0,
    )

    def report(epoch: int, values: dict[str, float]) -> None:
        if multi:
            return
        trial.report(values["val/epoch_auc"], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    tags = {
        "mlflow.parentRunId": parent,
        f"{tracking.TAG_PREFIX}study": study.study_name,
        f"{tracking.TAG_PREFIX}trial": str(trial.number),
        **cfg.extra_tags,
    }
    try:
        result = run_experiment(
            config,
            on_epoch=report,
            progress=progress,
            kind="trial",
            extra_tags=tags,
            score_test=False,
            finished_on=(optuna.TrialPruned,),
        )
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    values = [result.val.values.get(o.removeprefix("val/"), math.nan) for o in cfg.objectives]
    if any(math.isnan(v) for v in values):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise FairbenchError(f"trial {trial.number}: objective(s) {cfg.objectives} missing from the validation metrics")
    trial.set_user_attr("mlflow_run_id", result.run_id)
    study.tell(trial, values if multi else values[0])


def best_trials(study: Any, objectives: list[str]) -> list[dict[str, Any]]:
    """The best trial (single objective) or every trial on the Pareto front."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return []
    chosen = study.best_trials if len(objectives) > 1 else [study.best_trial]
    return [
        {
            "trial": t.number,
            "values": dict(zip(objectives, t.values, strict=True)),
            "params": t.params,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        }
        for t in sorted(chosen, key=lambda t: t.number)
    ]


def _close_parent(study: Any, cfg: TuneConfig, parent: str, multi: bool, status: str) -> None:
    """Record the best trial(s) on the study's run; it is FINISHED once the budget is spent."""
    import mlflow

    client = mlflow.MlflowClient()
    best = best_trials(study, cfg.objectives)
    with contextlib.suppress(Exception):
        tracking.retry_locked(client.log_dict, parent, best, "best_trials.json")
        if best and not multi:
            client.log_metric(parent, "best/" + cfg.objectives[0], best[0]["values"][cfg.objectives[0]])
        if multi and best:
            import matplotlib.pyplot as plt

            fig = pareto_figure(study, cfg.objectives)
            client.log_figure(parent, fig, "pareto_front.png")
            plt.close(fig)
    tracking.retry_locked(client.set_terminated, parent, status)


def pareto_figure(study: Any, objectives: list[str]) -> Any:
    """All complete trials in the plane of the first two objectives, the Pareto front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for on_front, style in ((False, {"color": "0.6"}), (True, {"color": "C3"})):
        pts = [t for t in done if (t.number in front) == on_front]
        ax.scatter(
            [t.values[0] for t in pts],
            [t.values[1] for t in pts],
            label="Pareto front" if on_front else "other trials",
            **style,
        )
    ax.set_xlabel(objectives[0])
    ax.set_ylabel(objectives[1])
    ax.set_title(study.study_name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_front(result: TuneResult, folder: Path, objectives: list[str]) -> list[Path]:
    """Write the best trial(s) as JSON, and for several objectives the Pareto plot as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    name = result.study.study_name
    paths = [folder / f"{name}_best.json"]
    paths[0].write_text(json.dumps(result.best, indent=2))
    if len(objectives) > 1 and result.best:
        import matplotlib.pyplot as plt

        fig = pareto_figure(result.study, objectives)
        paths.append(folder / f"{name}_pareto.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
