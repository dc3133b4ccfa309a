"""The sample contract every dataset meets, and the batch loader the trainer uses.

A dataset adapter turns its raw download into three :class:`Split` objects of plain arrays
(images N x C x H x W, uint8 or float16, possibly memory-mapped; labels; attribute codes).
Batches are gathered by index in one array operation per batch, moved to the device as stored,
and converted and normalised there, so no per-sample Python transform runs in training.
"""

from __future__ import annotations

import math
import os
import random
import time
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
    label_names: tuple[str, ...] = ()
    folder: Path | None = None

    def __getitem__(self, name: str) -> Split:
        if name not in SPLITS:
            raise KeyError(name)
        return getattr(self, name)

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's input after the device transform."""
        side = self.size or int(self.train.images.shape[-1])
        return (self.in_chans, side, side)


def splits_of_table(images: np.ndarray, table, attributes: dict[str, list[str]]) -> dict[str, Split]:
    """The train/val/test :class:`Split` views of a prepared cache: ``table`` (one row per image of
    ``images``, in order) holds ``split``, ``label`` and one code column per attribute; rows of any
    other split (e.g. ``excluded``) belong to none."""
    attrs = table[list(attributes)].to_numpy(np.int64)
    labels = table["label"].to_numpy(np.int64)
    split = table["split"].to_numpy()
    out = {}
    for name in SPLITS:
        rows = np.flatnonzero(split == name)
        out[name] = Split(images=images, labels=labels[rows], attrs=attrs[rows], rows=rows)
    return out


class Dataset:
    """Base class of dataset adapters (registered in the ``fairbench.datasets`` group).

    Constructor keyword arguments are the dataset's options (``-D key=value`` on the CLI).
    """

    name: ClassVar[str] = ""
    attributes: ClassVar[dict[str, list[str]]] = {}
    label_names: ClassVar[tuple[str, ...]] = ()
    """Clinical names of the dataset's findings (e.g. for label embeddings); may be empty."""
    crossings: ClassVar[tuple[str, ...]] = ()
    """Intersectional attributes evaluated by default, e.g. ``("race_x_sex",)``."""
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


AUGMENTATIONS = ("crop", "hflip", "vflip", "rotate")


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the training augmentations a dataset enables by name in ``Splits.augment``.

    ``crop``: random resized crop covering ``crop_scale`` of the image area with aspect ratio in
    ``crop_ratio`` (the usual Inception-style crop, narrowed for medical images);
    ``rotate``: a uniform rotation within ± ``max_degrees``; ``hflip`` / ``vflip``: each with
    probability 1/2.
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_degrees: float = 15.0


@dataclass
class AugmentParams:
    """One batch's augmentation parameters, one value per sample (see :class:`AugmentConfig`).

    ``area`` ~ U(crop_scale), ``log_ratio`` ~ U(log crop_ratio), ``offset_x`` / ``offset_y`` ~
    U(-1, 1) (the crop centre as a fraction of its free play), ``flip_x`` / ``flip_y`` in
    {-1, 1} with P(-1) = 1/2, ``angle`` ~ U(-max_degrees, max_degrees) in radians. A disabled
    augmentation gets its identity value (area 1, ratio 1, offset 0, no flip, angle 0).
    """

    area: torch.Tensor
    log_ratio: torch.Tensor
    offset_x: torch.Tensor
    offset_y: torch.Tensor
    flip_x: torch.Tensor
    flip_y: torch.Tensor
    angle: torch.Tensor


