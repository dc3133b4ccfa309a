"""adversarial: adversarial debiasing through a gradient-reversal layer.

An adversary MLP predicts the training attribute's group. Between the encoder and the
adversary sits a gradient-reversal layer (Ganin & Lempitsky, ICML 2015): the identity going
forward, the gradient times ``-lambda`` going back. The adversary learns to find the group; the
encoder learns to hide it. ``lambda`` can rise linearly from 0 over the first
``warmup_epochs`` epochs, so the classifier learns the task before the adversary pushes.

``target=representation`` (default) shows the adversary the penultimate features
(representation invariance). ``target=eqodds`` shows it the predicted logit and the true label
instead, following Zhang, Lemoine & Mitchell (AIES 2018): knowing the label, the prediction
should carry no group information, which aims at equalized odds.

Samples whose group is unknown (-1) are left out of the adversary's loss.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import Backbone, ModelOutput
from fairbench.options import Interval


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-strength`` backward."""
    return _GradReverse.apply(x, strength)


def adversary_loss(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the samples with a known group (code >= 0); 0 when there are none.

    Computed as a masked mean over the whole batch, so no value goes back to the host (no
    boolean indexing, no data-dependent branch) and the training step never waits for the device.
    """
    known = (groups >= 0).float()
    per_sample = F.cross_entropy(logits.float(), groups.clamp(min=0), reduction="none")
    return (per_sample * known).sum() / known.sum().clamp(min=1.0)


class Adversarial(Method):
    """Adversarial debiasing: a gradient-reversed adversary removes group information."""

    uses_attributes = True

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        lambda_adv: Annotated[float, Interval(ge=0)] = 1.0,
        warmup_epochs: Annotated[int, Interval(ge=0)] = 0,
        target: Literal["representation", "eqodds"] = "representation",
        hidden: Annotated[int, Interval(ge=1)] = 64,
        adv_lr: Annotated[float, Interval(gt=0)] | None = None,
    ) -> None:
        super().__init__(backbone, info)
        self.lambda_adv = lambda_adv
        self.warmup_epochs = warmup_epochs
        self.target = target
        self.adv_lr = adv_lr
        self.strength = lambda_adv if warmup_epochs == 0 else 0.0
        self.register_buffer("logged_strength", torch.tensor(self.strength), persistent=False)
        in_dim = backbone.feature_dim if target == "representation" else 3
        self.adversary = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(info.group_names)))

    def on_epoch_start(self, epoch: int) -> None:
        ramp = 1.0 if self.warmup_epochs == 0 else min(1.0, epoch / self.warmup_epochs)
        self.strength = self.lambda_adv * ramp
        self.logged_strength.fill_(self.strength)

    def adversary_input(self, out: ModelOutput, label: torch.Tensor) -> torch.Tensor:
        if self.target == "representation":
            return out.features.float()
        logit = out.logits.float()
        return torch.stack([logit, label, logit * label], dim=1)

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        bce = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label)
        z = grad_reverse(self.adversary_input(out, batch.label), self.strength)
        adv = adversary_loss(self.adversary(z), batch.group)
        return {"loss": bce + adv, "bce": bce, "adv": adv, "lambda_adv": self.logged_strength}

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        adversary = list(self.adversary.parameters())
        ids = {id(p) for p in adversary}
        rest = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        return [{"params": rest}, {"params": adversary, "lr": self.adv_lr or lr}]

    @classmethod
    def search_space(cls, trial) -> dict:
        return {
            "lambda_adv": trial.suggest_float("lambda_adv", 0.1, 10.0, log=True),
            "warmup_epochs": trial.suggest_int("warmup_epochs", 0, 3),
        }
