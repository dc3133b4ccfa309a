"""Median pruner vs no pruner: the same 20-trial study on synthetic, epochs spent and best val AUC.

Both studies use the same sampler seed, so they propose the same first points; the pruner
stops unpromising trials after their first epochs. The configuration is scaled down (32 px,
600 training images) so both studies finish in minutes on a CPU.

Usage: ``python benchmarks/pruning.py [--trials 20] [--method nir] [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date

from _common import emit, machine

from fairbench.config import RunConfig
from fairbench.trainer import TrainConfig
from fairbench.tuning import TuneConfig, tune


def study(pruner: str, trials: int, method: str, results: str) -> dict:
    base = RunConfig(
        method=method,
        dataset_options={"n_train": 600, "n_val": 300, "n_test": 100},
        image_size=32,
        bootstrap=0,
        train=TrainConfig(epochs=8, patience=0, num_workers=0),
        results_dir=results,
    )
    t0 = time.perf_counter()
    result = tune(TuneConfig(base=base, trials=trials, pruner=pruner, study_name=f"pruning-{pruner}"))
    seconds = time.perf_counter() - t0
    finished = [t for t in result.study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    return {
        "pruner": pruner,
        "trials": len(finished),
        "pruned": sum(t.state.name == "PRUNED" for t in finished),
        "epochs": sum(len(t.intermediate_values) for t in finished),
        "best": result.best[0]["values"]["val/auc"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--method", default="nir")
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [study(p, args.trials, args.method, tmp) for p in ("none", "median")]
    none = rows[0]
    lines = [
        f"## Median pruner vs none ({date.today().isoformat()}, {machine()})",
        "",
        f"`{args.method}` on synthetic (600 training images, 32 px, resnet18, up to 8 epochs), {args.trials} trials, "
        "sampler seed 0, objective val AUC:",
        "",
        "| pruner | trials | pruned | epochs spent | epochs vs none | best val AUC | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['pruner']} | {r['trials']} | {r['pruned']} | {r['epochs']} | {r['epochs'] / none['epochs']:.2f} | "
            f"{r['best']:.4f} | {r['seconds']:.0f} s |"
            for r in rows
        ],
        "",
    ]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
