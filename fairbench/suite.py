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

Every key, name, option and value is checked when the file is read, before anything is
written. A method option given in the suite is fixed: it leaves the search space and the
studies and final runs use it as given. A file the suite names (``pretrained_file``) is
resolved relative to the suite's folder and must lie inside it.

Re-running a suite resumes it: finished studies run no trial and finished seeds are skipped.
Several workers may run one suite together: each final run is claimed (created RUNNING, under
the study's lock) before it is trained, so no seed is trained twice; a claim whose worker died
is marked KILLED and the seed trained again.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from fairbench import options, registry, tracking
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
PRUNERS = ("median", "hyperband", "none")
# Set on the command line, never in a suite: where results go and where prepared data lives.
MACHINE_KEYS = {"results_dir", "tracking_uri", "data_dir"}
RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)} - {
    "method",
    "dataset",
    "method_options",
    "dataset_options",
    "train",
    *MACHINE_KEYS,
}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
HINTS = {**typing.get_type_hints(RunConfig), **typing.get_type_hints(TrainConfig, include_extras=True)}


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


def conforms(value: Any, annotation: Any) -> bool:
    """Whether a YAML value has the type ``annotation`` names (ints count as floats, bools as neither)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(conforms(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _plugin_options(path: Path, kind: str, name: str, given: Any, cls: type) -> dict[str, Any]:
    """A method's or dataset's options from the suite, checked by name, type and range."""
    where = f"{path}: {kind}s: {name}"
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise FairbenchError(f"{where}: options must be a mapping option -> value, e.g. {{lambda_nir: 0.5}}")
    declared = options.declared(cls)
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    for key, value in given.items():
        if key not in declared:
            raise FairbenchError(f"{where}: no option '{key}'; options: {', '.join(declared) or 'none'}")
        if key in hints and not conforms(value, hints[key]):
            raise FairbenchError(f"{where}: option '{key}' = {value!r} is not a valid {hints[key]}")
    options.validate(cls, dict(given), f"{kind} '{name}' in {path}")
    return dict(given)


def _names(path: Path, data: dict[str, Any], key: str, kind: str) -> dict[str, dict[str, Any]]:
    value = data[key]
    if isinstance(value, list):
        value = dict.fromkeys(value)
    if not isinstance(value, dict) or not value:
        raise FairbenchError(f"{path}: '{key}' must be a non-empty list of names or a mapping name -> options")
    found = {}
    for name, given in value.items():
        kinds = registry.methods if kind == "method" else registry.datasets
        try:
            cls = kinds.get(str(name))
        except FairbenchError as exc:
            raise FairbenchError(f"{path}: {key}: {exc}") from None
        found[str(name)] = _plugin_options(path, kind, str(name), given, cls)
    return found


def _integer(path: Path, key: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise FairbenchError(f"{path}: '{key}' must be a whole number{bound}, not {value!r}")
    return value


def _run_knobs(path: Path, run: Any) -> dict[str, Any]:
    if not isinstance(run, dict):
        raise FairbenchError(f"{path}: 'run' must be a mapping knob -> value")
    machine = set(run) & MACHINE_KEYS
    if machine:
        raise FairbenchError(
            f"{path}: run: {', '.join(sorted(machine))} belong(s) on the command line "
            "(--results-dir, --tracking-uri, $FAIRBENCH_DATA), not in a suite"
        )
    bad = set(run) - RUN_KEYS - TRAIN_KEYS
    if bad:
        raise FairbenchError(
            f"{path}: run: unknown knob(s) {', '.join(sorted(bad))}; knobs: {', '.join(sorted(RUN_KEYS | TRAIN_KEYS))}"
        )
    out = dict(run)
    for key, value in run.items():
        if not conforms(value, HINTS[key]):
            raise FairbenchError(f"{path}: run: {key} = {value!r} is not a valid {HINTS[key]}")
        options.check(value, HINTS[key], f"{path}: run: {key}")
    if out.get("pretrained_file") is not None:
        folder = path.resolve().parent
        target = (folder / out["pretrained_file"]).resolve()
        if not target.is_relative_to(folder):
            raise FairbenchError(
                f"{path}: run: pretrained_file {out['pretrained_file']} lies outside the suite's folder {folder}; "
                "put the checkpoint beside the suite"
            )
        out["pretrained_file"] = str(target)
    return out


def load(path: str | Path) -> Suite:
    """Read and check a suite file; every problem names the file, the field and the fix."""
    from fairbench.tuning import direction

    path = Path(path)
    if not path.is_file():
        raise FairbenchError(f"{path}: no such suite file; suites are YAML files such as benchmarks/smoke.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FairbenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FairbenchError(f"{path}: a suite is a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise FairbenchError(
            f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; keys: {', '.join(sorted(SUITE_KEYS))}"
        )
    for key in ("name", "datasets", "methods"):
        if key not in data:
            raise FairbenchError(f"{path}: missing '{key}'")
    if not isinstance(data["name"], (str, int)) or isinstance(data["name"], bool):
        raise FairbenchError(f"{path}: 'name' must be a text such as smoke")
    name = tracking.safe_name(str(data["name"]), f"{path}: suite name")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds:
        raise FairbenchError(f"{path}: 'seeds' must be a non-empty list of whole numbers, e.g. [0, 1, 2]")
    seeds = [_integer(path, "seeds", s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise FairbenchError(f"{path}: 'seeds' lists a seed twice: {seeds}")
    objective = data.get("objective", "val/auc")
    pruner = data.get("pruner", "median")
    if pruner not in PRUNERS:
        raise FairbenchError(f"{path}: 'pruner' must be one of {', '.join(PRUNERS)}, not {pruner!r}")
    suite = Suite(
        name=name,
        trials=_integer(path, "trials", data.get("trials", 20), low=1),
        seeds=seeds,
        objective=str(objective),
        pruner=pruner,
        sampler_seed=_integer(path, "sampler_seed", data.get("sampler_seed", 0)),
        datasets=_names(path, data, "datasets", "dataset"),
        methods=_names(path, data, "methods", "method"),
        run=_run_knobs(path, data.get("run") or {}),
    )
    for dataset in suite.datasets:
        try:
            direction(suite.objective, dict(registry.datasets.get(dataset).attributes))
        except FairbenchError as exc:
            raise FairbenchError(f"{path}: objective: {exc}") from None
    return suite


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


def _cell_runs(client: Any, suite: Suite, dataset: str, method: str) -> list[Any]:
    ids = [e.experiment_id for e in tracking.retry_locked(client.search_experiments)]
    if not ids:
        return []
    query = tracking.tag_filter(kind="run", suite=suite.name, dataset=dataset, method=method)
    return tracking.retry_locked(client.search_runs, ids, filter_string=query, max_results=50000)


def claim_seed(suite: Suite, dataset: str, method: str, experiment: str) -> tuple[int | None, str | None, dict]:
    """Under the cell's lock: end dead workers' runs, then claim the first seed that has neither a
    FINISHED nor a live RUNNING run, by creating its run. Returns (seed, run id, state of the cell)."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = _cell_runs(client, suite, dataset, method)
    ended = set(tracking.end_orphans(client, runs))
    finished, running = set(), set()
    for run in runs:
        seed = int(run.data.tags.get(f"{tracking.TAG_PREFIX}seed", -1))
        if run.info.status == "FINISHED":
            finished.add(seed)
        elif run.info.status == "RUNNING" and run.info.run_id not in ended:
            running.add(seed)
    state = {"finished": finished, "running": running, "ended": len(ended)}
    pending = [s for s in suite.seeds if s not in finished | running]
    if not pending:
        return None, None, state
    seed = pending[0]
    tags = tracking.base_tags("run", method=method, dataset=dataset, seed=seed, suite=suite.name)
    tags[tracking.HEARTBEAT_TAG] = str(int(time.time()))
    run = tracking.retry_locked(client.create_run, experiment, run_name=f"{method}-{dataset}-s{seed}", tags=tags)
    return seed, run.info.run_id, state


