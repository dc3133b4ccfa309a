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


def _log_loss_terms(p, y):
    eps = np.finfo(np.float64).eps
    q = np.clip(p, eps, 1 - eps)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _rank_metrics(y, W, ends, with_ap):
    """ROC AUC (ties count one half) and, if asked, average precision, per row of W.

    The samples are in ascending score order; ``ends`` holds the last position of each run of
    equal scores, or None when all scores differ. Cumulative sums read at the run ends give the
    positive and negative weight at or below every distinct score.
    """
    wy = W * y
    cpos = np.cumsum(wy, axis=1)
    cw = np.cumsum(W, axis=1)
    P = cpos[:, -1]
    Q = cw[:, -1] - P
    if ends is None and not with_ap:
        # no ties: a sample is positive or negative, so sum(pos * neg_below) needs no blocks
        num = np.einsum("ij,ij->i", wy, cw) - (P * P + np.einsum("ij,ij->i", wy, wy)) / 2
        return _ratio(num, P * Q), None
    if ends is not None:
        cpos, cw = cpos[:, ends], cw[:, ends]
    cneg = cw - cpos
    pos = np.diff(cpos, axis=1, prepend=0.0)
    neg = np.diff(cneg, axis=1, prepend=0.0)
    auc = _ratio(np.einsum("ij,ij->i", pos, cneg - 0.5 * neg), P * Q)
    if not with_ap:
        return auc, None
    at_or_above = cw[:, -1:] - cw + pos + neg  # weight of samples scoring >= this score
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(at_or_above > 0, (P[:, None] - cpos + pos) / at_or_above, 0.0)
    return auc, _ratio(np.einsum("ij,ij->i", pos, precision), P)


def _gap(per_group: list[np.ndarray], rows: int) -> np.ndarray:
    """max - min over groups per row; NaN where fewer than two groups or any is NaN."""
    if len(per_group) < 2:
        return np.full(rows, np.nan)
    stacked = np.stack(per_group, axis=1)
    return stacked.max(axis=1) - stacked.min(axis=1)


