"""groupdro, domainind, fin, swad and sam: each method's core on hand-computed examples, the
trainer hooks they use, and one CLI run each."""

import copy
import math
from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairbench.methods.domainind import DomainIndependent, combine_heads, own_head_loss
from fairbench.methods.fin import EPS, FIN, fin_normalize
from fairbench.methods.groupdro import GroupDRO
from fairbench.methods.sam import SAM, perturbation
from fairbench.methods.swad import SWAD, LossValley
from test_trainer import CONFIG, tiny_splits

from fairbench import registry
from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import ModelOutput, create_backbone
from fairbench.trainer import fit, seed_everything

ONE_EPOCH = replace(CONFIG, epochs=1)


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def bce(z: float, y: int) -> float:
    """BCE of logit z for label y, by hand."""
    return softplus(-z) if y == 1 else softplus(z)


def info(labels, groups, names=("female", "male")) -> TrainInfo:
    return TrainInfo(
        labels=torch.tensor(labels),
        groups=None if groups is None else torch.tensor(groups),
        group_names=names,
        attribute="sex" if groups is not None else None,
        epochs=1,
        steps_per_epoch=1,
    )


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("test_resnet", in_chans=3)


# ----------------------------------------------------------------------------- groupdro

# cells (group, label): (0, 0) x 4, (0, 1) x 1, (1, 0) x 9, (1, 1) x 0, plus 2 unknown groups
DRO_LABELS = [0] * 4 + [1] + [0] * 9 + [0, 1]
DRO_GROUPS = [0] * 5 + [1] * 9 + [-1, -1]


def dro_batch(rows):
    """(logits, labels, groups) of a batch given as (logit, label, group) rows."""
    z, y, g = zip(*rows, strict=True)
    out = ModelOutput(logits=torch.tensor(z, dtype=torch.float32), features=torch.zeros(len(z), 2))
    return out, Batch(image=None, label=torch.tensor(y, dtype=torch.float32), index=None, group=torch.tensor(g))


