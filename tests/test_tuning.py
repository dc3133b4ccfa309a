"""Tuning and suites on tiny runs: resume, shared workers, Pareto front, interruption, suites."""

import subprocess
import sys

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from tiny import TINY_DATA, TINY_RUN

from fairbench import tuning
from fairbench.cli import main
from fairbench.errors import FairbenchError
from fairbench.tuning import TuneConfig, tune

TINY = [*TINY_RUN, *TINY_DATA, "--epochs", "2", "--patience", "0"]


def trial_runs(uri, study):
    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"tags.`fairbench.study` = '{study}'")


def cli_tune(results, *args):
    return CliRunner().invoke(main, ["tune", "--method", "nir", *TINY, "--results-dir", str(results), *args])


def test_study_resumes_to_the_new_budget_and_nests_trial_runs(tmp_path):
    results = tmp_path / "results"
    first = cli_tune(results, "--trials", "4", "--pruner", "none")
    assert first.exit_code == 0, first.output
    assert "best trial" in first.output
    again = cli_tune(results, "--trials", "6", "--pruner", "none")
    assert again.exit_code == 0, again.output
    study = optuna.load_study(study_name="nir-synthetic", storage=f"sqlite:///{results / 'optuna.db'}")
    assert [t.number for t in study.trials] == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {"lr", "weight_decay", "lambda_nir"} <= set(study.trials[0].params)
    runs = trial_runs(f"sqlite:///{results / 'mlflow.db'}", "nir-synthetic")
    parents = [r for r in runs if r.data.tags["fairbench.kind"] == "study"]
    trials = [r for r in runs if r.data.tags["fairbench.kind"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["fairbench.trial"]) for r in trials) == list(range(6))
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    assert all("val/auc" in r.data.metrics and not any(k.startswith("test/") for k in r.data.metrics) for r in trials)
    assert (results / "studies" / "nir-synthetic_best.json").exists()
    # a third run at the same budget trains nothing
    assert "(0 new)" in cli_tune(results, "--trials", "6", "--pruner", "none").output


