# ruff: noqa: F811  (the server fixtures are imported, then named as test arguments)
"""Scale-out against real servers: PostgreSQL for Optuna, an MLflow tracking server on PostgreSQL.

The commands are those of the README's scale-out section. Servers come from tests/servers.py.
"""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from servers import mlflow_server, postgres  # noqa: F401  (pytest fixtures used by name below)
from tiny import TINY_DATA, TINY_RUN

TINY = [*TINY_RUN, *TINY_DATA, "--epochs", "1", "--patience", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "fairbench.cli"]


@pytest.fixture(scope="module")
def optuna_url(postgres):
    return postgres.create_database("optuna")


def runs_of(uri, query):
    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=query, max_results=1000)


def start(args, tmp_path):
    return subprocess.Popen(
        [*CLI, *args, "--results-dir", str(tmp_path / "results")],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(procs, timeout=900):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-2000:] for o in outputs)
    return outputs


def test_three_tune_workers_share_one_postgres_study_and_one_tracking_server(
    optuna_url,
    mlflow_server,
    tmp_path,
):
    args = ["tune", "--method", "erm", *TINY, "--trials", "5", "--pruner", "none", "--study-name", "scale-tune",
            "--storage", optuna_url, "--tracking-uri", mlflow_server]  # fmt: skip
    outputs = finish([start(args, tmp_path) for _ in range(3)])
    news = [int(o.split(" new)")[0].rsplit("(", 1)[1]) for o in outputs]
    assert sum(news) == 5  # the budget holds exactly: no worker overshoots
    study = optuna.load_study(study_name="scale-tune", storage=optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    runs = runs_of(mlflow_server, "tags.`fairbench.study` = 'scale-tune'")
    trials = sorted(int(r.data.tags["fairbench.trial"]) for r in runs if r.data.tags["fairbench.kind"] == "trial")
    assert trials == list(range(5))  # every trial's run exactly once
    assert [r.info.status for r in runs if r.data.tags["fairbench.kind"] == "study"] == ["FINISHED"]


def test_a_sigkilled_remote_worker_is_detected_by_its_heartbeat(optuna_url, mlflow_server, tmp_path):
    base = ["tune", "--method", "erm", *TINY, "--trials", "2", "--pruner", "none", "--study-name", "scale-kill",
            "--storage", optuna_url, "--tracking-uri", mlflow_server, "--heartbeat-interval", "1",
            "--grace-period", "4"]  # fmt: skip
    slow = start([*base, "--epochs", "500"], tmp_path)
    study = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and slow.poll() is None:
        time.sleep(1)
        runs = runs_of(mlflow_server, "tags.`fairbench.study` = 'scale-kill' and tags.`fairbench.kind` = 'trial'")
        if runs and "val/epoch_auc" in runs[0].data.metrics:
            break
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=60)
    study = optuna.load_study(study_name="scale-kill", storage=optuna_url)
    assert [t.state.name for t in study.trials] == ["RUNNING"]
    # make the dead worker look like one on another machine: only its heartbeat can tell
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("scale-kill"), 0)
    storage.set_trial_user_attr(trial_id, "worker", "elsewhere:1:1")
    run = runs_of(mlflow_server, "tags.`fairbench.study` = 'scale-kill' and tags.`fairbench.kind` = 'trial'")[0]
    mlflow.MlflowClient(mlflow_server).set_tag(run.info.run_id, "fairbench.worker", "elsewhere:1:1")
    time.sleep(5)  # longer than the grace period
    finish([start(base, tmp_path)])
    study = optuna.load_study(study_name="scale-kill", storage=optuna_url)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    statuses = {
        r.data.tags["fairbench.trial"]: r.info.status
        for r in runs_of(mlflow_server, "tags.`fairbench.study` = 'scale-kill' and tags.`fairbench.kind` = 'trial'")
    }
    assert statuses == {"0": "KILLED", "1": "FINISHED", "2": "FINISHED"}


SUITE = """name: scale
trials: 2
seeds: [0, 1]
pruner: none
datasets: {synthetic: {n_train: 64, n_val: 48, n_test: 48}}
methods: [erm, nir]
run: {backbone: test_resnet, image_size: 32, epochs: 1, batch_size: 32, bootstrap: 20, num_workers: 0, device: cpu}
"""


def test_two_suite_workers_on_the_servers_train_everything_once(optuna_url, mlflow_server, tmp_path):
    path = tmp_path / "scale.yaml"
    path.write_text(SUITE)
    args = ["suite", str(path), "--storage", optuna_url, "--tracking-uri", mlflow_server]
    finish([start(args, tmp_path / f"w{i}") for i in range(2)])
    for method in ("erm", "nir"):
        study = optuna.load_study(study_name=f"scale-synthetic-{method}", storage=optuna_url)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    runs = runs_of(mlflow_server, "tags.`fairbench.suite` = 'scale'")
    final = sorted((r.data.tags["fairbench.method"], r.data.tags["fairbench.seed"], r.info.status)
                   for r in runs if r.data.tags["fairbench.kind"] == "run")  # fmt: skip
    assert final == [(m, s, "FINISHED") for m in ("erm", "nir") for s in ("0", "1")]
    assert len([r for r in runs if r.data.tags["fairbench.kind"] == "trial"]) == 4
    board = subprocess.run(
        [*CLI, "leaderboard", "--suite", "scale", "--tracking-uri", mlflow_server, "--format", "csv", "--no-plots",
         "--results-dir", str(tmp_path / "board")], env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert board.returncode == 0, board.stderr
    assert "erm" in board.stdout and "nir" in board.stdout


def test_eight_concurrent_runs_into_the_tracking_server(mlflow_server, tmp_path):
    procs = [start(["run", "--method", "erm", *TINY, "--seed", str(100 + i), "--tracking-uri", mlflow_server],
                   tmp_path) for i in range(8)]  # fmt: skip
    finish(procs)
    runs = runs_of(mlflow_server, "tags.`fairbench.kind` = 'run' and tags.`fairbench.method` = 'erm'")
    mine = [r for r in runs if int(r.data.tags["fairbench.seed"]) >= 100]
    assert sorted(int(r.data.tags["fairbench.seed"]) for r in mine) == list(range(100, 108))
    assert {r.info.status for r in mine} == {"FINISHED"}
    assert all("test/auc" in r.data.metrics and "val/sex/eo_gap" in r.data.metrics for r in mine)
