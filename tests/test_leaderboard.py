import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fairbench import leaderboard as lb
from fairbench import tracking
from fairbench.cli import main
from fairbench.experiment import predictions_frame
from fairbench.metrics import evaluate
from fairbench.trainer import Predictions

ATTRS = {"sex": ["female", "male"], "age": ["<60", "≥60"]}
N = 400
rng = np.random.default_rng(0)
LABELS = rng.integers(0, 2, N)
CODES = rng.integers(0, 2, (N, 2))


def scores(separation, seed):
    noise = np.random.default_rng(seed).normal(0, 1, N)
    return 1 / (1 + np.exp(-(separation * (LABELS - 0.5) + noise)))


def log_run(uri, results, method, seed, s, uses=False, kind="run", status="FINISHED", params=None, codes=CODES):
    experiment = tracking.experiment_id("synthetic", uri, results)
    tags = tracking.base_tags(
        kind, method=method, dataset="synthetic", seed=seed, backbone="resnet18", uses_attributes=uses
    )
    report = evaluate(s, LABELS, codes, ATTRS, threshold=0.5)
    with tracking.tracked_run(experiment, f"{method}-{seed}", tags) as run:
        if params:
            tracking.log_params(params)
        if status == "FINISHED":
            tracking.log_metrics(report.flat(), prefix="test/")
            tracking.log_table(predictions_frame(Predictions(s, LABELS, codes), list(ATTRS)), "predictions_test.csv")
    return run.info.run_id, report


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    results = tmp_path_factory.mktemp("store") / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    reports = {}
    for seed in range(3):
        reports[("erm", seed)] = log_run(uri, results, "erm", seed, scores(1.0, seed))[1]
        reports[("better", seed)] = log_run(uri, results, "better", seed, scores(3.0, 100 + seed), uses=True)[1]
        jitter = scores(1.0, seed) + np.random.default_rng(7 + seed).normal(0, 1e-4, N)
        reports[("same", seed)] = log_run(uri, results, "same", seed, np.clip(jitter, 0, 1))[1]
    log_run(uri, results, "erm", 9, scores(1.0, 9), kind="trial")  # tuning trials never count
    with (
        pytest.raises(RuntimeError),
        tracking.tracked_run(
            tracking.experiment_id("synthetic", uri, results),
            "crash",
            tracking.base_tags("run", method="erm", dataset="synthetic", seed=5),
        ),
    ):
        raise RuntimeError("crashed run")
    return results, uri, reports


def test_aggregates_match_the_logged_metrics(store):
    _, uri, reports = store
    runs = lb.load_runs(uri)
    assert runs.skipped == 1  # the crashed run
    assert sorted(runs.frame["method"].value_counts().items()) == [("better", 3), ("erm", 3), ("same", 3)]
    board = lb.build(runs, n_bootstrap=300)
    row = board.table.set_index(["method", "attribute"]).loc[("better", "sex")]
    values = [reports[("better", s)].values["sex/tpr_gap"] for s in range(3)]
    assert row["tpr_gap_mean"] == pytest.approx(np.mean(values))
    assert row["tpr_gap_std"] == pytest.approx(np.std(values, ddof=1))
    assert row["seeds"] == 3 and row["uses_attributes"] and row["shared_seeds"] == 3
    erm_auc = np.mean([reports[("erm", s)].values["auc"] for s in range(3)])
    assert row["auc_delta"] == pytest.approx(row["auc_mean"] - erm_auc)
    assert row["auc_rel"] == pytest.approx((row["auc_mean"] - erm_auc) / erm_auc)


def test_significance_flags_real_differences_only(store):
    _, uri, _ = store
    runs = lb.load_runs(uri)
    raw = lb.build(runs, n_bootstrap=300, correction="none").table.set_index(["method", "attribute"])
    assert raw.loc[("better", "sex"), "auc_significant"]
    assert raw.loc[("better", "sex"), "auc_ci_low"] > 0
    assert raw.loc[("better", "sex"), "auc_p"] < 0.05
    assert not raw.loc[("same", "sex"), "auc_significant"]
    assert raw.loc[("same", "sex"), "auc_ci_low"] < 0 < raw.loc[("same", "sex"), "auc_ci_high"]
    assert pd.isna(raw.loc[("erm", "sex"), "auc_significant"])  # ERM is the reference, not compared
    # the default adjusts over the whole table: never smaller p-values, the same raw ones
    bh = lb.build(runs, n_bootstrap=300).table.set_index(["method", "attribute"])
    assert bh.loc[("better", "sex"), "auc_p"] == pytest.approx(raw.loc[("better", "sex"), "auc_p"])
    assert (bh["auc_p_adj"].dropna() >= bh["auc_p"].dropna() - 1e-12).all()


