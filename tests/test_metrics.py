import numpy as np
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, average_precision_score, log_loss, roc_auc_score

from fairbench.metrics import evaluate, group_key, roc_auc, select_threshold

ATTRS = {"site": ["a", "b", "c", "d"], "sex": ["female", "male"]}


def random_data(n=600, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    if ties:
        s = np.round(s, 1)
    a = np.stack([rng.integers(0, 4, n), rng.integers(0, 2, n)], axis=1)
    return s, y, a


@pytest.mark.parametrize("ties", [False, True])
def test_overall_metrics_match_sklearn(ties):
    s, y, a = random_data(ties=ties)
    r = evaluate(s, y, a, ATTRS, threshold=0.5)
    pred = (s >= 0.5).astype(int)
    assert r.values["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r.values["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r.values["bce"] == pytest.approx(log_loss(y, s), abs=1e-12)
    assert r.values["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert r.values["tpr"] == pytest.approx(pred[y == 1].mean(), abs=1e-12)
    assert r.values["fpr"] == pytest.approx(pred[y == 0].mean(), abs=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 0.37])
def test_group_gaps_match_fairlearn(threshold):
    s, y, a = random_data(seed=1)
    r = evaluate(s, y, a, ATTRS, threshold=threshold)
    pred = (s >= threshold).astype(int)
    for col, attr in enumerate(ATTRS):
        groups = a[:, col]
        frame = MetricFrame(
            metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
            y_true=y,
            y_pred=pred,
            sensitive_features=groups,
        )
        diff = frame.difference()
        assert r.values[f"{attr}/tpr_gap"] == pytest.approx(diff["tpr"], abs=1e-12)
        assert r.values[f"{attr}/fpr_gap"] == pytest.approx(diff["fpr"], abs=1e-12)
        assert r.values[f"{attr}/eo_gap"] == pytest.approx(
            equalized_odds_difference(y, pred, sensitive_features=groups), abs=1e-12
        )
        assert r.values[f"{attr}/dp_gap"] == pytest.approx(
            demographic_parity_difference(y, pred, sensitive_features=groups), abs=1e-12
        )


def test_group_auc_worst_gap_and_es_auc():
    s, y, a = random_data(seed=2)
    r = evaluate(s, y, a, ATTRS)
    group_auc = [roc_auc_score(y[a[:, 0] == k], s[a[:, 0] == k]) for k in range(4)]
    for k, g in enumerate(ATTRS["site"]):
        assert r.values[f"site/auc/{g}"] == pytest.approx(group_auc[k], abs=1e-12)
    assert r.values["site/worst_auc"] == pytest.approx(min(group_auc))
    assert r.values["site/auc_gap"] == pytest.approx(max(group_auc) - min(group_auc))
    overall = roc_auc_score(y, s)
    es = overall / (1 + sum(abs(overall - g) for g in group_auc))
    assert r.values["site/es_auc"] == pytest.approx(es)
    assert r.counts["site/n/a"] == int((a[:, 0] == 0).sum())


def test_ece_against_a_plain_loop():
    s, y, a = random_data(seed=3)
    bins = np.minimum((s * 10).astype(int), 9)
    ece = sum(
        abs(y[bins == b].mean() - s[bins == b].mean()) * (bins == b).mean() for b in range(10) if (bins == b).any()
    )
    r = evaluate(s, y, a, ATTRS)
    assert r.values["ece"] == pytest.approx(ece, abs=1e-12)
    m = a[:, 1] == 0
    bins_f = bins[m]
    ece_f = sum(
        abs(y[m][bins_f == b].mean() - s[m][bins_f == b].mean()) * (bins_f == b).mean()
        for b in range(10)
        if (bins_f == b).any()
    )
    assert r.values["sex/ece/female"] == pytest.approx(ece_f, abs=1e-12)


def test_unknown_group_code_counts_overall_but_in_no_group():
    s, y, a = random_data(seed=4)
    a[:50, 1] = -1
    r = evaluate(s, y, a, ATTRS)
    assert r.counts["sex/n/female"] + r.counts["sex/n/male"] == len(y) - 50
    assert r.values["auc"] == pytest.approx(roc_auc_score(y, s))


def test_group_without_positives_is_missing_with_a_warning_not_zero():
    s, y, a = random_data(seed=5)
    y[a[:, 0] == 2] = 0
    r = evaluate(s, y, a, ATTRS)
    assert np.isnan(r.values["site/tpr/c"])
    assert np.isnan(r.values["site/auc/c"])
    assert not np.isnan(r.values["site/fpr/c"])
    assert any("site=c has no positives" in w for w in r.warnings)
    defined = [r.values[f"site/tpr/{g}"] for g in "abd"]
    assert r.values["site/tpr_gap"] == pytest.approx(max(defined) - min(defined))
    assert "site/tpr/c" not in r.flat()


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    s, y, a = random_data(seed=6)
    r1 = evaluate(s, y, a, ATTRS, n_bootstrap=300, seed=7)
    r2 = evaluate(s, y, a, ATTRS, n_bootstrap=300, seed=7)
    r3 = evaluate(s, y, a, ATTRS, n_bootstrap=300, seed=8)
    assert r1.ci == r2.ci
    assert r1.ci["auc"] != r3.ci["auc"]
    for key in ("auc", "ap", "sex/tpr_gap", "site/worst_auc"):
        lo, hi = r1.ci[key]
        assert lo < r1.values[key] < hi
    flat = r1.flat()
    assert flat["auc_ci_low"] == r1.ci["auc"][0]


def test_bootstrap_counts_equal_sklearn_on_the_resample():
    # the integer-count kernels must equal scikit-learn on the materialised resample, exactly
    from fairbench import metrics

    s, y, a = random_data(n=200, seed=9, ties=True)
    plan = metrics._Plan(s, y.astype(float), a, ATTRS, 0.5, {})
    C = metrics.stratified_counts(np.random.default_rng(0), plan.strata(), len(s), 4)
    out = plan.compute(C)
    for r in range(4):
        idx = plan.order[np.repeat(np.arange(len(s)), C[:, r])]
        assert out["auc"][r] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
        assert out["ap"][r] == pytest.approx(average_precision_score(y[idx], s[idx]), abs=1e-12)
        assert out["bce"][r] == pytest.approx(log_loss(y[idx], s[idx]), abs=1e-12)
        group = a[idx, 0] == 1
        assert out["site/auc/b"][r] == pytest.approx(roc_auc_score(y[idx][group], s[idx][group]), abs=1e-12)
        tpr = true_positive_rate(y[idx][group], s[idx][group] >= 0.5)
        assert out["site/tpr/b"][r] == pytest.approx(tpr, abs=1e-12)


def test_bootstrap_is_stratified_by_group_and_label():
    from fairbench import metrics

    s, y, a = random_data(n=300, seed=3)
    plan = metrics._Plan(s, y.astype(float), a, ATTRS, 0.5, {})
    C = metrics.stratified_counts(np.random.default_rng(1), plan.strata(), len(s), 50)
    ys, sites = plan.y, plan.a[:, 0]
    for code in range(4):
        for label in (0, 1):
            cell = (sites == code) & (ys == label)
            # every resample holds exactly as many draws of this group and label as the data
            assert (C[cell].sum(axis=0) == cell.sum()).all()
    assert C.sum(axis=0).tolist() == [len(s)] * 50
    assert len({tuple(C[:, r]) for r in range(50)}) == 50  # and the resamples differ


def test_small_group_is_reported_and_left_out_of_the_gaps():
    s, y, a = random_data(n=600, seed=11)
    tiny = np.flatnonzero(a[:, 0] == 3)
    keep = np.r_[np.flatnonzero(a[:, 0] != 3), tiny[y[tiny] == 1][:1], tiny[y[tiny] == 0][:4]]
    s, y, a = s[keep], y[keep], a[keep]
    r = evaluate(s, y, a, ATTRS, n_bootstrap=200, seed=0, min_count=20)
    assert r.counts["site/n/d"] == 5 and r.counts["site/n_pos/d"] == 1 and r.counts["site/n_neg/d"] == 4
    assert [e["group"] for e in r.too_small] == ["d"]
    assert any("site=d is too small (1 positives, 4 negatives" in w for w in r.warnings)
    others = [r.values[f"site/tpr/{g}"] for g in "abc"]
    assert r.values["site/tpr_gap"] == pytest.approx(max(others) - min(others))
    assert not np.isnan(r.values["site/tpr/d"])  # its own value is kept, with its counts
    assert r.bootstrap_excluded == 0
    lo, hi = r.ci["site/tpr_gap"]
    assert lo <= r.values["site/tpr_gap"] <= hi
    assert r.flat()["site/too_small/d"] == 1.0 and r.flat()["min_group_count"] == 20.0
    # with a lower minimum the group counts again
    assert evaluate(s, y, a, ATTRS, min_count=1).too_small == []


def test_threshold_rules_against_brute_force():
    s, y, _ = random_data(seed=10)
    cands = np.unique(s)
    tpr = np.array([(s[y == 1] >= t).mean() for t in cands])
    fpr = np.array([(s[y == 0] >= t).mean() for t in cands])
    youden = cands[np.argmax(tpr - fpr + 1e-12 * cands)]
    assert select_threshold(s, y, "youden") == pytest.approx(youden)
    tp = np.array([((s >= t) & (y == 1)).sum() for t in cands])
    fp = np.array([((s >= t) & (y == 0)).sum() for t in cands])
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    assert f1[cands == select_threshold(s, y, "f1")][0] == pytest.approx(f1.max())
    assert select_threshold(s, y, "0.3") == 0.3
    with pytest.raises(ValueError, match="unknown threshold rule"):
        select_threshold(s, y, "best")


def test_roc_auc_nan_without_both_classes_and_group_keys():
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))
    assert group_key("<60") == "lt60"
    assert group_key("≥60") == "ge60"
    assert group_key("Black or African American") == "Black_or_African_American"