def test_two_workers_share_one_study_without_losing_or_duplicating(tmp_path):
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "fairbench.cli",
        "tune",
        "--method",
        "erm",
        *TINY,
        "--results-dir",
        str(results),
        "--trials",
        "6",
        "--pruner",
        "none",
    ]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    news = sorted(int(o.split(" new)")[0].rsplit("(", 1)[1]) for o in outputs)
    assert sum(news) == 6 and news[0] > 0  # both workers trained
    study = optuna.load_study(study_name="erm-synthetic", storage=f"sqlite:///{results / 'optuna.db'}")
    assert len(study.trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    lrs = [t.params["lr"] for t in study.trials]
    assert len(set(lrs)) == 6  # workers drew different points
    runs = [
        r
        for r in trial_runs(f"sqlite:///{results / 'mlflow.db'}", "erm-synthetic")
        if r.data.tags["fairbench.kind"] == "trial"
    ]
    assert sorted(int(r.data.tags["fairbench.trial"]) for r in runs) == list(range(6))


def test_multi_objective_study_returns_a_pareto_front_and_its_plot(tmp_path):
    results = tmp_path / "results"
    out = cli_tune(results, "--trials", "3", "--objectives", "val/auc,val/sex/eo_gap")
    assert out.exit_code == 0, out.output
    assert "Pareto front" in out.output
    study = optuna.load_study(study_name="nir-synthetic", storage=f"sqlite:///{results / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert len(study.best_trials) >= 1
    assert (results / "studies" / "nir-synthetic_pareto.png").stat().st_size > 1000


def test_objectives_must_be_validation_metrics(tmp_path):
    out = cli_tune(tmp_path, "--trials", "1", "--objective", "test/auc")
    assert out.exit_code == 1 and "validation metrics only" in out.output
    out = cli_tune(tmp_path, "--trials", "1", "--objective", "val/race/eo_gap")
    assert "no attribute 'race'" in out.output


def test_interrupted_trial_is_not_complete_its_run_is_killed_and_the_study_resumes(tmp_path, tiny_config, monkeypatch):
    real = tuning.run_experiment
    calls = []

    def interrupt_second(config, on_epoch=None, **kw):
        calls.append(1)

        def stop(epoch, values):
            raise KeyboardInterrupt

        return real(config, on_epoch=stop if len(calls) == 2 else on_epoch, **kw)

    monkeypatch.setattr(tuning, "run_experiment", interrupt_second)
    cfg = TuneConfig(base=tiny_config(method="erm"), trials=3, pruner="none")
    with pytest.raises(KeyboardInterrupt):
        tune(cfg)
    study = optuna.load_study(study_name="erm-synthetic", storage=cfg.storage_url())
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    runs = {
        r.data.tags.get("fairbench.trial"): r.info.status for r in trial_runs(cfg.base.tracking_uri, "erm-synthetic")
    }
    assert runs["0"] == "FINISHED" and runs["1"] == "KILLED" and runs[None] == "KILLED"  # None: the study run
    monkeypatch.setattr(tuning, "run_experiment", real)
    result = tune(cfg)
    assert result.new_trials == 2
    assert [t.state.name for t in result.study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_pruned_trial_is_recorded_as_pruned(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr(tuning, "_pruner", lambda name: optuna.pruners.ThresholdPruner(lower=1.01))
    cfg = TuneConfig(base=tiny_config(method="erm"), trials=2)
    result = tune(cfg)
    assert [t.state.name for t in result.study.trials] == ["PRUNED", "PRUNED"]
    assert result.best == []
    runs = [r for r in trial_runs(cfg.base.tracking_uri, "erm-synthetic") if r.data.tags["fairbench.kind"] == "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics.get("epochs_run") is None for r in runs)  # stopped after its first epoch


def test_suite_runs_end_to_end_and_a_rerun_trains_nothing(tmp_path):
    results = tmp_path / "results"
    args = ["suite", "benchmarks/smoke.yaml", "--results-dir", str(results)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "suite smoke: 4 new trials, 4 new runs, 0 finished runs kept" in first.output
    assert (results / "leaderboard.md").exists()
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "suite smoke: 0 new trials, 0 new runs, 4 finished runs kept" in second.output


def test_bad_suite_file_names_the_field(tmp_path):
    from fairbench import suite

    path = tmp_path / "s.yaml"
    path.write_text("name: x\ndatasets: [synthetic]\nmethods: [erm]\nrun: {epoch: 3}\n")
    with pytest.raises(FairbenchError, match=r"s.yaml: run: unknown knob\(s\) epoch"):
        suite.load(path)
    path.write_text("name: x\ndatasets: [synthetic]\nmethod: [erm]\n")
    with pytest.raises(FairbenchError, match=r"unknown key\(s\) method"):
        suite.load(path)


def test_objective_directions_come_from_the_metric_table():
    assert tuning.direction("val/sex/fpr/female") == "minimize"  # a name guess said maximise
    assert tuning.direction("val/sex/tpr/female") == "maximize"
    assert tuning.direction("val/age/eo_gap") == "minimize"
    assert tuning.direction("val/sex/worst_auc") == "maximize"
    assert tuning.direction("val/bce") == "minimize"
    with pytest.raises(FairbenchError, match="not a metric fairbench can tune"):
        tuning.direction("val/sex/selection_rate/female")
    with pytest.raises(FairbenchError, match="has no group 'other'"):
        tuning.direction("val/sex/fpr/other", {"sex": ["female", "male"]})


def test_a_suites_fixed_option_is_not_tuned_and_reaches_trials_and_final_runs(tmp_path):
    path = tmp_path / "fixed.yaml"
    path.write_text(
        "name: fixed\ntrials: 2\nseeds: [0]\npruner: none\n"
        "datasets: {synthetic: {n_train: 64, n_val: 48, n_test: 48}}\nmethods: {nir: {lambda_nir: 0.5}}\n"
        "run: {backbone: test_resnet, image_size: 32, epochs: 1, batch_size: 32, bootstrap: 20, num_workers: 0,"
        " device: cpu}\n"
    )
    results = tmp_path / "results"
    out = CliRunner().invoke(main, ["suite", str(path), "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    study = optuna.load_study(study_name="fixed-synthetic-nir", storage=f"sqlite:///{results / 'optuna.db'}")
    assert all("lambda_nir" not in t.params for t in study.trials)
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string="tags.`fairbench.suite` = 'fixed'")
    kinds = sorted(r.data.tags["fairbench.kind"] for r in runs)
    assert kinds == ["run", "study", "trial", "trial"]
    assert all(r.data.params["method.lambda_nir"] == "0.5" for r in runs if r.data.tags["fairbench.kind"] != "study")


def test_filters_quote_values_with_quotes(tmp_path):
    from fairbench import tracking

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = client.create_experiment("x")
    for name in ("it's", 'say "hi"', "plain"):
        client.create_run(experiment, tags={"fairbench.suite": name, "fairbench.kind": "run"})
    for name in ("it's", 'say "hi"', "plain"):
        found = client.search_runs([experiment], filter_string=tracking.tag_filter(kind="run", suite=name))
        assert [r.data.tags["fairbench.suite"] for r in found] == [name]
    with pytest.raises(FairbenchError, match="both quote kinds"):
        tracking.tag_filter(suite='it\'s "both"')


def test_a_study_name_cannot_leave_the_studies_folder(tmp_path):
    out = cli_tune(tmp_path / "results", "--trials", "1", "--study-name", "../x")
    assert out.exit_code == 1 and "study name '../x'" in out.output
    assert "Traceback" not in out.output
    assert not (tmp_path / "results").exists() and not (tmp_path / "x_best.json").exists()


def write_suite(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


GOOD = "name: s\ndatasets: [synthetic]\nmethods: [erm]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: s\ndatasets: [synthetic]\nmethods: [ermm]\n", "methods: unknown method 'ermm'"),
        ("name: s\ndatasets: [synthetc]\nmethods: [erm]\n", "datasets: unknown dataset 'synthetc'"),
        (GOOD + "trials: two\n", "'trials' must be a whole number >= 1, not 'two'"),
        (GOOD + "seeds: 3\n", "'seeds' must be a non-empty list"),
        (GOOD + "run: {epochs: many}\n", "run: epochs = 'many' is not a valid"),
        (GOOD + "run: {results_dir: /tmp}\n", "belong(s) on the command line"),
        (GOOD + "run: {pretrained_file: ../w.pt}\n", "lies outside the suite's folder"),
        (GOOD + "objective: val/sex/selection_rate/female\n", "not a metric fairbench can tune"),
        ("name: ../s\ndatasets: [synthetic]\nmethods: [erm]\n", "suite name '../s'"),
        ("name: s\ndatasets: [synthetic]\nmethods: {nir: {lambda_nr: 0.5}}\n", "methods: nir: no option 'lambda_nr'"),
        ("name: s\ndatasets: [synthetic]\nmethods: {nir: {lambda_nir: high}}\n", "'lambda_nir' = 'high' is not"),
        ("name: s\ndatasets: [synthetic]\nmethods: {nir: {lambda_nir: -1}}\n", "outside its range"),
        ("name: s\ndatasets: {synthetic: {n_trainn: 5}}\nmethods: [erm]\n", "datasets: synthetic: no option"),
        ("!!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ],
)
def test_bad_suite_values_are_one_clear_line_and_write_nothing(tmp_path, text, message):
    path = write_suite(tmp_path, text)
    out = CliRunner().invoke(main, ["suite", str(path), "--results-dir", str(tmp_path / "results")])
    assert out.exit_code != 0
    assert message in out.output and str(path) in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_unreachable_stores_and_unknown_runs_are_clear_errors_that_write_nothing(tmp_path):
    from servers import free_port

    from fairbench import tracking

    results = tmp_path / "results"
    port = free_port()
    cases = [
        (["--tracking-uri", f"http://127.0.0.1:{port}"], "cannot reach the MLflow tracking server"),
        (["--storage", f"postgresql+psycopg://u:secret@127.0.0.1:{port}/db"], "cannot open the Optuna storage"),
        (["--storage", "redis://nowhere"], "cannot open the Optuna storage"),
    ]
    for args, message in cases:
        out = cli_tune(results, "--trials", "1", *args)
        assert out.exit_code == 1 and message in out.output, out.output
        assert "secret" not in out.output and "Traceback" not in out.output
        assert not results.exists()
    out = CliRunner().invoke(main, ["analyze", "neurons", "0123abcd", "--results-dir", str(results)])
    assert out.exit_code == 1 and "no MLflow store at" in out.output and not results.exists()
    tracking.open_store(f"sqlite:///{results / 'mlflow.db'}")
    out = CliRunner().invoke(main, ["analyze", "nc", "0123abcd", "--results-dir", str(results)])
    assert out.exit_code == 1 and "no run 0123abcd" in out.output
    assert "Traceback" not in out.output and not (results / "analysis").exists()


def test_a_killed_worker_no_longer_holds_the_budget_and_its_run_is_killed(tmp_path):
    """SQLite default: the next worker on the machine fails the dead worker's trial at once."""
    import os
    import signal
    import sqlite3
    import time

    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "fairbench.cli", "tune", "--method", "erm", *TINY, "--results-dir", str(results)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    slow = subprocess.Popen([*cmd, "--trials", "2", "--epochs", "500"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    epochs = 0
    while epochs < 1 and time.monotonic() < deadline and slow.poll() is None:
        time.sleep(1)
        if (results / "mlflow.db").exists():
            with sqlite3.connect(results / "mlflow.db", timeout=30) as con:
                epochs = con.execute("select count(*) from metrics where key = 'val/epoch_auc'").fetchone()[0]
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=60)
    assert epochs >= 1, "the first worker never got into its trial"
    out = cli_tune(results, "--trials", "2", "--epochs", "1", "--method", "erm", "--pruner", "none")
    assert out.exit_code == 0, out.output
    study = optuna.load_study(study_name="erm-synthetic", storage=f"sqlite:///{results / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params  # the dead worker's trial was retried
    runs = {r.data.tags["fairbench.trial"]: r.info.status for r in trial_runs(f"sqlite:///{results / 'mlflow.db'}",
            "erm-synthetic") if r.data.tags["fairbench.kind"] == "trial"}  # fmt: skip
    assert runs == {"0": "KILLED", "1": "FINISHED", "2": "FINISHED"}
