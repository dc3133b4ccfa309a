"""The Method interface: everything a debiasing method may change, and nothing else.

A method wraps the shared backbone. It may add modules (an adversary), define the per-batch
loss from the model output and the batch, weight or resample the training set, add optimiser
parameter groups, react at the start of an epoch, and declare its hyperparameters for tuning.
The trainer calls these hooks the same way for every method and never branches on its name.

Methods whose ``uses_attributes`` is False never see demographic codes: the trainer gives
them batches whose ``group`` is None and a :class:`TrainInfo` without groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from fairbench.model import Backbone, ModelOutput


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
    group-specific normalisation); shown by ``fairbench list`` and on the leaderboard."""
    clip_grad_norm: float | None = None
    """When set, the trainer clips the gradient norm of all parameters to it after each backward."""

    def __init__(self, backbone: Backbone, info: TrainInfo) -> None:
        super().__init__()
        self.backbone = backbone
        self.info = info

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

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """The method's own hyperparameters drawn from an Optuna trial (none by default)."""
        return {}

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
