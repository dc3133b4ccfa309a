"""Training regimes: which backbone parameters train under full / linear / lora / last-n."""

from __future__ import annotations

import mlflow
import pytest
import torch
from click.testing import CliRunner
from test_trainer import tiny_splits
from tiny import TINY_DATA, TINY_RUN
from torch import nn

from fairbench.cli import main
from fairbench.errors import FairbenchError
from fairbench.finetune import Finetune, count_trainable, default_lora_targets
from fairbench.model import create_backbone
from fairbench.trainer import TrainConfig, fit, seed_everything


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable_names(backbone) -> list[str]:
    return [n for n, p in backbone.net.named_parameters() if p.requires_grad]


def test_vit_counts_per_regime_by_hand():
    # test_vit: width 64, 6 blocks, qkv Linear(64, 192), proj Linear(64, 64), head Linear(64, 1)
    head = 64 + 1
    full = create_backbone("test_vit", 3)
    total = numel(full)
    assert count_trainable(full) == (total, total)
    assert count_trainable(create_backbone("test_vit", 3, finetune=Finetune("linear")))[0] == head
    rank = 4
    lora = create_backbone("test_vit", 3, finetune=Finetune("lora", lora_rank=rank))
    per_block = rank * (64 + 192) + rank * (64 + 64)  # A: r x in, B: out x r, for qkv and proj
    assert count_trainable(lora) == (6 * per_block + head, total + 6 * per_block)
    last2 = create_backbone("test_vit", 3, finetune=Finetune("last-n", last_n=2))
    net = last2.net
    assert count_trainable(last2)[0] == numel(net.blocks[4]) + numel(net.blocks[5]) + numel(net.norm) + head


def test_resnet_counts_per_regime():
    base = create_backbone("test_resnet", 3).net
    head = base.fc.in_features + 1
    linear = create_backbone("test_resnet", 3, finetune=Finetune("linear"))
    assert count_trainable(linear)[0] == head
    last1 = create_backbone("test_resnet", 3, finetune=Finetune("last-n", last_n=1))
    assert count_trainable(last1)[0] == numel(base.layer4) + head
    rank = 2
    expected = head
    modules = dict(base.named_modules())
    for name in default_lora_targets(base):
        m = modules[name]
        assert isinstance(m, nn.Conv2d) and m.groups == 1  # a ResNet has no linear layer but its head
        k = m.kernel_size[0] * m.kernel_size[1]
        expected += rank * m.in_channels * k + m.out_channels * rank  # A: r x in x k x k, B: 1x1 conv out x r
    lora = create_backbone("test_resnet", 3, finetune=Finetune("lora", lora_rank=rank))
    assert count_trainable(lora)[0] == expected
    assert {"conv1.0", "layer4.0.conv2"} <= set(default_lora_targets(base))


def test_lora_trains_only_adapters_and_head_linear_only_the_head():
    for name in ("test_vit", "test_resnet"):
        lora = create_backbone(name, 3, finetune=Finetune("lora"))
        head = lora.net.pretrained_cfg["classifier"]
        names = trainable_names(lora)
        assert names and all(".lora_A." in n or ".lora_B." in n or n.startswith(head + ".") for n in names)
        assert any(n.startswith(head + ".") for n in names)
        linear = create_backbone(name, 3, finetune=Finetune("linear"))
        assert trainable_names(linear) == [f"{head}.weight", f"{head}.bias"]


def test_frozen_batchnorm_keeps_its_statistics_in_training_mode():
    linear = create_backbone("test_resnet", 3, finetune=Finetune("linear")).train()
    assert not linear.net.bn1.training and not linear.net.layer4[0].bn1.training
    last = create_backbone("test_resnet", 3, finetune=Finetune("last-n", last_n=1)).train()
    assert last.net.layer4[0].bn1.training and not last.net.layer3[0].bn1.training
    assert create_backbone("test_resnet", 3).train().net.bn1.training


