"""Exact stratified bootstrap: the compiled count scan vs the numpy kernels it replaced.

Times the full ``evaluate`` (every metric, 3 attributes of 2, 2 and 5 groups with unknown codes,
1,000 stratified resamples) of 100,000 predictions with the current ``fairbench.metrics`` and
with a verbatim copy of the implementation before it (below, "BEFORE"), side by side in one run,
and prints their ratio and the largest absolute difference over every value, every bootstrap
draw and every interval bound (both use the same seed, hence the same resamples). Also: the
first-call compilation (empty numba cache) and the load from the cache, each in a fresh process;
the split of the new time into drawing, counting and scanning; and what one numpy pass over the
(N, R) count matrix costs, the unit of the vectorised alternatives.

Usage: ``python benchmarks/bootstrap.py [--n 100000] [--resamples 1000] [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone

import numba
import numpy as np
from _common import emit, machine

from fairbench import kernels, metrics
from fairbench.metrics import (
    ECE_BINS,
    _as_arrays,
    _gap,
    _group_rules,
    _percentile_ci,
    _ratio,
    evaluate,
    group_key,
)

ATTRIBUTES = {"sex": ["female", "male"], "scanner": ["x", "y"], "site": ["a", "b", "c", "d", "e"]}

# --------------------------------------------------------------------------- BEFORE
# The implementation this benchmark compares against, copied unchanged from fairbench.metrics
# before the compiled scan (only renamed): numpy kernels over an (N, R) count matrix, rates and
# calibration sums from one float64 product ``M.T @ C``, AUC and AP from integer cumulative
# counts along axis 0.


def _log_loss_terms(p, y):
    eps = np.finfo(np.float64).eps
    q = np.clip(p, eps, 1 - eps)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


class _BeforeRanks:
    """ROC AUC (ties count one half) of one subset, for integer sample counts.

    The subset's samples are in ascending score order. With ``cum`` the cumulative counts
    (a zero row first), a positive in a run of equal scores from ``start`` to ``end`` has
    ``(cum[start] + cum[end + 1]) / 2`` samples below it (ties counted one half). Summed over
    positives this counts every (positive, negative) pair once and every (positive, positive)
    pair once, so ``2U = sum_pos c * (cum[start] + cum[end + 1]) - P**2``. Everything is an
    integer, hence exact; only the final ratio is a float.
    """

    def __init__(self, s: np.ndarray, y: np.ndarray) -> None:
        n = s.size
        new_run = np.r_[True, s[1:] != s[:-1]] if n else np.zeros(0, bool)
        run = np.cumsum(new_run) - 1
        starts = np.flatnonzero(new_run)
        ends = np.r_[starts[1:], n] - 1 if n else np.zeros(0, np.int64)
        self.pos = np.flatnonzero(y == 1)
        self.lo = starts[run[self.pos]]
        self.hi = ends[run[self.pos]] + 1
        self.y = y
        self.starts, self.ends = starts, ends

    def auc(self, C: np.ndarray) -> np.ndarray:
        """AUC per column of the counts ``C`` (n, R), int32, rows in this subset's order."""
        cum = np.zeros((C.shape[0] + 1, C.shape[1]), np.int32)
        np.cumsum(C, axis=0, dtype=np.int32, out=cum[1:])
        cpos = C[self.pos]
        P = cpos.sum(axis=0, dtype=np.int64)
        total = cum[-1].astype(np.int64)
        two_u = np.einsum("ij,ij->j", cpos, cum[self.lo] + cum[self.hi], dtype=np.int64) - P * P
        return _ratio(two_u.astype(np.float64), 2.0 * P * (total - P))

    def average_precision(self, C: np.ndarray) -> np.ndarray:
        """Average precision per column: the step-wise sum over distinct scores, high to low."""
        cum = np.zeros((C.shape[0] + 1, C.shape[1]), np.int64)
        np.cumsum(C, axis=0, out=cum[1:])
        cy = np.zeros_like(cum)
        np.cumsum(C * self.y[:, None].astype(C.dtype), axis=0, out=cy[1:])
        P, total = cy[-1], cum[-1]
        at_or_above = total - cum[self.starts]  # samples scoring >= each distinct score
        pos_above = P - cy[self.starts]
        pos_here = cy[self.ends + 1] - cy[self.starts]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(at_or_above > 0, pos_above / at_or_above, 0.0)
        return _ratio((pos_here * precision).sum(axis=0), P.astype(np.float64))


