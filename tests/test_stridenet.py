import math

import numpy as np
import ot
import pytest
import torch
from fairbench.methods.stridenet import LabelEmbeddingWarning, StrideNet, confusion_loss, label_embeddings_for

from fairbench import embeddings
from fairbench.errors import FairbenchError
from fairbench.method import Batch, TrainInfo
from fairbench.model import create_backbone
from fairbench.transport import cosine_cost, got_distance, gromov_wasserstein, threshold_cost, wasserstein

GROUPS = torch.tensor([0, 1, -1, 1])
LABELS = torch.tensor([0.0, 1.0, 1.0, 0.0])


def info(tmp_path, label_names=("glaucoma", "no glaucoma"), size=32):
    return TrainInfo(
        labels=LABELS.long(),
        groups=GROUPS,
        group_names=("female", "male"),
        attribute="sex",
        epochs=1,
        steps_per_epoch=1,
        input_shape=(3, size, size),
        label_names=label_names,
        data_folder=tmp_path / "no-such-dataset",
    )


def method(tmp_path, backbone="test_vit", size=32, **options):
    torch.manual_seed(0)
    with pytest.warns(LabelEmbeddingWarning):
        return StrideNet(create_backbone(backbone, in_chans=3), info(tmp_path, size=size), **options)


def batch():
    return Batch(image=None, label=LABELS, index=torch.arange(4), group=GROUPS)


@pytest.mark.parametrize(("backbone", "size", "tokens"), [("test_vit", 32, 5), ("test_resnet", 64, 4)])
def test_mask_shape_range_and_outputs(tmp_path, backbone, size, tokens):
    m = method(tmp_path, backbone, size)
    out = m(torch.randn(4, 3, size, size))
    mask = out.extras["mask"]
    assert mask.shape == (4, tokens, 2)
    assert mask.min() > 0 and mask.max() < 1
    assert out.logits.shape == (4,) and out.logits.dtype == torch.float32
    # the features are the mean of the masked tokens, each token weighted by its mask sum
    assert torch.allclose(out.features, out.extras["tokens"].mean(dim=1))
    assert (out.extras["tokens"].norm(dim=-1) > 0).all()


def test_masked_tokens_are_tokens_times_mask_sum(tmp_path):
    m = method(tmp_path, "test_vit", 32)
    x = torch.randn(3, 3, 32, 32)
    out = m(x)
    tokens = m.backbone.net.forward_features(x)
    weight = out.extras["mask"].sum(dim=-1, keepdim=True)
    assert torch.allclose(out.extras["tokens"], tokens * weight, atol=1e-6)


def test_attribute_ce_trains_the_head_only_and_confusion_the_encoder_only(tmp_path):
    m = method(tmp_path)
    parts = m.loss(m(torch.randn(4, 3, 32, 32)), batch())
    parts["attr_ce"].backward(retain_graph=True)
    encoder = [*m.backbone.parameters(), *m.mask_net.parameters()]
    assert all(p.grad is None for p in encoder)
    assert m.attr_head.weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    parts["confusion"].backward()
    assert m.attr_head.weight.grad is None
    assert sum(p.grad.abs().sum() for p in m.mask_net.parameters()) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())


def test_confusion_can_update_the_head_when_asked(tmp_path):
    m = method(tmp_path, confusion_head_grad=True)
    m.loss(m(torch.randn(4, 3, 32, 32)), batch())["confusion"].backward()
    assert m.attr_head.weight.grad.abs().sum() > 0