def test_average_ranks(store):
    _, uri, _ = store
    ranks = lb.build(lb.load_runs(uri), n_bootstrap=100).ranks.set_index("method")
    assert ranks.loc["better", "auc"] == 1.0
    assert set(ranks.loc[["erm", "same"], "auc"]) <= {2.0, 3.0, 2.5}


def test_cli_formats_files_and_plots(store):
    results, _, _ = store
    base = ["leaderboard", "--results-dir", str(results), "--bootstrap", "200"]
    out = CliRunner().invoke(main, base)
    assert out.exit_code == 0, out.output
    assert "better" in out.output and "Average rank" in out.output
    markdown = (results / "leaderboard.md").read_text()
    assert "## synthetic" in markdown and "| better |" in markdown and "*" in markdown
    assert len(pd.read_csv(results / "leaderboard.csv")) == 6  # 3 methods x 2 attributes
    assert sorted(p.name for p in (results / "plots").iterdir()) == [
        "synthetic_age_rates.png",
        "synthetic_age_tradeoff.png",
        "synthetic_sex_rates.png",
        "synthetic_sex_tradeoff.png",
    ]
    md = CliRunner().invoke(main, [*base, "--format", "markdown", "--metric", "auc", "--metric", "eo_gap"])
    assert "| AUC | Δ AUC | EO gap | Δ EO gap |" in md.output and "TPR gap" not in md.output
    csv = CliRunner().invoke(main, [*base, "--format", "csv", "--attribute", "sex"])
    assert set(pd.read_csv(pd.io.common.StringIO(csv.stdout))["attribute"]) == {"sex"}
    js = json.loads(CliRunner().invoke(main, [*base, "--format", "json"]).stdout)
    assert {r["method"] for r in js["rows"]} == {"erm", "better", "same"}
    latex = CliRunner().invoke(main, [*base, "--format", "latex"]).stdout
    assert latex.startswith("\\begin{tabular}") and "$\\pm$" in latex


def test_plot_groups_come_from_group_counts(store):
    _, uri, _ = store
    frame = lb.load_runs(uri).frame
    assert lb.groups_of(frame, "sex") == ["female", "male"]
    with_intervals = pd.DataFrame(columns=["sex/tpr/female", "sex/tpr/female_ci_high", "sex/n/female", "sex/n/male"])
    assert lb.groups_of(with_intervals, "sex") == ["female", "male"]
    assert lb.groups_of(frame, "age") == ["ge60", "lt60"]


def test_erm_comes_first(store):
    _, uri, _ = store
    table = lb.build(lb.load_runs(uri), n_bootstrap=100).table
    assert list(table["method"])[:2] == ["erm", "erm"]


def test_empty_store_says_how_to_make_runs(tmp_path):
    out = CliRunner().invoke(main, ["leaderboard", "--results-dir", str(tmp_path)])
    assert out.exit_code == 1
    assert "fairbench run --method erm --dataset synthetic" in out.output
    results = tmp_path / "r"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    tracking.experiment_id("synthetic", uri, results)
    out = CliRunner().invoke(main, ["leaderboard", "--results-dir", str(results)])
    assert "no finished runs" in out.output and out.exit_code == 1


def test_unknown_metric_filter(store):
    results, _, _ = store
    out = CliRunner().invoke(main, ["leaderboard", "--results-dir", str(results), "--metric", "acc"])
    assert out.exit_code == 1 and "not a headline metric" in out.output


