"""One training loop for every method.

Adam or AdamW; early stopping with patience on a validation selection rule (``val_auc`` by
default, ``worst_group_auc`` or ``val_loss``); the best epoch's weights are restored;
validation and test predictions come from that epoch (or from the weights a method's
``on_train_end`` hook puts in their place, e.g. a weight average). Seeding covers Python,
NumPy, torch, the loader and the augmentation draws. On CUDA the forward pass runs under bf16
autocast in channels_last layout, the optimiser step is fused, the next batch is copied while
the current one trains, and the training step never waits for the device (losses are summed
there and read once per epoch).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fairbench.data import (
    DeviceTransform,
    Split,
    Splits,
    Stopwatch,
    default_num_workers,
    eval_batches,
    iterate_device,
    make_loader,
)
from fairbench.errors import FairbenchError
from fairbench.method import Batch, Method, TrainInfo
from fairbench.metrics import roc_auc
from fairbench.model import Backbone

EpochCallback = Callable[[int, dict[str, float]], None]
FeatureCallback = Callable[[str, int, np.ndarray, np.ndarray, np.ndarray], None]
"""(split, epoch, penultimate features, scores, head weight) for ``train`` and ``val`` each epoch."""


@dataclass
class TrainConfig:
    """Knobs of the shared trainer; identical for every method."""

    epochs: int = 10
    patience: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: Literal["adam", "adamw"] = "adamw"
    seed: int = 0
    device: str = "auto"
    num_workers: int | None = None
    compile: bool = False
    select: Literal["val_auc", "worst_group_auc", "val_loss"] = "val_auc"
    deterministic: bool = True
    """Deterministic kernels (see :func:`set_deterministic`): one seed, one result."""


@dataclass
class Predictions:
    """Scores (probability of the positive class), labels and attribute codes of one split."""

    scores: np.ndarray
    labels: np.ndarray
    attrs: np.ndarray


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    best_val_auc: float
    val: Predictions
    test: Predictions | None
    seconds: float
    test_features: np.ndarray | None = None
    head: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and choose the kernels (:func:`set_deterministic`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_deterministic(deterministic)


def set_deterministic(on: bool) -> None:
    """With ``on``: cuDNN's deterministic algorithms without autotuning, and torch's
    deterministic implementations wherever one exists (ops without one warn instead of
    failing), so a seed reproduces a run exactly on the same machine. Off: cuDNN autotunes
    its fastest (possibly non-deterministic) algorithms. Uninitialised memory is never
    filled: fairbench never reads it, and filling costs a pass over every new buffer."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def make_optimizer(method: Method, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW over the method's parameter groups: one fused kernel per step on CUDA,
    the multi-tensor (foreach) implementation elsewhere; both compute the same update as the
    per-parameter loop."""
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return opt_cls(
        method.param_groups(config.lr, config.weight_decay), lr=config.lr, weight_decay=config.weight_decay, **fast
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; other names are passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FairbenchError(f"--device {name}: {exc}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FairbenchError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


class _Reporter:
    """A rich progress bar on a terminal; one plain line per epoch otherwise."""

    def __init__(self, epochs: int, steps: int, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.enabled = enabled
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.epoch_task = self.progress.add_task("epochs", total=epochs)
            self.step_task = self.progress.add_task("batches", total=steps)

    def __enter__(self) -> _Reporter:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def step(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.step_task)

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        if self.progress is not None:
            self.progress.advance(self.epoch_task)
            self.progress.reset(self.step_task)
            self.progress.console.print(f"epoch {epoch + 1}: {text}")
        elif self.enabled:
            print(f"epoch {epoch + 1}: {text}", file=sys.stderr, flush=True)


@torch.no_grad()
def predict(
    method: Method,
    loader,
    transform: DeviceTransform,
    device: torch.device,
    features: bool = False,
    group_column: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Positive-class probabilities of every sample in loader order, and (when asked) their
    penultimate features, from the same forward pass. With ``group_column`` the method is
    given each sample's code of that attribute (methods that use attributes at test only)."""
    method.eval()
    scores, feats = [], []
    for batch in iterate_device(loader, device):
        x = transform(batch["image"], train=False)
        with _autocast(device):
            out = method(x) if group_column is None else method(x, group=batch["attrs"][:, group_column])
        scores.append(torch.sigmoid(out.logits.double()))
        if features:
            feats.append(out.features.float())
    return torch.cat(scores).cpu().numpy(), torch.cat(feats).cpu().numpy() if features else None


SELECTION_RULES = ("val_auc", "worst_group_auc", "val_loss")


