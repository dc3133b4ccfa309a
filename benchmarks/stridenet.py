"""Benchmark stridenet's training step against ERM's on the same backbone at 224 px.

Each method's step (forward, loss, backward, gradient clipping where the method asks for it,
optimiser step) runs on the same random batches with randomly initialised backbones, timed in
interleaved rounds in this one process; the table gives median seconds per step and the ratio
to ERM (target: at most 1.5). On a CPU shared with other jobs wall time mostly measures the
neighbours, so the process's CPU time is taken too, with one torch thread (no spinning
threads inflate it); the target is judged on that ratio.

Usage: ``python benchmarks/stridenet.py [--batch 8] [--steps 2] [--rounds 3] [--threads 1] [--append FILE]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from _common import emit, machine

from fairbench import registry
from fairbench.method import Batch, TrainInfo
from fairbench.model import create_backbone
from fairbench.trainer import resolve_device, seed_everything

BACKBONES = ("resnet18", "vit_tiny_patch16_224")
SIZE = 224
VARIANTS = {"erm": ("erm", {}), "stridenet": ("stridenet", {})}


def _runner(name: str, options: dict, backbone: str, info: TrainInfo, device: torch.device):
    seed_everything(0)
    cls = registry.methods.get(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stridenet's one-hot label-embedding notice
        method = cls(create_backbone(backbone, 3), info, **options).to(device).train()
    opt = torch.optim.AdamW(method.param_groups(1e-3, 1e-4), lr=1e-3, weight_decay=1e-4)
    return method, opt


def step_times(backbone: str, batch: int, steps: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds per training step of each variant on ``backbone``, interleaved rounds."""
    device = resolve_device("auto")
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(-1, 2, (batch,), generator=g)
    batches = [
        Batch(
            image=torch.randn(batch, 3, SIZE, SIZE, generator=g).to(device),
            label=torch.randint(0, 2, (batch,), generator=g).float().to(device),
            index=torch.arange(batch, device=device),
            group=groups.to(device),
        )
        for _ in range(steps)
    ]
    info = TrainInfo(
        labels=torch.zeros(batch, dtype=torch.int64),
        groups=groups,
        group_names=("female", "male"),
        attribute="sex",
        epochs=1,
        steps_per_epoch=steps,
        input_shape=(3, SIZE, SIZE),
        label_names=("lesion with a ring", "lesion without a ring"),
        data_folder=Path("/nonexistent"),
    )
    runners = {v: _runner(name, opts, backbone, info, device) for v, (name, opts) in VARIANTS.items()}

    def one_pass(variant: str) -> tuple[float, float]:
        method, opt = runners[variant]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches:
            parts = method.loss(method(b.image), b)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if method.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(method.parameters(), method.clip_grad_norm)
            opt.step()
        sync()
        return (time.process_time() - c0) / len(batches), (time.perf_counter() - t0) / len(batches)

    for variant in VARIANTS:  # warm-up
        one_pass(variant)
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(rounds):
        for variant in order if r % 2 == 0 else order[::-1]:
            samples[variant].append(one_pass(variant))
    return {v: (statistics.median(c for c, _ in s), statistics.median(w for _, w in s)) for v, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--backbone", action="append", default=None, help="only these backbones (repeatable)")
    parser.add_argument("--steps", type=int, default=2, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed passes per variant")
    parser.add_argument("--append", default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = []
    for backbone in args.backbone or BACKBONES:
        times = step_times(backbone, args.batch, args.steps, args.rounds)
        cpu0, wall0 = times["erm"]
        for variant, (cpu, wall) in times.items():
            ratio = cpu / cpu0
            target, met = ("≤ 1.5", "yes" if ratio <= 1.5 else "no") if variant != "erm" else ("", "")
            cells = [backbone, variant, f"{cpu:.3f}", f"{ratio:.2f}", f"{wall:.3f}", f"{wall / wall0:.2f}", target, met]
            rows.append("| " + " | ".join(cells) + " |")
        print(*rows[-len(times) :], sep="\n", flush=True)
    lines = [
        f"## stridenet step time vs ERM ({date.today().isoformat()}, {machine()}, torch {torch.__version__})",
        "",
        f"`python benchmarks/stridenet.py`: {SIZE} px, batch {args.batch}, random init, default options "
        f"(one-hot label embeddings, C = 2), {args.threads} torch thread(s), median of {args.rounds} interleaved "
        f"passes of {args.steps} steps. Load average {load:.0f} → {os.getloadavg()[0]:.0f} on the shared CPU "
        "during the run: the CPU-time ratio is the measure, wall times are shown for completeness.",
        "",
        "| backbone | variant | CPU s / step | ratio to ERM (CPU) | wall s / step | ratio (wall) | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "| any | stridenet on a GPU | not measured: no GPU | | | | ≤ 1.5 | |",
    ]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
