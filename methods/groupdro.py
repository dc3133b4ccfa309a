"""groupdro: group distributionally robust optimisation (Sagawa, Koh, Hashimoto & Liang, ICLR 2020).

Groups are the (attribute group x label) cells of the training set. GroupDRO minimises the
worst-case loss over groups with the paper's online algorithm: it keeps a distribution q over
the groups and, every step, first raises the weight of each group in the batch by its loss,

    q_g <- q_g * exp(eta * (loss_g + C / sqrt(n_g))),   then q <- q / sum(q),

and then minimises sum_g q_g * loss_g. ``loss_g`` is the mean BCE of the batch's samples of
group g and ``n_g`` the group's size in the training set; ``C / sqrt(n_g)`` is the paper's
generalisation adjustment (C = 0 turns it off). Defaults are the paper's: ``eta = 0.01``,
``C = 0``.

Where the paper is silent: a group absent from a batch keeps its weight before normalising (its
loss was not observed), and samples whose group is unknown (-1) are left out of the weights
and of the robust loss (they still count in the logged ``train/bce``). Groups without
training samples get no weight.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import Backbone, ModelOutput
from fairbench.options import Interval


def cell_codes(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Cell of each sample, ``2 * group + label``; -1 where the group is unknown."""
    return torch.where(groups >= 0, groups.long() * 2 + labels.long(), torch.full_like(groups.long(), -1))


def group_losses(per_sample: torch.Tensor, cells: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss per cell, whether the cell occurs) over the samples of known cells."""
    known = cells >= 0
    index = cells.clamp(min=0)
    weight = known.to(per_sample.dtype)
    sums = torch.zeros(n_cells, dtype=per_sample.dtype, device=per_sample.device).index_add(
        0, index, per_sample * weight
    )
    counts = torch.zeros(n_cells, dtype=per_sample.dtype, device=per_sample.device).index_add(0, index, weight)
    return sums / counts.clamp(min=1), counts > 0


def update_weights(
    q: torch.Tensor, losses: torch.Tensor, present: torch.Tensor, eta: float, adjustment: torch.Tensor
) -> torch.Tensor:
    """One exponentiated-gradient step of the group weights, normalised to sum 1.

    Only groups present in the batch move; ``adjustment`` is C / sqrt(n_g) per group.
    """
    step = torch.where(present, eta * (losses + adjustment), torch.zeros_like(losses))
    q = q * torch.exp(step)
    return q / q.sum()


class GroupDRO(Method):
    """GroupDRO: minimises the worst (group x label) loss with online group weights."""

    uses_attributes = True

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        eta: Annotated[float, Interval(gt=0)] = 0.01,
        adjustment: Annotated[float, Interval(ge=0)] = 0.0,
    ) -> None:
        super().__init__(backbone, info)
        self.eta = eta
        self.n_cells = 2 * len(info.group_names)
        cells = cell_codes(info.labels, info.groups)
        counts = torch.bincount(cells[cells >= 0], minlength=self.n_cells).double()
        has = counts > 0
        q = has.double() / has.sum()
        adjust = torch.where(has, adjustment / counts.clamp(min=1).sqrt(), torch.zeros_like(counts))
        self.register_buffer("q", q.float())
        self.register_buffer("adjust", adjust.float(), persistent=False)

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        per_sample = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label, reduction="none")
        losses, present = group_losses(per_sample, cell_codes(batch.label, batch.group), self.n_cells)
        with torch.no_grad():
            self.q.copy_(update_weights(self.q, losses.detach(), present, self.eta, self.adjust))
        robust = (self.q * losses).sum()
        worst = losses[present].max() if present.any() else per_sample.new_zeros(())
        return {"loss": robust, "bce": per_sample.mean(), "worst_group_bce": worst.detach(), "q_max": self.q.max()}

    @classmethod
    def search_space(cls, trial) -> dict:
        return {
            "eta": trial.suggest_float("eta", 0.001, 0.1, log=True),
            "adjustment": float(trial.suggest_int("adjustment", 0, 5)),
        }