def test_groupdro_weights_after_two_steps_match_the_hand_computation(backbone):
    eta, c = 0.5, 2.0
    method = GroupDRO(backbone, info(DRO_LABELS, DRO_GROUPS), eta=eta, adjustment=c)
    adj = [c / math.sqrt(4), c / math.sqrt(1), c / math.sqrt(9), 0.0]
    # the empty cell (1, 1) never gets weight; the others start uniform
    q = [1 / 3, 1 / 3, 1 / 3, 0.0]
    assert method.q.tolist() == pytest.approx(q)

    # step 1: cells (0,0) and (1,0) present, (0,1) absent; the unknown sample has a huge loss
    step1 = [(0.0, 0, 0), (1.0, 0, 0), (-1.0, 0, 1), (-8.0, 1, -1)]
    l00, l10 = (bce(0.0, 0) + bce(1.0, 0)) / 2, bce(-1.0, 0)
    q = [q[0] * math.exp(eta * (l00 + adj[0])), q[1], q[2] * math.exp(eta * (l10 + adj[2])), 0.0]
    q = [v / sum(q) for v in q]
    parts = method.loss(*dro_batch(step1))
    assert method.q.tolist() == pytest.approx(q, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(q[0] * l00 + q[2] * l10, rel=1e-6)
    assert parts["worst_group_bce"].item() == pytest.approx(max(l00, l10), rel=1e-6)

    # step 2: cells (0,1) and (1,0)
    step2 = [(-2.0, 1, 0), (0.5, 0, 1)]
    l01, l10 = bce(-2.0, 1), bce(0.5, 0)
    q = [q[0], q[1] * math.exp(eta * (l01 + adj[1])), q[2] * math.exp(eta * (l10 + adj[2])), 0.0]
    q = [v / sum(q) for v in q]
    parts = method.loss(*dro_batch(step2))
    assert method.q.tolist() == pytest.approx(q, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(q[1] * l01 + q[2] * l10, rel=1e-6)

    # the unknown-group sample changed nothing: the same two steps without it agree
    again = GroupDRO(backbone, info(DRO_LABELS, DRO_GROUPS), eta=eta, adjustment=c)
    again.loss(*dro_batch(step1[:3]))
    again.loss(*dro_batch(step2))
    assert torch.allclose(again.q, method.q)


def test_groupdro_gradient_is_the_weighted_group_losses(backbone):
    method = GroupDRO(backbone, info(DRO_LABELS, DRO_GROUPS))
    out, batch = dro_batch([(0.0, 0, 0), (1.0, 0, 0), (-1.0, 0, 1), (3.0, 1, -1)])
    out.logits.requires_grad_()
    method.loss(out, batch)["loss"].backward()
    q = method.q
    # d/dz of q_g * mean_{i in g} BCE_i = q_g * (sigmoid(z) - y) / n_g(batch); unknown gets 0
    expected = [q[0] * 0.5 / 2, q[0] * (1 / (1 + math.exp(-1))) / 2, q[2] * (1 / (1 + math.exp(1))), 0.0]
    assert out.logits.grad.tolist() == pytest.approx([float(v) for v in expected], rel=1e-5)


# ----------------------------------------------------------------------------- sam


def test_sam_perturbation_is_rho_times_the_normalised_gradient():
    params = [torch.tensor([1.0, -2.0]), torch.tensor([0.5])]
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    e = perturbation(params, grads, rho=0.05)
    assert e[0].tolist() == pytest.approx([0.05 * 3 / 5, 0.0])
    assert e[1].tolist() == pytest.approx([0.05 * 4 / 5])
    # adaptive (ASAM): T = |w| + eta, e = rho * T^2 g / ||T g||
    t = [1.01, 2.01, 0.51]
    norm = math.sqrt((1.01 * 3) ** 2 + (0.51 * 4) ** 2)
    e = perturbation(params, grads, rho=0.5, adaptive=True, eta=0.01)
    assert e[0].tolist() == pytest.approx([0.5 * t[0] ** 2 * 3 / norm, 0.0], rel=1e-6)
    assert e[1].tolist() == pytest.approx([0.5 * t[2] ** 2 * 4 / norm], rel=1e-6)


def test_sam_steps_with_the_gradient_at_the_perturbed_weights_in_two_passes(backbone):
    torch.manual_seed(1)
    method = SAM(copy.deepcopy(backbone), info([0, 1], None, names=()), rho=0.05).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0.0, 1.0, 1.0, 0.0])
    ref = copy.deepcopy(method)
    passes = []

    def forward_loss():
        passes.append(1)
        return {"loss": F.binary_cross_entropy_with_logits(method(x).logits, y)}

    # by hand: gradient at w, e = rho g/||g||, gradient at w + e, SGD step from w
    ref_params = [p for p in ref.parameters()]
    F.binary_cross_entropy_with_logits(ref(x).logits, y).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in ref_params]
    norm = torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
    running_after_one_pass = ref.backbone.net.bn1.running_mean.clone()
    with torch.no_grad():
        w0 = [p.clone() for p in ref_params]
        for p, g in zip(ref_params, grads, strict=True):
            if g is not None:
                p.add_(0.05 * g / norm)
    ref.zero_grad()
    F.binary_cross_entropy_with_logits(ref(x).logits, y).backward()
    expected = [w - 0.1 * p.grad if p.grad is not None else w for w, p in zip(w0, ref_params, strict=True)]

    method.train_step(forward_loss, torch.optim.SGD(method.parameters(), lr=0.1))
    assert len(passes) == 2
    for p, w in zip(method.parameters(), expected, strict=True):
        assert torch.allclose(p, w, atol=1e-6)
    # running statistics were updated by the first pass only
    assert torch.allclose(method.backbone.net.bn1.running_mean, running_after_one_pass)


# ----------------------------------------------------------------------------- swad

