"""Benchmark every registered method on the synthetic dataset: outcomes and training-step cost.

1. Outcomes: each method is trained with its default options on several seeds (every run is
   recorded in MLflow under ``--results-dir``); the table gives test AUC and, per attribute,
   TPR and FPR gaps as mean ± std over seeds, followed by fairbench's leaderboard of those runs
   (significance vs ERM, ranks).
2. Step time: every method's training step as the trainer runs it (the method's ``train_step``
   hook, e.g. SAM's two passes, and ``after_step``, e.g. SWAD's weight collection) on the same
   batches and backbone, timed in interleaved rounds in this one process; the table gives each
   method's median step time as a ratio to ERM's (SAM is expected near 2x, the others <= 1.05x).

The methods are read from the registry, so plugins and methods added later are included.

Full table (all methods, 3 seeds, default options; use a fresh results folder so the
leaderboard holds only these runs):
  python benchmarks/methods.py --seeds 3 --results-dir results/benchmark-methods-$(date +%F) \\
      --append benchmarks/RESULTS.md
Step time only:   python benchmarks/methods.py --skip-outcomes --append benchmarks/RESULTS.md
Some methods:     python benchmarks/methods.py --methods erm,sam,swad --seeds 1 --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from datetime import date

import numpy as np
import torch
from _common import emit, machine

from fairbench import options, registry
from fairbench.config import RunConfig
from fairbench.data import DeviceTransform
from fairbench.experiment import resolve, run_experiment
from fairbench.method import Batch, TrainInfo
from fairbench.model import create_backbone
from fairbench.trainer import TrainConfig, make_optimizer, resolve_device, seed_everything, train_step

ATTRIBUTES = ("sex", "age")


def outcomes(
    methods: list[str],
    seeds: int,
    epochs: int | None,
    results_dir: str,
    image_size: int | None = None,
    dataset_options: dict | None = None,
) -> list[str]:
    """Per-method table (mean ± std over seeds) and the leaderboard of the same runs."""
    from fairbench import leaderboard as lb
    from fairbench.tracking import resolve_tracking_uri

    rows = []
    train = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    for method in methods:
        values: dict[str, list[float]] = {}
        for seed in range(seeds):
            config = RunConfig(
                method=method,
                train=replace(train, seed=seed),
                results_dir=results_dir,
                image_size=image_size,
                dataset_options=dict(dataset_options or {}),
            )
            result = run_experiment(config, progress=False, extra_tags={"fairbench.benchmark": "methods"})
            keys = ["auc"] + [f"{a}/{m}" for a in ATTRIBUTES for m in ("tpr_gap", "fpr_gap")]
            for key in keys:
                values.setdefault(key, []).append(result.test.values[key])
            print(f"{method} seed {seed}: " + " ".join(f"{k}={v[-1]:.3f}" for k, v in values.items()), flush=True)
        cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}" for v in values.values()]
        cls = registry.methods.get(method)
        train_uses = "yes" if cls.uses_attributes else "no"
        test_uses = "yes" if cls.attributes_at_test(options.defaults(cls)) else "no"
        rows.append(f"| {method} | {train_uses} | {test_uses} | " + " | ".join(cells) + " |")
    head = "| method | uses attributes in training | uses attributes at test | test AUC | " + " | ".join(
        f"{a} {m}" for a in ATTRIBUTES for m in ("TPR gap", "FPR gap")
    )
    board = lb.build(lb.load_runs(resolve_tracking_uri(results_dir, None)))
    table, shown = lb.filtered(board, datasets=("synthetic",))
    return [
        head + " |",
        "|" + " --- |" * (3 + 1 + 2 * len(ATTRIBUTES)),
        *rows,
        "",
        "Leaderboard of these runs (`fairbench leaderboard`):",
        "",
        lb.to_markdown(table, board.ranks, shown, board.notes, board.correction),
    ]


def step_times(
    methods: list[str], steps: int, rounds: int, backbone: str | None, image_size: int | None = None
) -> dict[str, float | str]:
    """Median seconds per training step of each method, measured in interleaved rounds; a
    method that cannot be built here gets the reason instead. The step is the trainer's: its
    optimiser and, on CUDA, bf16 autocast in channels_last layout; ``image_size`` resizes the
    synthetic images (default: the dataset's 48 px)."""
    config = resolve(RunConfig())
    dataset = registry.datasets.get("synthetic")(**config.dataset_options)
    data_dir = config.resolved_data_dir()
    splits = dataset.load(data_dir, config.image_size)
    splits = replace(
        splits, label_names=tuple(dataset.label_names), folder=data_dir / dataset.name, size=image_size or splits.size
    )
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
    runners, skipped = {}, {}
    for name in methods:
        cls = registry.methods.get(name)
        uses = cls.uses_attributes
        info = TrainInfo(
            labels=torch.from_numpy(train.labels),
            groups=torch.from_numpy(train.attrs[:, 0]) if uses else None,
            group_names=tuple(splits.attributes["sex"]) if uses else (),
            attribute="sex" if uses else None,
            epochs=1,
            steps_per_epoch=steps,
            input_shape=splits.input_shape,
            label_names=tuple(splits.label_names),
            data_folder=splits.folder,
        )
        seed_everything(0)
        try:
            method = cls(create_backbone(backbone or config.backbone, splits.in_chans), info).to(device).train()
            if cuda:
                method = method.to(memory_format=torch.channels_last)
        except Exception as exc:  # a plugin that needs what this benchmark does not provide
            skipped[name] = f"not measured: {type(exc).__name__}: {exc}"
            continue
        opt = make_optimizer(method, config.train, device)
        at_test = uses and cls.attributes_at_test(options.defaults(cls))
        runners[name] = (method, opt, uses, at_test)

    def one_pass(name: str) -> float:
        method, opt, uses, at_test = runners[name]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for batch in batches:
            b = batch if uses else Batch(batch.image, batch.label, batch.index, None)
            train_step(method, b, opt, device, at_test)
        sync()
        return (time.perf_counter() - t0) / len(batches)

    for name in runners:  # warm-up
        one_pass(name)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            samples[name].append(one_pass(name))
    return {**{name: statistics.median(v) for name, v in samples.items()}, **skipped}


def step_table(times: dict[str, float | str], steps: int, rounds: int, backbone: str) -> list[str]:
    erm = times.get("erm")
    rows = []
    for m, t in times.items():
        if isinstance(t, str):
            rows.append(f"| {m} | {t} | |")
        else:
            ratio = f"{t / erm:.3f}" if isinstance(erm, float) else "not measured: no erm"
            rows.append(f"| {m} | {t * 1000:.1f} | {ratio} |")
    return [
        f"Training-step time (the trainer's step: forward, loss, backward, AdamW step, the method's step "
        f"hooks; {backbone}, batch 64, 48 px), median of {rounds} interleaved passes of {steps} steps:",
        "",
        "| method | ms / step | ratio to erm |",
        "| --- | --- | --- |",
        *rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: every registered one)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (outcomes)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: the trainer's)")
    parser.add_argument("--image-size", type=int, default=None, help="input size of the runs (default: 48 px)")
    parser.add_argument("--n-train", type=int, default=None, help="training images of the runs (default: 1500)")
    parser.add_argument("--steps", type=int, default=10, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed passes per method")
    parser.add_argument("--backbone", default=None, help="backbone for the step times (default: the run default)")
    parser.add_argument("--results-dir", default="results/benchmark-methods")
    parser.add_argument("--skip-outcomes", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--append", default=None, help="append the tables to this markdown file")
    args = parser.parse_args()
    names = registry.methods.names()
    methods = names if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        registry.methods.get(m)  # an unknown name fails here, with the known ones listed

    lines = [f"## Methods on synthetic ({date.today().isoformat()}, {machine()}, torch {torch.__version__})", ""]
    if not args.skip_outcomes:
        epochs = "the trainer's default epochs" if args.epochs is None else f"{args.epochs} epochs"
        data = {"n_train": args.n_train} if args.n_train else {}
        size = f"{args.image_size} px" if args.image_size else "48 px"
        lines += [
            f"Default options (resnet18, `fairbench run` defaults, {epochs}, {size}, "
            f"{args.n_train or 1500} training images), seeds 0–{args.seeds - 1}; test split; mean ± std over seeds.",
            "",
            *outcomes(methods, args.seeds, args.epochs, args.results_dir, args.image_size, data),
            "",
        ]
    if not args.skip_steps:
        backbone = args.backbone or resolve(RunConfig()).backbone
        times = step_times(methods, args.steps, args.rounds, args.backbone)
        lines += step_table(times, args.steps, args.rounds, backbone)
    emit(lines, args.append)


if __name__ == "__main__":
    main()