def test_training_moves_only_the_trainable_parameters():
    seed_everything(0)
    backbone = create_backbone("test_resnet", 3, finetune=Finetune("linear"))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    from fairbench.methods.erm import ERM

    config = TrainConfig(epochs=1, patience=0, batch_size=16, num_workers=0, device="cpu", weight_decay=0.1)
    fit(ERM, {}, backbone, tiny_splits(), "sex", config, progress=False)
    after = backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.fc.weight", "net.fc.bias"}


def test_method_modules_stay_trainable():
    from fairbench.methods.adversarial import Adversarial

    from fairbench.method import TrainInfo

    backbone = create_backbone("test_vit", 3, finetune=Finetune("linear"))
    info = TrainInfo(labels=torch.zeros(4), groups=torch.zeros(4), group_names=("a", "b"), attribute="sex",
                     epochs=1, steps_per_epoch=1)  # fmt: skip
    method = Adversarial(backbone, info)
    assert all(p.requires_grad for p in method.adversary.parameters())
    trained = {id(p) for group in method.param_groups(1e-3, 0.0) for p in group["params"]}
    assert {id(p) for p in method.adversary.parameters()} <= trained
    assert id(backbone.net.blocks[0].attn.qkv.weight) not in trained


def test_lora_is_applied_after_loading_a_local_checkpoint(tmp_path):
    source = create_backbone("test_vit", 3)
    path = tmp_path / "vit.pth"
    torch.save(source.net.state_dict(), path)
    lora = create_backbone("test_vit", 3, pretrained_file=path, finetune=Finetune("lora"))
    assert torch.equal(lora.net.blocks[0].attn.qkv.base_layer.weight, source.net.blocks[0].attn.qkv.weight)
    x = torch.randn(2, 3, 32, 32)
    source.eval(), lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(x).features, source(x).features)  # LoRA's B starts at zero
    small = create_backbone("test_vit", 3, pretrained_file=path, finetune=Finetune("lora"), image_size=32)
    assert small.net.pos_embed.shape[1] < source.net.pos_embed.shape[1]  # resampled to the 32 px grid
    assert small(torch.randn(2, 3, 32, 32)).logits.shape == (2,)
    wrong = tmp_path / "resnet.pth"
    torch.save(create_backbone("test_resnet", 3).net.state_dict(), wrong)
    with pytest.raises(FairbenchError, match="does not fit"):
        create_backbone("test_vit", 3, pretrained_file=wrong, finetune=Finetune("lora"))


def test_a_fixed_size_vit_is_built_for_the_run_image_size():
    vit = create_backbone("vit_small_patch16_224", 3, image_size=48, finetune=Finetune("lora"))
    assert vit(torch.randn(2, 3, 48, 48)).logits.shape == (2,)
    assert create_backbone("test_resnet", 3, image_size=48)(torch.randn(2, 3, 48, 48)).logits.shape == (2,)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(regime="last-n", last_n=7), "--last-n 7: 'VisionTransformer' has 6 blocks"),
        (dict(regime="lora", lora_targets=("no_such_layer",)), "--lora-targets no_such_layer"),
    ],
)
def test_bad_regime_settings_name_the_option(spec, message):
    with pytest.raises(FairbenchError, match=message):
        create_backbone("test_vit", 3, finetune=Finetune(**spec))
    with pytest.raises(FairbenchError, match=r"--lora-dropout 1\.0: must be in"):
        Finetune("lora", lora_dropout=1.0)


def test_cli_runs_linear_and_lora_on_a_vit_and_logs_the_regime(tmp_path):
    results = tmp_path / "results"
    common = ["run", "-m", "nir", *TINY_RUN, "--backbone", "test_vit", *TINY_DATA, "--epochs", "1",
              "--results-dir", str(results)]  # fmt: skip
    for regime in ("linear", "lora"):
        out = CliRunner().invoke(main, [*common, "--finetune", regime, "--lora-rank", "4"])
        assert out.exit_code == 0, out.output
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = sorted((r.data.tags["fairbench.finetune"], r.data.params["finetune"], r.info.status) for r in runs)
    assert logged == [("linear", "linear", "FINISHED"), ("lora", "lora", "FINISHED")]
    assert {r.data.params["lora_rank"] for r in runs} == {"4"}
