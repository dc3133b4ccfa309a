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
