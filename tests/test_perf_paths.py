"""The trainer's fast paths compute exactly what the plain paths compute, and stay seeded.

One-draw augmentation, fused / multi-tensor optimiser steps, device-resident evaluation
batches, the host-blocked timer and the methods' sync-free losses.
"""

import math
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fairbench.methods.adversarial import Adversarial, adversary_loss
from fairbench.methods.reweight import Reweight
from scipy import stats
from test_trainer import tiny_splits

from fairbench.cli import main
from fairbench.data import DeviceTransform, ResidentBatches, Stopwatch, eval_batches, iterate_device, make_loader
from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import ModelOutput, create_backbone
from fairbench.trainer import TrainConfig, fit, make_optimizer, predict, seed_everything

CPU = torch.device("cpu")
ALL = ("crop", "hflip", "vflip", "rotate")


def augmented_splits(n=64):
    splits = tiny_splits(n=n)
    splits.augment = ALL
    splits.size = 12
    return splits


def one_epoch(seed, splits):
    config = TrainConfig(epochs=1, patience=0, batch_size=16, num_workers=0, device="cpu", seed=seed)
    seed_everything(seed)
    return fit(Method, {}, create_backbone("test_resnet", 3), splits, "sex", config, progress=False)


def test_two_seeded_epochs_end_with_identical_weights_and_another_seed_does_not():
    splits = augmented_splits()
    a, b = one_epoch(0, splits), one_epoch(0, splits)
    assert np.array_equal(a.head, b.head)
    assert np.array_equal(a.test_features, b.test_features)
    assert np.array_equal(a.test.scores, b.test.scores)
    assert a.history[0]["train/loss"] == b.history[0]["train/loss"]
    assert not np.array_equal(a.head, one_epoch(1, splits).head)


def test_epoch_time_is_split_into_steps_validation_and_waiting():
    h = one_epoch(0, tiny_splits()).history[0]
    parts = h["steps_seconds"] + h["val_seconds"] + h["wait_seconds"]
    assert min(h["steps_seconds"], h["val_seconds"], h["wait_seconds"]) >= 0
    assert parts <= h["epoch_seconds"] + 1e-9


def test_all_augmentation_parameters_come_from_one_draw_with_the_documented_ranges():
    tf = DeviceTransform(augmented_splits(n=4), CPU, generator=torch.Generator().manual_seed(3))
    n = 20000
    p = tf.draw(n, CPU)
    # the same parameters from a single torch.rand(n, 7) of an identically seeded generator ...
    twin = torch.Generator().manual_seed(3)
    u = torch.rand(n, 7, generator=twin)
    assert torch.allclose(p.area, 0.6 + 0.4 * u[:, 0])
    assert torch.allclose(p.offset_y, -1 + 2 * u[:, 3])
    assert torch.equal(p.flip_x, torch.where(u[:, 5] < 0.5, -1.0, 1.0))
    # ... which was the only draw: both generators are in the same state afterwards
    assert torch.equal(tf.generator.get_state(), twin.get_state())
    uniform = {
        "area": (p.area, 0.6, 1.0),
        "log_ratio": (p.log_ratio, math.log(3 / 4), math.log(4 / 3)),
        "offset_x": (p.offset_x, -1.0, 1.0),
        "offset_y": (p.offset_y, -1.0, 1.0),
        "angle": (p.angle, -math.radians(15), math.radians(15)),
    }
    for name, (values, lo, hi) in uniform.items():
        assert values.min() >= lo - 1e-6 and values.max() <= hi + 1e-6, name
        assert stats.kstest(values.double().numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, name
    for flips in (p.flip_x, p.flip_y):
        assert set(flips.unique().tolist()) == {-1.0, 1.0}
        assert stats.binomtest(int((flips < 0).sum()), n, 0.5).pvalue > 1e-3


def test_disabled_augmentations_draw_their_identity():
    splits = tiny_splits(n=4)
    splits.augment = ("hflip",)
    p = DeviceTransform(splits, CPU).draw(500, CPU)
    assert torch.equal(p.area, torch.ones(500)) and torch.equal(p.log_ratio, torch.zeros(500))
    assert torch.equal(p.offset_x, torch.zeros(500)) and torch.equal(p.angle, torch.zeros(500))
    assert torch.equal(p.flip_y, torch.ones(500)) and (p.flip_x < 0).any()


def test_one_seed_gives_identical_augmented_batches_whatever_else_draws():
    splits = augmented_splits(n=4)
    images = torch.randint(0, 255, (32, 3, 16, 16), dtype=torch.uint8)
    outs = []
    for noise in (0, 5):
        tf = DeviceTransform(splits, CPU, generator=torch.Generator().manual_seed(7))
        torch.rand(noise)  # the global generator moves; the batches must not
        outs.append([tf(images, train=True) for _ in range(3)])
    for x, y in zip(*outs, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(outs[0][0], outs[0][1])


def tiny_method():
    torch.manual_seed(0)
    info = TrainInfo(labels=torch.zeros(8), groups=None, group_names=(), attribute=None, epochs=1, steps_per_epoch=1)
    return Method(create_backbone("test_resnet", 3), info)


IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_and_multi_tensor_steps_equal_the_per_parameter_loop(kind):
    assert make_optimizer(tiny_method(), TrainConfig(optimizer=kind), CPU).defaults["foreach"] is True
    opt_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    model = tiny_method()
    start = [p.detach().clone() for p in model.parameters()]
    copies = {impl: [p.clone().requires_grad_() for p in start] for impl in IMPLEMENTATIONS}
    opts = {impl: opt_cls(copies[impl], lr=1e-2, weight_decay=0.1, **flags) for impl, flags in IMPLEMENTATIONS.items()}
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0.0, 1.0] * 4)
    for _ in range(3):
        # the model's real gradients at the loop's weights, given to every implementation
        with torch.no_grad():
            for p, q in zip(model.parameters(), copies["loop"], strict=True):
                p.copy_(q)
        model.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x).logits, y).backward()
        for impl, opt in opts.items():
            for p, q in zip(model.parameters(), copies[impl], strict=True):
                q.grad = p.grad.clone()
            opt.step()
    loop = torch.cat([q.detach().flatten() for q in copies["loop"]])
    assert not torch.allclose(loop, torch.cat([p.flatten() for p in start]))
    for impl in ("foreach", "fused"):
        other = torch.cat([q.detach().flatten() for q in copies[impl]])
        assert torch.allclose(other, loop, rtol=1e-6, atol=1e-7), impl


