"""The leaderboard's `*`: its false-positive rate under a null and its power on a planted difference.

Simulates what a leaderboard compares: on one test set (labels, two binary attributes, a
per-sample difficulty shared by every model), a "trained model" of a seed scores each sample
with a model-level offset and group-specific shifts of its positives drawn per seed (so gaps
vary from seed to seed as they do between trainings) plus per-sample noise. ERM and the method
are `--seeds` such models each.

- null: the method's models come from the same distribution as ERM's;
- power: the method's models have half the female-positive shift (a narrower sex TPR gap) and a
  slightly stronger signal (higher AUC).

Each repetition scores the comparison exactly as ``fairbench leaderboard`` does
(:func:`fairbench.leaderboard.paired_test_variance`, :func:`~fairbench.leaderboard.compare`,
:func:`~fairbench.leaderboard.adjust`) and, for reference, with the previous rule (a 95%
interval from the paired test-sample bootstrap alone). Rates are the share of repetitions with
a `*`; "table" applies the adjustment over the 6 headline metrics x 2 attributes of one
repetition, as a leaderboard table would, and counts a repetition with any `*`.

Usage: ``python benchmarks/significance.py [--reps 200] [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import math
from datetime import date

import numpy as np
import pandas as pd
from _common import emit, machine

from fairbench import leaderboard as lb
from fairbench.metrics import evaluate

ATTRS = {"sex": ["female", "male"], "age": ["<60", "≥60"]}
KEYS = ["auc"] + [f"{a}/{m}" for a in ATTRS for m in lb.PER_ATTRIBUTE]


def draw_test_set(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.35).astype(np.int64)
    codes = rng.integers(0, 2, (n, 2))
    difficulty = rng.normal(0, 1, n)
    return y, codes, difficulty


def model(rng, y, codes, difficulty, signal: float, female_shift: float) -> np.ndarray:
    """One trained model's scores on the test set."""
    shift = rng.normal(female_shift, 0.25) * ((codes[:, 0] == 0) & (y == 1))
    shift += rng.normal(0.0, 0.15) * ((codes[:, 1] == 1) & (y == 1))
    logit = signal * (2 * y - 1) + 0.7 * difficulty + rng.normal(0, 0.2) - shift + rng.normal(0, 0.8, y.size)
    return 1 / (1 + np.exp(-logit))


def one(rng, n: int, seeds: int, planted: bool, n_bootstrap: int) -> dict[str, tuple[float, float, bool]]:
    """Per metric key: (p, mean difference, previous rule's mark) for one simulated comparison."""
    y, codes, difficulty = draw_test_set(rng, n)
    erm = [model(rng, y, codes, difficulty, 1.0, 0.8) for _ in range(seeds)]
    other = [model(rng, y, codes, difficulty, 1.1 if planted else 1.0, 0.4 if planted else 0.8) for _ in range(seeds)]
    metrics_e = [evaluate(s, y, codes, ATTRS).values for s in erm]
    metrics_m = [evaluate(s, y, codes, ATTRS).values for s in other]

    def frame(s):
        out = pd.DataFrame({"score": s, "label": y})
        for i, a in enumerate(ATTRS):
            out[a] = codes[:, i]
        return out

    pairs = [(frame(m), 0.5, frame(e), 0.5) for m, e in zip(other, erm, strict=True)]
    variance = lb.paired_test_variance(pairs, "simulated", list(ATTRS), n_bootstrap, int(rng.integers(1 << 30)), 20)
    out = {}
    for key in KEYS:
        diffs = np.array([m[key] - e[key] for m, e in zip(metrics_m, metrics_e, strict=True)])
        mean, p, _, _ = lb.compare(diffs, variance.get(key, math.nan))
        previous = abs(mean) > 1.96 * math.sqrt(variance.get(key, math.nan))
        out[key] = (p, mean, previous)
    return out


def rates(results: list[dict], correction: str) -> dict[str, float]:
    marks = {k: [] for k in KEYS}
    table_hits = []
    for rep in results:
        p = np.array([rep[k][0] for k in KEYS])
        adjusted = lb.adjust(p, correction)
        for k, a in zip(KEYS, adjusted, strict=True):
            marks[k].append(a < lb.ALPHA)
        table_hits.append(bool(np.nanmin(adjusted) < lb.ALPHA))
    out = {k: float(np.mean(v)) for k, v in marks.items()}
    out["table"] = float(np.mean(table_hits))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--power-reps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=300)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
    null = [one(rng, args.n, args.seeds, False, args.bootstrap) for _ in range(args.reps)]
    power = [one(rng, args.n, args.seeds, True, args.bootstrap) for _ in range(args.power_reps)]
    shown = ["auc", "sex/tpr_gap", "sex/eo_gap", "age/eo_gap", "sex/worst_auc", "table"]
    lines = [
        "",
        f"## Significance of the leaderboard's `*` ({date.today()}, {machine()})",
        "",
        f"`python benchmarks/significance.py`: {args.seeds} seeds per method, {args.n} test samples, "
        f"{args.bootstrap} paired test-set resamples; {args.reps} null and {args.power_reps} planted repetitions. "
        "Share of repetitions marked `*` (nominal level 0.05); *table*: any `*` among the 12 comparisons of one "
        "repetition.",
        "",
        "| scenario | rule | " + " | ".join(shown) + " |",
        "| --- | --- | " + " | ".join("---" for _ in shown) + " |",
    ]
    for name, results in (("null", null), ("planted", power)):
        previous = {k: float(np.mean([r[k][2] for r in results])) for k in KEYS}
        prev_table = float(np.mean([any(r[k][2] for k in KEYS) for r in results]))
        previous["table"] = prev_table
        for rule, values in (
            ("previous: test-sample bootstrap only, no adjustment", previous),
            ("t over seeds + test variance, unadjusted", rates(results, "none")),
            ("t over seeds + test variance, Benjamini–Hochberg (default)", rates(results, "bh")),
            ("t over seeds + test variance, Holm", rates(results, "holm")),
        ):
            lines.append(f"| {name} | {rule} | " + " | ".join(f"{values[k]:.3f}" for k in shown) + " |")
    planted = {k: float(np.mean([r[k][1] for r in power])) for k in ("auc", "sex/tpr_gap", "sex/eo_gap")}
    lines += [
        "",
        "Planted effect (mean difference method - ERM): "
        + ", ".join(f"{k} {v:+.3f}" for k, v in planted.items())
        + "; age metrics have no planted effect, so their planted-row rates are false positives too.",
        "",
    ]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
