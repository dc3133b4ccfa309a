"""fin: Fair Identity Normalization (Luo, Tian, Shi, Elze & Wang, Harvard-GF, ICCV 2023).

A learnable, group-specific normalisation of the penultimate features, between the encoder
and the linear head. Each group g of the training attribute has a learnable mean mu_g and scale
parameter sigma_g (one value per feature); with momentum m a sample's features f become

    f' = (1 - m) * (f - mu_g) / (softplus(sigma_g) + eps) + m * f,

so m keeps part of the unnormalised features. Defaults follow the paper's released training
script: m = 0.1, mu_g initialised from N(0, 0.001^2), sigma_g from N(0, 0.1^2), eps = 1e-6.
The loss is plain BCE on the logits of the normalised features.

FIN needs each sample's group at test time as well (runs are tagged
``fairbench.uses_attributes_at_test``). Where the paper is silent: a sample whose group is
unknown (-1) is normalised with the groups' mean mu and mean softplus(sigma).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from fairbench.method import Method, TrainInfo
from fairbench.model import Backbone, ModelOutput, head_fp32
from fairbench.options import Interval

EPS = 1e-6


def fin_normalize(
    features: torch.Tensor, group: torch.Tensor | None, mus: torch.Tensor, sigmas: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Group-wise normalised features (B, D), mixed with the input by ``momentum``."""
    f = features.float()
    scale = F.softplus(sigmas)
    if group is None:
        group = torch.full((f.shape[0],), -1, device=f.device, dtype=torch.long)
    known = (group >= 0)[:, None]
    index = group.clamp(min=0).long()
    mu = torch.where(known, mus[index], mus.mean(dim=0))
    sd = torch.where(known, scale[index], scale.mean(dim=0))
    return (1.0 - momentum) * (f - mu) / (sd + EPS) + momentum * f


class FIN(Method):
    """Fair Identity Normalization: learnable per-group normalisation of the features."""

    uses_attributes = True
    uses_attributes_at_test = True

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        momentum: Annotated[float, Interval(ge=0, le=1)] = 0.1,
        mu_init: Annotated[float, Interval(ge=0)] = 0.001,
        sigma_init: Annotated[float, Interval(ge=0)] = 0.1,
    ) -> None:
        super().__init__(backbone, info)
        self.momentum = momentum
        shape = (len(info.group_names), backbone.feature_dim)
        self.mus = nn.Parameter(torch.randn(shape) * mu_init)
        self.sigmas = nn.Parameter(torch.randn(shape) * sigma_init)

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> ModelOutput:
        raw = self.backbone(x).features
        features = fin_normalize(raw, group, self.mus, self.sigmas, self.momentum)
        logits = head_fp32(self.backbone.net.get_classifier(), features).squeeze(-1)
        return ModelOutput(logits=logits, features=features, extras={"raw_features": raw})

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"momentum": trial.suggest_float("momentum", 0.0, 0.5)}