def test_resident_and_worker_evaluation_give_the_loaders_batches_and_predictions():
    splits = tiny_splits(n=37)
    method = tiny_method().eval()
    tf = DeviceTransform(splits, CPU)
    plain = make_loader(splits.val, 8, train=False, seed=0)
    resident = eval_batches(splits.val, 8, CPU, resident=True)
    workers = eval_batches(splits.val, 8, CPU, num_workers=1)
    assert isinstance(resident, ResidentBatches) and not isinstance(workers, ResidentBatches)
    assert len(resident) == len(plain) == 5
    for a, b in zip(plain, resident, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    expected, _ = predict(method, plain, tf, CPU)
    for other in (resident, workers):
        scores, _ = predict(method, other, tf, CPU)
        assert np.array_equal(scores, expected)


def test_waiting_for_the_loader_is_timed():
    class Slow:
        def __iter__(self):
            for i in range(3):
                time.sleep(0.05)
                yield {"x": torch.tensor([i])}

    waited = Stopwatch()
    got = [b["x"].item() for b in iterate_device(Slow(), CPU, waited)]
    assert got == [0, 1, 2]
    assert 0.15 <= waited.seconds < 1.0


def test_method_losses_read_nothing_back_from_the_device():
    # on the meta device a tensor has no values: any data-dependent branch, boolean-mask
    # indexing or .item() would raise, exactly where it would make a GPU step wait
    meta = torch.device("meta")
    groups = torch.tensor([0, -1, 1, 1]).to(meta)
    assert adversary_loss(torch.randn(4, 2).to(meta), groups).shape == ()
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    info = TrainInfo(labels, torch.tensor([0, 1, 1, 0, -1, 0]), ("f", "m"), "sex", epochs=2, steps_per_epoch=1)
    for cls, options in ((Adversarial, {"warmup_epochs": 1}), (Reweight, {})):
        method = cls(create_backbone("test_resnet", 3), info, **options).to(meta)
        method.on_epoch_start(1)
        dim = method.backbone.feature_dim
        out = ModelOutput(logits=torch.zeros(4, device=meta), features=torch.zeros(4, dim, device=meta))
        batch = Batch(None, torch.zeros(4, device=meta), torch.arange(4, device=meta), groups)
        assert method.loss(out, batch)["loss"].shape == ()


def test_adversarial_logs_the_epochs_strength():
    labels = torch.tensor([0, 1, 0, 1])
    info = TrainInfo(labels, torch.tensor([0, 1, 1, 0]), ("f", "m"), "sex", epochs=3, steps_per_epoch=1)
    method = Adversarial(create_backbone("test_resnet", 3), info, lambda_adv=2.0, warmup_epochs=2)
    out = ModelOutput(logits=torch.zeros(4), features=torch.zeros(4, method.backbone.feature_dim))
    batch = Batch(None, labels.float(), torch.arange(4), info.groups)
    logged = []
    for epoch in range(3):
        method.on_epoch_start(epoch)
        logged.append(method.loss(out, batch)["lambda_adv"].item())
    assert logged == [0.0, 1.0, 2.0]


def test_deterministic_is_a_run_option_on_by_default(monkeypatch):
    seen = []
    monkeypatch.setattr("fairbench.experiment.run_experiment", lambda config, **kw: seen.append(config) or 1 / 0)
    for flag, expected in (([], True), (["--no-deterministic"], False)):
        CliRunner().invoke(main, ["run", *flag])
        assert seen[-1].train.deterministic is expected
    seed_everything(0, deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    seed_everything(0)
    assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
