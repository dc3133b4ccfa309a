"""nir: Neuron Incidence Redistribution (Shoby, Palmer & Kurian, 2026, arXiv 2605.19393).

NIR needs no demographic labels. It penalises the concentration of positive-class evidence
in a few penultimate neurons, so that the decision rests on the whole layer. With ``h`` the
penultimate activations (B x D, exactly what the linear head receives) and ``p`` the predicted
probabilities, the prediction-weighted mean activation of neuron j is

    m_j = sum_i p_i h_ij / (sum_i p_i + eps)

and the penalty is the variance of m over the D neurons, R = (1/D) sum_j (m_j - mean(m))^2.
The loss is BCE + lambda * R with lambda = 0.1, the paper's fixed value.

Where the paper is silent, two logged options: ``side=both`` adds the same term weighted by
1 - p (the negative-prediction channel the paper also analyses), and
``normalize=mean_square`` divides R by mean_j m_j^2, which makes it scale-free.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import Backbone, ModelOutput
from fairbench.options import Interval

EPS = 1e-6


def incidence_variance(
    features: torch.Tensor, weights: torch.Tensor, normalize: Literal["none", "mean_square"] = "none"
) -> torch.Tensor:
    """Variance over neurons of the ``weights``-weighted mean activation (population variance);
    the weighted sum is one matrix product and the variance one reduction, to keep the step's
    kernel count (what a GPU step of a small model pays for) low."""
    m = (weights @ features) / (weights.sum() + EPS)
    r = m.var(correction=0)
    if normalize == "mean_square":
        r = r / ((m**2).mean() + EPS)
    return r


def nir_penalty(
    features: torch.Tensor,
    logits: torch.Tensor,
    side: Literal["positive", "both"] = "positive",
    normalize: Literal["none", "mean_square"] = "none",
) -> torch.Tensor:
    """The NIR term R from penultimate features (B, D) and logits (B,); differentiable in both."""
    p = torch.sigmoid(logits)
    r = incidence_variance(features, p, normalize)
    if side == "both":
        r = r + incidence_variance(features, 1.0 - p, normalize)
    return r


class NIR(Method):
    """Neuron Incidence Redistribution: spreads positive-class evidence over the whole layer."""

    uses_attributes = False

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        lambda_nir: Annotated[float, Interval(ge=0)] = 0.1,
        side: Literal["positive", "both"] = "positive",
        normalize: Literal["none", "mean_square"] = "none",
    ) -> None:
        super().__init__(backbone, info)
        self.lambda_nir = lambda_nir
        self.side = side
        self.normalize = normalize

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        bce = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label)
        r = nir_penalty(out.features.float(), out.logits.float(), self.side, self.normalize)
        return {"loss": bce + self.lambda_nir * r, "bce": bce, "nir": r}

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"lambda_nir": trial.suggest_float("lambda_nir", 0.01, 1.0, log=True)}
