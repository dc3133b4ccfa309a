"""MLflow runs -> the comparison researchers publish: tables, significance, ranks and plots.

Only finished runs of kind ``run`` count (tuning trials do not).

**One row = one experimental configuration.** Runs are grouped by dataset, method and every
logged parameter that changes the experiment: the dataset's and the method's options, the
backbone and its pretrained weights or fine-tuning regime, the training attribute (for methods
that use it, or when it drives model selection), label bias, threshold rule, selection rule,
minimum group count, epochs, patience, batch size, learning rate, weight decay, optimiser.
Parameters that do not change what is trained or reported (seed, device, workers, compile,
bootstrap resamples, where results go) are not part of it. Where a table holds more than one
configuration of a method, the settings that tell them apart are shown. A seed that ran more
than once in one configuration keeps its latest run, and a note says so: no run is dropped
silently.

**Comparison with ERM.** A configuration is compared with the ERM configuration of the same
setting (everything but the method, its options, the training attribute and the tuned learning
rate and weight decay) over the seeds both share; at least :data:`MIN_SEEDS` shared seeds are
needed, otherwise no test is made. The difference is the mean over shared seeds of the
per-seed differences. Its variance has two parts: seed-to-seed variance (the sample variance of
the per-seed differences over k) and test-sample variance (a paired bootstrap of the saved test
predictions, stratified by label x group, of the mean difference). The test statistic
``mean / sqrt(seed part + test part)`` is referred to a t distribution with k - 1 degrees of
freedom (the seed part is estimated from k differences; Welch–Satterthwaite's larger degrees
of freedom made the test anti-conservative with 3 seeds in ``benchmarks/significance.py``). The p-values of
every comparison in the leaderboard are then adjusted for multiplicity (Benjamini–Hochberg by
default, Holm on request), and ``*`` marks an adjusted p below 0.05.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fairbench.errors import FairbenchError

BASELINE = "erm"
OVERALL = ("auc",)
PER_ATTRIBUTE = ("worst_auc", "tpr_gap", "fpr_gap", "eo_gap", "es_auc")
HEADLINE = OVERALL + PER_ATTRIBUTE
LOWER_IS_BETTER = {"tpr_gap", "fpr_gap", "eo_gap"}
LABELS = {
    "auc": "AUC",
    "worst_auc": "worst-group AUC",
    "tpr_gap": "TPR gap",
    "fpr_gap": "FPR gap",
    "eo_gap": "EO gap",
    "es_auc": "ES-AUC",
}
MAKE_RUNS = "fairbench run --method erm --dataset synthetic"
MIN_SEEDS = 3
ALPHA = 0.05
CORRECTIONS = ("bh", "holm", "none")
NOT_CONFIGURATION = {
    "method",
    "dataset",
    "seed",
    "device",
    "num_workers",
    "compile",
    "deterministic",
    "results_dir",
    "tracking_uri",
    "data_dir",
    "bootstrap",
    "track_nc",
}
"""Logged parameters that do not change what is trained or what is reported."""
TUNED = {"lr", "weight_decay", "attribute"}
"""Parameters a method may set differently from ERM in the same setting (with its ``method.*``)."""


@dataclass
class Runs:
    """Finished runs (one row each: ids, tags, parameters and ``test/*`` metrics), how many were
    skipped, and notes on duplicated seeds."""

    frame: pd.DataFrame
    skipped: int
    tracking_uri: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Leaderboard:
    """``table``: one row per configuration x attribute; ``ranks``: average ranks."""

    table: pd.DataFrame
    ranks: pd.DataFrame
    skipped: int
    notes: list[str] = field(default_factory=list)
    correction: str = "bh"


def _configuration(params: dict[str, str], uses_attributes: bool) -> dict[str, str]:
    """The parameters that define the experiment of a run (see the module docstring)."""
    keep = {k: v for k, v in params.items() if k not in NOT_CONFIGURATION}
    if not uses_attributes and keep.get("select") != "worst_group_auc":
        keep.pop("attribute", None)  # a label-free method trains the same whatever the attribute
    return keep


def _key(values: dict[str, str]) -> str:
    return "; ".join(f"{k}={values[k]}" for k in sorted(values))


def load_runs(tracking_uri: str, suite: str | None = None) -> Runs:
    """Every finished ``run`` in the store (of one suite, if named); runs without test metrics
    are counted as skipped; of a seed run more than once in one configuration, the latest."""
    import mlflow

    from fairbench import tracking

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).exists():
        raise FairbenchError(f"no MLflow store at {tracking_uri}; make runs first, e.g. '{MAKE_RUNS}'")
    tracking.use_store(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    query = tracking.tag_filter(kind="run", **({"suite": suite} if suite else {}))
    found = client.search_runs(ids, filter_string=query, max_results=50000) if ids else []
    rows, skipped = [], 0
    for run in found:
        metrics = run.data.metrics
        if run.info.status != "FINISHED" or "test/auc" not in metrics:
            skipped += 1
            continue
        tags = run.data.tags
        uses = tags.get("fairbench.uses_attributes") == "True"
        config = _configuration(dict(run.data.params), uses)
        context = {k: v for k, v in config.items() if k not in TUNED and not k.startswith("method.")}
        rows.append(
            {
                "run_id": run.info.run_id,
                "start_time": run.info.start_time or 0,
                "dataset": tags.get("fairbench.dataset"),
                "method": tags.get("fairbench.method"),
                "backbone": tags.get("fairbench.backbone", ""),
                "seed": int(tags.get("fairbench.seed", 0)),
                "uses_attributes": uses,
                "uses_attributes_at_test": tags.get("fairbench.uses_attributes_at_test") == "True",
                "config": _key(config),
                "context": _key(context),
                "params": config,
                "threshold": metrics.get("test/threshold", 0.5),
                **{k[len("test/") :]: v for k, v in metrics.items() if k.startswith("test/")},
            }
        )
    if not rows:
        raise FairbenchError(
            f"no finished runs in {tracking_uri}"
            + (f" ({skipped} run(s) without test metrics skipped)" if skipped else "")
            + f"; make some with '{MAKE_RUNS}'"
        )
    frame = pd.DataFrame(rows).sort_values("start_time", kind="stable")
    notes = []
    dup = frame.duplicated(["dataset", "method", "config", "seed"], keep="last")
    for (dataset, method, seed), part in frame[dup].groupby(["dataset", "method", "seed"], sort=True):
        kept = frame[~dup & (frame["dataset"] == dataset) & (frame["method"] == method) & (frame["seed"] == seed)]
        notes.append(
            f"{dataset} {method}: seed {seed} ran {len(part) + 1} times in one configuration; kept the latest "
            f"finished run ({', '.join(kept['run_id'].str[:8])}), left out {', '.join(part['run_id'].str[:8])}"
        )
    frame = frame[~dup].reset_index(drop=True)
    return Runs(frame=frame, skipped=skipped, tracking_uri=tracking_uri, notes=notes)


def _attributes(frame: pd.DataFrame) -> list[str]:
    """The evaluated attributes: those with per-group counts (``sex/n/female``)."""
    return sorted({c.split("/")[0] for c in frame.columns if c.count("/") == 2 and c.split("/")[1] == "n"})


def _settings(frame: pd.DataFrame) -> pd.Series:
    """Per run, the settings that distinguish its configuration from the others in its table:
    setting keys that vary across the dataset's runs, and a method's own keys that vary across
    that method's configurations."""
    out = pd.Series("", index=frame.index, dtype=object)
    for _, part in frame.groupby("dataset", sort=False):
        shared = [p for p in part["params"]]
        context_keys = {k for p in shared for k in p if k not in TUNED and not k.startswith("method.")}
        varying = {k for k in context_keys if len({p.get(k) for p in shared}) > 1}
        for _, mine in part.groupby("method", sort=False):
            own = [p for p in mine["params"]]
            keys = {k for p in own for k in p} - context_keys
            varying_own = {k for k in keys if len({p.get(k) for p in own}) > 1}
            shown = sorted(varying | varying_own)
            for i, p in zip(mine.index, own, strict=True):
                out[i] = ", ".join(f"{k.removeprefix('method.')}={p.get(k, '-')}" for k in shown)
    return out


def _predictions(client: Any, run_id: str, cache: dict[str, pd.DataFrame | None]) -> pd.DataFrame | None:
    """A run's saved test predictions, downloaded once per leaderboard (ERM's serve every method)."""
    if run_id not in cache:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cache[run_id] = pd.read_csv(client.download_artifacts(run_id, "predictions_test.csv", tmp))
        except Exception:  # an older run without the artifact: seed variance only
            cache[run_id] = None
    return cache[run_id]


def _attribute_groups(dataset: str, attributes: list[str], preds: pd.DataFrame) -> dict[str, list[str]]:
    """Group names in code order, from the dataset plugin when installed (crossed attributes
    from their parts), else the codes."""
    from fairbench import registry
    from fairbench.attributes import groups, parts

    try:
        known = dict(registry.datasets.get(dataset).attributes)
    except FairbenchError:
        known = {}
    for a in attributes:
        pair = parts(a)
        if pair and all(p in known for p in pair):
            known[a] = groups(known[pair[0]], known[pair[1]])
    return {
        a: list(known[a]) if a in known else [str(c) for c in range(int(preds[a].max()) + 1)]
        for a in attributes
        if a in preds
    }


def paired_test_variance(
    pairs: list[tuple[pd.DataFrame, float, pd.DataFrame, float]],
    dataset: str,
    attributes: list[str],
    n_bootstrap: int,
    seed: int,
    min_count: int,
) -> dict[str, float]:
    """Per metric key, the bootstrap variance of the mean (over seeds) of method - ERM on the
    test set: the same stratified resamples score both runs of every shared seed."""
    from fairbench.metrics import paired_bootstrap

    first = pairs[0][0]
    groups = _attribute_groups(dataset, attributes, first)
    codes = first[list(groups)].to_numpy(np.int64)
    predictions = [(p["score"].to_numpy(), t) for a, ta, b, tb in pairs for p, t in ((a, ta), (b, tb))]
    draws = paired_bootstrap(
        predictions,
        first["label"].to_numpy(),
        codes,
        groups,
        n_bootstrap=n_bootstrap,
        seed=seed,
        min_count=min_count,
    )
    out = {}
    for key in draws[0]:
        diff = np.mean([draws[2 * i][key] - draws[2 * i + 1][key] for i in range(len(pairs))], axis=0)
        diff = diff[np.isfinite(diff)]
        if diff.size > 1:
            out[key] = float(np.var(diff, ddof=1))
    return out


def compare(diffs: np.ndarray, test_var: float) -> tuple[float, float, float, float]:
    """(mean difference, p-value, CI low, CI high) from per-seed differences and the test-sample
    variance of their mean (see the module docstring); NaNs with fewer than :data:`MIN_SEEDS`."""
    from scipy import stats

    k = diffs.size
    mean = float(diffs.mean()) if k else math.nan
    if k < MIN_SEEDS:
        return mean, math.nan, math.nan, math.nan
    seed_part = float(np.var(diffs, ddof=1)) / k
    test_part = test_var if np.isfinite(test_var) else 0.0
    se = math.sqrt(seed_part + test_part)
    if se == 0:
        return mean, (1.0 if mean == 0 else 0.0), mean, mean
    df = k - 1
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * se
    return mean, float(2 * stats.t.sf(abs(mean) / se, df)), mean - half, mean + half


def adjust(p: np.ndarray, method: str) -> np.ndarray:
    """Multiplicity-adjusted p-values (NaNs stay NaN): Benjamini–Hochberg, Holm, or none."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0 or method == "none":
        out[ok] = p[ok]
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    elif method == "bh":
        adj = np.minimum.accumulate((m / np.arange(1, m + 1) * ranked)[::-1])[::-1]
    else:
        raise FairbenchError(f"--correction {method}: use one of {', '.join(CORRECTIONS)}")
    out[order] = np.minimum(adj, 1.0)
    return out


def _erm_for(frame: pd.DataFrame, dataset: str, context: str) -> tuple[pd.DataFrame, str | None]:
    """The ERM runs of the same setting; with several ERM configurations, the one with most seeds."""
    erm = frame[(frame["dataset"] == dataset) & (frame["method"] == BASELINE) & (frame["context"] == context)]
    if erm.empty:
        return erm, "no ERM runs in the same setting"
    configs = erm.groupby("config")["seed"].nunique().sort_values(ascending=False, kind="stable")
    why = (
        f"{len(configs)} ERM configurations in this setting; compared with the one of most seeds"
        if len(configs) > 1
        else None
    )
    return erm[erm["config"] == configs.index[0]], why


def _too_small_notes(group: pd.DataFrame, label: str, attributes: list[str]) -> list[str]:
    notes = []
    for attr in attributes:
        prefix = f"{attr}/too_small/"
        for col in sorted(c for c in group.columns if c.startswith(prefix)):
            hit = group[col] == 1.0
            if hit.any():
                g = col[len(prefix) :]
                pos = group.loc[hit, f"{attr}/n_pos/{g}"].iloc[0] if f"{attr}/n_pos/{g}" in group else "?"
                neg = group.loc[hit, f"{attr}/n_neg/{g}"].iloc[0] if f"{attr}/n_neg/{g}" in group else "?"
                notes.append(
                    f"{label}: {attr} group {g} too small in {int(hit.sum())} run(s) ({int(pos)} positives, "
                    f"{int(neg)} negatives on test): left out of its gaps"
                )
    return notes


def build(runs: Runs, n_bootstrap: int = 1000, seed: int = 0, correction: str = "bh") -> Leaderboard:
    """Aggregate each configuration over seeds, compare it with ERM, adjust for multiplicity, rank."""
    import mlflow

    if correction not in CORRECTIONS:
        raise FairbenchError(f"--correction {correction}: use one of {', '.join(CORRECTIONS)}")
    frame = runs.frame.copy()
    frame["setting"] = _settings(frame)
    attributes = _attributes(frame)
    client = mlflow.MlflowClient(runs.tracking_uri)
    downloaded: dict[str, pd.DataFrame | None] = {}
    notes: list[str] = list(runs.notes)
    rows = []
    for (dataset, method, config), group in frame.groupby(["dataset", "method", "config"], sort=True):
        setting = str(group["setting"].iloc[0])
        label = f"{dataset} {method}" + (f" ({setting})" if setting else "")
        notes += _too_small_notes(group, label, attributes)
        compared = method != BASELINE
        erm, why = _erm_for(frame, dataset, str(group["context"].iloc[0])) if compared else (group.iloc[:0], None)
        shared = sorted(set(group["seed"]) & set(erm["seed"])) if compared else []
        if compared and why:
            notes.append(f"{label}: {why}")
        if compared and not erm.empty and len(shared) < MIN_SEEDS:
            notes.append(f"{label}: {len(shared)} seed(s) shared with ERM; no test below {MIN_SEEDS}")
        variance = {}
        if len(shared) >= MIN_SEEDS:
            variance, missing = _shared_test_variance(
                group, erm, shared, dataset, attributes, n_bootstrap, seed, client, downloaded
            )
            if missing:
                notes.append(f"{label}: {missing}; test over seeds only")
        mine, base = group.set_index("seed"), erm.set_index("seed")
        for attr in attributes:
            counts = [c for c in group.columns if c.startswith(f"{attr}/n/")]
            if group[counts].isna().all().all():
                continue
            row: dict[str, Any] = {
                "dataset": dataset,
                "method": method,
                "setting": setting,
                "backbone": str(group["backbone"].iloc[0]),
                "config": config,
                "attribute": attr,
                "uses_attributes": bool(group["uses_attributes"].iloc[0]),
                "uses_attributes_at_test": bool(group["uses_attributes_at_test"].iloc[0]),
                "seeds": len(group),
                "shared_seeds": len(shared) if compared else math.nan,
            }
            for metric in HEADLINE:
                key = metric if metric in OVERALL else f"{attr}/{metric}"
                values = mine[key] if key in mine else pd.Series(dtype=float)
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                if not compared or erm.empty or key not in base:
                    continue
                diffs = (values[shared] - base[key][shared]).to_numpy(dtype=np.float64)
                diffs = diffs[np.isfinite(diffs)]
                mean, p, lo, hi = compare(diffs, variance.get(key, math.nan))
                base_mean = float(base[key][shared].mean()) if shared else math.nan
                row[f"{metric}_delta"] = mean
                row[f"{metric}_rel"] = mean / abs(base_mean) if base_mean else math.nan
                row[f"{metric}_p"] = p
                row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = lo, hi
            rows.append(row)
    table = pd.DataFrame(rows)
    _mark(table, correction)
    table = (
        table.assign(_ref=table["method"] != BASELINE)
        .sort_values(["dataset", "_ref", "method", "setting", "attribute"], kind="stable")
        .drop(columns="_ref")
        .reset_index(drop=True)
    )
    return Leaderboard(table=table, ranks=rank(table), skipped=runs.skipped, notes=notes, correction=correction)


def _shared_test_variance(group, erm, shared, dataset, attributes, n_bootstrap, seed, client, cache):
    """Test-sample variance per metric key from the saved predictions, or why it is missing."""
    pairs = []
    for s in shared:
        mine, base = group[group["seed"] == s].iloc[0], erm[erm["seed"] == s].iloc[0]
        a, b = _predictions(client, mine["run_id"], cache), _predictions(client, base["run_id"], cache)
        if a is None or b is None:
            return {}, "test predictions missing"
        if len(a) != len(b) or not np.array_equal(a["label"], b["label"]):
            return {}, "test sets differ from ERM's"
        pairs.append((a, float(mine["threshold"]), b, float(base["threshold"])))
    min_count = int(group["min_group_count"].iloc[0]) if "min_group_count" in group else 20
    return paired_test_variance(pairs, dataset, attributes, n_bootstrap, seed, min_count), None


def _mark(table: pd.DataFrame, correction: str) -> None:
    """Adjust every p-value of the table together and mark the significant differences."""
    cols = [f"{m}_p" for m in HEADLINE if f"{m}_p" in table]
    if not cols:
        return
    flat = table[cols].to_numpy(dtype=np.float64).ravel()
    adjusted = adjust(flat, correction).reshape(len(table), len(cols))
    for j, col in enumerate(cols):
        metric = col[: -len("_p")]
        table[f"{metric}_p_adj"] = adjusted[:, j]
        table[f"{metric}_significant"] = np.where(np.isfinite(adjusted[:, j]), adjusted[:, j] < ALPHA, None)


def rank(table: pd.DataFrame) -> pd.DataFrame:
    """Average rank of each configuration over datasets (and attributes) per headline metric; 1 is best."""
    label = table["method"] + np.where(table["setting"] != "", " (" + table["setting"] + ")", "")
    table = table.assign(label=label)
    out = {}
    for metric in HEADLINE:
        col = f"{metric}_mean"
        by = ["dataset"] if metric in OVERALL else ["dataset", "attribute"]
        subset = table.drop_duplicates(["dataset", "config", "method"]) if metric in OVERALL else table
        ranks = subset.groupby(by)[col].rank(ascending=metric in LOWER_IS_BETTER, method="average")
        out[metric] = ranks.groupby(subset["label"]).mean()
    return pd.DataFrame(out).rename_axis("method").reset_index()


def filtered(board: Leaderboard, datasets=(), attributes=(), metrics=()) -> tuple[pd.DataFrame, list[str]]:
    """The table restricted by the CLI filters, and the metrics to show."""
    table = board.table
    if datasets:
        table = table[table["dataset"].isin(datasets)]
    if attributes:
        table = table[table["attribute"].isin(attributes)]
    unknown = [m for m in metrics if m not in HEADLINE]
    if unknown:
        raise FairbenchError(f"--metric {unknown[0]}: not a headline metric; choose from {', '.join(HEADLINE)}")
    if table.empty:
        raise FairbenchError("no leaderboard rows match the filters; drop --dataset/--attribute to see all")
    return table, list(metrics) or list(HEADLINE)


# --------------------------------------------------------------------------- presentation


def value_cell(row: pd.Series, metric: str) -> str:
    """``0.817±0.023``: mean ± std over seeds, compact so it never wraps; ``n/a`` when undefined
    (e.g. a gap with fewer than two groups of the minimum size)."""
    mean = row[f"{metric}_mean"]
    return "n/a" if math.isnan(mean) else f"{mean:.3f}±{row[f'{metric}_std']:.3f}"


def delta_cell(row: pd.Series, metric: str) -> str:
    """``+0.012*``: the mean difference from ERM over shared seeds; ``*`` when significant after
    adjustment; empty for ERM itself or without a comparison."""
    delta = row.get(f"{metric}_delta", math.nan)
    if not isinstance(delta, float) or math.isnan(delta):
        return ""
    return f"{delta:+.3f}" + ("*" if row.get(f"{metric}_significant") is True else "")


def _uses(row: pd.Series) -> str:
    if row["uses_attributes_at_test"]:
        return "train+test"
    return "train" if row["uses_attributes"] else "no"


def display_frame(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The human-readable table: identity columns, then per metric its value and its change vs ERM."""
    out = pd.DataFrame(
        {
            "dataset": table["dataset"].to_numpy(),
            "method": table["method"].to_numpy(),
            "setting": table["setting"].to_numpy(),
            "uses attributes": [_uses(r) for _, r in table.iterrows()],
            "seeds": table["seeds"].to_numpy(),
            "attribute": table["attribute"].str.replace("_x_", "×").to_numpy(),
        }
    )
    if not (out["setting"] != "").any():
        out = out.drop(columns="setting")
    for metric in metrics:
        out[LABELS[metric]] = [value_cell(r, metric) for _, r in table.iterrows()]
        out[f"Δ {LABELS[metric]}"] = [delta_cell(r, metric) for _, r in table.iterrows()]
    return out.reset_index(drop=True)


def footnote(correction: str) -> str:
    how = {"bh": "Benjamini–Hochberg", "holm": "Holm", "none": "no"}[correction]
    return (
        "mean±std over seeds on the test split; Δ: mean difference from ERM of the same setting over the seeds "
        f"both share; * marks a difference whose p-value (t over seeds, seed and test-sample variance; at least "
        f"{MIN_SEEDS} shared seeds) stays below {ALPHA} after {how} adjustment over every comparison in the table."
    )


def to_markdown(table: pd.DataFrame, ranks: pd.DataFrame, metrics: list[str], notes=(), correction="bh") -> str:
    shown = display_frame(table, metrics)
    lines = ["# fairbench leaderboard", ""]
    for dataset, part in shown.groupby("dataset", sort=True):
        lines += [f"## {dataset}", "", _md(part.drop(columns="dataset")), ""]
    rank_cols = ["method", *metrics]
    lines += ["## Average rank (1 = best)", "", _md(ranks[rank_cols].round(2)), "", footnote(correction), ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + ("\n" if notes else "")


def _md(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    sep = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def to_latex(table: pd.DataFrame, metrics: list[str]) -> str:
    shown = display_frame(table, metrics).replace({"±": r"$\\pm$", "Δ": r"$\\Delta$", "×": r"$\\times$"}, regex=True)
    shown.columns = [str(c).replace("Δ", r"$\Delta$") for c in shown.columns]
    cols = "l" * len(shown.columns)
    lines = [rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(shown.columns) + r" \\", r"\midrule"]
    for row in shown.itertuples(index=False):
        lines.append(" & ".join(str(v).replace("%", r"\%").replace("_", r"\_") for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


PRIORITY = ("method", "attribute", "AUC", "EO gap", "setting", "Δ AUC", "Δ EO gap", "worst-group AUC", "TPR gap")
"""Columns kept first when the terminal is narrow; the rest follow in table order."""
SHORT = {"worst-group AUC": "worst AUC", "uses attributes": "attrs", "Δ worst-group AUC": "Δ worst AUC"}


def fit_columns(frame: pd.DataFrame, width: int) -> tuple[pd.DataFrame, list[str]]:
    """The columns of ``frame`` that fit in ``width`` characters as a boxed table, by priority,
    with short headers; and the names of the columns left out. A cell is never broken."""
    frame = frame.rename(columns=SHORT)
    names = [SHORT.get(c, c) for c in PRIORITY] + list(frame.columns)
    order = [c for c in dict.fromkeys(names) if c in frame.columns]

    def cost(col: str) -> int:
        return max([len(str(col)), *(len(str(v)) for v in frame[col])]) + 3  # padding and a border

    kept, used = [], 1
    for col in order:
        if used + cost(col) <= width:
            kept.append(col)
            used += cost(col)
    kept = [c for c in frame.columns if c in kept]
    return frame[kept], [c for c in frame.columns if c not in kept]


def groups_of(frame: pd.DataFrame, attr: str) -> list[str]:
    """The group keys of ``attr`` in the runs, from the per-group counts (``sex/n/female``)."""
    prefix = f"{attr}/n/"
    return sorted(c[len(prefix) :] for c in frame.columns if c.startswith(prefix))


def _row_label(row: pd.Series) -> str:
    return row["method"] + (f" ({row['setting']})" if row.get("setting") else "")


def plot(table: pd.DataFrame, runs: Runs, folder: Path, gap: str = "eo_gap") -> list[Path]:
    """Per dataset and attribute: AUC vs ``gap`` with error bars, and per-group TPR/FPR bars;
    one point or bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    frame = runs.frame
    for (dataset, attr), part in table.groupby(["dataset", "attribute"], sort=True):
        stem = f"{dataset}_{attr}"
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for _, row in part.iterrows():
            ax.errorbar(
                row["auc_mean"],
                row[f"{gap}_mean"],
                xerr=row["auc_std"],
                yerr=row[f"{gap}_std"],
                fmt="o",
                capsize=3,
                label=_row_label(row),
            )
            ax.annotate(
                _row_label(row),
                (row["auc_mean"], row[f"{gap}_mean"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
        ax.set_xlabel("test AUC")
        ax.set_ylabel(f"test {LABELS[gap]} ({attr})")
        ax.set_title(f"{dataset}: accuracy vs fairness ({attr})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(folder / f"{stem}_tradeoff.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

        runs_here = frame[frame["dataset"] == dataset]
        groups = groups_of(runs_here, attr)
        if not groups:
            continue
        configs = list(part.drop_duplicates(["method", "config"]).itertuples(index=False))
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        width = 0.8 / max(len(configs), 1)
        for ax, rate in zip(axes, ("tpr", "fpr"), strict=True):
            for i, row in enumerate(configs):
                mine = runs_here[(runs_here["method"] == row.method) & (runs_here["config"] == row.config)]
                cols = [f"{attr}/{rate}/{g}" for g in groups]
                means = [mine[c].mean() if c in mine else np.nan for c in cols]
                stds = [mine[c].std(ddof=1) if c in mine and len(mine) > 1 else 0 for c in cols]
                label = row.method + (f" ({row.setting})" if row.setting else "")
                ax.bar(np.arange(len(groups)) + i * width, means, width, yerr=stds, capsize=2, label=label)
            ax.set_xticks(np.arange(len(groups)) + width * (len(configs) - 1) / 2, groups)
            ax.set_title(f"{rate.upper()} by {attr}")
        axes[0].legend(fontsize=8)
        fig.suptitle(dataset)
        fig.tight_layout()
        written.append(folder / f"{stem}_rates.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
