import math

import pytest
import torch
import torch.nn.functional as F
from fairbench.methods.adversarial import Adversarial, adversary_loss, grad_reverse
from fairbench.methods.nir import NIR, nir_penalty
from fairbench.methods.reweight import Reweight, group_weights
from torch.utils.data import WeightedRandomSampler

from fairbench import registry
from fairbench.method import Batch, TrainInfo
from fairbench.model import ModelOutput, create_backbone

# a hand-made training table: 2 groups x 2 labels with cells of 4, 2, 1, 3 samples, plus 2 unknown
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 1])
GROUPS = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1])


def info(groups=GROUPS, labels=LABELS, names=("female", "male")):
    return TrainInfo(labels=labels, groups=groups, group_names=names, attribute="sex", epochs=4, steps_per_epoch=1)


def test_every_group_label_cell_carries_the_same_total_weight():
    w = group_weights(LABELS, GROUPS)
    known = GROUPS >= 0
    totals = [w[known & (GROUPS == g) & (LABELS == y)].sum().item() for g in (0, 1) for y in (0, 1)]
    assert totals == pytest.approx([totals[0]] * 4)
    assert w.mean().item() == pytest.approx(1.0)
    # within a cell every sample weighs 1/count
    assert w[0].item() / w[4].item() == pytest.approx(2 / 4)


def test_unknown_group_gets_its_label_cells_mean_weight():
    w = group_weights(LABELS, GROUPS)
    assert w[10].item() == pytest.approx(w[(GROUPS >= 0) & (LABELS == 0)].mean().item())
    assert w[11].item() == pytest.approx(w[(GROUPS >= 0) & (LABELS == 1)].mean().item())


@pytest.mark.parametrize(("cells", "key"), [("group", GROUPS), ("label", LABELS)])
def test_other_cell_definitions(cells, key):
    w = group_weights(LABELS, GROUPS, cells=cells)
    mask = GROUPS >= 0 if cells == "group" else torch.ones_like(LABELS, dtype=torch.bool)
    totals = [w[mask & (key == k)].sum().item() for k in (0, 1)]
    assert totals[0] == pytest.approx(totals[1])


def test_power_softens_the_weights():
    full = group_weights(LABELS, GROUPS, power=1.0)
    half = group_weights(LABELS, GROUPS, power=0.5)
    assert full.max() / full.min() > half.max() / half.min() > 1


def fake_output(n=12, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ModelOutput(logits=torch.randn(n, generator=g), features=torch.randn(n, d, generator=g))


def test_reweight_loss_is_the_weighted_mean_and_sampler_mode_draws_by_weight():
    bb = create_backbone("test_resnet", in_chans=3)
    method = Reweight(bb, info())
    out = fake_output()
    batch = Batch(image=None, label=LABELS.float(), index=torch.arange(12), group=GROUPS)
    parts = method.loss(out, batch)
    per = F.binary_cross_entropy_with_logits(out.logits, LABELS.float(), reduction="none")
    assert parts["loss"].item() == pytest.approx((group_weights(LABELS, GROUPS) * per).mean().item())
    assert method.sampler() is None
    sampled = Reweight(bb, info(), mode="sampler")
    sampler = sampled.sampler()
    assert isinstance(sampler, WeightedRandomSampler)
    assert torch.allclose(sampler.weights.float(), group_weights(LABELS, GROUPS))
    assert sampled.loss(out, batch)["loss"].item() == pytest.approx(per.mean().item())


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_adversary_ignores_unknown_groups():
    logits = torch.randn(5, 2)
    groups = torch.tensor([0, -1, 1, -1, 0])
    expected = F.cross_entropy(logits[[0, 2, 4]], groups[[0, 2, 4]])
    assert adversary_loss(logits, groups).item() == pytest.approx(expected.item())
    none = adversary_loss(logits.requires_grad_(), torch.full((5,), -1))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("target", ["representation", "eqodds"])
def test_adversarial_encoder_gets_reversed_adversary_gradient(target):
    torch.manual_seed(0)
    bb = create_backbone("test_resnet", in_chans=3)
    method = Adversarial(bb, info(), lambda_adv=2.0, target=target)
    features = torch.randn(12, bb.feature_dim, requires_grad=True)
    logits = torch.randn(12, requires_grad=True)
    batch = Batch(image=None, label=LABELS.float(), index=torch.arange(12), group=GROUPS)
    parts = method.loss(ModelOutput(logits=logits, features=features), batch)
    parts["adv"].backward()
    leaf = features if target == "representation" else logits
    # what the adversary alone would send back, reversed and scaled by lambda
    leaf2 = leaf.detach().clone().requires_grad_()
    out2 = ModelOutput(
        logits=leaf2 if target == "eqodds" else logits.detach(),
        features=leaf2 if target == "representation" else features.detach(),
    )
    plain = adversary_loss(method.adversary(method.adversary_input(out2, batch.label)), GROUPS)
    plain.backward()
    assert torch.allclose(leaf.grad, -2.0 * leaf2.grad, atol=1e-6)
    assert leaf.grad.abs().sum() > 0


def test_adversarial_warmup_and_parameter_groups():
    bb = create_backbone("test_resnet", in_chans=3)
    method = Adversarial(bb, info(), lambda_adv=1.0, warmup_epochs=2, adv_lr=0.01)
    strengths = []
    for epoch in range(4):
        method.on_epoch_start(epoch)
        strengths.append(method.strength)
    assert strengths == [0.0, 0.5, 1.0, 1.0]
    groups = method.param_groups(lr=0.1, weight_decay=0.0)
    assert groups[1]["lr"] == 0.01
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.adversary.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(method.parameters()))


