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


UNEVEN = {"site": ["a", "b", "c", "d", "e"], "sex": ["female", "male"], "scanner": ["x", "y"]}


def uneven_data(n=400, seed=12):
    """Ties (scores on a 0.05 grid, the threshold one of them), groups of very different sizes
    (the smallest with 2 positives and 2 negatives) and unknown codes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1) * 20) / 20
    site = rng.choice(4, n, p=[0.7, 0.2, 0.07, 0.03])
    site[:4] = 4
    y[:4] = [1, 1, 0, 0]
    sex = rng.choice([-1, 0, 1], n, p=[0.1, 0.6, 0.3])
    scanner = rng.integers(0, 2, n)
    return s, y, np.stack([site, sex, scanner], axis=1)


def plain_metrics(s, y, a, attributes, threshold):
    """Every metric of one (materialised) sample, from scikit-learn, fairlearn and plain loops."""

    def ece(s, y):
        bins = np.minimum((s * 10).astype(int), 9)
        return sum(abs((y[bins == b] - s[bins == b]).sum()) for b in range(10)) / len(s)

    pred = (s >= threshold).astype(int)
    out = {
        "auc": roc_auc_score(y, s),
        "ap": average_precision_score(y, s),
        "bce": log_loss(y, s, labels=[0, 1]),
        "accuracy": accuracy_score(y, pred),
        "tpr": true_positive_rate(y, pred),
        "fpr": false_positive_rate(y, pred),
        "ece": ece(s, y),
    }
    for col, (attr, groups) in enumerate(attributes.items()):
        per = {"auc": [], "tpr": [], "fpr": [], "selection_rate": []}
        for code, g in enumerate(groups):
            m = a[:, col] == code
            values = {
                "auc": roc_auc_score(y[m], s[m]),
                "tpr": true_positive_rate(y[m], pred[m]),
                "fpr": false_positive_rate(y[m], pred[m]),
                "selection_rate": pred[m].mean(),
            }
            for name, v in values.items():
                out[f"{attr}/{name}/{g}"] = v
                per[name].append(v)
            out[f"{attr}/ece/{g}"] = ece(s[m], y[m])
        gaps = {name: max(v) - min(v) for name, v in per.items()}
        out.update({f"{attr}/{name}_gap": gaps[name] for name in ("auc", "tpr", "fpr")})
        out[f"{attr}/eo_gap"] = max(gaps["tpr"], gaps["fpr"])
        out[f"{attr}/dp_gap"] = gaps["selection_rate"]
        out[f"{attr}/worst_auc"] = min(per["auc"])
        out[f"{attr}/es_auc"] = out["auc"] / (1 + sum(abs(out["auc"] - g) for g in per["auc"]))
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.37])
def test_bootstrap_resamples_equal_plain_metrics_on_the_materialised_resample(threshold):
    # every metric of every resample, from the compiled count scan, against scikit-learn on the
    # resample written out sample by sample (ties, uneven groups, unknown codes)
    from fairbench import metrics

    s, y, a = uneven_data()
    plan = metrics._Plan(s, y.astype(float), a, UNEVEN, threshold, {})
    C = metrics.stratified_counts(np.random.default_rng(0), plan.strata(), len(s), 6)
    out = plan.compute(C)
    for r in range(C.shape[1]):
        idx = plan.order[np.repeat(np.arange(len(s)), C[:, r])]
        expected = plain_metrics(s[idx], y[idx], a[idx], UNEVEN, threshold)
        assert set(expected) == set(out)
        for key, value in expected.items():
            assert out[key][r] == pytest.approx(value, abs=1e-9), key


def old_stratified_counts(rng, strata, n, rows):
    """The draw counts as first written (one bincount per stratum), shape (n, rows)."""
    counts = np.empty((n, rows), np.int32)
    for members in strata:
        size = members.size
        picks = rng.integers(0, size, size=(rows, size), dtype=np.int64)
        flat = picks + (np.arange(rows, dtype=np.int64) * size)[:, None]
        counts[members] = np.bincount(flat.ravel(), minlength=rows * size).reshape(rows, size).T
    return counts


def test_bootstrap_draws_are_those_of_the_seed():
    # the compiled counts come from the same generator calls as the first implementation: a
    # seed gives the same resamples (uneven strata, one of a single sample)
    from fairbench import metrics

    s, y, a = uneven_data()
    y[4] = 1 - y[4]
    a[4] = [2, -1, 1]  # very likely alone in its stratum
    plan = metrics._Plan(s, y.astype(float), a, UNEVEN, 0.5, {})
    strata = plan.strata()
    assert min(m.size for m in strata) == 1
    for seed, rows in ((0, 7), (3, 1)):
        new = metrics.stratified_counts(np.random.default_rng(seed), strata, len(s), rows)
        old = old_stratified_counts(np.random.default_rng(seed), strata, len(s), rows)
        assert new.shape == (len(s), rows)
        np.testing.assert_array_equal(new, old)


def test_bootstrap_is_stratified_by_group_and_label():
    from fairbench import metrics

    s, y, a = random_data(n=300, seed=3)
    plan = metrics._Plan(s, y.astype(float), a, ATTRS, 0.5, {})
    C = metrics.stratified_counts(np.random.default_rng(1), plan.strata(), len(s), 2000)
    ys, sites, sexes = plan.y, plan.a[:, 0], plan.a[:, 1]
    for code in range(4):
        for sex in range(2):
            for label in (0, 1):
                cell = (sites == code) & (sexes == sex) & (ys == label)
                # every resample holds exactly as many draws of this cell as the data
                assert (C[cell].sum(axis=0) == cell.sum()).all()
                # uniform with replacement within the cell: each member is drawn
                # Binomial(size, 1/size) times
                size = cell.sum()
                counts = C[cell]
                assert abs(counts.mean() - 1.0) < 5 * np.sqrt((1 - 1 / size) / counts.size)
                assert counts.var() == pytest.approx(1 - 1 / size, rel=0.1)
    assert C.sum(axis=0).tolist() == [len(s)] * 2000
    assert len({tuple(C[:, r]) for r in range(50)}) == 50  # and the resamples differ


def test_paired_bootstrap_evaluates_every_prediction_on_the_same_resamples():
    from fairbench import metrics

    s, y, a = uneven_data(n=200, seed=13)
    other = np.clip(s + np.random.default_rng(1).normal(0, 0.1, len(s)), 0, 1)
    first, second = metrics.paired_bootstrap([(s, 0.5), (other, 0.4)], y, a, UNEVEN, n_bootstrap=5, seed=4, min_count=1)
    # the first prediction alone gives exactly evaluate's draws for that seed
    plan = metrics._Plan(s, y.astype(float), a, UNEVEN, 0.5, {})
    alone = metrics._draw_all(plan, 5, 4)
    assert set(alone) == set(first)
    for key in alone:
        np.testing.assert_array_equal(alone[key], first[key])
    # the second is evaluated on the very same resamples (strata in sample order)
    strata = [plan.order[m] for m in plan.strata()]
    C = metrics.stratified_counts(np.random.default_rng(4), strata, len(s), 5)
    for r in range(5):
        idx = np.repeat(np.arange(len(s)), C[:, r])
        expected = plain_metrics(other[idx], y[idx], a[idx], UNEVEN, 0.4)
        for key in ("auc", "ap", "bce", "site/auc/e", "sex/tpr_gap", "scanner/ece/y"):
            assert second[key][r] == pytest.approx(expected[key], abs=1e-9), key


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
