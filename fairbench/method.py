"""The Method interface: everything a debiasing method may change, and nothing else.

A method wraps the shared backbone. It may add modules (an adversary), define the per-batch
loss from the model output and the batch, weight or resample the training set, add optimiser
parameter groups, react at the start of an epoch, and declare its hyperparameters for tuning.
It may also replace the optimiser step (:meth:`Method.train_step`, e.g. two passes for
sharpness-aware minimisation), watch the weights after every step and the validation numbers
after every epoch (:meth:`Method.after_step`, :meth:`Method.on_validation`), replace the weights
that are finally evaluated (:meth:`Method.on_train_end`, e.g. a weight average), and receive
each sample's group when it predicts (``uses_attributes_at_test``). The trainer calls these
hooks the same way for every method and never branches on its name.

Methods whose ``uses_attributes`` is False never see demographic codes: the trainer gives
them batches whose ``group`` is None and a :class:`TrainInfo` without groups, and never calls
their ``forward`` with a group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from fairbench.model import Backbone, ModelOutput

ForwardLoss = Callable[[], dict[str, torch.Tensor]]
"""Runs the forward pass of the current batch (under the trainer's autocast) and returns the
method's loss parts; :meth:`Method.train_step` may call it more than once."""
TrainImages = Callable[[], Iterator[torch.Tensor]]
"""Yields the training set once more as model-ready (augmented) image batches on the device."""


@dataclass(frozen=True)
class TrainInfo:
    """What a method may know about its training set before training starts.

    ``groups`` holds the training attribute's code per training sample (-1 unknown) and is
    None for methods that do not use attributes. ``input_shape`` is (C, H, W) of the model's
    input; ``label_names`` the dataset's clinical finding names; ``data_folder`` the dataset's
    prepared folder, where dataset-side files such as label embeddings are kept.
    """

    labels: torch.Tensor
    groups: torch.Tensor | None
    group_names: tuple[str, ...]
    attribute: str | None
    epochs: int
    steps_per_epoch: int
    input_shape: tuple[int, int, int] = (3, 224, 224)
    label_names: tuple[str, ...] = ()
    data_folder: Path | None = None


@dataclass
class Batch:
    """One training batch on the device.

    ``index`` is each sample's position in the training split (to look up per-sample weights);
    ``group`` is the training attribute's code, or None for methods without attributes.
    """

    image: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    group: torch.Tensor | None


class Method(nn.Module):
    """Base class of methods (registered in the ``fairbench.methods`` entry-point group).

    Keyword arguments of a subclass's ``__init__`` after ``backbone`` and ``info`` are its
    options; their annotations say how ``-o key=value`` strings are converted.
    """

    uses_attributes: ClassVar[bool] = False
    uses_attributes_at_test: ClassVar[bool] = False
    """True for methods that need the sensitive attribute of each sample to predict (e.g. a
    group-specific normalisation); shown by ``fairbench list`` and on the leaderboard. Such a
    method (it must also set ``uses_attributes``) is called as ``method(x, group=codes)`` in
    training and prediction, codes -1 where unknown. Where an option decides it, override
    :meth:`attributes_at_test`."""
    clip_grad_norm: float | None = None
    """When set, the default :meth:`train_step` clips the gradient norm of all parameters to it
    after each backward pass."""

    def __init__(self, backbone: Backbone, info: TrainInfo) -> None:
        super().__init__()
        self.backbone = backbone
        self.info = info

    @classmethod
    def attributes_at_test(cls, options: dict[str, Any]) -> bool:
        """Whether the method with these options needs each sample's group to predict (by
        default the class flag); the run is tagged with this resolved value."""
        return cls.uses_attributes_at_test

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.backbone(x)

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss to minimise under ``"loss"``; other entries are logged as ``train/<name>``."""
        bce = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label)
        return {"loss": bce, "bce": bce}

    def sampler(self) -> Sampler[int] | None:
        """A sampler over training positions, or None for plain shuffling."""
        return None

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; the default trains every parameter alike."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (0-based), e.g. for a warm-up schedule."""

    def train_step(self, forward_loss: ForwardLoss, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """One optimiser step on the current batch; returns the loss parts to log.

        The default is one forward pass, backward and step. A method that needs the gradient
        elsewhere (e.g. at perturbed weights) calls ``forward_loss`` again.
        """
        parts = forward_loss()
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip_grad_norm)
        optimizer.step()
        return parts

    def after_step(self) -> None:
        """Called after every optimiser step, e.g. to collect the weights for an average."""

    def on_validation(self, epoch: int, values: dict[str, float]) -> dict[str, float]:
        """Called after each epoch's validation with its numbers (``val/epoch_auc``,
        ``val/epoch_bce``, ``train/*``); what it returns is logged with them."""
        return {}

    def on_train_end(self, train_images: TrainImages) -> bool:
        """Called once the selected epoch's weights are restored, before val and test are
        predicted. Return True after replacing the weights (e.g. with an average whose BN
        statistics are recomputed on ``train_images()``): validation is then predicted anew."""
        return False

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """The method's own hyperparameters drawn from an Optuna trial (none by default)."""
        return {}

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