def run_suite(
    suite: Suite,
    results_dir: str,
    tracking_uri: str | None = None,
    storage: str | None = None,
    progress: bool = False,
    say=print,
    heartbeat_interval: int = tracking.Heartbeat.interval,
    grace_period: int = tracking.Heartbeat.grace,
) -> dict[str, int]:
    """Tune every cell, retrain the best configuration on every seed; returns what was trained."""
    import mlflow

    from fairbench.experiment import run_experiment
    from fairbench.tuning import TuneConfig, study_lock, tune

    uri = tracking.resolve_tracking_uri(results_dir, tracking_uri)
    tag = {f"{tracking.TAG_PREFIX}suite": suite.name}
    counts = {"trials": 0, "runs": 0, "skipped_runs": 0, "elsewhere": 0, "orphans": 0}
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
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
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
            experiment = tracking.experiment_id(dataset, uri, results_dir)
            mine: set[int] = set()
            for _ in range(len(suite.seeds) + 1):
                with study_lock(study.storage_url(), study.name()):
                    seed, run_id, state = claim_seed(suite, dataset, method, experiment)
                counts["orphans"] += state["ended"]
                if seed is None:
                    break
                config = dataclasses.replace(
                    base_config(suite, dataset, method, results_dir, tracking_uri),
                    train=dataclasses.replace(base.train, seed=seed, **train_params),
                )
                config.method_options.update(params)
                try:
                    with tracking.claimed(run_id):
                        run_experiment(
                            config,
                            progress=progress,
                            extra_tags={**tag, f"{tracking.TAG_PREFIX}best_trial": str(result.best[0]["trial"])},
                        )
                finally:
                    client = mlflow.MlflowClient()
                    if tracking.retry_locked(client.get_run, run_id).info.status == "RUNNING":
                        tracking.retry_locked(client.set_terminated, run_id, "FAILED")
                mine.add(seed)
                counts["runs"] += 1
            counts["skipped_runs"] += len(state["finished"] - mine)
            counts["elsewhere"] += len(state["running"])
    return counts