class _Plan:
    """Everything about one split that does not depend on the sample weights, prepared once.

    Samples are put in ascending score order (every metric is invariant to the order), so each
    subset (all samples, each group) is already sorted and needs no sort per resample. Every
    metric that is a ratio of weighted sums (rates, log loss, the per-bin calibration sums) is
    read from one product ``W @ M``.
    """

    def __init__(self, s, y, a, attributes, threshold, defined):
        self.order = np.argsort(s, kind="stable")
        s, y, a = s[self.order], y[self.order], a[self.order]
        self.y = y
        self.attributes = attributes
        self.defined = defined
        pred = (s >= threshold).astype(np.float64)
        bins = np.minimum((s * ECE_BINS).astype(np.int64), ECE_BINS - 1)
        onehot = np.zeros((s.size, ECE_BINS))
        onehot[np.arange(s.size), bins] = y - s
        columns = [np.ones_like(s), (pred == y).astype(np.float64), _log_loss_terms(s, y)]
        self.subsets = []  # (metric prefix, columns or None, labels, run ends or None, first column of M)
        for prefix, cols in self._subset_columns(a):
            m = np.ones(s.size)
            if cols is not None:
                m = np.zeros(s.size)
                m[cols] = 1.0
            sub = s if cols is None else s[cols]
            ends = np.flatnonzero(np.r_[sub[1:] != sub[:-1], True]) if sub.size else np.zeros(0, np.int64)
            first = len(columns)
            columns += [m, m * y, m * y * pred, m * (1 - y) * pred, m * pred]
            columns += list((onehot * m[:, None]).T)
            self.subsets.append(
                (prefix, cols, y if cols is None else y[cols], None if ends.size == sub.size else ends, first)
            )
        self.M = np.stack(columns, axis=1)

    def _subset_columns(self, a):
        yield "", None
        for i, (attr, groups) in enumerate(self.attributes.items()):
            for code, group in enumerate(groups):
                yield f"{attr}/{{}}/{group_key(group)}", np.flatnonzero(a[:, i] == code)

    def compute(self, W: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric as a (R,) array for weights W (R, N) in this plan's sample order."""
        M = self.M if W.dtype == np.float64 else self.M.astype(W.dtype)
        S = W @ M
        rows = W.shape[0]
        out: dict[str, np.ndarray] = {}
        for prefix, cols, y, ends, c in self.subsets:
            n, pos, tp, fp, sel = (S[:, c + k] for k in range(5))
            ece = _ratio(np.abs(S[:, c + 5 : c + 5 + ECE_BINS]).sum(axis=1), n)
            overall = cols is None
            Wg = W if overall else W[:, cols]
            if y.size:
                auc, ap = _rank_metrics(y, Wg, ends, with_ap=overall)
            else:
                auc, ap = np.full(rows, np.nan), None
            values = {"auc": auc, "tpr": _ratio(tp, pos), "fpr": _ratio(fp, n - pos), "ece": ece}
            if overall:
                values.update(ap=ap, accuracy=_ratio(S[:, 1], n), bce=_ratio(S[:, 2], n))
                out.update(values)
            else:
                values["selection_rate"] = _ratio(sel, n)
                out.update({prefix.format(name): v for name, v in values.items()})
        for attr, groups in self.attributes.items():
            keys = [group_key(g) for g in groups]
            per = {
                name: [out[f"{attr}/{name}/{g}"] for g in keys if self.defined.get(f"{attr}/{name}/{g}", True)]
                for name in ("auc", "tpr", "fpr", "selection_rate")
            }
            gaps = {name: _gap(vs, rows) for name, vs in per.items()}
            out[f"{attr}/auc_gap"] = gaps["auc"]
            out[f"{attr}/tpr_gap"] = gaps["tpr"]
            out[f"{attr}/fpr_gap"] = gaps["fpr"]
            out[f"{attr}/eo_gap"] = np.maximum(gaps["tpr"], gaps["fpr"])
            out[f"{attr}/dp_gap"] = gaps["selection_rate"]
            if per["auc"]:
                group_auc = np.stack(per["auc"], axis=1)
                out[f"{attr}/worst_auc"] = group_auc.min(axis=1)
                out[f"{attr}/es_auc"] = out["auc"] / (1.0 + np.abs(out["auc"][:, None] - group_auc).sum(axis=1))
            else:
                out[f"{attr}/worst_auc"] = np.full(rows, np.nan)
                out[f"{attr}/es_auc"] = np.full(rows, np.nan)
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
    plan = _Plan(s, y, a, attributes, threshold, defined)
    point = plan.compute(np.ones((1, s.size)))
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
        report.ci = _bootstrap_ci(plan, values, n_bootstrap, seed, confidence)
    return report


def _bootstrap_ci(plan: _Plan, values, n_bootstrap, seed, confidence):
    """Percentile intervals from resamples drawn directly in the plan's (sorted) order."""
    rng = np.random.default_rng(seed)
    n = plan.y.size
    draws: dict[str, list[np.ndarray]] = {k: [] for k in values}
    for r in _blocks_of(n_bootstrap, n):
        for k, v in plan.compute(_resample_weights(rng, r, n)).items():
            draws[k].append(v)
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


def _blocks_of(n_bootstrap: int, n: int) -> list[int]:
    """Resamples per block, so that one block's weight matrix holds about 8 million entries."""
    size = max(1, min(n_bootstrap, 8_000_000 // max(n, 1)))
    return [min(size, n_bootstrap - i) for i in range(0, n_bootstrap, size)]


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
    plans = [_Plan(np.asarray(s, dtype=np.float64).ravel(), y, a, attributes, t, defined) for s, t in predictions]
    rng = np.random.default_rng(seed)
    draws: list[dict[str, list[np.ndarray]]] = [{} for _ in plans]
    for r in _blocks_of(n_bootstrap, y.size):
        W = _resample_weights(rng, r, y.size)  # in sample order: the same resamples for every plan
        for out, plan in zip(draws, plans, strict=True):
            for k, v in plan.compute(W[:, plan.order]).items():
                out.setdefault(k, []).append(v)
    return [{k: np.concatenate(v) for k, v in out.items()} for out in draws]


def _resample_weights(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``rows`` bootstrap resamples of n samples as draw counts, shape (rows, n), float32
    (counts are small integers, exact in float32; the point estimate stays in float64)."""
    idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float32)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve; NaN unless both classes are present."""
    s, y, _ = _as_arrays(scores, labels, None, {})
    order = np.argsort(s, kind="stable")
    ends = np.flatnonzero(np.r_[s[order][1:] != s[order][:-1], True])
    return float(_rank_metrics(y[order], np.ones((1, s.size)), ends, with_ap=False)[0][0])


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
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], s.size] - 1
    tp = np.cumsum(y[order])[ends]
    fp = (ends + 1) - tp
    if rule == "youden":
        objective = tp / n_pos - fp / n_neg
    else:
        objective = 2 * tp / (2 * tp + fp + (n_pos - tp))
    return float(s[order][starts][int(np.argmax(objective))])
