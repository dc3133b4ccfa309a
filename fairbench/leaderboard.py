"""MLflow runs -> the comparison researchers publish: tables, significance, ranks and plots.

Only finished runs of kind ``run`` count (tuning trials do not). Runs are grouped by dataset x
method (x backbone, where a dataset has runs of more than one), and each headline metric is
aggregated over seeds as mean ± std.

Each method is compared with ERM on the same dataset (and backbone) in two ways:

- paired over seeds: the mean of the per-seed differences and a paired t-test over the seeds
  both methods share;
- a paired bootstrap of the test predictions: the same resamples of the test set score both
  methods' saved predictions (each at its own run's threshold), the metric is averaged over the
  shared seeds, and the 95% percentile interval of the difference is reported. A difference
  whose interval excludes 0 is marked ``*``.
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


@dataclass
class Runs:
    """Finished runs (one row each: ids, tags and ``test/*`` metrics) and how many were skipped."""

    frame: pd.DataFrame
    skipped: int
    tracking_uri: str


@dataclass
class Leaderboard:
    """``table``: one row per dataset x backbone x method x attribute; ``ranks``: average ranks."""

    table: pd.DataFrame
    ranks: pd.DataFrame
    skipped: int
    notes: list[str] = field(default_factory=list)


def load_runs(tracking_uri: str, suite: str | None = None) -> Runs:
    """Every finished ``run`` in the store (of one suite, if named); runs without test metrics
    are counted as skipped."""
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
        rows.append(
            {
                "run_id": run.info.run_id,
                "dataset": tags.get("fairbench.dataset"),
                "method": tags.get("fairbench.method"),
                "backbone": tags.get("fairbench.backbone", ""),
                "seed": int(tags.get("fairbench.seed", 0)),
                "uses_attributes": tags.get("fairbench.uses_attributes") == "True",
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
    return Runs(frame=pd.DataFrame(rows), skipped=skipped, tracking_uri=tracking_uri)


def _attributes(frame: pd.DataFrame) -> list[str]:
    return sorted({c.split("/")[0] for c in frame.columns if c.endswith("/eo_gap")})


def _cell_groups(frame: pd.DataFrame) -> list[str]:
    """Backbone joins the grouping only where a dataset has runs of more than one."""
    multi = frame.groupby("dataset")["backbone"].nunique()
    frame["variant"] = np.where(frame["dataset"].map(multi) > 1, frame["backbone"], "")
    return ["dataset", "variant", "method"]


def _predictions(client: Any, run_id: str, cache: dict[str, pd.DataFrame | None]) -> pd.DataFrame | None:
    """A run's saved test predictions, downloaded once per leaderboard (ERM's serve every method)."""
    if run_id not in cache:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cache[run_id] = pd.read_csv(client.download_artifacts(run_id, "predictions_test.csv", tmp))
        except Exception:  # an older run without the artifact: no bootstrap for it
            cache[run_id] = None
    return cache[run_id]


def _attribute_groups(dataset: str, attributes: list[str], preds: pd.DataFrame) -> dict[str, list[str]]:
    """Group names in code order, from the dataset plugin when installed, else the codes."""
    from fairbench import registry

    try:
        known = registry.datasets.get(dataset).attributes
    except FairbenchError:
        known = {}
    return {
        a: list(known[a]) if a in known else [str(c) for c in range(int(preds[a].max()) + 1)]
        for a in attributes
        if a in preds
    }


def _bootstrap_differences(
    runs: Runs,
    group: pd.DataFrame,
    erm: pd.DataFrame,
    n_bootstrap: int,
    seed: int,
    client: Any,
    cache: dict[str, pd.DataFrame | None],
) -> tuple[dict[str, tuple[float, float]], str | None]:
    """95% interval of (method - ERM) for each metric key, pooled over shared seeds."""
    from fairbench.metrics import paired_bootstrap

    shared = sorted(set(group["seed"]) & set(erm["seed"]))
    if not shared:
        return {}, "no shared seeds"
    pairs = []
    for s in shared:
        a = _predictions(client, group.loc[group["seed"] == s, "run_id"].iloc[0], cache)
        b = _predictions(client, erm.loc[erm["seed"] == s, "run_id"].iloc[0], cache)
        if a is None or b is None:
            return {}, "predictions missing"
        if len(a) != len(b) or not np.array_equal(a["label"], b["label"]):
            return {}, "test sets differ"
        ta = float(group.loc[group["seed"] == s, "threshold"].iloc[0])
        tb = float(erm.loc[erm["seed"] == s, "threshold"].iloc[0])
        pairs.append((a, ta, b, tb))
    first = pairs[0][0]
    attributes = _attribute_groups(str(group["dataset"].iloc[0]), _attributes(runs.frame), first)
    codes = first[list(attributes)].to_numpy(np.int64)
    predictions = [(p["score"].to_numpy(), t) for a, ta, b, tb in pairs for p, t in ((a, ta), (b, tb))]
    draws = paired_bootstrap(
        predictions, first["label"].to_numpy(), codes, attributes, n_bootstrap=n_bootstrap, seed=seed
    )
    ci = {}
    for key in draws[0]:
        diff = np.mean([draws[2 * i][key] - draws[2 * i + 1][key] for i in range(len(pairs))], axis=0)
        diff = diff[np.isfinite(diff)]
        if diff.size:
            lo, hi = np.quantile(diff, [0.025, 0.975])
            ci[key] = (float(lo), float(hi))
    return ci, None


def build(runs: Runs, n_bootstrap: int = 1000, seed: int = 0) -> Leaderboard:
    """Aggregate, compare with ERM and rank."""
    import mlflow
    from scipy import stats

    frame = runs.frame.copy()
    keys = _cell_groups(frame)
    attributes = _attributes(frame)
    client = mlflow.MlflowClient(runs.tracking_uri)
    downloaded: dict[str, pd.DataFrame | None] = {}
    notes: list[str] = []
    rows = []
    for (dataset, variant, method), group in frame.groupby(keys, sort=True):
        group = group.drop_duplicates("seed", keep="first")
        erm = frame[(frame["dataset"] == dataset) & (frame["variant"] == variant) & (frame["method"] == BASELINE)]
        erm = erm.drop_duplicates("seed", keep="first")
        ci, why = (
            ({}, None)
            if method == BASELINE or erm.empty
            else _bootstrap_differences(runs, group, erm, n_bootstrap, seed, client, downloaded)
        )
        if why:
            notes.append(f"{dataset} {method}: no bootstrap comparison with ERM ({why})")
        for attr in attributes:
            if f"{attr}/eo_gap" not in group or group[f"{attr}/eo_gap"].isna().all():
                continue
            row: dict[str, Any] = {
                "dataset": dataset,
                "backbone": variant,
                "method": method,
                "attribute": attr,
                "uses_attributes": bool(group["uses_attributes"].iloc[0]),
                "seeds": len(group),
            }
            for metric in HEADLINE:
                key = metric if metric in OVERALL else f"{attr}/{metric}"
                values = group.set_index("seed")[key] if key in group else pd.Series(dtype=float)
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                if method == BASELINE or erm.empty or key not in erm:
                    continue
                base = erm.set_index("seed")[key]
                shared = values.index.intersection(base.index)
                base_mean = float(base.mean())
                row[f"{metric}_rel"] = (row[f"{metric}_mean"] - base_mean) / abs(base_mean) if base_mean else math.nan
                diffs = (values[shared] - base[shared]).to_numpy()
                row[f"{metric}_diff"] = float(diffs.mean()) if diffs.size else math.nan
                row[f"{metric}_paired_p"] = (
                    float(stats.ttest_rel(values[shared], base[shared]).pvalue) if diffs.size > 1 else math.nan
                )
                lo, hi = ci.get(key, (math.nan, math.nan))
                row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = lo, hi
                row[f"{metric}_significant"] = bool(lo > 0 or hi < 0)
            rows.append(row)
    table = pd.DataFrame(rows)
    # the reference first, then the methods by name
    table = (
        table.assign(_ref=table["method"] != BASELINE)
        .sort_values(["dataset", "backbone", "_ref", "method", "attribute"])
        .drop(columns="_ref")
        .reset_index(drop=True)
    )
    return Leaderboard(table=table, ranks=rank(table), skipped=runs.skipped, notes=notes)


def rank(table: pd.DataFrame) -> pd.DataFrame:
    """Average rank of each method over datasets (and attributes) for each headline metric; 1 is best."""
    out = {}
    for metric in HEADLINE:
        col = f"{metric}_mean"
        by = ["dataset", "backbone"] if metric in OVERALL else ["dataset", "backbone", "attribute"]
        subset = table.drop_duplicates(["dataset", "backbone", "method"]) if metric in OVERALL else table
        ranks = subset.groupby(by)[col].rank(ascending=metric in LOWER_IS_BETTER, method="average")
        out[metric] = ranks.groupby(subset["method"]).mean()
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


def cell(row: pd.Series, metric: str) -> str:
    """``mean ± std``, with the relative change vs ERM and ``*`` when its bootstrap CI excludes 0."""
    text = f"{row[f'{metric}_mean']:.3f} ± {row[f'{metric}_std']:.3f}"
    rel = row.get(f"{metric}_rel", math.nan)
    if isinstance(rel, float) and not math.isnan(rel):
        mark = "*" if row.get(f"{metric}_significant") is True else ""
        text += f" ({rel:+.1%}{mark})"
    return text


def display_frame(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The human-readable table: one formatted column per metric."""
    out = pd.DataFrame(
        {
            "dataset": table["dataset"] + np.where(table["backbone"] != "", " / " + table["backbone"], ""),
            "method": table["method"],
            "uses attributes": np.where(table["uses_attributes"], "yes", "no"),
            "seeds": table["seeds"],
            "attribute": table["attribute"],
        }
    )
    for metric in metrics:
        out[LABELS[metric]] = [cell(row, metric) for _, row in table.iterrows()]
    return out.reset_index(drop=True)


FOOTNOTE = (
    "mean ± std over seeds on the test split; in brackets the change relative to ERM; * marks a "
    "difference whose 95% paired-bootstrap interval (test predictions, pooled over shared seeds) excludes 0."
)


def to_markdown(table: pd.DataFrame, ranks: pd.DataFrame, metrics: list[str]) -> str:
    shown = display_frame(table, metrics)
    lines = ["# fairbench leaderboard", ""]
    for dataset, part in shown.groupby("dataset", sort=True):
        lines += [f"## {dataset}", "", _md(part.drop(columns="dataset")), ""]
    rank_cols = ["method", *metrics]
    lines += ["## Average rank (1 = best)", "", _md(ranks[rank_cols].round(2)), "", FOOTNOTE, ""]
    return "\n".join(lines)


def _md(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    sep = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def to_latex(table: pd.DataFrame, metrics: list[str]) -> str:
    shown = display_frame(table, metrics).replace({"±": r"$\\pm$"}, regex=True)
    cols = "l" * len(shown.columns)
    lines = [rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(shown.columns) + r" \\", r"\midrule"]
    for row in shown.itertuples(index=False):
        lines.append(" & ".join(str(v).replace("%", r"\%").replace("_", r"\_") for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def groups_of(frame: pd.DataFrame, attr: str) -> list[str]:
    """The group keys of ``attr`` in the runs, from the per-group counts (``sex/n/female``)."""
    prefix = f"{attr}/n/"
    return sorted(c[len(prefix) :] for c in frame.columns if c.startswith(prefix))


def plot(table: pd.DataFrame, runs: Runs, folder: Path, gap: str = "eo_gap") -> list[Path]:
    """Per dataset and attribute: AUC vs ``gap`` with error bars, and per-group TPR/FPR bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    frame = runs.frame
    for (dataset, backbone, attr), part in table.groupby(["dataset", "backbone", "attribute"], sort=True):
        stem = "_".join(x for x in (dataset, backbone, attr) if x)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for _, row in part.iterrows():
            ax.errorbar(
                row["auc_mean"],
                row[f"{gap}_mean"],
                xerr=row["auc_std"],
                yerr=row[f"{gap}_std"],
                fmt="o",
                capsize=3,
                label=row["method"],
            )
            ax.annotate(
                row["method"],
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
        methods = list(part["method"])
        groups = groups_of(runs_here, attr)
        if not groups:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        width = 0.8 / max(len(methods), 1)
        for ax, rate in zip(axes, ("tpr", "fpr"), strict=True):
            for i, method in enumerate(methods):
                mine = runs_here[runs_here["method"] == method]
                cols = [f"{attr}/{rate}/{g}" for g in groups]
                means = [mine[c].mean() if c in mine else np.nan for c in cols]
                stds = [mine[c].std(ddof=1) if c in mine and len(mine) > 1 else 0 for c in cols]
                ax.bar(np.arange(len(groups)) + i * width, means, width, yerr=stds, capsize=2, label=method)
            ax.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2, groups)
            ax.set_title(f"{rate.upper()} by {attr}")
        axes[0].legend(fontsize=8)
        fig.suptitle(dataset)
        fig.tight_layout()
        written.append(folder / f"{stem}_rates.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