# validation losses per evaluation; with N_s = 3 the loss stops decreasing at 2 (0.6 <= 0.7, 0.65),
# tolerance 1.3 * mean(0.6, 0.7, 0.65) = 0.845; with N_e = 3 it stays above it from 7 on
VALLEY = [1.0, 0.8, 0.6, 0.7, 0.65, 0.9, 0.62, 1.0, 1.0, 1.0, 1.0]


def segment(i: int) -> tuple[list[torch.Tensor], int]:
    """Segment i holds two steps with weights i and i + 0.5 (sum 2i + 0.5)."""
    return [torch.tensor([2 * i + 0.5])], 2


def test_swad_window_follows_the_start_and_end_rule():
    valley = LossValley(n_converge=3, n_tolerance=3, tolerance_ratio=0.3)
    for i, loss in enumerate(VALLEY):
        valley.add(*segment(i), loss)
        assert valley.start == (2 if i >= 4 else None)
    assert valley.threshold == pytest.approx(0.845)
    assert valley.end == 7
    valley.finish()
    steps = [w for i in range(2, 7) for w in (i, i + 0.5)]
    assert valley.average()[0].item() == pytest.approx(sum(steps) / len(steps))
    assert valley.steps == 10


def test_swad_windows_are_cut_where_training_ends():
    # still inside the valley at the end: every segment from the start is averaged
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    for i, loss in enumerate(VALLEY[:7]):
        valley.add(*segment(i), loss)
    valley.finish()
    assert (valley.start, valley.end) == (2, None)
    assert valley.average()[0].item() == pytest.approx(np.mean([w for i in range(2, 7) for w in (i, i + 0.5)]))
    # never converged: the start is the lowest of the last evaluations, the end where the rest exceeds
    valley = LossValley(n_converge=3, n_tolerance=1, tolerance_ratio=0.05)
    for i, loss in enumerate([1.0, 0.9, 0.8, 0.7, 0.5, 0.6]):
        valley.add(*segment(i), loss)
    assert valley.start is None
    valley.finish()
    assert valley.start == 4
    assert valley.threshold == pytest.approx(1.05 * 0.55)
    assert valley.end == 5
    assert valley.average()[0].item() == pytest.approx(4.25)


def test_swad_evaluates_the_dense_average_with_recomputed_batchnorm(backbone):
    method = SWAD(copy.deepcopy(backbone), info([0, 1], None, names=()), n_converge=1, n_tolerance=1)
    params = list(method.parameters())
    saved = []
    for epoch, loss in enumerate([0.5, 0.4]):  # start at 0; 0.4 < 1.3 * 0.5 keeps epoch 1
        for _ in range(2):
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn_like(p))
            saved.append([p.detach().clone() for p in params])
            method.after_step()
        method.on_validation(epoch, {"val/epoch_bce": loss})
    images = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    bn = method.backbone.net.conv1[1]
    bn.running_mean.fill_(7.0)
    assert method.on_train_end(lambda: iter(images)) is True
    for i, p in enumerate(params):
        assert torch.allclose(p, torch.stack([s[i] for s in saved]).mean(0), atol=1e-5)
    # first BN layer: the average over both batches of its input's per-batch channel means
    with torch.no_grad():
        conv = method.backbone.net.conv1[0]
        expected = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x in images]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    assert bn.momentum == 0.1  # restored after the recomputation


# ----------------------------------------------------------------------------- fin


def test_fin_normalises_each_group_with_its_own_statistics_and_momentum():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mus = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    scales = torch.tensor([[2.0, 1.0], [0.5, 4.0]])
    sigmas = torch.log(torch.expm1(scales))  # softplus(sigmas) == scales
    m = 0.25
    out = fin_normalize(f, torch.tensor([0, 1, -1]), mus, sigmas, m)
    row0 = [(1 - m) * (1 - 0.5) / (2 + EPS) + m * 1, (1 - m) * 2 / (1 + EPS) + m * 2]
    row1 = [(1 - m) * (3 - 1) / (0.5 + EPS) + m * 3, (1 - m) * (4 - 1) / (4 + EPS) + m * 4]
    # unknown group: the groups' mean mu (0.75, 0.5) and mean scale (1.25, 2.5)
    row2 = [(1 - m) * (5 - 0.75) / (1.25 + EPS) + m * 5, (1 - m) * (6 - 0.5) / (2.5 + EPS) + m * 6]
    assert out.tolist() == [pytest.approx(row0), pytest.approx(row1), pytest.approx(row2)]
    # momentum 1 keeps the features as they are; 0 is the pure normalisation
    assert torch.allclose(fin_normalize(f, torch.tensor([0, 1, -1]), mus, sigmas, 1.0), f)


