"""One experiment end to end: data -> backbone -> method -> trainer -> metrics -> MLflow.

The CLI's ``run``, tuning trials and suites all call :func:`run_experiment` with different
configurations; none of them reaches inside the trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from fairbench import attributes as crossed
from fairbench import options, registry, tracking
from fairbench.analysis import inject_label_bias, neural_collapse_by_group, neuron_incidence, parse_label_bias
from fairbench.config import RunConfig
from fairbench.errors import FairbenchError
from fairbench.metrics import THRESHOLD_RULES, Report, evaluate, select_threshold
from fairbench.model import create_backbone
from fairbench.trainer import EpochCallback, FitResult, Predictions, fit, seed_everything


@dataclass
class ExperimentResult:
    run_id: str
    tracking_uri: str
    fit: FitResult
    attributes: dict[str, list[str]]
    val: Report
    test: Report | None


def _check_threshold(rule: str) -> None:
    try:
        value = float(rule)
    except ValueError:
        if rule not in THRESHOLD_RULES:
            raise FairbenchError(f"--threshold {rule}: use a number in [0, 1] such as 0.5, 'youden' or 'f1'") from None
        return
    if not 0.0 <= value <= 1.0:  # also refuses nan and inf
        raise FairbenchError(f"--threshold {rule}: a fixed threshold is a probability in [0, 1], e.g. 0.5")


def predictions_frame(pred: Predictions, attributes: list[str]) -> pd.DataFrame:
    """The saved predictions table: index, score, label and one column of codes per attribute."""
    frame = pd.DataFrame({"index": np.arange(len(pred.scores)), "score": pred.scores, "label": pred.labels})
    for i, attr in enumerate(attributes):
        frame[attr] = np.asarray(pred.attrs)[:, i]
    return frame


def resolve(config: RunConfig) -> RunConfig:
    """A copy of ``config`` with names validated and every default filled in (plugin options,
    image size, training attribute)."""
    method_cls = registry.methods.get(config.method)
    dataset_cls = registry.datasets.get(config.dataset)
    _check_threshold(config.threshold)
    if config.label_bias:
        parse_label_bias(config.label_bias, dataset_cls.attributes)
    attributes = list(dataset_cls.attributes)
    attribute = config.attribute
    if attribute is not None:
        attribute = crossed.resolve(attribute, dataset_cls.attributes, config.dataset)
    return replace(
        config,
        method_options={**options.defaults(method_cls), **config.method_options},
        dataset_options={**options.defaults(dataset_cls), **config.dataset_options},
        attribute=attribute or (attributes[0] if attributes else None),
        image_size=config.image_size or dataset_cls.default_image_size,
    )


def run_experiment(
    config: RunConfig,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    kind: str = "run",
    extra_tags: dict[str, str] | None = None,
    score_test: bool = True,
    finished_on: tuple[type[BaseException], ...] = (),
) -> ExperimentResult:
    """Train and evaluate one configuration, recording everything in one MLflow run.

    Tuning trials pass ``score_test=False``: the test split is then neither predicted nor
    logged, so no tuning decision can see it.
    """
    config = resolve(config)
    method_cls = registry.methods.get(config.method)
    dataset = registry.datasets.get(config.dataset)(**config.dataset_options)
    data_dir = config.resolved_data_dir()
    if not dataset.is_prepared(data_dir):
        raise FairbenchError(
            f"dataset '{config.dataset}' is not prepared in {data_dir}: run "
            f"'fairbench prepare {config.dataset} --source <download folder>' first"
        )
    seed_everything(config.train.seed)
    splits = dataset.load(data_dir, config.image_size)
    splits = replace(splits, label_names=tuple(dataset.label_names), folder=data_dir / dataset.name)
    # crossings the dataset evaluates by default, and the training attribute when it is one
    splits = crossed.add_crossed(splits, [*dataset.crossings, *filter(None, [config.attribute])])
    flipped = None
    if config.label_bias:
        column, code, fraction = parse_label_bias(config.label_bias, splits.attributes)
        labels, flipped = inject_label_bias(
            splits.train.labels, splits.train.attrs, column, code, fraction, config.train.seed
        )
        splits = replace(splits, train=replace(splits.train, labels=labels))
    backbone = create_backbone(
        config.backbone,
        splits.in_chans,
        pretrained=config.pretrained,
        pretrained_file=config.pretrained_file,
        finetune=config.finetune_spec(),
        image_size=config.image_size,
    )
    uri = tracking.resolve_tracking_uri(config.results_dir, config.tracking_uri)
    experiment = tracking.experiment_id(config.dataset, uri, config.results_dir)
    tags = tracking.base_tags(
        kind,
        method=config.method,
        dataset=config.dataset,
        seed=config.train.seed,
        backbone=config.backbone,
        finetune=config.finetune,
        attribute=config.attribute,
        uses_attributes=method_cls.uses_attributes,
        uses_attributes_at_test=method_cls.attributes_at_test(config.method_options),
    )
    tags.update(extra_tags or {})
    run_name = f"{config.method}-{config.dataset}-s{config.train.seed}"
    with tracking.tracked_run(experiment, run_name, tags, finished_on=finished_on) as run:
        tracking.log_params(config.params())
        tracking.log_json(asdict(config), "config.json")

        if flipped is not None:
            tracking.log_metrics({"label_bias/flipped": len(flipped)})

        def log_epoch(epoch: int, values: dict[str, float]) -> None:
            tracking.log_metrics(values, step=epoch)
            if on_epoch is not None:
                on_epoch(epoch, values)

        def log_collapse(split: str, epoch: int, features, scores, head) -> None:
            part = splits[split]
            values = neural_collapse_by_group(features, part.labels, scores > 0.5, head, part.attrs, splits.attributes)
            tracking.log_metrics(values, prefix=f"nc/{split}/", step=epoch)

        result = fit(
            method_cls,
            config.method_options,
            backbone,
            splits,
            config.attribute,
            config.train,
            on_epoch=log_epoch,
            progress=progress,
            score_test=score_test,
            on_features=log_collapse if config.track_nc else None,
        )
        threshold = select_threshold(result.val.scores, result.val.labels, config.threshold)
        attrs = splits.attributes
        val = evaluate(
            result.val.scores,
            result.val.labels,
            result.val.attrs,
            attrs,
            threshold=threshold,
            min_count=config.min_group_count,
        )
        tracking.log_metrics(val.flat(), prefix="val/")
        tracking.log_metrics(
            {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "train_seconds": result.seconds}
        )
        test = None
        if result.test is not None:
            test = evaluate(
                result.test.scores,
                result.test.labels,
                result.test.attrs,
                attrs,
                threshold=threshold,
                n_bootstrap=config.bootstrap,
                seed=config.train.seed,
                min_count=config.min_group_count,
            )
            tracking.log_metrics(test.flat(), prefix="test/")
            neurons = neuron_incidence(
                result.test_features, result.test.scores, result.test.labels, result.test.attrs, attrs
            )
            tracking.log_json(neurons, "neurons.json")
            tracking.log_metrics(
                {f"{side}/{k}": v for side in ("positive", "negative") for k, v in neurons[side].items()},
                prefix="test/neurons/",
            )
        tracking.log_json({"val": asdict(val), "test": asdict(test) if test else None}, "metrics.json")
        for name, pred in (("val", result.val), ("test", result.test)):
            if pred is not None:
                tracking.log_table(predictions_frame(pred, list(attrs)), f"predictions_{name}.csv")
    return ExperimentResult(run_id=run.info.run_id, tracking_uri=uri, fit=result, attributes=attrs, val=val, test=test)
