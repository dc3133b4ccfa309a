from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import SubsetRandomSampler

from fairbench.data import DeviceTransform, Split, Splits, make_loader
from fairbench.method import Method
from fairbench.model import create_backbone
from fairbench.trainer import TrainConfig, fit, seed_everything, selection_score


def tiny_splits(n=64, seed=0):
    rng = np.random.default_rng(seed)

    def split():
        labels = rng.integers(0, 2, n)
        images = rng.integers(0, 255, (n, 3, 16, 16), dtype=np.uint8)
        images[labels == 1, 0] = 250  # learnable: red channel
        return Split(images=images, labels=labels, attrs=rng.integers(-1, 2, (n, 1)))

    return Splits(
        train=split(),
        val=split(),
        test=split(),
        attributes={"sex": ["female", "male"]},
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )


CONFIG = TrainConfig(epochs=3, patience=0, batch_size=16, num_workers=0, device="cpu")


def run(method_cls, splits, options=None, config=CONFIG, on_epoch=None):
    seed_everything(config.seed)
    bb = create_backbone("test_resnet", in_chans=3)
    return fit(method_cls, options or {}, bb, splits, "sex", config, on_epoch=on_epoch, progress=False)


class Recorder(Method):
    """Checks the hook surface: extra module, own loss term, sampler, parameter group, epoch hook."""

    uses_attributes = True
    seen: ClassVar[list] = []

    def __init__(self, backbone, info, *, extra_lr: float = 0.5):
        super().__init__(backbone, info)
        self.adversary = nn.Linear(backbone.feature_dim, 2)
        self.extra_lr = extra_lr
        self.epochs_started = []
        Recorder.seen = []
        Recorder.instance = self

    def sampler(self):
        positives = torch.nonzero(self.info.labels == 1).flatten().tolist()
        return SubsetRandomSampler(positives, generator=torch.Generator().manual_seed(0))

    def param_groups(self, lr, weight_decay):
        return [{"params": self.backbone.parameters()}, {"params": self.adversary.parameters(), "lr": self.extra_lr}]

    def on_epoch_start(self, epoch):
        self.epochs_started.append(epoch)

    def loss(self, out, batch):
        Recorder.seen.append((batch.index.clone(), batch.group.clone()))
        bce = F.binary_cross_entropy_with_logits(out.logits, batch.label)
        adv = F.cross_entropy(self.adversary(out.features), batch.group.clamp(min=0))
        return {"loss": bce + adv, "bce": bce, "adv": adv}


def test_hooks_reach_the_trainer_unchanged():
    splits = tiny_splits()
    epochs = []
    result = run(Recorder, splits, {"extra_lr": 0.25}, on_epoch=lambda e, v: epochs.append((e, v)))
    method = Recorder.instance
    assert method.epochs_started == [0, 1, 2]
    seen_index = torch.cat([i for i, _ in Recorder.seen]).numpy()
    assert (splits.train.labels[seen_index] == 1).all()  # the method's sampler was used
    seen_group = torch.cat([g for _, g in Recorder.seen]).numpy()
    assert np.array_equal(seen_group, splits.train.attrs[seen_index, 0])  # the training attribute
    assert [e for e, _ in epochs] == [0, 1, 2]
    assert {"train/loss", "train/bce", "train/adv", "val/epoch_auc"} <= set(epochs[0][1])
    assert result.epochs_run == 3


def test_methods_without_attributes_never_see_them():
    class Blind(Method):
        def loss(self, out, batch):
            assert batch.group is None and self.info.groups is None
            return super().loss(out, batch)

    run(Blind, tiny_splits(), config=TrainConfig(epochs=1, batch_size=16, num_workers=0, device="cpu"))


def test_same_seed_same_predictions():
    splits = tiny_splits()
    a = run(Method, splits)
    b = run(Method, splits)
    assert np.array_equal(a.test.scores, b.test.scores)


