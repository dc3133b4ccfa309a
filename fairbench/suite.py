"""Suites: datasets x methods, each tuned with the same budget, retrained on K seeds, compared.

A suite is a YAML file (see benchmarks/smoke.yaml)::

    name: smoke                 # tags every run; names the studies <name>-<dataset>-<method>
    trials: 2                   # the tuning budget, equal for every method
    seeds: [0, 1]               # final runs with the best parameters, one per seed
    objective: val/auc          # validation metrics only
    pruner: median              # median | hyperband | none
    datasets: {synthetic: {n_train: 96}}   # dataset -> dataset options
    methods: {erm: {}, nir: {}}            # method -> fixed method options (not tuned)
    run: {backbone: resnet18, epochs: 20}  # any run or trainer knob

Re-running a suite resumes it: finished studies run no trial and finished seeds are skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fairbench import tracking
from fairbench.config import RunConfig
from fairbench.errors import FairbenchError
from fairbench.trainer import TrainConfig

SUITE_KEYS = {
    "name",
    "description",
    "trials",
    "seeds",
    "objective",
    "pruner",
    "sampler_seed",
    "datasets",
    "methods",
    "run",
}
RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)} - {
    "method",
    "dataset",
    "method_options",
    "dataset_options",
    "train",
}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}


@dataclass
class Suite:
    name: str
    trials: int
    seeds: list[int]
    objective: str
    pruner: str
    sampler_seed: int
    datasets: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    run: dict[str, Any]


def load(path: str | Path) -> Suite:
    """Read and check a suite file; every problem names the file, the field and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FairbenchError(f"{path}: no such suite file; suites are YAML files such as benchmarks/smoke.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FairbenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FairbenchError(f"{path}: a suite is a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise FairbenchError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; keys: {', '.join(sorted(SUITE_KEYS))}"
        )
    for key in ("name", "datasets", "methods"):
        if key not in data:
            raise FairbenchError(f"{path}: missing '{key}'")
    run = data.get("run") or {}
    bad = set(run) - RUN_KEYS - TRAIN_KEYS
    if bad:
        raise FairbenchError(
            f"{path}: run: unknown knob(s) {', '.join(sorted(bad))}; knobs: {', '.join(sorted(RUN_KEYS | TRAIN_KEYS))}"
        )

    def mapping(key: str) -> dict[str, dict[str, Any]]:
        value = data[key]
        if isinstance(value, list):
            return {name: {} for name in value}
        if not isinstance(value, dict):
            raise FairbenchError(f"{path}: '{key}' must be a list of names or a mapping name -> options")
        return {name: dict(options or {}) for name, options in value.items()}

    return Suite(
        name=str(data["name"]),
        trials=int(data.get("trials", 20)),
        seeds=[int(s) for s in data.get("seeds", [0, 1, 2])],
        objective=str(data.get("objective", "val/auc")),
        pruner=str(data.get("pruner", "median")),
        sampler_seed=int(data.get("sampler_seed", 0)),
        datasets=mapping("datasets"),
        methods=mapping("methods"),
        run=dict(run),
    )


def base_config(suite: Suite, dataset: str, method: str, results_dir: str, tracking_uri: str | None) -> RunConfig:
    train = TrainConfig(**{k: v for k, v in suite.run.items() if k in TRAIN_KEYS})
    knobs = {k: v for k, v in suite.run.items() if k in RUN_KEYS}
    knobs.update(results_dir=results_dir, tracking_uri=tracking_uri)
    return RunConfig(
        method=method,
        dataset=dataset,
        method_options=dict(suite.methods[method]),
        dataset_options=dict(suite.datasets[dataset]),
        train=train,
        **knobs,
    )


def _finished_seeds(suite: Suite, dataset: str, method: str, tracking_uri: str) -> set[int]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return set()
    query = (
        f"tags.`fairbench.kind` = 'run' and tags.`fairbench.suite` = '{suite.name}' and "
        f"tags.`fairbench.dataset` = '{dataset}' and tags.`fairbench.method` = '{method}' and "
        "attributes.status = 'FINISHED'"
    )
    return {int(r.data.tags["fairbench.seed"]) for r in client.search_runs(ids, filter_string=query)}


def run_suite(
    suite: Suite,
    results_dir: str,
    tracking_uri: str | None = None,
    storage: str | None = None,
    progress: bool = False,
    say=print,
) -> dict[str, int]:
    """Tune every cell, retrain the best configuration on every seed; returns what was trained."""
    from fairbench.experiment import run_experiment
    from fairbench.tuning import TuneConfig, tune

    uri = tracking.resolve_tracking_uri(results_dir, tracking_uri)
    tag = {f"{tracking.TAG_PREFIX}suite": suite.name}
    counts = {"trials": 0, "runs": 0, "skipped_runs": 0}
    for dataset in suite.datasets:
        for method in suite.methods:
            base = base_config(suite, dataset, method, results_dir, tracking_uri)
            study = TuneConfig(
                base=base,
                trials=suite.trials,
                objectives=[suite.objective],
                storage=storage,
                study_name=f"{suite.name}-{dataset}-{method}",
                pruner=suite.pruner,
                sampler_seed=suite.sampler_seed,
                extra_tags=tag,
            )
            result = tune(study, progress=progress)
            counts["trials"] += result.new_trials
            if not result.best:
                raise FairbenchError(f"study {study.name()} has no complete trial; raise 'trials' in the suite")
            params = dict(result.best[0]["params"])
            train_params = {k: params.pop(k) for k in ("lr", "weight_decay")}
            say(
                f"{dataset} / {method}: best {suite.objective} = {result.best[0]['values'][suite.objective]:.4f} "
                f"with {result.best[0]['params']}"
            )
            done = _finished_seeds(suite, dataset, method, uri)
            for seed in suite.seeds:
                if seed in done:
                    counts["skipped_runs"] += 1
                    continue
                config = dataclasses.replace(
                    base_config(suite, dataset, method, results_dir, tracking_uri),
                    train=dataclasses.replace(base.train, seed=seed, **train_params),
                )
                config.method_options.update(params)
                run_experiment(
                    config,
                    progress=progress,
                    extra_tags={**tag, f"{tracking.TAG_PREFIX}best_trial": str(result.best[0]["trial"])},
                )
                counts["runs"] += 1
    return counts
