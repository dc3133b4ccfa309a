"""Benchmark the built-in methods on the synthetic dataset: outcomes and training-step cost.

1. Outcomes: each method is trained with the default settings on several seeds (every run is
   recorded in MLflow under ``--results-dir``); the table gives test AUC and, per attribute,
   TPR and FPR gaps as mean ± std over seeds.
2. Step time: every method's training step (forward, loss, backward, optimiser step) on the
   same batches and backbone, timed in interleaved rounds in this one process; the table gives
   each method's median step time as a ratio to ERM's.

Usage: ``python benchmarks/methods.py [--seeds 3] [--steps 30] [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import numpy as np
import torch
from _common import emit, machine

from fairbench import registry
from fairbench.config import RunConfig
from fairbench.data import DeviceTransform
from fairbench.experiment import resolve, run_experiment
from fairbench.method import Batch, TrainInfo
from fairbench.model import create_backbone
from fairbench.trainer import TrainConfig, make_optimizer, resolve_device, seed_everything

METHODS = ("erm", "reweight", "adversarial", "nir")
ATTRIBUTES = ("sex", "age")


def outcomes(seeds: int, results_dir: str) -> list[str]:
    rows = []
    for method in METHODS:
        values: dict[str, list[float]] = {}
        for seed in range(seeds):
            config = RunConfig(method=method, train=TrainConfig(seed=seed), results_dir=results_dir)
            result = run_experiment(config, progress=False, extra_tags={"fairbench.benchmark": "methods"})
            keys = ["auc"] + [f"{a}/{m}" for a in ATTRIBUTES for m in ("tpr_gap", "fpr_gap")]
            for key in keys:
                values.setdefault(key, []).append(result.test.values[key])
            print(f"{method} seed {seed}: " + " ".join(f"{k}={v[-1]:.3f}" for k, v in values.items()), flush=True)
        cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}" for v in values.values()]
        uses = "yes" if registry.methods.get(method).uses_attributes else "no"
        rows.append(f"| {method} | {uses} | " + " | ".join(cells) + " |")
    head = "| method | uses attributes | test AUC | " + " | ".join(
        f"{a} {m}" for a in ATTRIBUTES for m in ("TPR gap", "FPR gap")
    )
    return [head + " |", "|" + " --- |" * (2 + 1 + 2 * len(ATTRIBUTES)), *rows]


def step_times(steps: int, rounds: int, image_size: int | None = None) -> dict[str, float]:
    """Median seconds per training step of each method, measured in interleaved rounds.

    The step is the trainer's: its optimiser and, on CUDA, bf16 autocast in channels_last
    layout. ``image_size`` resizes the synthetic images (default: the dataset's 48 px).
    """
    config = resolve(RunConfig())
    dataset = registry.datasets.get("synthetic")(**config.dataset_options)
    splits = dataset.load(config.resolved_data_dir(), config.image_size)
    splits.size = image_size or splits.size
    device = resolve_device("auto")
    cuda = device.type == "cuda"
    transform = DeviceTransform(splits, device, channels_last=cuda)
    bs = config.train.batch_size
    train = splits.train
    batches = []
    for b in range(steps):
        idx = np.arange(b * bs, (b + 1) * bs) % len(train)
        image = transform(torch.from_numpy(train.take(idx)).to(device), train=True)
        batches.append(
            Batch(
                image=image,
                label=torch.from_numpy(train.labels[idx]).float().to(device),
                index=torch.from_numpy(idx).to(device),
                group=torch.from_numpy(train.attrs[idx, 0]).to(device),
            )
        )
    info = TrainInfo(
        labels=torch.from_numpy(train.labels),
        groups=torch.from_numpy(train.attrs[:, 0]),
        group_names=tuple(splits.attributes["sex"]),
        attribute="sex",
        epochs=1,
        steps_per_epoch=steps,
    )
    runners = {}
    for name in METHODS:
        seed_everything(0)
        cls = registry.methods.get(name)
        method = cls(create_backbone(config.backbone, splits.in_chans), info).to(device).train()
        if cuda:
            method = method.to(memory_format=torch.channels_last)
        opt = make_optimizer(method, config.train, device)
        runners[name] = (method, opt, cls.uses_attributes)

    def one_pass(name: str) -> float:
        method, opt, uses = runners[name]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for batch in batches:
            b = batch if uses else Batch(batch.image, batch.label, batch.index, None)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = method(b.image)
            parts = method.loss(out, b)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
        sync()
        return (time.perf_counter() - t0) / len(batches)

    for name in METHODS:  # warm-up
        one_pass(name)
    samples: dict[str, list[float]] = {name: [] for name in METHODS}
    for r in range(rounds):
        order = METHODS if r % 2 == 0 else METHODS[::-1]
        for name in order:
            samples[name].append(one_pass(name))
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed passes per method")
    parser.add_argument("--results-dir", default="results/benchmark-methods")
    parser.add_argument("--skip-outcomes", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--append", default=None, help="append the tables to this markdown file")
    args = parser.parse_args()

    lines = [f"## Methods on synthetic ({date.today().isoformat()}, {machine()}, torch {torch.__version__})", ""]
    if not args.skip_outcomes:
        lines += [
            f"Default settings (resnet18, `fairbench run` defaults), seeds 0–{args.seeds - 1}; "
            "test split; mean ± std over seeds.",
            "",
            *outcomes(args.seeds, args.results_dir),
            "",
        ]
    times = {} if args.skip_steps else step_times(args.steps, args.rounds)
    lines += (
        []
        if args.skip_steps
        else [
            f"Training-step time (forward, loss, backward, AdamW step; resnet18, batch 64), median of {args.rounds} "
            f"interleaved passes of {args.steps} steps:",
            "",
            "| method | ms / step | ratio to erm |",
            "| --- | --- | --- |",
            *[f"| {m} | {t * 1000:.1f} | {t / times['erm']:.3f} |" for m, t in times.items()],
            "",
        ]
    )
    emit(lines, args.append)


if __name__ == "__main__":
    main()
