"""Scores keep full precision on the CUDA path: the head and the sigmoid run outside bf16 autocast.

The CPU's autocast casts linear layers and convolutions to bf16 as CUDA's does, so the CUDA dtype
path is checked here on the CPU.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fairbench import registry, trainer
from fairbench.data import DeviceTransform, Split, Splits, make_loader
from fairbench.method import Method, TrainInfo
from fairbench.model import create_backbone

SIZE = 32
N = 256


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_cpu_autocast_casts_like_cuda():
    # without this the tests below could not see a bf16 head
    with bf16():
        assert torch.nn.Linear(4, 1)(torch.randn(2, 4)).dtype == torch.bfloat16


def test_backbone_logits_are_the_float32_head_of_the_features_under_autocast():
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", 3).eval()
    with torch.no_grad(), bf16():
        out = backbone(torch.randn(8, 3, SIZE, SIZE))
    assert out.features.dtype == torch.bfloat16  # the body did run under autocast
    assert out.logits.dtype == torch.float32
    head = backbone.net.get_classifier()
    assert torch.equal(out.logits, F.linear(out.features.float(), head.weight, head.bias).squeeze(-1))


@pytest.mark.parametrize("name", registry.methods.names())
def test_every_methods_logits_are_float32_under_autocast(name):
    torch.manual_seed(0)
    labels = torch.arange(16) % 2
    info = TrainInfo(labels=labels, groups=labels.flip(0), group_names=("a", "b"), attribute="sex",
                     epochs=2, steps_per_epoch=1, input_shape=(3, SIZE, SIZE))  # fmt: skip
    method = registry.methods.get(name)(create_backbone("test_resnet", 3), info).eval()
    with torch.no_grad(), bf16():
        out = method(torch.randn(4, 3, SIZE, SIZE))
    assert out.logits.dtype == torch.float32


def nearby_images(seed=0):
    """N copies of one image, each with a few pixels moved by one grey level."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (3, SIZE, SIZE), dtype=np.uint8)
    images = np.repeat(base[None], N, axis=0)
    for i in range(N):
        c, y, x = rng.integers(0, 3), rng.integers(0, SIZE, 4), rng.integers(0, SIZE, 4)
        images[i, c, y, x] += 1
    return images


def test_predict_scores_keep_full_precision_under_autocast(monkeypatch):
    real = trainer._autocast
    used = []

    def forced(device):
        used.append(device)
        return real(device, enabled=True)

    monkeypatch.setattr(trainer, "_autocast", forced)
    torch.manual_seed(0)
    split = Split(images=nearby_images(), labels=np.arange(N) % 2, attrs=np.zeros((N, 2), dtype=np.int64))
    splits = Splits(train=split, val=split, test=split, attributes={"sex": ["f", "m"], "age": ["y", "o"]},
                    mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))  # fmt: skip
    info = TrainInfo(labels=torch.as_tensor(split.labels), groups=None, group_names=(), attribute=None,
                     epochs=1, steps_per_epoch=1)  # fmt: skip
    method = Method(create_backbone("test_resnet", 3), info)
    device = torch.device("cpu")
    loader = make_loader(split, 64, train=False, seed=0, num_workers=0)
    scores, features = trainer.predict(method, loader, DeviceTransform(splits, device), device, features=True)
    assert used  # predict's forward pass ran under the (forced) bf16 autocast
    assert scores.dtype == np.float64
    head = method.backbone.net.get_classifier()
    with torch.no_grad():
        logits = F.linear(torch.as_tensor(features), head.weight, head.bias).squeeze(-1).double()
    np.testing.assert_allclose(scores, torch.sigmoid(logits).numpy(), rtol=0, atol=1e-6)
    # nearby inputs: a bf16 logit would put them on a handful of values, full precision does not
    rounded = torch.sigmoid(logits.to(torch.bfloat16).double()).numpy()
    assert len(np.unique(rounded)) < N // 8
    assert len(np.unique(scores)) > N * 3 // 4
