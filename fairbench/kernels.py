"""Compiled loops behind the metrics: bootstrap draw counts and one scan per resample.

The bootstrap of a large split (100,000 predictions x 1,000 resamples) spends its time in
work that numpy can only do in many passes over an (R, N) matrix. Here each resample is
one pass over its samples in score order, in integers wherever the metric allows, and the
resamples run in parallel. Compiled with numba; ``cache=True`` keeps the machine code next to
this file, so only the very first call on a machine pays for the compilation. The kernels
release the GIL, so the next block's random draws can be made while a block is scanned.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

RUN = 1
"""Flag of a subset entry: the lowest-scoring entry of a run of equal scores."""
CUT = 2
"""Flag: the lowest-scoring entry predicted positive (score >= threshold)."""
POSITIVE = 4
"""Flag: the entry's label is 1 (the highest flag, so that ``flags >> 2`` is the label)."""


def tasks(starts: np.ndarray) -> np.ndarray:
    """The subsets each thread scans, (threads, subsets) padded with -1: the largest first, each to
    the least loaded thread (subset 0, which also sums average precision and log loss, counts
    twice its size)."""
    threads = numba.get_num_threads()
    sizes = np.diff(starts).astype(np.float64)
    sizes[0] *= 2
    out = np.full((threads, sizes.size), -1, np.int64)
    load = np.zeros(threads)
    filled = np.zeros(threads, np.int64)
    for k in np.argsort(-sizes, kind="stable"):
        t = int(np.argmin(load))
        out[t, filled[t]] = k
        filled[t] += 1
        load[t] += sizes[k]
    return out


@njit(parallel=True, cache=True, nogil=True)
def count_draws(picks: np.ndarray, sizes: np.ndarray, rows: int) -> np.ndarray:
    """Draw counts (sum(sizes), rows), int32, strata one after another, from the within-stratum
    picks: stratum after stratum, a (rows, size) block of indices into it, flattened. Each
    resample is counted in its own row of a per-stratum buffer (small enough for the cache),
    then written out in tiles of 16 members."""
    counts = np.empty((sizes.sum(), rows), np.int32)
    firsts = np.zeros(sizes.size, np.int64)
    firsts[1:] = np.cumsum(sizes)[:-1]
    for k in prange(sizes.size):
        first = firsts[k]
        size = sizes[k]
        local = np.zeros((rows, size), np.int32)
        for r in range(rows):
            row = local[r]
            block = first * rows + r * size
            for t in range(size):
                row[picks[block + t]] += 1
        for lo in range(0, size, 16):
            for r in range(rows):
                for m in range(lo, min(size, lo + 16)):
                    counts[first + m, r] = local[r, m]
    return counts


@njit(parallel=True, cache=True, nogil=True)
def scan(counts, index, starts, tasks, flags, score, bins, n_bins, loss_pos, loss_neg):
    """Integer and real sums of every subset for every resample (column) of ``counts`` (M, R).

    Subset k is the list of entries ``starts[k]:starts[k + 1]`` in ascending score order; entry
    j reads its counts in row ``index[j]`` and carries ``flags[j]`` (RUN, CUT, POSITIVE),
    ``score[j]`` and its calibration bin ``bins[j]`` (of ``n_bins``). Subset 0 holds every
    sample, entry j being sample j of the plan; for it the average-precision and log-loss sums
    are also returned (``loss_pos`` / ``loss_neg``: a sample's log loss if its label is 1 / 0).
    ``tasks`` (threads, subsets) lists the subsets each thread scans (-1: none).

    Scanning from the highest score down, a run of equal scores with ``p`` positive and ``q``
    negative draws, below ``P`` positives already seen, adds ``q * (2P + p)`` to ``2U`` (twice
    the Mann-Whitney count, ties one half) and ``p * P' / A'`` to the average-precision sum,
    with ``P'`` / ``A'`` the positives / draws scoring at least this run's score. Equal scores
    share their calibration bin and their decision, so both are settled once per run. All
    resamples advance together, entry by entry, so the inner loops run over resamples and
    vectorise.

    Returns ``ints`` (R, K, 5): n, positives, TP, selected, 2U; and ``reals`` (R, K, 3): the sum
    over bins of |positives - sum of scores|, the average-precision sum, the log-loss sum.
    """
    rows = counts.shape[1]
    ints = np.zeros((rows, starts.size - 1, 5), np.int64)
    reals = np.zeros((rows, starts.size - 1, 3))
    for thread in prange(tasks.shape[0]):
        for k in tasks[thread]:
            if k < 0:
                break
            seen = np.zeros(rows, np.int64)
            seen_pos = np.zeros(rows, np.int64)
            run_all = np.zeros(rows, np.int64)
            run_pos = np.zeros(rows, np.int64)
            tp = np.zeros(rows, np.int64)
            selected = np.zeros(rows, np.int64)
            two_u = np.zeros(rows, np.int64)
            bin_pos = np.zeros((n_bins, rows), np.int64)
            bin_score = np.zeros((n_bins, rows))
            ap = np.zeros(rows)
            loss = np.zeros(rows)
            first = k == 0
            for j in range(starts[k + 1] - 1, starts[k] - 1, -1):
                i = index[j]
                f = flags[j]
                label = np.int64(f >> 2)
                if not f & RUN:
                    for r in range(rows):
                        c = np.int64(counts[i, r])
                        run_all[r] += c
                        run_pos[r] += c * label
                    continue
                s = score[j]
                b = bins[j]
                lp = loss_pos[j] if first else 0.0
                ln = loss_neg[j] if first else 0.0
                for r in range(rows):
                    c = np.int64(counts[i, r])
                    n_run = run_all[r] + c
                    p_run = run_pos[r] + c * label
                    run_all[r] = 0
                    run_pos[r] = 0
                    two_u[r] += (n_run - p_run) * (2 * seen_pos[r] + p_run)
                    seen[r] += n_run
                    seen_pos[r] += p_run
                    bin_pos[b, r] += p_run
                    bin_score[b, r] += n_run * s
                    if first:
                        ap[r] += p_run * (seen_pos[r] / max(seen[r], 1))
                        loss[r] += p_run * lp + (n_run - p_run) * ln
                if f & CUT:
                    tp[:] = seen_pos
                    selected[:] = seen
            for r in range(rows):
                calibration = 0.0
                for b in range(n_bins):
                    calibration += abs(bin_pos[b, r] - bin_score[b, r])
                ints[r, k, 0] = seen[r]
                ints[r, k, 1] = seen_pos[r]
                ints[r, k, 2] = tp[r]
                ints[r, k, 3] = selected[r]
                ints[r, k, 4] = two_u[r]
                reals[r, k, 0] = calibration
                reals[r, k, 1] = ap[r]
                reals[r, k, 2] = loss[r]
    return ints, reals
