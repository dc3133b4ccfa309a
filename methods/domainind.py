"""domainind: domain-independent training (Wang, Qinami, Karakozis, Genova, Nair, Hata & Russakovsky, CVPR 2020).

The shared encoder feeds one classifier head per group of the training attribute; each sample
is trained only through its own group's head, so no head has to learn to ignore the group.
Here a head is one logit (the binary finding), and a sample's loss is the BCE of its group's
logit; samples whose group is unknown (-1) are left out of the loss.

Inference without the attribute follows the paper's rule, which combines the heads' outputs
and picks the class with the largest sum over groups, ``argmax_y sum_d s(y, d, x)``. With one
logit z_d per head (s(1, d) = z_d, s(0, d) = 0) that is the sign of sum_d z_d; fairbench scores
``sigmoid(mean_d z_d)``, which ranks (AUC) and decides at 0.5 exactly like the sum and keeps
the logit on the scale of one head. ``inference=sum_prob`` averages the heads' probabilities
instead (the paper's variant on probabilities). ``inference=conditional`` is the paper's
attribute-conditional rule: each sample is scored by its own group's head (the mean rule where
its group is unknown). It needs the attribute at test time, and runs are tagged so.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fairbench import options as plugin_options
from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import Backbone, ModelOutput, head_fp32

Inference = Literal["sum", "sum_prob", "conditional"]


def combine_heads(logits: torch.Tensor, rule: Inference, group: torch.Tensor | None = None) -> torch.Tensor:
    """One logit per sample from the per-group logits (B, G) by the inference ``rule``."""
    if rule == "sum_prob":
        return torch.logit(torch.sigmoid(logits).mean(dim=1), eps=1e-7)
    mean = logits.mean(dim=1)
    if rule == "sum" or group is None:
        return mean
    own = logits.gather(1, group.clamp(min=0).long()[:, None]).squeeze(1)
    return torch.where(group >= 0, own, mean)


def own_head_loss(logits: torch.Tensor, label: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean BCE of each known-group sample's own head; 0 when no group is known."""
    known = group >= 0
    if not known.any():
        return logits.sum() * 0.0
    own = logits[known].gather(1, group[known].long()[:, None]).squeeze(1)
    return F.binary_cross_entropy_with_logits(own, label[known])


class DomainIndependent(Method):
    """Domain-independent training: one head per group on shared features."""

    uses_attributes = True

    def __init__(self, backbone: Backbone, info: TrainInfo, *, inference: Inference = "sum") -> None:
        super().__init__(backbone, info)
        self.inference = inference
        self.heads = nn.Linear(backbone.feature_dim, len(info.group_names))

    @classmethod
    def attributes_at_test(cls, options: dict[str, Any]) -> bool:
        return {**plugin_options.defaults(cls), **options}["inference"] == "conditional"

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> ModelOutput:
        features = self.backbone(x).features
        logits = head_fp32(self.heads, features)
        combined = combine_heads(logits, self.inference, group)
        return ModelOutput(logits=combined, features=features, extras={"group_logits": logits})

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        bce = own_head_loss(out.extras["group_logits"], batch.label, batch.group)
        return {"loss": bce, "bce": bce}

    @classmethod
    def search_space(cls, trial) -> dict:
        """None: the paper's method has no continuous hyperparameter, and the inference rule
        decides whether the attribute is used at test, so it is a choice, not a tuned knob."""
        return {}
