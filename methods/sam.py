"""sam: sharpness-aware minimisation (Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021).

SAM minimises the loss at the worst nearby weights. Each step takes two forward/backward
passes: the gradient g at the weights w gives the perturbation

    e = rho * g / ||g||_2        (the paper's p = 2 solution, rho = 0.05),

the gradient is taken again at w + e, the weights are put back to w and the trainer's optimiser
steps with that second gradient. ``adaptive=true`` is adaptive SAM (Kwon, Kim, Park & Choi,
ICML 2021), whose neighbourhood scales with the weights, T_w = |w| + eta element-wise:

    e = rho * T_w^2 g / ||T_w g||_2     (ASAM's defaults: eta = 0.01; it expects a larger rho, e.g. 0.5).

||.|| runs over every parameter that has a gradient. The base optimiser is the trainer's
(AdamW by default; the paper used SGD), so SAM differs from ERM only in where the gradient is
taken. Where the paper is silent: batch-norm running statistics are updated by the first pass
only (the second pass sees perturbed weights), and the logged loss is the first pass's, at w.
The paper's m-sharpness (perturbations per sub-batch across accelerators) is the whole batch here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import torch
from torch import nn

from fairbench.method import ForwardLoss, Method, TrainInfo
from fairbench.model import Backbone
from fairbench.options import Interval

NORM_EPS = 1e-12


def perturbation(
    params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, adaptive: bool = False, eta: float = 0.01
) -> list[torch.Tensor]:
    """SAM's ascent step ``rho * g / ||g||`` per parameter, or ASAM's ``rho * T^2 g / ||T g||``."""
    if adaptive:
        scales = [p.detach().abs() + eta for p in params]
        scaled = [t * g for t, g in zip(scales, grads, strict=True)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        return [rho * t * s / (norm + NORM_EPS) for t, s in zip(scales, scaled, strict=True)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [rho * g / (norm + NORM_EPS) for g in grads]


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers normalise with batch statistics but do not update their running ones."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


class SAM(Method):
    """Sharpness-aware minimisation: the gradient is taken at the worst nearby weights."""

    uses_attributes = False

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        rho: Annotated[float, Interval(gt=0)] = 0.05,
        adaptive: bool = False,
        eta: Annotated[float, Interval(ge=0)] = 0.01,
    ) -> None:
        super().__init__(backbone, info)
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta

    def train_step(self, forward_loss: ForwardLoss, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        parts = forward_loss()
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        params = [p for p in self.parameters() if p.grad is not None]
        with torch.no_grad():
            e = perturbation(params, [p.grad for p in params], self.rho, self.adaptive, self.eta)
            torch._foreach_add_(params, e)
        optimizer.zero_grad(set_to_none=True)
        with frozen_batchnorm_stats(self):
            forward_loss()["loss"].backward()
        with torch.no_grad():
            torch._foreach_sub_(params, e)
        optimizer.step()
        return parts

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"rho": trial.suggest_float("rho", 0.01, 0.5, log=True)}
