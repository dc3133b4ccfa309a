"""reweight: group reweighting, so that every (group x label) cell weighs the same in training.

Each training sample is weighted by ``count(cell) ** -power`` and the weights are scaled to
mean 1. With ``power = 1`` (inverse frequency, the common choice) every cell carries the same
total weight. The weights enter either the loss (``mode=loss``) or a
``WeightedRandomSampler`` that draws the training set with replacement (``mode=sampler``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler, WeightedRandomSampler

from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import Backbone, ModelOutput
from fairbench.options import Interval

Cells = Literal["group_label", "group", "label"]


def group_weights(labels: torch.Tensor, groups: torch.Tensor, cells: Cells = "group_label", power: float = 1.0):
    """Per-sample weights ``count(cell) ** -power``, scaled to mean 1.

    Cells are (group, label), group or label. A sample whose group is unknown (-1) gets the
    mean weight of the known samples with its label (its label cell), so it neither dominates
    nor vanishes; with ``cells=label`` groups are not used at all.
    """
    labels = labels.long()
    groups = groups.long()
    known = groups >= 0 if cells != "label" else torch.ones_like(labels, dtype=torch.bool)
    if cells == "group_label":
        key = groups * 2 + labels
    elif cells == "group":
        key = groups
    else:
        key = labels
    key = torch.where(known, key, torch.zeros_like(key))
    counts = torch.bincount(key[known], minlength=int(key.max()) + 1).double()
    weights = torch.zeros(labels.shape, dtype=torch.float64)
    weights[known] = counts[key[known]] ** -power
    for y in (0, 1):
        unknown = ~known & (labels == y)
        if unknown.any():
            same_label = known & (labels == y)
            weights[unknown] = weights[same_label].mean() if same_label.any() else weights[known].mean()
    return (weights / weights.mean()).float()


class Reweight(Method):
    """Group reweighting: each (group x label) cell carries equal weight in training."""

    uses_attributes = True

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        cells: Cells = "group_label",
        mode: Literal["loss", "sampler"] = "loss",
        power: Annotated[float, Interval(ge=0)] = 1.0,
    ) -> None:
        super().__init__(backbone, info)
        self.mode = mode
        self.register_buffer("weights", group_weights(info.labels, info.groups, cells, power), persistent=False)

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        per_sample = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label, reduction="none")
        bce = per_sample.mean()
        if self.mode == "sampler":
            return {"loss": bce, "bce": bce}
        weighted = (self.weights[batch.index] * per_sample).mean()
        return {"loss": weighted, "bce": bce, "weighted_bce": weighted}

    def sampler(self) -> Sampler[int] | None:
        if self.mode != "sampler":
            return None
        generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**63)
        return WeightedRandomSampler(
            self.weights.double().cpu(), len(self.weights), replacement=True, generator=generator
        )

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"power": trial.suggest_float("power", 0.5, 1.5)}
