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
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fairbench import registry, tracking
from fairbench.config import RunConfig
from fairbench.errors import FairbenchError
from fairbench.experiment import resolve, run_experiment

MINIMIZE = ("gap", "bce", "ece")
COUNTED = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


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

    def name(self) -> str:
        return self.study_name or f"{self.base.method}-{self.base.dataset}"

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.base.results_dir).resolve() / 'optuna.db'}"


@dataclass
class TuneResult:
    study: Any
    best: list[dict[str, Any]]  # one entry (single objective) or the Pareto front
    parent_run_id: str
    new_trials: int


def direction(objective: str) -> str:
    """Gaps and losses are minimised; AUC-like scores are maximised."""
    return "minimize" if any(objective.endswith(m) for m in MINIMIZE) else "maximize"


def shared_space(trial: Any) -> dict[str, float]:
    """The knobs every method tunes alike: learning rate and weight decay (log scale)."""
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    }


def check_objectives(objectives: list[str], attributes: list[str]) -> None:
    for name in objectives:
        if not name.startswith("val/"):
            raise FairbenchError(
                f"objective '{name}': tuning uses validation metrics only; use e.g. val/auc or val/sex/eo_gap"
            )
        parts = name.split("/")
        if len(parts) == 3 and parts[1] not in attributes:
            raise FairbenchError(f"objective '{name}': no attribute '{parts[1]}'; attributes: {', '.join(attributes)}")


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


@contextlib.contextmanager
def _study_lock(storage_url: str) -> Iterator[None]:
    """Serialise 'count trials, then ask' between workers on one machine (SQLite storages).

    With a shared server storage workers on different machines can overshoot the budget by at
    most one trial each at the very end; on one machine the budget is exact.
    """
    if not storage_url.startswith("sqlite:///"):
        yield
        return
    path = Path(storage_url[len("sqlite:///") :]).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _parent_run(study: Any, cfg: TuneConfig, base: RunConfig) -> str:
    """The study's MLflow run (kind ``study``), created once and reused by every worker."""
    import mlflow

    parent = study.user_attrs.get("mlflow_run_id")
    client = mlflow.MlflowClient()
    if parent is not None:
        with contextlib.suppress(Exception):
            client.update_run(parent, status="RUNNING")
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
    base = resolve(cfg.base)
    method_cls = registry.methods.get(base.method)
    attributes = list(registry.datasets.get(base.dataset).attributes)
    check_objectives(cfg.objectives, attributes)
    multi = len(cfg.objectives) > 1
    storage_url = cfg.storage_url()
    if storage_url.startswith("sqlite:///"):
        Path(storage_url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    with _study_lock(storage_url):
        study = optuna.create_study(
            study_name=cfg.name(),
            storage=storage_url,
            directions=[direction(o) for o in cfg.objectives],
            pruner=optuna.pruners.NopPruner() if multi else _pruner(cfg.pruner),
            load_if_exists=True,
        )
        if [d.name.lower() for d in study.directions] != [direction(o) for o in cfg.objectives]:
            raise FairbenchError(
                f"study '{cfg.name()}' exists with other objectives; pass another --study-name or the same objectives"
            )
        tracking.use_store(tracking.resolve_tracking_uri(base.results_dir, base.tracking_uri))
        parent = _parent_run(study, cfg, base)
    started = time.monotonic()
    new = 0
    status = "FINISHED"
    try:
        while cfg.timeout is None or time.monotonic() - started < cfg.timeout:
            with _study_lock(storage_url):
                if _counted(study) >= cfg.trials:
                    break
                trial = study.ask()
            study.sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed * 1_000_003 + trial.number)
            _run_trial(study, trial, cfg, base, method_cls, parent, multi, progress)
            new += 1
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close_parent(study, cfg, parent, multi, status)
    return TuneResult(study=study, best=best_trials(study, cfg.objectives), parent_run_id=parent, new_trials=new)


def _run_trial(study, trial, cfg: TuneConfig, base: RunConfig, method_cls, parent: str, multi: bool, progress):
    import optuna

    shared = shared_space(trial)
    own = method_cls.search_space(trial)
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
        f"{tracking.TAG_PREFIX}study": cfg.name(),
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
        client.log_dict(parent, best, "best_trials.json")
        if best and not multi:
            client.log_metric(parent, "best/" + cfg.objectives[0], best[0]["values"][cfg.objectives[0]])
        if multi and best:
            import matplotlib.pyplot as plt

            fig = pareto_figure(study, cfg.objectives)
            client.log_figure(parent, fig, "pareto_front.png")
            plt.close(fig)
    client.set_terminated(parent, status)


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
