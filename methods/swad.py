"""swad: stochastic weight averaging densely (Cha, Chun, Lee, Cho, Park, Lee & Park, NeurIPS 2021).

SWAD averages the weights after every optimiser step (densely) over a window of training that
the validation loss selects, and evaluates the average. Training is cut into segments at the
validation evaluations; segment i ends with evaluation i and its validation loss L_i (of the
weights being trained, not of the average). With N_s = ``n_converge``, N_e = ``n_tolerance``
and r = 1 + ``tolerance_ratio`` (the paper's 3, 6 and 1.3):

- start t_s: the first i whose loss is the lowest of the N_s evaluations from i on
  (L_i <= min(L_i, ..., L_{i+N_s-1}): the loss stopped decreasing);
- tolerance: r times the mean loss of those N_s evaluations;
- end t_e: the first i > t_s from which the loss stays above the tolerance for N_e evaluations
  (min(L_i, ..., L_{i+N_e-1}) > tolerance): the model has left the loss valley.

The weights of every step in segments t_s .. t_e - 1 are averaged. When training ends first,
the windows are cut at the last evaluation (the start is then the lowest loss among the last
evaluations). Batch-norm statistics of the average are recomputed on one pass over the
augmented training set (``torch.optim.swa_utils.update_bn``), and the average is what is
evaluated: validation and test predictions come from it.

fairbench evaluates once per epoch, so the paper's evaluation interval (``eval_every``
steps) is one epoch here and N_s, N_e count epochs; the validation loss is the trainer's
``val/epoch_bce``. The trainer's early stopping still applies (pass ``--patience 0`` to train
the full ``--epochs`` as the paper does). Each epoch logs ``swad/start`` and ``swad/end``
(the epochs found so far, -1 while unknown).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch.optim.swa_utils import update_bn

from fairbench.method import Method, TrainImages, TrainInfo
from fairbench.model import Backbone
from fairbench.options import Interval


class LossValley:
    """The paper's start/end rule over per-segment validation losses, with running sums.

    ``add(weights_sum, steps, loss)`` closes a segment; ``average()`` is the mean weight of
    every step in the selected window. Only segments whose fate is still open are kept.
    """

    def __init__(self, n_converge: int, n_tolerance: int, tolerance_ratio: float) -> None:
        self.n_converge = n_converge
        self.n_tolerance = n_tolerance
        self.ratio = 1.0 + tolerance_ratio
        self.losses: list[float] = []
        self.pending: dict[int, tuple[list[torch.Tensor], int]] = {}
        self.start: int | None = None
        self.end: int | None = None
        self.threshold: float | None = None
        self.next = 0
        self.total: list[torch.Tensor] | None = None
        self.steps = 0

    def add(self, weights_sum: list[torch.Tensor], steps: int, loss: float) -> None:
        k = len(self.losses)
        self.losses.append(loss)
        if self.end is not None:
            return
        self.pending[k] = (weights_sum, steps)
        if self.start is None:
            first = k - self.n_converge + 1
            if first >= 0 and self.losses[first] <= min(self.losses[first:]):
                self._open(first)
            else:
                self._forget_before(k - self.n_converge + 2)
                return
        self._decide(final=False)

    def finish(self) -> None:
        """Close the window at the last evaluation, cutting the rule's windows there."""
        if self.end is not None or not self.losses:
            return
        if self.start is None:
            tail = [i for i in sorted(self.pending)]
            self._open(min(tail, key=lambda i: (self.losses[i], i)))
        self._decide(final=True)

    def average(self) -> list[torch.Tensor] | None:
        """Mean weights of the window, or None when it holds no step."""
        if self.total is None or self.steps == 0:
            return None
        return [t / self.steps for t in self.total]

    def _open(self, start: int) -> None:
        self.start = self.next = start
        window = self.losses[start : start + self.n_converge]
        self.threshold = self.ratio * sum(window) / len(window)
        self._forget_before(start)

    def _forget_before(self, index: int) -> None:
        for i in [i for i in self.pending if i < index]:
            del self.pending[i]

    def _decide(self, final: bool) -> None:
        last = len(self.losses) - 1
        while self.next <= last:
            i = self.next
            if not final and i + self.n_tolerance - 1 > last:
                return
            window = self.losses[i : i + self.n_tolerance]
            if i > self.start and min(window) > self.threshold:
                self.end = i
                self.pending.clear()
                return
            weights, steps = self.pending.pop(i)
            if self.total is None:
                self.total = [w.clone() for w in weights]
            else:
                torch._foreach_add_(self.total, weights)
            self.steps += steps
            self.next += 1


class SWAD(Method):
    """SWAD: dense weight averaging over the validation-loss valley, with BN recomputed."""

    uses_attributes = False

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        n_converge: Annotated[int, Interval(ge=1)] = 3,
        n_tolerance: Annotated[int, Interval(ge=1)] = 6,
        tolerance_ratio: Annotated[float, Interval(ge=0)] = 0.3,
    ) -> None:
        super().__init__(backbone, info)
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self._segment: list[torch.Tensor] | None = None
        self._segment_steps = 0

    def _weights(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.parameters()]

    def after_step(self) -> None:
        weights = [w.float() for w in self._weights()]
        if self._segment is None:
            self._segment = [w.clone() for w in weights]
        else:
            torch._foreach_add_(self._segment, weights)
        self._segment_steps += 1

    def on_validation(self, epoch: int, values: dict[str, float]) -> dict[str, float]:
        if self._segment is not None:
            self.valley.add([s.cpu() for s in self._segment], self._segment_steps, values["val/epoch_bce"])
        self._segment, self._segment_steps = None, 0
        return {"swad/start": _epoch(self.valley.start), "swad/end": _epoch(self.valley.end)}

    def on_train_end(self, train_images: TrainImages) -> bool:
        self.valley.finish()
        average = self.valley.average()
        if average is None:
            return False
        with torch.no_grad():
            for p, a in zip(self._weights(), average, strict=True):
                p.copy_(a.to(device=p.device, dtype=p.dtype))
            update_bn(train_images(), self)
        self.eval()
        return True

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"tolerance_ratio": trial.suggest_float("tolerance_ratio", 0.1, 0.5)}


def _epoch(index: int | None) -> float:
    return float(-1 if index is None else index)
