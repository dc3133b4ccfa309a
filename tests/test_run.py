"""End to end: a tiny run through the trainer into MLflow, checked against its own artifacts."""

import os
import subprocess
import sys
from typing import ClassVar

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fairlearn.metrics import MetricFrame, equalized_odds_difference, true_positive_rate
from sklearn.metrics import average_precision_score, roc_auc_score
from tiny import TINY_DATA, TINY_RUN

from fairbench.cli import main
from fairbench.experiment import run_experiment


def fetch(config, run_id, name):
    client = mlflow.MlflowClient(config.tracking_uri)
    return client.get_run(run_id), client.download_artifacts(run_id, name)


def test_logged_metrics_equal_recomputation_from_logged_predictions(tiny_config):
    config = tiny_config(threshold="youden")
    result = run_experiment(config, progress=False)
    run, path = fetch(config, result.run_id, "predictions_test.csv")
    assert run.info.status == "FINISHED"
    assert run.data.tags["fairbench.method"] == "erm"
    assert run.data.tags["fairbench.kind"] == "run"
    assert run.data.params["method"] == "erm"
    assert run.data.params["dataset.n_train"] == "96"
    m = run.data.metrics
    pred = pd.read_csv(path)
    s, y = pred["score"].to_numpy(), pred["label"].to_numpy()
    assert m["test/auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["test/ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    threshold = m["test/threshold"]
    assert threshold == m["val/threshold"]
    yhat = (s >= threshold).astype(int)
    for attr in ("sex", "age"):
        frame = MetricFrame(metrics=true_positive_rate, y_true=y, y_pred=yhat, sensitive_features=pred[attr])
        assert m[f"test/{attr}/tpr_gap"] == pytest.approx(frame.difference(), abs=1e-12)
        assert m[f"test/{attr}/eo_gap"] == pytest.approx(
            equalized_odds_difference(y, yhat, sensitive_features=pred[attr]), abs=1e-12
        )
    assert m["test/auc_ci_low"] <= m["test/auc"] <= m["test/auc_ci_high"]
    history = mlflow.MlflowClient(config.tracking_uri).get_metric_history(result.run_id, "val/epoch_auc")
    assert [h.step for h in history] == [0, 1]
    # the threshold was fitted on validation predictions, not test
    _, val_path = fetch(config, result.run_id, "predictions_val.csv")
    val = pd.read_csv(val_path)
    from fairbench.metrics import select_threshold

    assert threshold == select_threshold(val["score"], val["label"], "youden")


def _stop(epoch, values):
    raise KeyboardInterrupt


def _crash(epoch, values):
    raise RuntimeError("boom")


def test_interrupted_run_is_killed_failed_run_is_failed_next_run_finishes(tiny_config):
    config = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, on_epoch=_stop, progress=False)
    with pytest.raises(RuntimeError):
        run_experiment(tiny_config(), on_epoch=_crash, progress=False)
    done = run_experiment(tiny_config(), progress=False)
    runs = mlflow.search_runs(experiment_names=["synthetic"], output_format="list", order_by=["start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FAILED", "FINISHED"]
    assert runs[-1].info.run_id == done.run_id


def test_cli_run_prints_the_summary(tmp_path):
    results = tmp_path / "results"
    args = ["run", "--method", "erm", *TINY_RUN, *TINY_DATA, "--epochs", "1", "--results-dir", str(results)]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "sex: equalized-odds gap" in out.output
    run_id = out.output.split("MLflow run ")[1].split()[0]
    assert f"store sqlite:///{results / 'mlflow.db'}" in out.output
    run = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--method", "nope"], "error: unknown method 'nope'"),
        (["run", "--dataset", "synthetc"], "did you mean 'synthetic'?"),
        (["run", "-o", "lr=1"], "method 'erm' has no option 'lr'"),
        (["run", "--attribute", "race"], "dataset 'synthetic' has no attribute 'race'"),
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(args, message, tmp_path):
    out = CliRunner().invoke(main, [*args, "--results-dir", str(tmp_path)])
    assert out.exit_code == 2
    assert message in out.output
    assert "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "nan"], "--threshold nan: a fixed threshold is a probability in [0, 1]"),
        (["--threshold", "inf"], "--threshold inf: a fixed threshold is a probability in [0, 1]"),
        (["--threshold", "1.5"], "--threshold 1.5: a fixed threshold is a probability in [0, 1]"),
        (["-m", "adversarial", "-o", "lambda_adv=-1"], "-1.0 is outside its range [0, inf)"),
        (["-m", "nir", "-o", "lambda_nir=nan"], "option lambda_nir of method 'nir': nan is not a finite number"),
        (["-m", "reweight", "-o", "power=inf"], "option power of method 'reweight': inf is not a finite number"),
    ],
)
def test_bad_numbers_are_refused_before_training(args, message, tmp_path):
    out = CliRunner().invoke(main, ["run", *args, "--results-dir", str(tmp_path)])
    assert out.exit_code == 1
    assert message in out.output
    assert "Traceback" not in out.output
    assert not (tmp_path / "mlflow.db").exists()


def test_help_and_list_stay_light():
    code = "import sys, fairbench.cli; assert 'torch' not in sys.modules and 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = CliRunner().invoke(main, ["list"])
    assert out.exit_code == 0, out.output
    assert "erm" in out.output and "synthetic" in out.output and "built in" in out.output


def test_unprepared_dataset_names_the_prepare_command(tiny_config, tmp_path):
    from fairbench import registry
    from fairbench.data import Dataset
    from fairbench.errors import FairbenchError

    class Needs(Dataset):
        attributes: ClassVar[dict] = {"sex": ["female", "male"]}

    registry.datasets.register("needs_prepare", Needs)
    config = tiny_config(dataset="needs_prepare", dataset_options={}, data_dir=str(tmp_path))
    with pytest.raises(FairbenchError, match="run 'fairbench prepare needs_prepare --source"):
        run_experiment(config, progress=False)
    assert not np.any(
        [
            r
            for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if r.data.tags.get("fairbench.dataset") == "needs_prepare"
        ]
    )


def test_ctrl_c_during_an_epoch_records_killed_and_the_next_run_works(tmp_path):
    import signal
    import time

    results = tmp_path / "results"
    cli = ["run", *TINY_RUN, *TINY_DATA, "--results-dir", str(results)]
    args = [sys.executable, "-m", "fairbench.cli", *cli, "--epochs", "500", "--patience", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("epoch 2:") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output
    assert "recorded as KILLED" in output
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = [client.get_experiment_by_name("synthetic").experiment_id]
    assert [r.info.status for r in client.search_runs(experiment)] == ["KILLED"]
    again = CliRunner().invoke(main, [*cli, "--epochs", "1"])
    assert again.exit_code == 0, again.output
    assert sorted(r.info.status for r in client.search_runs(experiment)) == ["FINISHED", "KILLED"]
