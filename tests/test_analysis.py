import json

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from fairbench.analysis import (
    concentration,
    inject_label_bias,
    neural_collapse,
    neural_collapse_by_group,
    neuron_incidence,
    parse_label_bias,
)
from fairbench.cli import main
from fairbench.errors import FairbenchError
from fairbench.experiment import run_experiment

ATTRS = {"sex": ["female", "male"], "age": ["<60", "≥60"]}


def collapsed(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    means = rng.normal(size=(2, d))
    return means[y].copy(), y, means


def test_nc1_is_zero_for_collapsed_features_and_positive_otherwise():
    h, y, means = collapsed()
    head = means[1] - means[0]
    assert neural_collapse(h, y, y, head)["nc1"] == pytest.approx(0.0, abs=1e-12)
    noisy = h + np.random.default_rng(1).normal(0, 0.3, h.shape)
    assert neural_collapse(noisy, y, y, head)["nc1"] > 0.01
    assert neural_collapse(noisy, y, y, head)["within_var"] > 0


def test_nc1_against_its_definition():
    # unbalanced classes: the global mean is the mean of the class means and Σ_W the average of
    # the per-class covariances, each class weighted equally
    rng = np.random.default_rng(2)
    y = (rng.random(50) < 0.3).astype(int)
    h = rng.normal(size=(50, 4)) * (1 + y[:, None]) + y[:, None]
    mu = np.stack([h[y == k].mean(0) for k in (0, 1)])
    sw = sum(np.cov(h[y == k].T, bias=True) for k in (0, 1)) / 2
    mg = (mu[0] + mu[1]) / 2
    sb = sum(np.outer(mu[k] - mg, mu[k] - mg) for k in (0, 1)) / 2
    expected = np.trace(sw @ np.linalg.pinv(sb)) / 2
    out = neural_collapse(h, y, y, np.ones(4))
    assert out["nc1"] == pytest.approx(expected, rel=1e-8)
    assert out["within_var"] == pytest.approx(np.trace(sw), rel=1e-10)


def test_nc4_is_zero_when_predictions_follow_the_nearest_class_centre():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], [45, 15])
    h = rng.normal(size=(60, 5)) + 2 * y[:, None]
    mu = np.stack([h[y == k].mean(0) for k in (0, 1)])
    ncc = np.argmin(((h[:, None] - mu[None]) ** 2).sum(2), axis=1)
    assert neural_collapse(h, y, ncc, np.ones(5))["nc4"] == 0.0
    flipped = ncc.copy()
    flipped[:9] = 1 - flipped[:9]  # 9 of the 45 negatives: rate 0.2 in class 0, 0 in class 1
    assert neural_collapse(h, y, flipped, np.ones(5))["nc4"] == pytest.approx(0.1)


def two_clouds(seed=5, n=20, d=5):
    """Two Gaussian clouds of different spread, and a head along their mean difference."""
    rng = np.random.default_rng(seed)
    negatives = rng.normal(0.0, 0.5, (n, d))
    positives = rng.normal(1.0, 1.5, (n, d))
    head = positives.mean(0) - negatives.mean(0)
    return negatives, positives, head


def at_prevalence(negatives, positives, copies_of_negatives):
    """The same class-conditional geometry at another prevalence: exact copies of the negatives."""
    h = np.concatenate([np.tile(negatives, (copies_of_negatives, 1)), positives])
    y = np.repeat([0, 1], [copies_of_negatives * len(negatives), len(positives)])
    return h, y


def predict_off_centre(h, head):
    # a decision rule that disagrees with the nearest-class-centre rule on some samples
    return (h @ head > 0.6 * head @ head).astype(int)


@pytest.mark.parametrize("metric", ["nc1", "nc3", "nc4", "within_var"])
def test_nc_values_do_not_move_with_class_prevalence(metric):
    negatives, positives, head = two_clouds()
    values = {}
    for copies, prevalence in ((1, 0.5), (3, 0.25), (9, 0.1)):
        h, y = at_prevalence(negatives, positives, copies)
        assert y.mean() == pytest.approx(prevalence)
        values[prevalence] = neural_collapse(h, y, predict_off_centre(h, head), head)[metric]
    assert values[0.25] == pytest.approx(values[0.5], rel=1e-9, abs=1e-12)
    assert values[0.1] == pytest.approx(values[0.5], rel=1e-9, abs=1e-12)
    if metric == "nc3":  # the head is aligned with the class means
        assert values[0.1] == pytest.approx(0.0, abs=1e-9)
    if metric == "nc4":  # the rule above does disagree with the class centres
        assert values[0.5] > 0


def test_nc3_is_zero_when_the_head_points_along_the_class_means():
    h, y, means = collapsed()
    assert neural_collapse(h, y, y, means[1] - means[0])["nc3"] == pytest.approx(0.0, abs=1e-9)
    assert neural_collapse(h, y, y, means[0] - means[1])["nc3"] == pytest.approx(2.0, abs=1e-9)