class DeviceTransform:
    """Turns a stored batch (uint8 or float16, on the device) into the model's input.

    Scaling and normalisation, then, in training, every enabled augmentation at once: each
    sample's crop, rotation and flips are composed into one 2 x 3 affine matrix and the whole
    batch is resampled by a single ``grid_sample`` call at the output size. All random
    parameters of a batch come from one ``torch.rand`` call on the device (one kernel launch
    instead of one per parameter), from ``generator`` when given, so a seeded run draws the
    same augmentations whatever else consumes torch's global generator. Evaluation only
    resizes (antialiased) when the stored size differs from ``Splits.size``.
    """

    def __init__(
        self,
        splits: Splits,
        device: torch.device,
        channels_last: bool = False,
        config: AugmentConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        unknown = set(splits.augment) - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; known: {', '.join(AUGMENTATIONS)}")
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(splits.mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(splits.std, dtype=torch.float32, device=device).view(shape)
        self.scale = splits.scale
        self.augment = splits.augment
        self.size = splits.size
        self.channels_last = channels_last
        self.config = config or AugmentConfig()
        self.generator = generator
        self.low, self.high, self.flip_p = self._ranges(device)

    def _ranges(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-column bounds mapping U(0, 1) draws to the parameters, and the flip probabilities."""
        cfg, on = self.config, set(self.augment)
        crop, rotate = "crop" in on, "rotate" in on
        log_ratio = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])) if crop else (0.0, 0.0)
        bounds = [
            cfg.crop_scale if crop else (1.0, 1.0),
            log_ratio,
            (-1.0, 1.0) if crop else (0.0, 0.0),
            (-1.0, 1.0) if crop else (0.0, 0.0),
            (-cfg.max_degrees, cfg.max_degrees) if rotate else (0.0, 0.0),
        ]
        low = torch.tensor([b[0] for b in bounds], dtype=torch.float32, device=device)
        high = torch.tensor([b[1] for b in bounds], dtype=torch.float32, device=device)
        flip_p = torch.tensor([0.5 * ("hflip" in on), 0.5 * ("vflip" in on)], dtype=torch.float32, device=device)
        return low, high, flip_p

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float()
        size = self.size or x.shape[-1]
        if train and self.augment:
            theta = self.affine(x.shape[0], x.device)
            grid = torch.nn.functional.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
            x = torch.nn.functional.grid_sample(
                x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
            )
        elif x.shape[-1] != size:
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        # resampling is linear, so scaling and normalising after it (on the output size) is exact
        x = (x * self.scale - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def draw(self, n: int, device: torch.device) -> AugmentParams:
        """The parameters of ``n`` samples from a single ``torch.rand(n, 7)`` draw."""
        u = torch.rand(n, 7, device=device, generator=self.generator)
        p = torch.lerp(self.low, self.high, u[:, :5])
        flips = torch.where(u[:, 5:] < self.flip_p, -1.0, 1.0)
        return AugmentParams(
            area=p[:, 0],
            log_ratio=p[:, 1],
            offset_x=p[:, 2],
            offset_y=p[:, 3],
            flip_x=flips[:, 0],
            flip_y=flips[:, 1],
            angle=torch.deg2rad(p[:, 4]),
        )

    def affine(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, 2, 3) matrices mapping output to input coordinates in [-1, 1]."""
        return compose_affine(self.draw(n, device))


def compose_affine(p: AugmentParams) -> torch.Tensor:
    """(n, 2, 3) matrices of the crop (half-sizes ``w``, ``h`` centred inside the image), the
    flips and the rotation; ``w = sqrt(area * ratio)`` and ``h = sqrt(area / ratio)``, each at
    most 1 (the crop never leaves the image)."""
    ratio = torch.exp(p.log_ratio)
    w = torch.sqrt(p.area * ratio).clamp(max=1.0)
    h = torch.sqrt(p.area / ratio).clamp(max=1.0)
    cx, cy = p.offset_x * (1 - w), p.offset_y * (1 - h)
    w, h = w * p.flip_x, h * p.flip_y
    cos, sin = torch.cos(p.angle), torch.sin(p.angle)
    return torch.stack([cos * w, -sin * h, cx, sin * w, cos * h, cy], dim=1).view(-1, 2, 3)


class Stopwatch:
    """Seconds the host spent blocked waiting for batches (summed over an epoch by the caller)."""

    def __init__(self) -> None:
        self.seconds = 0.0


class ResidentBatches:
    """An evaluation split held on the device once and read back in order, batch by batch.

    Used instead of a DataLoader when the split fits in device memory: evaluation then costs
    no host work per batch (no gather, no copy, no loader process). Yields the same batches
    as ``make_loader(split, batch_size, train=False)``.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device) -> None:
        positions = np.arange(len(split))
        self.batch_size = batch_size
        self.tensors = {
            "image": torch.from_numpy(np.ascontiguousarray(split.take(positions))).to(device),
            "label": torch.from_numpy(np.asarray(split.labels).astype(np.int64)).to(device),
            "attrs": torch.from_numpy(np.asarray(split.attrs).astype(np.int64)).to(device),
            "index": torch.from_numpy(positions).to(device),
        }

    def __len__(self) -> int:
        return math.ceil(len(self.tensors["index"]) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.tensors["index"]), self.batch_size):
            yield {k: v[start : start + self.batch_size] for k, v in self.tensors.items()}


RESIDENT_SHARE = 0.25
"""Largest share of the free device memory an evaluation split may take to be held there."""


def split_bytes(split: Split) -> int:
    """Bytes of a split's images."""
    return len(split) * int(np.prod(split.images.shape[1:])) * split.images.dtype.itemsize


def eval_batches(
    split: Split, batch_size: int, device: torch.device, *, num_workers: int = 0, resident: bool | None = None
) -> DataLoader | ResidentBatches:
    """Batches of an evaluation split in order: held on the device (:class:`ResidentBatches`)
    when ``resident``, by default on CUDA when the images take at most ``RESIDENT_SHARE`` of
    the free device memory; else a loader with ``num_workers`` workers and pinned memory on CUDA."""
    if resident is None:
        resident = device.type == "cuda" and split_bytes(split) <= RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]
    if resident:
        return ResidentBatches(split, batch_size, device)
    return make_loader(
        split, batch_size, train=False, seed=0, num_workers=num_workers, pin_memory=device.type == "cuda"
    )


def iterate_device(
    loader: DataLoader | ResidentBatches, device: torch.device, waited: Stopwatch | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches on ``device``; ``waited`` adds up the time blocked on the loader.

    On CUDA the next batch is fetched and its (pinned, non-blocking) copy issued on a side
    stream before the current one is handed out, so the copy overlaps the current step's
    kernels; the compute stream waits for the copy only when it uses the batch.
    """
    batches = iter(loader)
    resident = isinstance(loader, ResidentBatches)
    stream = torch.cuda.Stream(device) if device.type == "cuda" and not resident else None

    def fetch() -> dict[str, torch.Tensor] | None:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if waited is not None:
            waited.seconds += time.perf_counter() - t0
        if batch is None or resident:
            return batch
        if stream is None:
            return {k: v.to(device) for k, v in batch.items()}
        with torch.cuda.stream(stream):
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    upcoming = fetch()
    while upcoming is not None:
        current = upcoming
        if stream is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(stream)
            for v in current.values():
                v.record_stream(compute)
        upcoming = fetch()
        yield current