def test_attribute_losses_leave_unknown_groups_out(tmp_path):
    m = method(tmp_path)
    out = m(torch.randn(4, 3, 32, 32))
    parts = m.loss(out, batch())
    known = GROUPS >= 0
    logits = m.attr_head(out.features[known])
    expected = torch.nn.functional.cross_entropy(logits, GROUPS[known])
    assert parts["attr_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["confusion"].item() == pytest.approx(confusion_loss(logits).item(), rel=1e-5)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_confusion_is_log_k_at_a_uniform_prediction_and_larger_elsewhere(k):
    assert confusion_loss(torch.full((6, k), 0.7)).item() == pytest.approx(math.log(k), rel=1e-6)
    skewed = torch.zeros(6, k)
    skewed[:, 0] = 2.0
    assert confusion_loss(skewed).item() > math.log(k) + 0.1


def test_loss_is_the_weighted_sum_of_its_parts_and_l1_covers_the_trained_parameters(tmp_path):
    m = method(tmp_path, confusion_weight=0.3, attr_weight=0.5, got_weight=2.0, l1_weight=1e-3)
    parts = m.loss(m(torch.randn(4, 3, 32, 32)), batch())
    expected = parts["bce"] + 0.3 * parts["confusion"] + 0.5 * parts["attr_ce"] + 2.0 * parts["got"]
    expected = expected + 1e-3 * parts["l1"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    classifier = {id(p) for p in m.backbone.net.get_classifier().parameters()}
    trained = [p for p in m.parameters() if id(p) not in classifier]
    assert parts["l1"].item() == pytest.approx(sum(p.abs().sum().item() for p in trained), rel=1e-5)
    assert parts["got"].item() == pytest.approx(0.9 * parts["gw"].item() + 0.1 * parts["w"].item(), rel=1e-5)
    assert {id(p) for p in m.param_groups(1e-3, 0)[0]["params"]} == {id(p) for p in trained}
    assert m.clip_grad_norm == 1.0
    assert method(tmp_path, clip_grad_norm=0).clip_grad_norm is None


def test_the_mask_is_trained_by_w_through_the_unrolled_plan_only(tmp_path):
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for ot_grad in ("unrolled", "plan_detached"):
        m = method(tmp_path, ot_grad=ot_grad)
        m.loss(m(x), batch())["w"].backward()
        grads[ot_grad] = sum(p.grad.abs().sum().item() for p in m.mask_net.parameters())
    # cosine costs ignore the token scale, so with a fixed plan the mask gets (rounding-level) nothing
    assert grads["unrolled"] > 0
    assert grads["plan_detached"] < 1e-3 * grads["unrolled"]


# GOT against POT's exact solvers on a hand-made pair: 4 tokens and 3 labels in the plane
X = torch.tensor([[[1.0, 0.0], [0.9, 0.5], [0.0, 1.0], [-1.0, 0.3]]], dtype=torch.float64)
Y = torch.tensor([[[1.0, 0.2], [0.2, 1.0], [-0.8, -0.4]]], dtype=torch.float64)
EXACT = {"beta": 0.5, "iterations": 500, "gw_outer": 20}


def uniform(n):
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def test_ipot_w_matches_pot_emd_and_the_mask_adds_minus_beta_log_mask():
    cost = threshold_cost(cosine_cost(X, Y), 0.1)
    exact = ot.emd2(uniform(4), uniform(3), cost[0])
    assert wasserstein(cost, None, 0.5, 500).item() == pytest.approx(exact.item(), abs=1e-6)
    # the default 30 iterations stop near, not at, the exact value; the independent plan is far off
    assert wasserstein(cost, None, 0.5, 30).item() == pytest.approx(exact.item(), abs=0.03)
    assert cost.mean().item() > exact.item() + 0.3
    weight = torch.tensor([[[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.6, 0.4, 0.9], [0.1, 0.7, 0.2]]], dtype=torch.float64)
    plan = ot.emd(uniform(4), uniform(3), cost[0] - 0.5 * torch.log(weight[0]))
    assert wasserstein(cost, weight, 0.5, 500).item() == pytest.approx((cost[0] * plan).sum().item(), abs=1e-6)


def test_gw_and_got_match_pot_on_a_hand_made_pair():
    c1 = threshold_cost(cosine_cost(X, X), 0.1)
    c2 = threshold_cost(cosine_cost(Y, Y), 0.1)
    gw_pot = ot.gromov.gromov_wasserstein2(c1[0], c2[0], uniform(4), uniform(3), loss_fun="square_loss")
    gw = gromov_wasserstein(c1, c2, EXACT["beta"], EXACT["iterations"], EXACT["gw_outer"])
    assert gw.item() == pytest.approx(gw_pot.item(), abs=1e-5)
    w_pot = ot.emd2(uniform(4), uniform(3), threshold_cost(cosine_cost(X, Y), 0.1)[0])
    got, w, gw2 = got_distance(X, Y, **EXACT)
    assert got.item() == pytest.approx(0.9 * gw_pot.item() + 0.1 * w_pot.item(), abs=1e-5)
    assert (w.item(), gw2.item()) == pytest.approx((w_pot.item(), gw_pot.item()), abs=1e-5)


def test_threshold_zeroes_the_cheapest_tenth_of_each_range():
    cost = torch.tensor([[[0.0, 0.05, 0.5], [1.0, 0.2, 0.09]], [[1.0, 1.5, 2.0], [1.04, 1.2, 1.1]]])
    pruned = threshold_cost(cost, 0.1)
    assert torch.equal(pruned[0], torch.tensor([[0.0, 0.0, 0.5], [1.0, 0.2, 0.0]]))
    assert torch.equal(pruned[1], torch.tensor([[0.0, 1.5, 2.0], [0.0, 1.2, 1.1]]))


def test_got_is_zero_for_identical_point_clouds():
    z = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, w, gw = got_distance(z, z, **EXACT)
    assert torch.allclose(gw, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(got, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(w, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    far = got_distance(z, torch.randn(3, 6, 8, dtype=torch.float64), **EXACT)[0]
    assert (far > 1e-2).all()


def test_label_embeddings_auto_onehot_file_and_missing(tmp_path):
    names = ("glaucoma", "no glaucoma")
    folder = tmp_path / "oct_rnfl"
    folder.mkdir()
    prepared = TrainInfo(LABELS.long(), GROUPS, ("a", "b"), "sex", 1, 1, label_names=names, data_folder=folder)
    with pytest.raises(FairbenchError, match="fairbench embed-labels oct_rnfl"):
        label_embeddings_for("auto", prepared)
    assert np.array_equal(label_embeddings_for("onehot", prepared), np.eye(2))
    array = np.arange(10, dtype=np.float32).reshape(2, 5)
    embeddings.write(folder, names, array, "tiny")
    assert np.array_equal(label_embeddings_for("auto", prepared), array)
    np.save(tmp_path / "three.npy", np.ones((3, 4), dtype=np.float32))
    with pytest.raises(FairbenchError, match="3 rows but the dataset has 2 label names"):
        label_embeddings_for(str(tmp_path / "three.npy"), prepared)


def test_embeddings_of_another_width_get_a_learned_projection(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((2, 7), dtype=np.float32))
    bb = create_backbone("test_vit", in_chans=3)
    m = StrideNet(bb, info(tmp_path), label_embeddings=str(tmp_path / "e.npy"))
    assert isinstance(m.label_proj, torch.nn.Linear) and m.label_proj.weight.shape == (64, 7)
    assert m.mask_net[1].in_features == 5 * 64 and m.mask_net[3].out_features == 5 * 2


def test_trainer_clips_the_gradient_norm(tmp_path):
    from dataclasses import replace

    from fairbench.datasets.synthetic import Synthetic
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fairbench.trainer import TrainConfig, fit

    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    splits = Synthetic(n_train=32, n_val=16, n_test=16).load(tmp_path, 32)
    splits = replace(splits, label_names=Synthetic.label_names, folder=tmp_path / "synthetic")
    config = TrainConfig(epochs=1, batch_size=16, num_workers=0, device="cpu")
    handle = register_optimizer_step_pre_hook(record)
    try:
        with pytest.warns(LabelEmbeddingWarning):
            fit(StrideNet, {"clip_grad_norm": 0.01, "l1_weight": 1.0}, create_backbone("test_resnet", 3), splits,
                "sex", config, progress=False)  # fmt: skip
    finally:
        handle.remove()
    # l1_weight=1 alone gives a gradient norm of sqrt(#parameters) >> 0.01 without clipping
    assert len(norms) == 2 and max(norms) <= 0.01 * 1.0001


@pytest.mark.parametrize("backbone", ["test_vit", "test_resnet"])
def test_stridenet_runs_from_the_cli_and_logs_its_loss_parts(tmp_path, monkeypatch, backbone):
    import mlflow
    from click.testing import CliRunner
    from tiny import TINY_DATA, TINY_RUN

    from fairbench.cli import main

    monkeypatch.setenv("FAIRBENCH_DATA", str(tmp_path / "data"))
    results = tmp_path / "results"
    args = ["run", "--method", "stridenet", *TINY_RUN, *TINY_DATA, "--backbone", backbone, "--epochs", "1",
            "--results-dir", str(results)]  # fmt: skip
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "one-hot label embeddings" in out.output
    run_id = out.output.split("MLflow run ")[1].split()[0]
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["method.label_embeddings"] == "auto"
    for key in ("train/bce", "train/confusion", "train/attr_ce", "train/got", "train/w", "train/gw", "train/l1"):
        assert math.isfinite(client.get_metric_history(run_id, key)[0].value), key


def test_stridenet_is_registered_and_its_search_space_draws_declared_options():
    import optuna

    from fairbench import options, registry

    cls = registry.methods.get("stridenet")
    assert cls is StrideNet and cls.uses_attributes
    drawn = {"confusion_weight": 0.2, "got_weight": 1.0, "l1_weight": 1e-4}
    space = cls.search_space(optuna.trial.FixedTrial(drawn))
    assert space == drawn
    assert set(space) <= set(options.declared(cls))
    assert options.defaults(cls)["confusion_weight"] == 0.2


def test_gw_gradient_is_pots_gradient_at_the_optimal_plan():
    c1 = threshold_cost(cosine_cost(X, X), 0.1).requires_grad_()
    c2 = threshold_cost(cosine_cost(Y, Y), 0.1).requires_grad_()
    gromov_wasserstein(c1, c2, EXACT["beta"], EXACT["iterations"], EXACT["gw_outer"], detach_plan=True).sum().backward()
    p1 = c1.detach()[0].clone().requires_grad_()
    p2 = c2.detach()[0].clone().requires_grad_()
    ot.gromov.gromov_wasserstein2(p1, p2, uniform(4), uniform(3), loss_fun="square_loss").backward()
    assert torch.allclose(c1.grad[0], p1.grad, atol=1e-5)
    assert torch.allclose(c2.grad[0], p2.grad, atol=1e-5)
