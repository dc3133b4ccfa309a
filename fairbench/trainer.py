"""One training loop for every method.

Adam or AdamW; early stopping on validation AUC with patience; the best epoch's weights are
restored; validation and test predictions come from that epoch. Seeding covers Python, NumPy,
torch and the loader. On CUDA the forward pass runs under bf16 autocast in channels_last layout.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fairbench.data import DeviceTransform, Split, Splits, default_num_workers, iterate_device, make_loader
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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


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
    method: Method, loader, transform: DeviceTransform, device: torch.device, features: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Positive-class probabilities of every sample in loader order, and (when asked) their
    penultimate features, from the same forward pass."""
    method.eval()
    scores, feats = [], []
    for batch in iterate_device(loader, device):
        with _autocast(device):
            out = method(transform(batch["image"], train=False))
        scores.append(torch.sigmoid(out.logits.double()))
        if features:
            feats.append(out.features.float())
    return torch.cat(scores).cpu().numpy(), torch.cat(feats).cpu().numpy() if features else None


def _head_weight(method: Method) -> np.ndarray:
    return method.backbone.net.get_classifier().weight.detach().float().cpu().numpy()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


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
    always returned.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    for name in ("val", "test"):
        labels = np.asarray(splits[name].labels)
        if labels.min() == labels.max():
            raise FairbenchError(f"the {name} split has only label {labels[0]}: AUC needs both classes")
    num_workers = default_num_workers() if config.num_workers is None else config.num_workers
    pin = device.type == "cuda"
    train = splits.train
    steps = len(train) // config.batch_size + (len(train) % config.batch_size > 1)
    attr_col = list(splits.attributes).index(attribute) if attribute is not None else None
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
    transform = DeviceTransform(splits, device, channels_last=channels_last)
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(
        method.param_groups(config.lr, config.weight_decay), lr=config.lr, weight_decay=config.weight_decay
    )
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
        "val": make_loader(splits.val, config.batch_size * 2, train=False, seed=config.seed, pin_memory=pin),
        "test": make_loader(splits.test, config.batch_size * 2, train=False, seed=config.seed, pin_memory=pin),
    }
    if on_features is not None:
        loaders["train_eval"] = make_loader(train, config.batch_size * 2, train=False, seed=config.seed, pin_memory=pin)
    best_auc, best_epoch, best_state, best_val = -np.inf, -1, None, None
    history: list[dict[str, float]] = []
    stale = 0
    with _Reporter(config.epochs, steps, progress) as reporter:
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            method.train()
            method.on_epoch_start(epoch)
            sums: dict[str, torch.Tensor] = {}
            seen = 0
            for raw in iterate_device(loaders["train"], device):
                x = transform(raw["image"], train=True)
                batch = Batch(
                    image=x,
                    label=raw["label"].float(),
                    index=raw["index"],
                    group=raw["attrs"][:, attr_col] if info.groups is not None else None,
                )
                with _autocast(device):
                    out = method(x)
                parts = method.loss(out, batch)
                optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                if method.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(method.parameters(), method.clip_grad_norm)
                optimizer.step()
                n = x.shape[0]
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * n
                seen += n
                reporter.step()
            val_scores, val_features = predict(method, loaders["val"], transform, device, on_features is not None)
            if on_features is not None:
                head = _head_weight(method)
                train_scores, train_features = predict(method, loaders["train_eval"], transform, device, True)
                on_features("train", epoch, train_features, train_scores, head)
                on_features("val", epoch, val_features, val_scores, head)
            val_auc = roc_auc(val_scores, splits.val.labels)
            values = {f"train/{k}": float(v) / seen for k, v in sums.items()}
            values["val/epoch_auc"] = val_auc
            values["epoch_seconds"] = time.perf_counter() - t0
            history.append(values)
            reporter.epoch(epoch, values)
            if on_epoch is not None:
                on_epoch(epoch, values)
            if val_auc > best_auc:
                best_auc, best_epoch, stale = val_auc, epoch, 0
                best_state = {k: v.detach().clone() for k, v in method.state_dict().items()}
                best_val = val_scores
            else:
                stale += 1
                if config.patience and stale >= config.patience:
                    break
    method.load_state_dict(best_state)
    test, test_features = None, None
    if score_test:
        test_scores, test_features = predict(method, loaders["test"], transform, device, features=True)
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