def test_fin_head_reads_the_normalised_features(backbone):
    method = FIN(copy.deepcopy(backbone), info([0, 1], [0, 1]), momentum=0.1).eval()
    x = torch.randn(4, 3, 16, 16)
    group = torch.tensor([0, 1, 1, 0])
    out = method(x, group=group)
    raw = method.backbone(x).features
    expected = fin_normalize(raw, group, method.mus, method.sigmas, 0.1)
    assert torch.allclose(out.features, expected)
    head = method.backbone.net.get_classifier()
    assert torch.allclose(out.logits, head(expected).squeeze(-1), atol=1e-6)
    # the other group's statistics give another prediction
    assert not torch.allclose(method(x, group=1 - group).logits, out.logits)
    assert FIN.attributes_at_test({}) is True


# ----------------------------------------------------------------------------- domainind


def test_domainind_inference_rules():
    logits = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])
    assert combine_heads(logits, "sum").tolist() == [2.0, -1.0]  # sign and order of the sum
    mean_p = [(torch.sigmoid(torch.tensor(a)) + torch.sigmoid(torch.tensor(b))).item() / 2 for a, b in logits.tolist()]
    expected = [math.log(p / (1 - p)) for p in mean_p]
    assert combine_heads(logits, "sum_prob").tolist() == pytest.approx(expected, rel=1e-5)
    # conditional: the sample's own head; the combined rule where the group is unknown
    assert combine_heads(logits, "conditional", torch.tensor([1, -1])).tolist() == [3.0, -1.0]
    assert combine_heads(logits, "conditional", torch.tensor([0, 1])).tolist() == [1.0, 0.0]
    assert DomainIndependent.attributes_at_test({}) is False
    assert DomainIndependent.attributes_at_test({"inference": "conditional"}) is True


def test_domainind_trains_each_sample_on_its_own_head_only():
    logits = torch.tensor([[1.0, 3.0], [-2.0, 0.0], [0.5, 0.5]], requires_grad=True)
    label = torch.tensor([1.0, 0.0, 1.0])
    loss = own_head_loss(logits, label, torch.tensor([1, 0, -1]))
    assert loss.item() == pytest.approx((bce(3.0, 1) + bce(-2.0, 0)) / 2, rel=1e-6)
    loss.backward()
    s = torch.sigmoid
    expected = [[0.0, (s(torch.tensor(3.0)).item() - 1) / 2], [s(torch.tensor(-2.0)).item() / 2, 0.0], [0.0, 0.0]]
    assert torch.allclose(logits.grad, torch.tensor(expected), atol=1e-7)


# ----------------------------------------------------------------------------- the trainer hooks


def spy(base):
    """A subclass of ``base`` that records the groups its forward and loss receive."""

    class Spy(base):
        log: ClassVar[list] = []

        def forward(self, x, **kwargs):
            Spy.log.append(("forward", self.training, kwargs.get("group")))
            return super().forward(x, **kwargs)

        def loss(self, out, batch):
            Spy.log.append(("loss", True, batch.group))
            return super().loss(out, batch)

    return Spy


@pytest.mark.parametrize("base", [SAM, SWAD])
def test_label_free_methods_never_see_groups(base):
    cls = spy(base)
    seed_everything(0)
    options = {"n_converge": 1} if base is SWAD else {}
    fit(cls, options, create_backbone("test_resnet", 3), tiny_splits(n=32), "sex", ONE_EPOCH, progress=False)
    assert len(cls.log) > 0
    assert all(group is None for _, _, group in cls.log)


