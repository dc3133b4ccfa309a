"""Every number fairbench reports, computed from (score, label, attribute codes).

Each metric is written for a weight matrix ``W`` of shape (R, N): row r weights sample i by
``W[r, i]``. The point estimate is the single row of ones; a bootstrap resample is a row of
draw counts. One code path therefore gives both the values and their confidence intervals, and
the bootstrap is a handful of matrix operations per block of resamples rather than a Python loop
per resample.

Definitions follow scikit-learn (ROC AUC with ties counted one half, average precision as the
step-wise sum over distinct thresholds, log loss clipped at machine epsilon) and fairlearn
(a between-groups difference is max - min over the groups; the equalized-odds difference is the
larger of the TPR and FPR differences). A sample is predicted positive when ``score >= threshold``.

Groups coded -1 (unknown) count in the overall metrics and in no group. A group metric that is
undefined (AUC without both classes, TPR without positives, FPR without negatives) is missing
(NaN, with a warning naming it), never 0, and gaps are taken over the groups where it is defined.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

ECE_BINS = 10
THRESHOLD_RULES = ("youden", "f1")

_SLUG_REPLACEMENTS = (("<=", "le"), (">=", "ge"), ("≤", "le"), ("≥", "ge"), ("<", "lt"), (">", "gt"), ("+", "plus"))


def group_key(name: str) -> str:
    """A group name as it appears in metric keys: ``"<60"`` -> ``"lt60"``, ``"≥60"`` -> ``"ge60"``.

    MLflow keys allow only letters, digits, ``_ - . /`` and spaces.
    """
    for old, new in _SLUG_REPLACEMENTS:
        name = name.replace(old, new)
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "group"


# --------------------------------------------------------------------------- weighted kernels


def _blocks(scores_sorted: np.ndarray) -> np.ndarray:
    """Start positions of runs of equal scores in a sorted score vector."""
    return np.flatnonzero(np.r_[True, scores_sorted[1:] != scores_sorted[:-1]])


def _class_weights_by_score(s, y, W, descending):
    """Per distinct score, the weight of positives and of negatives: two (R, U) arrays."""
    order = np.argsort(-s if descending else s, kind="stable")
    starts = _blocks(s[order])
    Ws = W[:, order]
    ys = y[order].astype(bool)
    pos = np.add.reduceat(np.where(ys, Ws, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(ys, 0.0, Ws), starts, axis=1)
    return pos, neg


def _auc_w(s, y, W):
    """ROC AUC per row of W (Mann-Whitney; tied scores count one half)."""
    if s.size == 0:
        return np.full(W.shape[0], np.nan)
    pos, neg = _class_weights_by_score(s, y, W, descending=False)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _ap_w(s, y, W):
    """Average precision per row of W: sum over distinct thresholds of precision x recall step."""
    if s.size == 0:
        return np.full(W.shape[0], np.nan)
    pos, neg = _class_weights_by_score(s, y, W, descending=True)
    tps = np.cumsum(pos, axis=1)
    fps = np.cumsum(neg, axis=1)
    total_pos = tps[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        ap = np.sum(pos * precision, axis=1) / total_pos[:, 0]
    return np.where(total_pos[:, 0] > 0, ap, np.nan)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _ece_w(p, y, W):
    """Expected calibration error, 10 equal-width bins on [0, 1], per row of W."""
    if p.size == 0:
        return np.full(W.shape[0], np.nan)
    bins = np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    onehot = np.zeros((p.size, ECE_BINS))
    onehot[np.arange(p.size), bins] = 1.0
    gap_per_bin = (W * (y - p)) @ onehot
    return _ratio(np.abs(gap_per_bin).sum(axis=1), W.sum(axis=1))


def _log_loss_terms(p, y):
    eps = np.finfo(np.float64).eps
    q = np.clip(p, eps, 1 - eps)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


def _rates_w(pred, y, W):
    """(TPR, FPR, selection rate, accuracy) per row of W at fixed predictions."""
    n = W.sum(axis=1)
    n_pos = W @ y
    tp = W @ (pred * y)
    fp = W @ (pred * (1 - y))
    return (
        _ratio(tp, n_pos),
        _ratio(fp, n - n_pos),
        _ratio(W @ pred, n),
        _ratio(W @ (pred == y).astype(np.float64), n),
    )


def _gap(per_group: list[np.ndarray], rows: int) -> np.ndarray:
    """max - min over groups per row; NaN where fewer than two groups or any is NaN."""
    if len(per_group) < 2:
        return np.full(rows, np.nan)
    stacked = np.stack(per_group, axis=1)
    return stacked.max(axis=1) - stacked.min(axis=1)


def _all_metrics(s, y, attrs, attributes, threshold, W, defined):
    """Every metric as a (R,) array for the weight matrix W.

    ``defined`` maps a group metric key to whether it is defined on the full sample; gaps are
    taken over defined groups only, so that resamples compare the same set of groups.
    """
    pred = (s >= threshold).astype(np.float64)
    out: dict[str, np.ndarray] = {}
    out["auc"] = _auc_w(s, y, W)
    out["ap"] = _ap_w(s, y, W)
    tpr, fpr, _, acc = _rates_w(pred, y, W)
    out["accuracy"] = acc
    out["tpr"] = tpr
    out["fpr"] = fpr
    out["bce"] = _ratio(W @ _log_loss_terms(s, y), W.sum(axis=1))
    out["ece"] = _ece_w(s, y, W)
    for a, (attr, groups) in enumerate(attributes.items()):
        per: dict[str, list[np.ndarray]] = {"auc": [], "tpr": [], "fpr": [], "selection_rate": []}
        for code, group in enumerate(groups):
            m = attrs[:, a] == code
            Wg, sg, yg, pg = W[:, m], s[m], y[m], pred[m]
            g = group_key(group)
            values = dict(zip(("tpr", "fpr", "selection_rate"), _rates_w(pg, yg, Wg)[:3], strict=True))
            values["auc"] = _auc_w(sg, yg, Wg)
            values["ece"] = _ece_w(sg, yg, Wg)
            for name, v in values.items():
                out[f"{attr}/{name}/{g}"] = v
                if name in per and defined.get(f"{attr}/{name}/{g}", True):
                    per[name].append(v)
        gaps = {name: _gap(vs, W.shape[0]) for name, vs in per.items()}
        out[f"{attr}/auc_gap"] = gaps["auc"]
        out[f"{attr}/tpr_gap"] = gaps["tpr"]
        out[f"{attr}/fpr_gap"] = gaps["fpr"]
        out[f"{attr}/eo_gap"] = np.maximum(gaps["tpr"], gaps["fpr"])
        out[f"{attr}/dp_gap"] = gaps["selection_rate"]
        if per["auc"]:
            group_auc = np.stack(per["auc"], axis=1)
            out[f"{attr}/worst_auc"] = group_auc.min(axis=1)
            spread = np.abs(out["auc"][:, None] - group_auc).sum(axis=1)
            out[f"{attr}/es_auc"] = out["auc"] / (1.0 + spread)
        else:
            out[f"{attr}/worst_auc"] = np.full(W.shape[0], np.nan)
            out[f"{attr}/es_auc"] = np.full(W.shape[0], np.nan)
    return out


# --------------------------------------------------------------------------- public API


@dataclass
class Report:
    """The metrics of one split.

    ``values`` maps each metric key to its value (NaN where missing); ``ci`` maps keys to
    (low, high) 95% bootstrap bounds when a bootstrap was run; ``counts`` holds the number of
    samples per group (``sex/n/female``); ``warnings`` says which metrics are missing and why.
    """

    values: dict[str, float]
    counts: dict[str, int]
    threshold: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def flat(self) -> dict[str, float]:
        """Defined values, CI bounds (``<key>_ci_low`` / ``_ci_high``), counts and threshold."""
        out = {k: v for k, v in self.values.items() if np.isfinite(v)}
        for k, (lo, hi) in self.ci.items():
            if np.isfinite(lo) and np.isfinite(hi):
                out[f"{k}_ci_low"] = lo
                out[f"{k}_ci_high"] = hi
        out.update({k: float(v) for k, v in self.counts.items()})
        out["threshold"] = self.threshold
        return out


def _as_arrays(scores, labels, attrs, attributes):
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} values but labels has {y.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    a = np.asarray(attrs, dtype=np.int64).reshape(s.size, -1) if attributes else np.zeros((s.size, 0), np.int64)
    if a.shape[1] != len(attributes):
        raise ValueError(f"attrs has {a.shape[1]} columns but {len(attributes)} attributes are named")
    return s, y, a


def _undefined(y, attrs, attributes) -> tuple[dict[str, bool], list[str]]:
    """Which group metrics are defined on the full sample, and a warning for each that is not."""
    defined: dict[str, bool] = {}
    warnings: list[str] = []
    for a, (attr, groups) in enumerate(attributes.items()):
        for code, group in enumerate(groups):
            m = attrs[:, a] == code
            n_pos = int(y[m].sum())
            n_neg = int(m.sum()) - n_pos
            g = group_key(group)
            defined[f"{attr}/tpr/{g}"] = n_pos > 0
            defined[f"{attr}/fpr/{g}"] = n_neg > 0
            defined[f"{attr}/auc/{g}"] = n_pos > 0 and n_neg > 0
            defined[f"{attr}/selection_rate/{g}"] = n_pos + n_neg > 0
            defined[f"{attr}/ece/{g}"] = n_pos + n_neg > 0
            if n_pos == 0 or n_neg == 0:
                lacking = "samples" if n_pos + n_neg == 0 else ("positives" if n_pos == 0 else "negatives")
                missing = {"positives": "TPR and AUC", "negatives": "FPR and AUC"}.get(lacking, "every metric")
                warnings.append(f"{attr}={group} has no {lacking}: its {missing} are missing, not 0")
    return defined, warnings


def evaluate(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    attrs: np.ndarray | None = None,
    attributes: Mapping[str, Sequence[str]] | None = None,
    *,
    threshold: float = 0.5,
    n_bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> Report:
    """All overall and per-attribute metrics of one split.

    Parameters
    ----------
    scores : predicted probability of the positive class, shape (N,).
    labels : true labels in {0, 1}, shape (N,).
    attrs : attribute codes, shape (N, A); code k is ``attributes[attr][k]``, -1 is unknown.
    attributes : attribute name -> group names in code order.
    threshold : a sample is predicted positive when its score is >= threshold.
    n_bootstrap : number of bootstrap resamples for the confidence intervals (0: none).
    seed : seed of the resampling.
    confidence : coverage of the percentile intervals.
    """
    attributes = dict(attributes or {})
    s, y, a = _as_arrays(scores, labels, attrs, attributes)
    defined, warnings = _undefined(y, a, attributes)
    point = _all_metrics(s, y, a, attributes, threshold, np.ones((1, s.size)), defined)
    values = {k: float(v[0]) for k, v in point.items()}
    for k, ok in defined.items():
        if not ok:
            values[k] = float("nan")
    counts = {
        f"{attr}/n/{group_key(g)}": int((a[:, i] == code).sum())
        for i, (attr, groups) in enumerate(attributes.items())
        for code, g in enumerate(groups)
    }
    report = Report(values=values, counts=counts, threshold=float(threshold), warnings=warnings)
    if n_bootstrap > 0 and s.size > 0:
        report.ci = _bootstrap_ci(s, y, a, attributes, threshold, defined, values, n_bootstrap, seed, confidence)
    return report


def _bootstrap_ci(s, y, a, attributes, threshold, defined, values, n_bootstrap, seed, confidence):
    rng = np.random.default_rng(seed)
    n = s.size
    rows_per_block = max(1, min(n_bootstrap, 4_000_000 // n))
    draws: dict[str, list[np.ndarray]] = {k: [] for k in values}
    done = 0
    while done < n_bootstrap:
        r = min(rows_per_block, n_bootstrap - done)
        W = _resample_weights(rng, r, n)
        for k, v in _all_metrics(s, y, a, attributes, threshold, W, defined).items():
            draws[k].append(v)
        done += r
    alpha = (1.0 - confidence) / 2.0
    ci: dict[str, tuple[float, float]] = {}
    for k, parts in draws.items():
        if not np.isfinite(values[k]):
            continue
        v = np.concatenate(parts)
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
            ci[k] = (float(lo), float(hi))
    return ci


def paired_bootstrap(
    predictions: Sequence[tuple[np.ndarray, float]],
    labels: np.ndarray,
    attrs: np.ndarray,
    attributes: Mapping[str, Sequence[str]],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Bootstrap draws of every metric for several score vectors on the same samples.

    Each entry of ``predictions`` is (scores, threshold) for the same labels and attribute
    codes; all of them are evaluated on the same resamples, so differences between them are
    paired. Returns, per entry, metric key -> (n_bootstrap,) array of draws.
    """
    attributes = dict(attributes)
    _, y, a = _as_arrays(predictions[0][0], labels, attrs, attributes)
    defined, _ = _undefined(y, a, attributes)
    scores = [np.asarray(s, dtype=np.float64).ravel() for s, _ in predictions]
    n = y.size
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, min(n_bootstrap, 4_000_000 // n))
    draws: list[dict[str, list[np.ndarray]]] = [{} for _ in predictions]
    done = 0
    while done < n_bootstrap:
        r = min(rows_per_block, n_bootstrap - done)
        W = _resample_weights(rng, r, n)
        for out, s, (_, threshold) in zip(draws, scores, predictions, strict=True):
            for k, v in _all_metrics(s, y, a, attributes, threshold, W, defined).items():
                out.setdefault(k, []).append(v)
        done += r
    return [{k: np.concatenate(v) for k, v in out.items()} for out in draws]


def _resample_weights(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``rows`` bootstrap resamples of n samples as draw counts, shape (rows, n)."""
    idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve; NaN unless both classes are present."""
    s, y, _ = _as_arrays(scores, labels, None, {})
    return float(_auc_w(s, y, np.ones((1, s.size)))[0])


def select_threshold(scores, labels, rule: str | float) -> float:
    """The decision threshold for ``rule``, to be fitted on validation predictions only.

    ``rule`` is a number (used as is), ``"youden"`` (maximises TPR - FPR) or ``"f1"``
    (maximises F1). Candidates are the distinct scores; the highest-scoring best is taken.
    """
    if not isinstance(rule, str):
        return float(rule)
    try:
        return float(rule)
    except ValueError:
        pass
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule '{rule}'; use a number, 'youden' or 'f1'")
    s, y, _ = _as_arrays(scores, labels, None, {})
    n_pos = y.sum()
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"threshold rule '{rule}' needs both classes in the validation split")
    order = np.argsort(-s, kind="stable")
    starts = _blocks(s[order])
    ends = np.r_[starts[1:], s.size] - 1
    tp = np.cumsum(y[order])[ends]
    fp = (ends + 1) - tp
    if rule == "youden":
        objective = tp / n_pos - fp / n_neg
    else:
        objective = 2 * tp / (2 * tp + fp + (n_pos - tp))
    return float(s[order][starts][int(np.argmax(objective))])
