"""The sample contract every dataset meets, and the batch loader the trainer uses.

A dataset adapter turns its raw download into three :class:`Split` objects of plain arrays
(images N x C x H x W, uint8 or float16, possibly memory-mapped; labels; attribute codes).
Batches are gathered by index in one array operation per batch, moved to the device as stored,
and converted and normalised there, so no per-sample Python transform runs in training.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split: ``labels`` (N,) in {0, 1}, ``attrs`` (N, A) with -1 unknown, and its images.

    ``images`` is (M, C, H, W); ``rows`` (N,) says which of its rows belong to this split, so
    three splits can share one memory-mapped cache without copying it. Without ``rows`` the
    split owns all of ``images``.
    """

    images: np.ndarray
    labels: np.ndarray
    attrs: np.ndarray
    rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {self.images.shape}")
        n = len(self.images) if self.rows is None else len(self.rows)
        if len(self.labels) != n or len(self.attrs) != n:
            raise ValueError(f"split sizes disagree: {n} images, {len(self.labels)} labels, {len(self.attrs)} attrs")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The images at ``positions`` of this split, gathered in one indexing call."""
        return self.images[positions if self.rows is None else self.rows[positions]]


@dataclass
class Splits:
    """The three splits of a dataset plus what is needed to read them.

    ``mean`` and ``std`` are per channel, in the units of ``images`` after scaling by ``scale``
    (uint8 images use ``scale = 1/255``). When ``size`` is set and differs from the stored
    size, batches are resized to ``size x size`` on the device.
    """

    train: Split
    val: Split
    test: Split
    attributes: dict[str, list[str]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0 / 255.0
    augment: tuple[str, ...] = ()
    size: int | None = None

    def __getitem__(self, name: str) -> Split:
        if name not in SPLITS:
            raise KeyError(name)
        return getattr(self, name)

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])


class Dataset:
    """Base class of dataset adapters (registered in the ``fairbench.datasets`` group).

    Constructor keyword arguments are the dataset's options (``-D key=value`` on the CLI).
    """

    name: ClassVar[str] = ""
    attributes: ClassVar[dict[str, list[str]]] = {}
    in_chans: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 224
    cache_size: ClassVar[int] = 256
    needs_prepare: ClassVar[bool] = True

    def is_prepared(self, data_dir: Path) -> bool:
        """Whether ``load`` can run from ``data_dir`` without a ``fairbench prepare`` first."""
        return not self.needs_prepare

    def prepare(self, source: Path, folder: Path, *, size: int, skip_missing: bool, workers: int | None):
        """Validate the raw download in ``source``, write the images into ``folder`` and return
        the metadata table (a pandas DataFrame with ``split``, ``label`` and attribute codes)."""
        raise NotImplementedError(f"dataset '{self.name}' needs no preparation")

    def load(self, data_dir: Path, image_size: int) -> Splits:
        raise NotImplementedError


class _Gather(torch.utils.data.Dataset):
    """Indexed by a list of positions; returns the whole batch from one fancy-indexing call."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(positions, dtype=np.int64)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.split.take(idx))),
            "label": torch.from_numpy(self.split.labels[idx].astype(np.int64)),
            "attrs": torch.from_numpy(self.split.attrs[idx].astype(np.int64)),
            "index": torch.from_numpy(idx),
        }


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    split: Split,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    sampler: Sampler[int] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of whole batches gathered by index.

    Training shuffles with a seeded generator (or draws from ``sampler``, a method's choice)
    and drops a last batch of one sample, which would break batch normalisation.
    """
    generator = torch.Generator().manual_seed(seed)
    if sampler is None:
        sampler = RandomSampler(split, generator=generator) if train else SequentialSampler(split)
    n = len(sampler) if hasattr(sampler, "__len__") else len(split)
    drop_last = train and n % batch_size == 1
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(
        _Gather(split),
        sampler=batches,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker if num_workers else None,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def default_num_workers() -> int:
    """Loader workers: none on a small CPU machine (the model is the bottleneck), else 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 4 else min(8, cores // 2)


class DeviceTransform:
    """Converts a uint8/float16 batch on the device to normalised float, with batched augmentation.

    Augmentations (training only): ``hflip`` and ``vflip``, each applied to a random half of
    the batch with one tensor operation.
    """

    def __init__(self, splits: Splits, device: torch.device, channels_last: bool = False) -> None:
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(splits.mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(splits.std, dtype=torch.float32, device=device).view(shape)
        self.scale = splits.scale
        self.augment = splits.augment
        self.size = splits.size
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float() * self.scale
        x = (x - self.mean) / self.std
        if self.size is not None and x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        if train:
            for aug, dim in (("hflip", 3), ("vflip", 2)):
                if aug in self.augment:
                    flip = torch.rand(x.shape[0], device=x.device) < 0.5
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(dim), x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def iterate_device(loader: DataLoader, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches moved to ``device`` (non-blocking when memory is pinned)."""
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