def test_methods_using_attributes_at_test_get_each_samples_group_when_predicting():
    cls = spy(FIN)
    splits = tiny_splits(n=32)
    seed_everything(0)
    result = fit(cls, {}, create_backbone("test_resnet", 3), splits, "sex", ONE_EPOCH, progress=False)
    eval_groups = torch.cat([g for kind, training, g in cls.log if kind == "forward" and not training])
    # the epoch's validation pass, then the test split, in loader order
    expected = np.concatenate([splits.val.attrs[:, 0], splits.test.attrs[:, 0]])
    assert eval_groups.tolist() == expected.tolist()
    assert all(g is not None for kind, training, g in cls.log if training)
    assert result.test is not None


class ZeroHead(Method):
    """Replaces its weights at the end with a head that scores every sample 0.5."""

    def on_train_end(self, train_images):
        assert next(iter(train_images())).shape[1:] == (3, 16, 16)
        head = self.backbone.net.get_classifier()
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        return True


def test_weights_replaced_at_the_end_are_what_val_and_test_are_scored_with():
    seed_everything(0)
    result = fit(ZeroHead, {}, create_backbone("test_resnet", 3), tiny_splits(n=32), "sex", ONE_EPOCH, progress=False)
    assert np.allclose(result.val.scores, 0.5) and np.allclose(result.test.scores, 0.5)
    assert result.best_val_auc == 0.5
    assert all("val/epoch_bce" in h for h in result.history)


# ----------------------------------------------------------------------------- registry and CLI


def test_new_methods_are_registered_with_search_spaces():
    import optuna

    trial = optuna.trial.FixedTrial({"eta": 0.02, "adjustment": 3, "momentum": 0.2, "tolerance_ratio": 0.2, "rho": 0.1})
    spaces = {name: registry.methods.get(name).search_space(trial) for name in ("groupdro", "fin", "swad", "sam")}
    assert spaces == {
        "groupdro": {"eta": 0.02, "adjustment": 3.0},
        "fin": {"momentum": 0.2},
        "swad": {"tolerance_ratio": 0.2},
        "sam": {"rho": 0.1},
    }
    assert registry.methods.get("domainind").search_space(trial) == {}
    flags = {n: (registry.methods.get(n).uses_attributes, registry.methods.get(n).attributes_at_test({}))
             for n in ("groupdro", "domainind", "fin", "swad", "sam")}  # fmt: skip
    assert flags == {
        "groupdro": (True, False),
        "domainind": (True, False),
        "fin": (True, True),
        "swad": (False, False),
        "sam": (False, False),
    }


@pytest.mark.parametrize(
    ("method", "options", "logged", "at_test"),
    [
        ("groupdro", ["-o", "adjustment=1"], "train/worst_group_bce", False),
        ("domainind", ["-o", "inference=conditional"], "train/bce", True),
        ("fin", [], "train/bce", True),
        ("swad", ["-o", "n_converge=1"], "swad/start", False),
        ("sam", ["-o", "adaptive=true"], "train/bce", False),
    ],
)
def test_each_baseline_runs_from_the_cli(tmp_path, method, options, logged, at_test):
    import mlflow
    from click.testing import CliRunner
    from tiny import TINY_DATA, TINY_RUN

    from fairbench.cli import main

    results = tmp_path / "results"
    args = ["run", "--method", method, *options, *TINY_RUN, *TINY_DATA, "--epochs", "1",
            "--results-dir", str(results)]  # fmt: skip
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    run_id = out.output.split("MLflow run ")[1].split()[0]
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    tags = client.get_run(run_id).data.tags
    assert tags["fairbench.uses_attributes_at_test"] == str(at_test)
    assert tags["fairbench.uses_attributes"] == str(method not in ("swad", "sam"))
    assert [m.step for m in client.get_metric_history(run_id, logged)] == [0]
    assert "test/auc" in client.get_run(run_id).data.metrics