def test_per_subgroup_keys():
    h, y, means = collapsed(n=80)
    attrs = np.stack([np.arange(80) // 40, np.arange(80) % 4 // 2], axis=1)
    out = neural_collapse_by_group(h, y, y, means[1] - means[0], attrs, ATTRS)
    assert {"nc1", "sex/female/nc1", "sex/male/nc4", "age/lt60/nc3", "age/ge60/within_var"} <= set(out)


def test_per_subgroup_values_are_the_subgroups_own_and_free_of_its_prevalence():
    # females at prevalence 0.5, males at 0.1, with the same class-conditional features
    negatives, positives, head = two_clouds()
    h_f, y_f = at_prevalence(negatives, positives, 1)
    h_m, y_m = at_prevalence(negatives, positives, 9)
    h, y = np.concatenate([h_f, h_m]), np.concatenate([y_f, y_m])
    sex = np.repeat([0, 1], [len(y_f), len(y_m)])
    age = np.arange(len(y)) % 2
    attrs = np.stack([sex, age], axis=1)
    predictions = predict_off_centre(h, head)
    out = neural_collapse_by_group(h, y, predictions, head, attrs, ATTRS)
    for metric in ("nc1", "nc3", "nc4", "within_var"):
        assert out[f"sex/female/{metric}"] == pytest.approx(out[f"sex/male/{metric}"], rel=1e-9, abs=1e-12)
        assert out[metric] == pytest.approx(out[f"sex/male/{metric}"], rel=1e-9, abs=1e-12)
    old = age == 1
    own = neural_collapse(h[old], y[old], predictions[old], head)
    assert {k: out[f"age/ge60/{k}"] for k in own} == own


def test_incidence_and_concentration_on_a_hand_made_matrix():
    # neuron 0 fires for the two positive predictions, neuron 2 for the negative one
    h = np.array([[4.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    p = np.array([1.0, 1.0, 0.0])
    attrs = np.array([[0, 0], [1, 0], [1, 1]])
    out = neuron_incidence(h, p, np.array([1, 1, 0]), attrs, ATTRS, top=2)
    assert out["positive_incidence"] == pytest.approx([3.0, 0.5, 0.0])
    assert out["negative_incidence"] == pytest.approx([0.0, 0.0, 3.0])
    assert out["dominant_neurons"] == [0, 1]
    assert out["positive"]["top1_share"] == pytest.approx(3 / 3.5)
    assert out["dominant_activation_by_group"]["sex"] == {"female": 4.0, "male": 1.0}
    assert out["dominant_activation_by_label"] == {"0": 0.0, "1": 3.0}
    assert concentration(np.ones(8))["entropy"] == pytest.approx(1.0)
    assert concentration(np.array([5.0, 0, 0, 0]))["entropy"] == pytest.approx(0.0)


def test_label_bias_flips_the_requested_count_in_the_requested_group_only():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 500)
    attrs = rng.integers(0, 2, (500, 2))
    column, code, fraction = parse_label_bias("sex=female:0.3", ATTRS)
    new, flipped = inject_label_bias(labels, attrs, column, code, fraction, seed=7)
    candidates = (attrs[:, 0] == 0) & (labels == 1)
    assert len(flipped) == round(0.3 * candidates.sum())
    assert candidates[flipped].all()
    assert (new != labels).sum() == len(flipped) and (new[flipped] == 0).all()
    again, _ = inject_label_bias(labels, attrs, column, code, fraction, seed=7)
    assert np.array_equal(new, again)
    assert parse_label_bias("age=ge60:0.5", ATTRS) == (1, 1, 0.5)
    for spec, message in [
        ("sex:0.3", "ATTRIBUTE=GROUP:FRACTION"),
        ("race=x:0.1", "no attribute 'race'"),
        ("sex=other:0.1", "no sex group 'other'"),
        ("sex=male:1.5", r"\[0, 1\]"),
    ]:
        with pytest.raises(FairbenchError, match=message):
            parse_label_bias(spec, ATTRS)


def test_label_bias_nc_tracking_and_both_analyze_commands(tiny_config, tmp_path):
    config = tiny_config(
        label_bias="sex=female:0.5",
        track_nc=True,
        dataset_options={"n_train": 96, "n_val": 64, "n_test": 80, "label_noise": 0.0},
    )
    result = run_experiment(config, progress=False)
    client = mlflow.MlflowClient(config.tracking_uri)
    run = client.get_run(result.run_id)
    from fairbench.datasets.synthetic import Synthetic

    clean = Synthetic(n_train=96, n_val=64, n_test=80, label_noise=0.0).load(None, 32)
    positives = ((clean.train.attrs[:, 0] == 0) & (clean.train.labels == 1)).sum()
    assert run.data.metrics["label_bias/flipped"] == round(0.5 * positives)
    assert run.data.params["label_bias"] == "sex=female:0.5"
    assert np.array_equal(result.fit.test.labels, clean.test.labels)  # val and test labels stay true
    assert np.array_equal(result.fit.val.labels, clean.val.labels)
    history = client.get_metric_history(result.run_id, "nc/train/sex/female/nc1")
    assert [m.step for m in history] == [0, 1]
    assert "nc/val/nc1" in run.data.metrics
    assert "test/neurons/positive/top5_share" in run.data.metrics
    results = config.results_dir
    out = CliRunner().invoke(main, ["analyze", "nc", result.run_id, "--results-dir", results])
    assert out.exit_code == 0, out.output
    assert "train/sex/female" in out.output
    out = CliRunner().invoke(main, ["analyze", "neurons", result.run_id, "--results-dir", results])
    assert out.exit_code == 0, out.output
    assert "dominant neurons" in out.output
    pngs = sorted(p.name for p in (tmp_path / "results" / "analysis").iterdir())
    assert pngs == [f"{result.run_id}_nc_nc1.png", f"{result.run_id}_neurons.png"]
    with open(client.download_artifacts(result.run_id, "neurons.json", str(tmp_path))) as fh:
        data = json.load(fh)
    assert len(data["positive_incidence"]) == 96  # test_resnet's penultimate width


def test_analyze_nc_without_tracking_says_how(tiny_config):
    config = tiny_config()
    result = run_experiment(config, progress=False)
    out = CliRunner().invoke(main, ["analyze", "nc", result.run_id, "--results-dir", config.results_dir])
    assert out.exit_code == 1 and "--track-nc" in out.output