# NIR on a hand-computed example: h = [[1, 2], [3, 0]], p = [0.25, 0.75]
# m = [0.25*1 + 0.75*3, 0.25*2 + 0.75*0] / 1 = [2.5, 0.5], mean 1.5, R = (1 + 1) / 2 = 1
H = [[1.0, 2.0], [3.0, 0.0]]
LOGITS = [math.log(1 / 3), math.log(3)]


def test_nir_term_on_a_hand_computed_example():
    r = nir_penalty(torch.tensor(H), torch.tensor(LOGITS))
    assert r.item() == pytest.approx(1.0, rel=1e-5)
    normalized = nir_penalty(torch.tensor(H), torch.tensor(LOGITS), normalize="mean_square")
    assert normalized.item() == pytest.approx(1.0 / ((2.5**2 + 0.5**2) / 2), rel=1e-5)
    # negative side: weights 1 - p = [0.75, 0.25] -> m = [1.5, 1.5] -> 0; so both == positive
    both = nir_penalty(torch.tensor(H), torch.tensor(LOGITS), side="both")
    assert both.item() == pytest.approx(1.0, rel=1e-5)


def test_nir_is_zero_when_all_neurons_have_equal_weighted_means():
    h = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.5, 0.5, 0.5]])
    assert nir_penalty(h, torch.randn(3)).item() == pytest.approx(0.0, abs=1e-10)


def test_nir_gradient_reaches_features_and_logits():
    h = torch.tensor(H, requires_grad=True)
    z = torch.tensor(LOGITS, requires_grad=True)
    nir_penalty(h, z).backward()
    # dR/dh_ij = 2 (m_j - mean m) / D * p_i / sum(p) = (m_j - 1.5) * p_i here
    expected = torch.tensor([[0.25, -0.25], [0.75, -0.75]])
    assert torch.allclose(h.grad, expected, atol=1e-5)
    assert z.grad.abs().sum() > 0
    # both gradients match finite differences, for every option
    hd = torch.tensor(H, dtype=torch.float64, requires_grad=True)
    zd = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    for side in ("positive", "both"):
        for normalize in ("none", "mean_square"):
            assert torch.autograd.gradcheck(lambda h, z, s=side, n=normalize: nir_penalty(h, z, s, n), (hd, zd))


def test_nir_loss_adds_lambda_times_r_and_uses_no_attributes():
    bb = create_backbone("test_resnet", in_chans=3)
    method = NIR(bb, info(groups=None, names=()), lambda_nir=0.3)
    out = ModelOutput(logits=torch.tensor(LOGITS), features=torch.tensor(H))
    batch = Batch(image=None, label=torch.tensor([0.0, 1.0]), index=torch.arange(2), group=None)
    parts = method.loss(out, batch)
    assert parts["loss"].item() == pytest.approx(parts["bce"].item() + 0.3 * 1.0, rel=1e-5)
    assert NIR.uses_attributes is False


def test_methods_are_registered_with_search_spaces():
    import optuna

    assert {"erm", "reweight", "adversarial", "nir"} <= set(registry.methods.names())
    trial = optuna.trial.FixedTrial({"power": 1.0, "lambda_adv": 1.0, "warmup_epochs": 0, "lambda_nir": 0.1})
    assert registry.methods.get("nir").search_space(trial) == {"lambda_nir": 0.1}
    assert registry.methods.get("reweight").search_space(trial) == {"power": 1.0}
    assert registry.methods.get("adversarial").search_space(trial) == {"lambda_adv": 1.0, "warmup_epochs": 0}


@pytest.mark.parametrize(
    ("method", "options", "logged"),
    [
        ("reweight", ["-o", "mode=sampler"], "train/bce"),
        ("reweight", [], "train/weighted_bce"),
        ("adversarial", ["-o", "warmup_epochs=1", "-o", "target=eqodds"], "train/adv"),
        ("nir", ["-o", "side=both"], "train/nir"),
    ],
)
def test_each_method_runs_from_the_cli_and_logs_its_loss_parts(tmp_path, method, options, logged):
    import mlflow
    from click.testing import CliRunner
    from tiny import TINY_DATA, TINY_RUN

    from fairbench.cli import main

    results = tmp_path / "results"
    args = ["run", "--method", method, *options, *TINY_RUN, *TINY_DATA, "--epochs", "2", "--attribute", "age",
            "--results-dir", str(results)]  # fmt: skip
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    run_id = out.output.split("MLflow run ")[1].split()[0]
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags["fairbench.attribute"] == "age"
    assert run.data.tags["fairbench.uses_attributes"] == str(method != "nir")
    assert [m.step for m in client.get_metric_history(run_id, logged)] == [0, 1]
    if method == "adversarial":
        assert [m.value for m in client.get_metric_history(run_id, "train/lambda_adv")] == [0.0, 1.0]