def test_early_stopping_restores_the_best_epoch():
    splits = tiny_splits()
    config = TrainConfig(epochs=8, patience=2, batch_size=16, lr=0.05, num_workers=0, device="cpu")
    result = run(Method, splits, config=config)
    aucs = [h["val/epoch_auc"] for h in result.history]
    assert result.best_epoch == int(np.argmax(aucs))
    assert result.epochs_run == len(aucs)
    if result.epochs_run < 8:
        assert result.epochs_run - 1 - result.best_epoch == 2
    assert result.best_val_auc == max(aucs)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(result.val.labels, result.val.scores) == result.best_val_auc


def test_loader_gathers_whole_batches_and_transform_normalises():
    splits = tiny_splits(n=10)
    loader = make_loader(splits.train, 4, train=False, seed=0)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert np.array_equal(batches[1]["image"].numpy(), splits.train.images[4:8])
    train_loader = make_loader(splits.train, 3, train=True, seed=0)
    sizes = [len(b["index"]) for b in train_loader]
    assert 1 not in sizes  # a last batch of one would break batch norm
    tf = DeviceTransform(splits, torch.device("cpu"))
    x = tf(torch.full((2, 3, 2, 2), 255, dtype=torch.uint8), train=False)
    assert torch.allclose(x, torch.full_like(x, (1.0 - 0.5) / 0.25))


def test_flip_augmentation_flips_a_random_part_of_the_batch():
    splits = tiny_splits(n=4)
    splits.augment = ("hflip",)
    tf = DeviceTransform(splits, torch.device("cpu"))
    images = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    out = tf(images, train=True)
    base = tf(images, train=False)
    flipped = [torch.allclose(out[i], base[i].flip(-1), atol=1e-5) for i in range(64)]
    kept = [torch.allclose(out[i], base[i], atol=1e-5) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_crop_and_rotation_stay_inside_the_image_and_give_the_target_size():
    splits = tiny_splits(n=4)
    splits.augment = ("crop", "hflip", "vflip", "rotate")
    splits.size = 12
    tf = DeviceTransform(splits, torch.device("cpu"))
    torch.manual_seed(1)
    theta = tf.affine(1000, torch.device("cpu"))
    scale_x = theta[:, :, 0].norm(dim=1)  # rotation keeps the column norms: the crop's half-widths
    scale_y = theta[:, :, 1].norm(dim=1)
    assert (scale_x <= 1 + 1e-6).all() and (scale_y <= 1 + 1e-6).all()
    area = scale_x * scale_y
    assert area.min() >= 0.6 - 1e-6 and area.max() <= 1 + 1e-6
    assert (theta[:, :, 2].abs() <= 1 - torch.minimum(scale_x, scale_y)[:, None] + 1e-6).all()
    x = tf(torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8), train=True)
    assert x.shape == (5, 3, 12, 12)
    a = tf(torch.full((2, 3, 16, 16), 128, dtype=torch.uint8), train=False)
    assert a.shape == (2, 3, 12, 12)


def test_identity_augmentation_equals_evaluation_transform():
    from fairbench.data import AugmentConfig

    splits = tiny_splits(n=4)
    splits.augment = ("crop", "rotate")
    tf = DeviceTransform(
        splits, torch.device("cpu"), config=AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_degrees=0.0)
    )
    images = torch.randint(0, 255, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(tf(images, train=True), tf(images, train=False), atol=1e-5)


def test_selection_rules_against_sklearn():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0.01, 0.99)
    g = rng.integers(-1, 3, 200)
    assert selection_score("val_auc", s, y, g) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert selection_score("val_loss", s, y, g) == pytest.approx(-log_loss(y, s), abs=1e-12)
    worst = min(roc_auc_score(y[g == k], s[g == k]) for k in range(3))
    assert selection_score("worst_group_auc", s, y, g) == pytest.approx(worst, abs=1e-12)


def test_the_epoch_is_selected_by_the_rule_and_logged():
    splits = tiny_splits(seed=4)
    seen = []
    config = TrainConfig(epochs=4, patience=0, batch_size=16, num_workers=0, device="cpu", select="val_loss")
    result = run(Method, splits, config=config, on_epoch=lambda e, v: seen.append(v))
    chosen = [v["val/epoch_select"] for v in seen]
    assert result.best_epoch == int(np.argmax(chosen))
    assert chosen[result.best_epoch] == max(chosen)
    assert all(v["val/epoch_select"] <= 0 for v in seen)  # minus the validation loss
