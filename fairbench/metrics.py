"""Every number fairbench reports, computed from (score, label, attribute codes).

Each metric is written for a count matrix ``C`` of shape (R, N): row r draws sample i
``C[r, i]`` times. The point estimate is the single row of ones; a bootstrap resample is a row of
draw counts. One code path therefore gives both the values and their confidence intervals; the
counts are integers and every rate and AUC is a ratio of integer sums, so a resample's values
equal those computed on the materialised resample.

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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fairbench import kernels

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


# --------------------------------------------------------------------------- count kernels


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _changes(x: np.ndarray) -> np.ndarray:
    """Whether each entry differs from the one before it (the first always does)."""
    return np.r_[True, x[1:] != x[:-1]][: x.size]


def _gap(per_group: list[np.ndarray], rows: int) -> np.ndarray:
    """max - min over groups per resample; NaN where fewer than two groups or any is NaN."""
    if len(per_group) < 2:
        return np.full(rows, np.nan)
    stacked = np.stack(per_group, axis=1)
    return stacked.max(axis=1) - stacked.min(axis=1)


class _Plan:
    """Everything about one split that does not depend on the sample counts, prepared once.

    Samples are put in ascending score order (every metric is invariant to the order). Counts
    come as a matrix C (R, M): in resample r, the sample at plan position i is drawn
    ``C[r, at[i]]`` times (a row of ones is the point estimate). Each subset (all samples, then
    every group of every attribute) is a list of plan positions in score order, flagged where
    a run of equal scores and the predicted positives begin;
    :func:`fairbench.kernels.scan` walks every list once per resample and returns integer
    counts (n, positives, TP, selected, twice the Mann-Whitney U) and the few real sums
    (calibration, average precision, log loss). Every rate and AUC is a ratio of integers,
    hence exact.
    """

    def __init__(self, s, y, a, attributes, threshold, included):
        self.order = np.argsort(s, kind="stable")
        s, y, a = s[self.order], y[self.order], a[self.order]
        self.y = y
        self.a = a
        self.attributes = attributes
        self.included = included
        self.prefixes = []
        members = []
        for prefix, rows in self._subset_rows(a):
            self.prefixes.append(prefix)
            members.append(rows)
        self.index = np.concatenate(members).astype(np.int32)
        self.starts = np.r_[0, np.cumsum([m.size for m in members])].astype(np.int64)
        first = np.zeros(self.index.size, bool)
        first[self.starts[:-1][self.starts[:-1] < self.index.size]] = True
        # numpy's indexing rule for a bin index (a negative score wraps, as in a one-hot column)
        bins = np.arange(ECE_BINS)[np.minimum((s * ECE_BINS).astype(np.int64), ECE_BINS - 1)][self.index]
        pred = (s >= threshold)[self.index]
        score = s[self.index]
        flags = (first | _changes(score)) * kernels.RUN
        flags |= (pred & (first | _changes(pred))) * kernels.CUT
        flags |= (y[self.index] == 1) * kernels.POSITIVE
        eps = np.finfo(np.float64).eps
        q = np.clip(s, eps, 1 - eps)
        self.entries = (flags.astype(np.uint8), score, bins.astype(np.uint8), ECE_BINS, -np.log(q), -np.log(1 - q))

    def _subset_rows(self, a):
        yield "", np.arange(a.shape[0])
        for i, (attr, groups) in enumerate(self.attributes.items()):
            for code, group in enumerate(groups):
                yield f"{attr}/{{}}/{group_key(group)}", np.flatnonzero(a[:, i] == code)

    def strata(self) -> list[np.ndarray]:
        """Positions (in plan order) of each cell of label x every attribute's code (-1 included):
        a stratified resample redraws each cell within itself, so every resample holds every
        group with its exact numbers of positives and negatives."""
        keys = np.concatenate([self.y[:, None].astype(np.int64), self.a], axis=1)
        _, cell = np.unique(keys, axis=0, return_inverse=True)
        cell = cell.ravel()
        order = np.argsort(cell, kind="stable")
        bounds = np.flatnonzero(np.diff(cell[order])) + 1
        return np.split(order, bounds)

    def compute(self, C: np.ndarray, at: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every metric as an (R,) array for sample counts C (M, R) int32, one column per
        resample; ``at`` gives each plan position's row (default: the rows are in plan order)."""
        index = self.index if at is None else at[self.index].astype(np.int32)
        C = np.ascontiguousarray(C, dtype=np.int32)
        ints, reals = kernels.scan(C, index, self.starts, kernels.tasks(self.starts), *self.entries)
        rows = C.shape[1]
        out: dict[str, np.ndarray] = {}
        for k, prefix in enumerate(self.prefixes):
            n, pos, tp, selected, two_u = (ints[:, k, j] for j in range(5))
            values = {
                "auc": _ratio(two_u.astype(np.float64), 2.0 * pos * (n - pos)),
                "tpr": _ratio(tp, pos),
                "fpr": _ratio(selected - tp, n - pos),
                "ece": _ratio(reals[:, k, 0], n),
            }
            if k == 0:
                values.update(
                    ap=_ratio(reals[:, 0, 1], pos),
                    accuracy=_ratio(tp + (n - pos - (selected - tp)), n),
                    bce=_ratio(reals[:, 0, 2], n),
                )
                out.update(values)
            else:
                values["selection_rate"] = _ratio(selected, n)
                out.update({prefix.format(name): v for name, v in values.items()})
        for attr, groups in self.attributes.items():
            keys = [group_key(g) for g in groups]
            per = {
                name: [out[f"{attr}/{name}/{g}"] for g in keys if self.included.get(f"{attr}/{name}/{g}", True)]
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

MIN_GROUP_COUNT = 20
"""Default minimum numbers of positives and of negatives a group needs to enter a gap."""


@dataclass
class Report:
    """The metrics of one split.

    ``values`` maps each metric key to its value (NaN where undefined); ``ci`` maps keys to
    (low, high) 95% bootstrap bounds when a bootstrap was run; ``counts`` holds the number of
    samples, positives and negatives per group (``sex/n/female``, ``sex/n_pos/female``,
    ``sex/n_neg/female``); ``too_small`` lists the groups left out of the gaps for lack of
    samples (``{"attr": ..., "group": ..., "n_pos": ..., "n_neg": ..., "metrics": [...]}``);
    ``warnings`` says which metrics are missing or left out and why.
    """

    values: dict[str, float]
    counts: dict[str, int]
    threshold: float
    min_count: int = MIN_GROUP_COUNT
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    too_small: list[dict] = field(default_factory=list)
    bootstrap_excluded: int = 0
    warnings: list[str] = field(default_factory=list)

    def flat(self) -> dict[str, float]:
        """Defined values, CI bounds (``<key>_ci_low`` / ``_ci_high``), counts, threshold, minimum."""
        out = {k: v for k, v in self.values.items() if np.isfinite(v)}
        for k, (lo, hi) in self.ci.items():
            if np.isfinite(lo) and np.isfinite(hi):
                out[f"{k}_ci_low"] = lo
                out[f"{k}_ci_high"] = hi
        out.update({k: float(v) for k, v in self.counts.items()})
        for entry in self.too_small:
            out[f"{entry['attr']}/too_small/{group_key(entry['group'])}"] = 1.0
        out["threshold"] = self.threshold
        out["min_group_count"] = float(self.min_count)
        return out


def _as_arrays(scores, labels, attrs, attributes):
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} values but labels has {y.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    a = np.asarray(attrs, dtype=np.int64).reshape(s.size, -1) if attributes else np.zeros((s.size, 0), np.int64)
    if a.shape[1] != len(attributes):
        raise ValueError(f"attrs has {a.shape[1]} columns but {len(attributes)} attributes are named")
    return s, y, a


_NEEDS = {"tpr": (1, 0), "fpr": (0, 1), "auc": (1, 1), "selection_rate": (1, 1), "ece": (1, 1)}
"""Per group metric: whether it needs the minimum of positives and/or of negatives to enter a gap."""


def _group_rules(y, attrs, attributes, min_count) -> tuple[dict[str, bool], dict[str, bool], list[dict], list[str]]:
    """Which group metrics are defined (computable), which enter the gaps (defined and the group
    has the minimum counts), the too-small groups, and a warning for each metric left out."""
    defined: dict[str, bool] = {}
    included: dict[str, bool] = {}
    small: list[dict] = []
    warnings: list[str] = []
    for a, (attr, groups) in enumerate(attributes.items()):
        for code, group in enumerate(groups):
            m = attrs[:, a] == code
            n_pos = int(y[m].sum())
            n_neg = int(m.sum()) - n_pos
            g = group_key(group)
            has = {"tpr": n_pos > 0, "fpr": n_neg > 0}
            has.update(auc=has["tpr"] and has["fpr"], selection_rate=n_pos + n_neg > 0, ece=n_pos + n_neg > 0)
            left_out = []
            for name, (need_pos, need_neg) in _NEEDS.items():
                defined[f"{attr}/{name}/{g}"] = has[name]
                enough = (not need_pos or n_pos >= min_count) and (not need_neg or n_neg >= min_count)
                included[f"{attr}/{name}/{g}"] = has[name] and enough
                if has[name] and not enough:
                    left_out.append(name)
            if n_pos == 0 or n_neg == 0:
                lacking = "samples" if n_pos + n_neg == 0 else ("positives" if n_pos == 0 else "negatives")
                missing = {"positives": "TPR and AUC", "negatives": "FPR and AUC"}.get(lacking, "every metric")
                warnings.append(f"{attr}={group} has no {lacking}: its {missing} are missing, not 0")
            if left_out and n_pos + n_neg > 0:
                small.append({"attr": attr, "group": group, "n_pos": n_pos, "n_neg": n_neg, "metrics": left_out})
                warnings.append(
                    f"{attr}={group} is too small ({n_pos} positives, {n_neg} negatives; minimum {min_count} "
                    f"of each): left out of the gaps of {', '.join(left_out)}"
                )
    return defined, included, small, warnings


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
    min_count: int = MIN_GROUP_COUNT,
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
    min_count : a group enters a gap only with at least this many positives (TPR), negatives
        (FPR) or both (AUC, selection rate, ECE); smaller groups keep their own values, are
        listed in ``too_small`` and are left out of that gap.

    The bootstrap is stratified by label x every attribute's group: each resample redraws
    every such cell within itself, so every group keeps its numbers of positives and
    negatives and no resample is discarded for lacking a group.
    """
    attributes = dict(attributes or {})
    s, y, a = _as_arrays(scores, labels, attrs, attributes)
    defined, included, small, warnings = _group_rules(y, a, attributes, min_count)
    plan = _Plan(s, y, a, attributes, threshold, included)
    point = plan.compute(np.ones((s.size, 1), np.int32))
    values = {k: float(v[0]) for k, v in point.items()}
    for k, ok in defined.items():
        if not ok:
            values[k] = float("nan")
    counts = {}
    for i, (attr, groups) in enumerate(attributes.items()):
        for code, g in enumerate(groups):
            m = a[:, i] == code
            n_pos = int(y[m].sum())
            counts[f"{attr}/n/{group_key(g)}"] = int(m.sum())
            counts[f"{attr}/n_pos/{group_key(g)}"] = n_pos
            counts[f"{attr}/n_neg/{group_key(g)}"] = int(m.sum()) - n_pos
    report = Report(
        values=values,
        counts=counts,
        threshold=float(threshold),
        min_count=min_count,
        too_small=small,
        warnings=warnings,
    )
    if n_bootstrap > 0 and s.size > 0:
        draws = _draw_all(plan, n_bootstrap, seed)
        report.ci, report.bootstrap_excluded = _percentile_ci(draws, values, confidence)
    return report


def _draw_all(plan: _Plan, n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    """Every metric over ``n_bootstrap`` stratified resamples drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    sizes, members = _layout(plan.strata())
    at = np.empty(members.size, np.int64)
    at[members] = np.arange(members.size)  # the row of the counts of each plan position
    parts: dict[str, list[np.ndarray]] = {}
    for rows, picks in _drawn_ahead(rng, sizes, _blocks_of(n_bootstrap, plan.y.size)):
        counts = kernels.count_draws(picks, sizes, rows)
        for k, v in plan.compute(counts, at).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _percentile_ci(draws, values, confidence) -> tuple[dict[str, tuple[float, float]], int]:
    """Percentile intervals of the defined metrics, and the number of resamples in which any
    of them was undefined (0 under stratified resampling unless scores are degenerate)."""
    alpha = (1.0 - confidence) / 2.0
    ci: dict[str, tuple[float, float]] = {}
    bad = None
    for k, v in draws.items():
        if not np.isfinite(values[k]):
            continue
        finite = np.isfinite(v)
        bad = ~finite if bad is None else bad | ~finite
        if finite.any():
            lo, hi = np.quantile(v[finite], [alpha, 1.0 - alpha])
            ci[k] = (float(lo), float(hi))
    return ci, int(bad.sum()) if bad is not None else 0


def _layout(strata: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The strata's sizes and their members one stratum after another: the columns of the
    draw counts that :func:`fairbench.kernels.count_draws` returns."""
    return np.array([m.size for m in strata], np.int64), np.concatenate(strata)


def _draw_picks(rng: np.random.Generator, sizes: np.ndarray, rows: int) -> np.ndarray:
    """For ``rows`` resamples, each stratum's uniform draws with replacement within itself: stratum
    after stratum, an (rows, size) block of indices into it, flattened. The generator is called
    once per stratum, in stratum order, as it always has been, so a seed gives the same draws."""
    picks = np.empty(rows * int(sizes.sum()), np.int32)
    first = 0
    for size in sizes:
        picks[first : first + rows * size] = rng.integers(0, size, size=rows * size, dtype=np.int32)
        first += rows * size
    return picks


def _drawn_ahead(rng: np.random.Generator, sizes: np.ndarray, blocks: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Each block's size and picks, in order; the next block is drawn in a background thread
    while the caller counts and scans this one (one thread draws every block, in order, so the
    stream is the same as drawing them one after another)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = [pool.submit(_draw_picks, rng, sizes, rows) for rows in blocks[:1]]
        for i, rows in enumerate(blocks):
            picks = ahead.pop().result()
            ahead += [pool.submit(_draw_picks, rng, sizes, later) for later in blocks[i + 1 : i + 2]]
            yield rows, picks


def stratified_counts(rng: np.random.Generator, strata: list[np.ndarray], n: int, rows: int) -> np.ndarray:
    """``rows`` stratified bootstrap resamples as draw counts, shape (n, rows), int32: every
    stratum (an array of positions) is redrawn with replacement within itself."""
    sizes, members = _layout(strata)
    counts = np.zeros((n, rows), np.int32)
    counts[members] = kernels.count_draws(_draw_picks(rng, sizes, rows), sizes, rows)
    return counts


def _blocks_of(n_bootstrap: int, n: int) -> list[int]:
    """Resamples per block, so that one block's count matrix holds about 4 million entries."""
    size = max(1, min(n_bootstrap, 4_000_000 // max(n, 1)))
    return [min(size, n_bootstrap - i) for i in range(0, n_bootstrap, size)]


def paired_bootstrap(
    predictions: Sequence[tuple[np.ndarray, float]],
    labels: np.ndarray,
    attrs: np.ndarray,
    attributes: Mapping[str, Sequence[str]],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_count: int = MIN_GROUP_COUNT,
) -> list[dict[str, np.ndarray]]:
    """Bootstrap draws of every metric for several score vectors on the same samples.

    Each entry of ``predictions`` is (scores, threshold) for the same labels and attribute
    codes; all of them are evaluated on the same stratified resamples, so differences between
    them are paired. Returns, per entry, metric key -> (n_bootstrap,) array of draws.
    """
    attributes = dict(attributes)
    _, y, a = _as_arrays(predictions[0][0], labels, attrs, attributes)
    _, included, _, _ = _group_rules(y, a, attributes, min_count)
    plans = [_Plan(np.asarray(s, dtype=np.float64).ravel(), y, a, attributes, t, included) for s, t in predictions]
    rng = np.random.default_rng(seed)
    # strata in sample order (the same for every plan: they depend on labels and codes only)
    sizes, members = _layout([plans[0].order[m] for m in plans[0].strata()])
    row = np.empty(members.size, np.int64)
    row[members] = np.arange(members.size)  # the row of the counts of each sample
    draws: list[dict[str, list[np.ndarray]]] = [{} for _ in plans]
    for rows, picks in _drawn_ahead(rng, sizes, _blocks_of(n_bootstrap, y.size)):
        counts = kernels.count_draws(picks, sizes, rows)  # the same for every plan
        for out, plan in zip(draws, plans, strict=True):
            for k, v in plan.compute(counts, row[plan.order]).items():
                out.setdefault(k, []).append(v)
    return [{k: np.concatenate(v) for k, v in out.items()} for out in draws]


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve; NaN unless both classes are present."""
    s, y, a = _as_arrays(scores, labels, None, {})
    return float(_Plan(s, y, a, {}, 0.5, {}).compute(np.ones((s.size, 1), np.int32))["auc"][0])


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
