"""Neural collapse per subgroup and neuron-incidence concentration: erm vs nir under label bias.

Trains erm and nir on synthetic with ``--label-bias sex=female:0.3`` (on top of the dataset's
own bias) and ``--track-nc``, then tabulates NC1 on the training set per sex over epochs and the
concentration of the positive-prediction incidence on the test set. NC1 weighs both classes
equally (global mean = mean of the class means, Σ_W = average of the per-class covariances;
see fairbench.analysis), so the lower prevalence that label bias gives the female group does
not by itself change its NC1.

Usage: ``python benchmarks/analyses.py [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
from datetime import date

import mlflow
import torch
from _common import emit, machine
from fairbench.datasets.synthetic import Synthetic

from fairbench.analysis import inject_label_bias, parse_label_bias
from fairbench.config import RunConfig
from fairbench.experiment import run_experiment
from fairbench.trainer import TrainConfig

BIAS = "sex=female:0.3"


def train_prevalence(seed: int = 0) -> dict[str, float]:
    """Per sex, the share of positive labels in the training set the runs see (both biases)."""
    splits = Synthetic().load(None, 16)
    column, code, fraction = parse_label_bias(BIAS, splits.attributes)
    labels, _ = inject_label_bias(splits.train.labels, splits.train.attrs, column, code, fraction, seed)
    sex = splits.train.attrs[:, 0]
    return {g: float(labels[sex == c].mean()) for c, g in enumerate(splits.attributes["sex"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="results/benchmark-analyses")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    runs = {}
    for method in ("erm", "nir"):
        config = RunConfig(
            method=method,
            label_bias=BIAS,
            track_nc=True,
            results_dir=args.results_dir,
            train=TrainConfig(epochs=args.epochs, patience=0),
        )
        runs[method] = run_experiment(config, progress=False)
    client = mlflow.MlflowClient(runs["erm"].tracking_uri)
    prevalence = train_prevalence()
    lines = [
        f"## Neural collapse (prevalence-free) and neuron incidence under label bias ({date.today().isoformat()}, "
        f"{machine()}, "
        f"torch {torch.__version__})",
        "",
        f"synthetic with `--label-bias {BIAS}` and the dataset's defaults (validation biased like training), "
        f"resnet18, {args.epochs} epochs without "
        "early stopping, seed 0. NC1 on the training set (its labels include the injected flips), per sex, "
        "with both classes weighted equally (global mean = mean of the class means; Σ_W = average of the "
        "per-class covariances), so it does not move with the group's prevalence:",
        "",
        "| method | group | train prevalence | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |",
        "|" + " --- |" * (3 + args.epochs),
    ]
    for method, result in runs.items():
        for group in ("female", "male"):
            history = sorted(
                client.get_metric_history(result.run_id, f"nc/train/sex/{group}/nc1"), key=lambda m: m.step
            )
            values = " | ".join(f"{m.value:.3g}" for m in history)
            lines.append(f"| {method} | {group} | {prevalence[group]:.3f} | {values} |")
    lines += [
        "",
        "Positive-prediction incidence on the test split (penultimate layer of 512 neurons), and test fairness:",
        "",
        "| method | top-1 share | top-5 share | normalised entropy | test AUC | sex TPR gap | run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, result in runs.items():
        m = client.get_run(result.run_id).data.metrics
        lines.append(
            f"| {method} | {m['test/neurons/positive/top1_share']:.4f} | {m['test/neurons/positive/top5_share']:.4f} "
            f"| {m['test/neurons/positive/entropy']:.4f} | {m['test/auc']:.3f} | {m['test/sex/tpr_gap']:.3f} "
            f"| `{result.run_id[:8]}` |"
        )
    lines.append("")
    emit(lines, args.append)


if __name__ == "__main__":
    main()