class _BeforePlan:
    """Everything about one split that does not depend on the sample counts, prepared once.

    Samples are put in ascending score order (every metric is invariant to the order), so each
    subset (all samples, each group) is already sorted and needs no sort per resample. Counts
    come as a matrix C (N, R): sample i is drawn C[i, r] times in resample r (a column of ones
    is the point estimate). Every metric that is a ratio of sums (rates, log loss, the per-bin
    calibration sums) is read from one product ``M.T @ C``; AUC and AP come from integer
    cumulative counts (:class:`_Ranks`), so every value is exact.
    """

    def __init__(self, s, y, a, attributes, threshold, included):
        self.order = np.argsort(s, kind="stable")
        s, y, a = s[self.order], y[self.order], a[self.order]
        self.y = y
        self.a = a
        self.attributes = attributes
        self.included = included
        pred = (s >= threshold).astype(np.float64)
        bins = np.minimum((s * ECE_BINS).astype(np.int64), ECE_BINS - 1)
        onehot = np.zeros((s.size, ECE_BINS))
        onehot[np.arange(s.size), bins] = y - s
        columns = [np.ones_like(s), (pred == y).astype(np.float64), _log_loss_terms(s, y)]
        self.subsets = []  # (metric prefix, rows or None, ranks, first column of M)
        for prefix, rows in self._subset_rows(a):
            m = np.ones(s.size)
            if rows is not None:
                m = np.zeros(s.size)
                m[rows] = 1.0
            first = len(columns)
            columns += [m, m * y, m * y * pred, m * (1 - y) * pred, m * pred]
            columns += list((onehot * m[:, None]).T)
            ranks = _BeforeRanks(s, y) if rows is None else _BeforeRanks(s[rows], y[rows])
            self.subsets.append((prefix, rows, ranks, first))
        self.MT = np.stack(columns, axis=0)

    def _subset_rows(self, a):
        yield "", None
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

    def compute(self, C: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric as an (R,) array for sample counts C (N, R) int32 in this plan's order."""
        S = (self.MT @ C).T
        rows = C.shape[1]
        out: dict[str, np.ndarray] = {}
        for prefix, sub, ranks, c in self.subsets:
            n, pos, tp, fp, sel = (S[:, c + k] for k in range(5))
            ece = _ratio(np.abs(S[:, c + 5 : c + 5 + ECE_BINS]).sum(axis=1), n)
            Cs = C if sub is None else C[sub]
            auc = ranks.auc(Cs) if ranks.pos.size else np.full(rows, np.nan)
            values = {"auc": auc, "tpr": _ratio(tp, pos), "fpr": _ratio(fp, n - pos), "ece": ece}
            if sub is None:
                values.update(ap=ranks.average_precision(Cs), accuracy=_ratio(S[:, 1], n), bce=_ratio(S[:, 2], n))
                out.update(values)
            else:
                values["selection_rate"] = _ratio(sel, n)
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


def _before_draw_all(plan: _BeforePlan, n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    """Every metric over ``n_bootstrap`` stratified resamples drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    strata = plan.strata()
    parts: dict[str, list[np.ndarray]] = {}
    for rows in _before_blocks_of(n_bootstrap, plan.y.size):
        for k, v in plan.compute(_before_stratified_counts(rng, strata, plan.y.size, rows)).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _before_stratified_counts(rng: np.random.Generator, strata: list[np.ndarray], n: int, rows: int) -> np.ndarray:
    """``rows`` stratified bootstrap resamples as draw counts, shape (n, rows), int32: every
    stratum (an array of positions) is redrawn with replacement within itself."""
    counts = np.empty((n, rows), np.int32)
    for members in strata:
        size = members.size
        picks = rng.integers(0, size, size=(rows, size), dtype=np.int64)
        flat = picks + (np.arange(rows, dtype=np.int64) * size)[:, None]
        counts[members] = np.bincount(flat.ravel(), minlength=rows * size).reshape(rows, size).T
    return counts


def _before_blocks_of(n_bootstrap: int, n: int) -> list[int]:
    """Resamples per block, so that one block's count matrix holds about 4 million entries."""
    size = max(1, min(n_bootstrap, 4_000_000 // max(n, 1)))
    return [min(size, n_bootstrap - i) for i in range(0, n_bootstrap, size)]


def before_evaluate(s, y, a, attributes, threshold, n_bootstrap, seed, min_count=metrics.MIN_GROUP_COUNT):
    """BEFORE: the numbers of ``evaluate`` (values, intervals) and its bootstrap draws."""
    s, y, a = _as_arrays(s, y, a, attributes)
    defined, included, _, _ = _group_rules(y, a, attributes, min_count)
    plan = _BeforePlan(s, y, a, attributes, threshold, included)
    values = {k: float(v[0]) for k, v in plan.compute(np.ones((s.size, 1), np.int32)).items()}
    values.update({k: float("nan") for k, ok in defined.items() if not ok})
    draws = _before_draw_all(plan, n_bootstrap, seed)
    ci, _ = _percentile_ci(draws, values, 0.95)
    return values, ci, draws


# --------------------------------------------------------------------------- measurements


def make_data(n: int, seed: int = 0):
    """Scores clipped to [0, 1] (ties at both ends), 3 attributes, 10% unknown sex."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    sex = rng.choice([-1, 0, 1], n, p=[0.1, 0.45, 0.45])
    site = rng.choice(5, n, p=[0.5, 0.3, 0.1, 0.07, 0.03])
    a = np.stack([sex, rng.integers(0, 2, n), site], axis=1)
    return s, y, a


def compile_times() -> tuple[float, float]:
    """Seconds for import + first evaluate in a fresh process: with an empty numba cache, then from it."""
    code = (
        "import time; t = time.perf_counter(); import numpy as np; from fairbench.metrics import evaluate; "
        "evaluate(np.linspace(0, 1, 50), np.arange(50) % 2, np.zeros((50, 1), int), {'a': ['x']}, n_bootstrap=2); "
        "print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold, warm = (float(subprocess.check_output([sys.executable, "-c", code], env=env)) for _ in range(2))
    return cold, warm


def split_new(s, y, a, resamples: int) -> dict[str, float]:
    """Seconds of the new bootstrap's parts, run one after another: drawing (numpy's generator),
    counting, scanning; and one numpy pass (a cumsum along N) over each block's counts."""
    s, y, a = _as_arrays(s, y, a, ATTRIBUTES)
    plan = metrics._Plan(s, y, a, ATTRIBUTES, 0.5, {})
    sizes, members = metrics._layout(plan.strata())
    at = np.empty(members.size, np.int64)
    at[members] = np.arange(members.size)
    rng = np.random.default_rng(0)
    parts = {"draw": 0.0, "count": 0.0, "scan": 0.0, "cumsum": 0.0}
    for rows in metrics._blocks_of(resamples, y.size):
        t0 = time.perf_counter()
        picks = metrics._draw_picks(rng, sizes, rows)
        t1 = time.perf_counter()
        counts = kernels.count_draws(picks, sizes, rows)
        t2 = time.perf_counter()
        plan.compute(counts, at)
        t3 = time.perf_counter()
        np.cumsum(counts, axis=0, dtype=np.int32)
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key] += dt
    return parts


def max_difference(new_values, new_ci, new_draws, values, ci, draws) -> float:
    """Largest absolute difference over values, interval bounds and draws (NaN where both agree)."""
    assert new_values.keys() == values.keys() and new_ci.keys() == ci.keys() and new_draws.keys() == draws.keys()
    worst = 0.0
    pairs = [(np.array(new_values[k]), np.array(values[k])) for k in values]
    pairs += [(np.array(new_ci[k]), np.array(ci[k])) for k in ci]
    pairs += [(new_draws[k], draws[k]) for k in draws]
    for x, z in pairs:
        assert (np.isnan(x) == np.isnan(z)).all()
        finite = ~np.isnan(x)
        if finite.any():
            worst = max(worst, float(np.abs(x[finite] - z[finite]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--append", help="append the result to this markdown file")
    args = parser.parse_args()
    n, resamples = args.n, args.resamples

    cold, warm = compile_times()
    s, y, a = make_data(n)
    evaluate(s[:1000], y[:1000], a[:1000], ATTRIBUTES, n_bootstrap=2)  # load the compiled kernels
    load_before = os.getloadavg()

    def new():
        t0, c0 = time.perf_counter(), time.process_time()
        report = evaluate(s, y, a, ATTRIBUTES, threshold=0.5, n_bootstrap=resamples, seed=0)
        return time.perf_counter() - t0, time.process_time() - c0, report

    def old():
        t0, c0 = time.perf_counter(), time.process_time()
        result = before_evaluate(s, y, a, ATTRIBUTES, 0.5, resamples, 0)
        return time.perf_counter() - t0, time.process_time() - c0, result

    new_a, new_cpu_a, report = new()
    old_t, old_cpu, (values, ci, draws) = old()
    new_b, new_cpu_b, _ = new()
    new_t, new_cpu = min((new_a, new_cpu_a), (new_b, new_cpu_b))
    parts = split_new(s, y, a, resamples)
    load_after = os.getloadavg()

    s_, y_, a_ = _as_arrays(s, y, a, ATTRIBUTES)
    _, included, _, _ = _group_rules(y_, a_, ATTRIBUTES, metrics.MIN_GROUP_COUNT)
    new_draws = metrics._draw_all(metrics._Plan(s_, y_, a_, ATTRIBUTES, 0.5, included), resamples, 0)
    diff = max_difference(report.values, report.ci, new_draws, values, ci, draws)

    stamp = datetime.now(timezone.utc).strftime("%H:%M UTC")
    lines = [
        f"## Exact bootstrap ({date.today().isoformat()} {stamp}, {machine()}, numba {numba.__version__})",
        "",
        f"`python benchmarks/bootstrap.py --n {n} --resamples {resamples}`: `evaluate` of {n:,} predictions, "
        f"3 attributes (2, 2 and 5 groups, 10% unknown), {resamples:,} stratified resamples, seed 0. "
        f"Load average (1, 5, 15 min) {load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} before, "
        f"{load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f} after.",
        "",
        "| measurement | wall s | CPU s (all threads) |",
        "| --- | --- | --- |",
        f"| before: numpy kernels, (N, R) counts, `M.T @ C` | {old_t:.2f} | {old_cpu:.2f} |",
        f"| now: compiled count scan (best of 2; drawing overlapped with scanning) | {new_t:.2f} | {new_cpu:.2f} |",
        f"| ratio before / now | {old_t / new_t:.1f}× | {old_cpu / new_cpu:.1f}× |",
        f"| max abs difference (values, interval bounds, every draw) | {diff:.1e} | |",
        f"| target < 2 s met | {'yes' if new_t < 2 else 'no'} | |",
        f"| now, split: drawing (numpy generator, unchanged calls) | {parts['draw']:.2f} | |",
        f"| now, split: counting (scatter of the draws) | {parts['count']:.2f} | |",
        f"| now, split: scanning every subset (incl. assembling the metrics) | {parts['scan']:.2f} | |",
        f"| for scale: one numpy int32 cumsum along N over every block's (N, R) counts | {parts['cumsum']:.2f} | |",
        f"| first call in a fresh process, empty numba cache (import + compile) | {cold:.1f} | |",
        f"| first call in a fresh process, from the cache (import + load) | {warm:.1f} | |",
        "",
    ]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