def selection_score(rule: str, scores: np.ndarray, labels: np.ndarray, groups: np.ndarray | None) -> float:
    """The validation score an epoch is selected on (higher is better).

    ``val_auc``: AUC; ``worst_group_auc``: the lowest AUC over the groups of the training
    attribute that have both classes (``groups`` holds their codes, -1 unknown); ``val_loss``:
    minus the binary cross-entropy.
    """
    if rule == "val_auc":
        return roc_auc(scores, labels)
    if rule == "val_loss":
        return -_bce(scores, labels)
    if rule == "worst_group_auc":
        if groups is None:
            raise FairbenchError("--select worst_group_auc needs an attribute; pass --attribute")
        aucs = [roc_auc(scores[groups == g], labels[groups == g]) for g in np.unique(groups[groups >= 0])]
        aucs = [a for a in aucs if np.isfinite(a)]
        return min(aucs) if aucs else float("nan")
    raise FairbenchError(f"--select {rule}: use one of {', '.join(SELECTION_RULES)}")


def _head_weight(method: Method) -> np.ndarray:
    return method.backbone.net.get_classifier().weight.detach().float().cpu().numpy()


def _autocast(device: torch.device, enabled: bool | None = None):
    """bf16 autocast on CUDA, none elsewhere; ``enabled=True`` forces it on any device (the CPU's
    autocast casts like CUDA's, so the tests check the CUDA dtype path there)."""
    on = device.type == "cuda" if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


def train_step(
    method: Method, batch: Batch, optimizer: torch.optim.Optimizer, device: torch.device, group_in_forward: bool
) -> dict[str, torch.Tensor]:
    """One training step through the method's ``train_step`` and ``after_step`` hooks; the
    forward pass runs under autocast, with the batch's groups when ``group_in_forward``."""

    def forward_loss() -> dict[str, torch.Tensor]:
        with _autocast(device):
            out = method(batch.image, group=batch.group) if group_in_forward else method(batch.image)
        return method.loss(out, batch)

    parts = method.train_step(forward_loss, optimizer)
    method.after_step()
    return parts


