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
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)
    h = rng.normal(size=(50, 4)) + y[:, None]
    mu = np.stack([h[y == k].mean(0) for k in (0, 1)])
    sw = sum(np.outer(h[i] - mu[y[i]], h[i] - mu[y[i]]) for i in range(50)) / 50
    mg = h.mean(0)
    sb = sum(np.outer(mu[k] - mg, mu[k] - mg) for k in (0, 1)) / 2
    expected = np.trace(sw @ np.linalg.pinv(sb)) / 2
    assert neural_collapse(h, y, y, np.ones(4))["nc1"] == pytest.approx(expected, rel=1e-8)


def test_nc4_is_zero_when_predictions_follow_the_nearest_class_centre():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    h = rng.normal(size=(60, 5)) + 2 * y[:, None]
    mu = np.stack([h[y == k].mean(0) for k in (0, 1)])
    ncc = np.argmin(((h[:, None] - mu[None]) ** 2).sum(2), axis=1)
    assert neural_collapse(h, y, ncc, np.ones(5))["nc4"] == 0.0
    flipped = ncc.copy()
    flipped[:6] = 1 - flipped[:6]
    assert neural_collapse(h, y, flipped, np.ones(5))["nc4"] == pytest.approx(0.1)


def test_nc3_is_zero_when_the_head_points_along_the_class_means():
    h, y, means = collapsed()
    assert neural_collapse(h, y, y, means[1] - means[0])["nc3"] == pytest.approx(0.0, abs=1e-9)
    assert neural_collapse(h, y, y, means[0] - means[1])["nc3"] == pytest.approx(2.0, abs=1e-9)


def test_per_subgroup_keys():
    h, y, means = collapsed(n=80)
    attrs = np.stack([np.arange(80) // 40, np.arange(80) % 4 // 2], axis=1)
    out = neural_collapse_by_group(h, y, y, means[1] - means[0], attrs, ATTRS)
    assert {"nc1", "sex/female/nc1", "sex/male/nc4", "age/lt60/nc3", "age/ge60/within_var"} <= set(out)


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