def test_compare_and_adjust_by_hand():
    from scipy import stats

    diffs = np.array([0.02, 0.05, 0.03])
    mean, p, _lo, hi = lb.compare(diffs, test_var=1e-4)
    seed_part = np.var(diffs, ddof=1) / 3
    se = np.sqrt(seed_part + 1e-4)
    df = 2
    assert mean == pytest.approx(diffs.mean())
    assert p == pytest.approx(2 * stats.t.sf(diffs.mean() / se, df))
    assert hi - mean == pytest.approx(stats.t.ppf(0.975, df) * se)
    assert np.isnan(lb.compare(diffs[:2], 1e-4)[1])  # fewer than MIN_SEEDS shared seeds: no test
    p_values = np.array([0.01, 0.04, np.nan, 0.03, 0.2])
    holm = lb.adjust(p_values, "holm")
    assert holm[[0, 3, 1, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    bh = lb.adjust(p_values, "bh")
    assert bh[[0, 3, 1, 4]] == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert np.isnan(holm[2]) and np.isnan(bh[2])


def test_different_experiments_are_separate_rows_and_duplicates_are_reported(tmp_path):
    # the four-run store: ERM clean; ERM label-biased with youden; reweight on sex; reweight on age
    results = tmp_path / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    base = {"backbone": "resnet18", "threshold": "0.5", "label_bias": "None", "epochs": "10", "attribute": "sex"}
    log_run(uri, results, "erm", 0, scores(1.0, 0), params=base)
    biased = {**base, "label_bias": "sex=female:1.0", "threshold": "youden"}
    log_run(uri, results, "erm", 1, scores(1.0, 1), params=biased)
    log_run(uri, results, "reweight", 0, scores(2.0, 2), uses=True, params=base)
    log_run(uri, results, "reweight", 0, scores(2.0, 3), uses=True, params={**base, "attribute": "age"})
    runs = lb.load_runs(uri)
    assert len(runs.frame) == 4 and runs.notes == []
    table = lb.build(runs, n_bootstrap=100).table
    sex = table[table["attribute"] == "sex"]
    assert len(sex) == 4  # four configurations, none merged, none dropped
    assert (sex["seeds"] == 1).all()
    settings = dict(zip(sex["method"] + "|" + sex["setting"], sex["auc_mean"], strict=True))
    assert set(settings) == {
        "erm|label_bias=None, threshold=0.5",
        "erm|label_bias=sex=female:1.0, threshold=youden",
        "reweight|attribute=sex, label_bias=None, threshold=0.5",
        "reweight|attribute=age, label_bias=None, threshold=0.5",
    }
    # a repeated seed keeps its latest run and says so
    latest = log_run(uri, results, "erm", 0, scores(1.0, 5), params=base)[0]
    again = lb.load_runs(uri)
    assert len(again.frame) == 4
    assert latest in set(again.frame["run_id"])
    assert any("seed 0 ran 2 times" in n and latest[:8] in n for n in again.notes)


def test_minimum_shared_seeds_and_small_groups_are_noted(tmp_path):
    results = tmp_path / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    codes = CODES.copy()
    codes[np.flatnonzero(codes[:, 0] == 0)[5:], 0] = 1  # only five female samples
    for seed in range(2):
        log_run(uri, results, "erm", seed, scores(1.0, seed), codes=codes)
        log_run(uri, results, "better", seed, scores(3.0, 10 + seed), codes=codes)
    board = lb.build(lb.load_runs(uri), n_bootstrap=100)
    row = board.table.set_index(["method", "attribute"]).loc[("better", "sex")]
    assert np.isnan(row["auc_p"]) and row["auc_significant"] is None
    assert any("2 seed(s) shared with ERM; no test below 3" in n for n in board.notes)
    assert any("sex group female too small in 2 run(s)" in n for n in board.notes)


@pytest.mark.parametrize("width", [60, 80, 120])
def test_terminal_table_fits_the_width_and_never_breaks_a_cell(store, width):
    import io

    from rich.console import Console

    from fairbench.cli import print_leaderboard

    _, uri, _ = store
    board = lb.build(lb.load_runs(uri), n_bootstrap=100)
    console = Console(width=width, file=io.StringIO(), force_terminal=False)
    print_leaderboard(console, board.table, board.ranks, list(lb.HEADLINE), board.correction)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    shown, hidden = lb.fit_columns(lb.display_frame(board.table, list(lb.HEADLINE)).drop(columns="dataset"), width)
    assert {"method", "attribute", "AUC"} <= set(shown.columns)
    for value in shown.astype(str).to_numpy().ravel():
        assert value in text  # every cell whole, on one line
    assert (len(hidden) > 0) == (width < 120) or width == 120
    if hidden:
        assert "not shown at this width" in text


def test_through_a_pipe_the_leaderboard_is_markdown(store):
    results, _, _ = store
    out = CliRunner().invoke(main, ["leaderboard", "--results-dir", str(results), "--bootstrap", "100"])
    assert out.exit_code == 0
    assert out.stdout.startswith("# fairbench leaderboard")
    assert "| method | uses attributes | seeds | attribute | AUC | Δ AUC |" in out.stdout
