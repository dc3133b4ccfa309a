"""Trainable parameters and training-step time per fine-tuning regime (random init, CPU).

One optimiser step = forward, BCE loss, backward and AdamW update, on a fixed random batch;
the median over the timed steps is reported, after warm-up steps. The regimes of one backbone
are measured side by side in one process, their steps interleaved round robin, so their ratios
are comparable even when the machine's load changes.
Run: python benchmarks/finetune.py [--batch 4] [--steps 3] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F
from _common import emit, machine

from fairbench.finetune import Finetune, count_trainable
from fairbench.model import create_backbone

REGIMES = [
    Finetune("full"),
    Finetune("linear"),
    Finetune("last-n", last_n=1),
    Finetune("last-n", last_n=2),
    Finetune("lora"),
]


def trainer(backbone, batch: int, size: int):
    """A closure doing one timed AdamW step of ``backbone`` on a fixed random batch."""
    opt = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 2, (batch,)).float()
    backbone.train()

    def step() -> float:
        start = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(backbone(x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def label(spec: Finetune) -> str:
    if spec.regime == "last-n":
        return f"last-n (n={spec.last_n})"
    if spec.regime == "lora":
        return f"lora (rank {spec.lora_rank}, alpha {spec.lora_alpha:g}, default targets)"
    return spec.regime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", default="resnet18,vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        "",
        f"## Fine-tuning regimes ({date.today()}, {machine()}, torch {torch.__version__})",
        "",
        f"Random init, {args.size} px, batch {args.batch}, median of {args.steps} AdamW steps after "
        f"{args.warmup} warm-up steps, regimes interleaved; load average {os.getloadavg()[0]:.1f} at the start; "
        "command: `python benchmarks/finetune.py`. GPU step times: not measured: no GPU.",
        "",
        "| backbone | regime | trainable parameters | share of total | step time | vs full |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.backbones.split(","):
        backbones = [create_backbone(name, 3, finetune=spec) for spec in REGIMES]
        steps = [trainer(b, args.batch, args.size) for b in backbones]
        for step in steps:
            for _ in range(args.warmup):
                step()
        times: list[list[float]] = [[] for _ in REGIMES]
        for _ in range(args.steps):  # round robin: a change in machine load hits every regime alike
            for i, step in enumerate(steps):
                times[i].append(step())
        medians = [statistics.median(t) for t in times]
        for spec, backbone, seconds in zip(REGIMES, backbones, medians, strict=True):
            trainable, total = count_trainable(backbone)
            lines.append(
                f"| {name} | {label(spec)} | {trainable:,} | {trainable / total:.2%} | {seconds * 1000:.0f} ms "
                f"| {seconds / medians[0]:.2f} |"
            )
            print(lines[-1], flush=True)
    emit(lines, args.append)


if __name__ == "__main__":
    main()
