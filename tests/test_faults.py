"""Faults on the embedded SQLite stores: concurrent first use, a damaged store, a suite killed
with SIGKILL and restarted."""

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import mlflow
import optuna
from click.testing import CliRunner
from tiny import TINY_DATA, TINY_RUN

from fairbench.cli import main

RUN = [sys.executable, "-m", "fairbench.cli", "run", "--method", "erm", *TINY_RUN, *TINY_DATA, "--epochs", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def concurrent_runs(n, *args, timeout=900):
    """Start ``n`` tiny ``fairbench run`` processes at once; their exit codes and outputs."""
    procs = [
        subprocess.Popen([*RUN, "--seed", str(i), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for i in range(n)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def finished_runs(uri):
    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string="tags.`fairbench.kind` = 'run'", max_results=1000)


def test_eight_concurrent_runs_share_one_new_sqlite_store(tmp_path):
    results = tmp_path / "results"
    codes, outputs = concurrent_runs(8, "--results-dir", str(results))
    assert codes == [0] * 8, "\n".join(o[-2000:] for o in outputs)
    runs = finished_runs(f"sqlite:///{results / 'mlflow.db'}")
    assert sorted(int(r.data.tags["fairbench.seed"]) for r in runs) == list(range(8))
    assert {r.info.status for r in runs} == {"FINISHED"}
    reference = set(runs[0].data.metrics)
    assert "test/auc" in reference and "val/sex/eo_gap" in reference
    assert all(set(r.data.metrics) == reference for r in runs)  # no partial run
    assert not list(results.glob(".mlflow.db.*.tmp"))


def test_a_damaged_store_is_refused_and_left_as_it_was(tmp_path):
    results = tmp_path / "results"
    db = results / "mlflow.db"
    db.parent.mkdir()
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()  # a healthy store, made by another program
    with sqlite3.connect(db) as con:  # what an interrupted migration leaves behind
        con.execute("create table _alembic_tmp_tags (key text)")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    out = CliRunner().invoke(main, ["run", *TINY_RUN, *TINY_DATA, "--epochs", "1", "--results-dir", str(results)])
    assert out.exit_code == 1
    assert f"MLflow store {db} is damaged" in out.output and "_alembic_tmp_tags" in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


SUITE = """name: crash
trials: 3
seeds: [0, 1]
pruner: none
datasets: {synthetic: {n_train: 64, n_val: 48, n_test: 48}}
methods: [erm]
run: {backbone: test_resnet, image_size: 32, epochs: 3, patience: 0, batch_size: 32, bootstrap: 20, num_workers: 0,
      device: cpu}
"""


def suite_state(results):
    study = optuna.load_study(study_name="crash-synthetic-erm", storage=f"sqlite:///{results / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    runs = [r for r in finished_runs(f"sqlite:///{results / 'mlflow.db'}") if r.info.status == "FINISHED"]
    return states, runs


def test_a_suite_killed_at_a_random_point_resumes_without_redoing_or_duplicating(tmp_path):
    path = tmp_path / "crash.yaml"
    path.write_text(SUITE)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "fairbench.cli", "suite", str(path), "--results-dir", str(results)]
    delay = random.Random(os.environ.get("FAIRBENCH_FAULT_SEED")).uniform(5, 60)
    print(f"SIGKILL after {delay:.1f} s")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_trials, done_runs = 0, 0
    if (results / "optuna.db").exists() and (results / "mlflow.db").exists():
        try:
            states, runs = suite_state(results)
            done_trials, done_runs = states.count("COMPLETE"), len(runs)
        except (KeyError, ValueError):  # killed before the study existed
            pass
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"suite crash: {3 - done_trials} new trials, {2 - done_runs} new runs" in again.stdout
    states, runs = suite_state(results)
    assert states.count("COMPLETE") == 3 and states.count("FAIL") <= 1 and "RUNNING" not in states
    assert sorted(int(r.data.tags["fairbench.seed"]) for r in runs) == [0, 1]  # each seed once
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    every = client.search_runs(ids, filter_string="tags.`fairbench.suite` = 'crash'")
    assert "RUNNING" not in {r.info.status for r in every}
    trials = [r for r in every if r.data.tags["fairbench.kind"] == "trial" and r.info.status == "FINISHED"]
    assert len(trials) == 3 == len({r.data.tags["fairbench.trial"] for r in trials})