def _bce(scores: np.ndarray, labels) -> float:
    """Mean binary cross-entropy of probabilities (clipped away from 0 and 1)."""
    p = np.clip(scores, 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _predictions(split: Split, scores: np.ndarray) -> Predictions:
    return Predictions(scores=scores, labels=np.asarray(split.labels), attrs=np.asarray(split.attrs))


def fit(
    method_cls: type[Method],
    options: dict[str, Any],
    backbone: Backbone,
    splits: Splits,
    attribute: str | None,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    score_test: bool = True,
    on_features: FeatureCallback | None = None,
) -> FitResult:
    """Train ``method_cls(backbone, info, **options)`` and return its best epoch's predictions.

    ``attribute`` is the sensitive attribute given to methods that use attributes.
    ``on_epoch(epoch, values)`` receives each epoch's ``train/*`` and ``val/*`` numbers; an
    exception it raises (e.g. a pruning signal) stops training and propagates. With
    ``score_test=False`` (tuning) the test split is never scored. ``on_features`` receives the
    penultimate features of the training set (one extra evaluation pass) and of the validation
    set (from the validation pass) after every epoch; the test features of the best epoch are
    always returned. Each epoch's ``epoch_seconds`` is split into ``steps_seconds`` (the
    training steps, up to the device finishing them), ``val_seconds`` (the validation pass) and
    ``wait_seconds`` (the host blocked on the training loader).
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    set_deterministic(config.deterministic)
    for name in ("val", "test"):
        labels = np.asarray(splits[name].labels)
        if labels.min() == labels.max():
            raise FairbenchError(f"the {name} split has only label {labels[0]}: AUC needs both classes")
    num_workers = default_num_workers() if config.num_workers is None else config.num_workers
    pin = device.type == "cuda"
    train = splits.train
    steps = len(train) // config.batch_size + (len(train) % config.batch_size > 1)
    attr_col = list(splits.attributes).index(attribute) if attribute is not None else None
    group_col = attr_col if method_cls.uses_attributes and method_cls.attributes_at_test(options) else None
    info = TrainInfo(
        labels=torch.as_tensor(np.asarray(train.labels), dtype=torch.int64),
        groups=(
            torch.as_tensor(np.asarray(train.attrs)[:, attr_col], dtype=torch.int64)
            if method_cls.uses_attributes and attr_col is not None
            else None
        ),
        group_names=tuple(splits.attributes[attribute]) if method_cls.uses_attributes and attribute else (),
        attribute=attribute if method_cls.uses_attributes else None,
        epochs=config.epochs,
        steps_per_epoch=steps,
        input_shape=splits.input_shape,
        label_names=tuple(splits.label_names),
        data_folder=splits.folder,
    )
    if method_cls.uses_attributes and attr_col is None:
        raise FairbenchError(f"method '{method_cls.__name__}' needs a training attribute: pass --attribute")
    method = method_cls(backbone, info, **options).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    if config.compile:
        method.backbone.compile()
    augment_rng = torch.Generator(device=device).manual_seed(config.seed)
    transform = DeviceTransform(splits, device, channels_last=channels_last, generator=augment_rng)
    optimizer = make_optimizer(method, config, device)
    loaders = {
        "train": make_loader(
            train,
            config.batch_size,
            train=True,
            seed=config.seed,
            sampler=method.sampler(),
            num_workers=num_workers,
            pin_memory=pin,
        ),
        "val": eval_batches(splits.val, config.batch_size * 2, device, num_workers=num_workers),
    }
    if on_features is not None:
        loaders["train_eval"] = eval_batches(train, config.batch_size * 2, device, num_workers=num_workers)
    best_score, best_auc, best_epoch, best_state, best_val = -np.inf, np.nan, -1, None, None
    val_labels = np.asarray(splits.val.labels)
    val_groups = np.asarray(splits.val.attrs)[:, attr_col] if attr_col is not None else None
    history: list[dict[str, float]] = []
    stale = 0
    with _Reporter(config.epochs, steps, progress) as reporter:
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            method.train()
            method.on_epoch_start(epoch)
            sums: dict[str, torch.Tensor] = {}
            seen = 0
            waited = Stopwatch()
            for raw in iterate_device(loaders["train"], device, waited):
                x = transform(raw["image"], train=True)
                batch = Batch(
                    image=x,
                    label=raw["label"].float(),
                    index=raw["index"],
                    group=raw["attrs"][:, attr_col] if info.groups is not None else None,
                )
                parts = train_step(method, batch, optimizer, device, group_col is not None)
                n = x.shape[0]
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * n
                seen += n
                reporter.step()
            values = {
                f"train/{k}": v / seen
                for k, v in zip(sums, torch.stack([v.reshape(()) for v in sums.values()]).tolist(), strict=True)
            }
            t_val = time.perf_counter()
            val_scores, val_features = predict(
                method, loaders["val"], transform, device, on_features is not None, group_col
            )
            val_seconds = time.perf_counter() - t_val
            if on_features is not None:
                head = _head_weight(method)
                train_scores, train_features = predict(
                    method, loaders["train_eval"], transform, device, True, group_col
                )
                on_features("train", epoch, train_features, train_scores, head)
                on_features("val", epoch, val_features, val_scores, head)
            val_auc = roc_auc(val_scores, val_labels)
            score = selection_score(config.select, val_scores, val_labels, val_groups)
            values["val/epoch_auc"] = val_auc
            values["val/epoch_select"] = score
            values["val/epoch_bce"] = _bce(val_scores, val_labels)
            values.update(method.on_validation(epoch, values))
            values["epoch_seconds"] = time.perf_counter() - t0
            values["steps_seconds"] = t_val - t0 - waited.seconds
            values["val_seconds"] = val_seconds
            values["wait_seconds"] = waited.seconds
            history.append(values)
            reporter.epoch(epoch, values)
            if on_epoch is not None:
                on_epoch(epoch, values)
            if score > best_score or best_state is None:
                best_score, best_auc, best_epoch, stale = score, val_auc, epoch, 0
                best_state = {k: v.detach().clone() for k, v in method.state_dict().items()}
                best_val = val_scores
            else:
                stale += 1
                if config.patience and stale >= config.patience:
                    break
    method.load_state_dict(best_state)
    if method.on_train_end(
        lambda: (transform(b["image"], train=True) for b in iterate_device(loaders["train"], device))
    ):
        best_val = predict(method, loaders["val"], transform, device, group_column=group_col)[0]
        best_auc = roc_auc(best_val, splits.val.labels)
    test, test_features = None, None
    if score_test:
        test_loader = eval_batches(splits.test, config.batch_size * 2, device, num_workers=num_workers)
        test_scores, test_features = predict(
            method, test_loader, transform, device, features=True, group_column=group_col
        )
        test = _predictions(splits.test, test_scores)
    return FitResult(
        best_epoch=best_epoch,
        epochs_run=len(history),
        best_val_auc=float(best_auc),
        val=_predictions(splits.val, best_val),
        test=test,
        seconds=time.perf_counter() - started,
        history=history,
        test_features=test_features,
        head=_head_weight(method),
    )
