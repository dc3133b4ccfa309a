"""Fault table: inject the faults of long campaigns and count what survived.

Each row injects one fault a number of times and compares the trials and runs the stores hold
afterwards with what a fault-free campaign would hold (expected vs found), all on tiny runs
(timm's test_resnet, 32 px, synthetic data, CPU). Faults on the embedded SQLite stores always
run; the server rows (PostgreSQL + MLflow tracking server, from tests/servers.py) run where
the PostgreSQL binaries are installed and say "not measured: <why>" otherwise.

    nice -n 10 python benchmarks/faults.py            # prints the markdown table
    nice -n 10 python benchmarks/faults.py --repeats 2 --seed 1 --skip "8 concurrent" --no-servers

The table has the same columns every time; RESULTS.md records dated copies.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import random
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "32", "--device", "cpu",
        "--num-workers", "0", "--bootstrap", "20", "-D", "n_train=64", "-D", "n_val=48", "-D", "n_test=48",
        "--patience", "0"]  # fmt: skip
CLI = [sys.executable, "-m", "fairbench.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SUITE = """name: faults
trials: 3
seeds: [0, 1]
pruner: none
datasets: {synthetic: {n_train: 64, n_val: 48, n_test: 48}}
methods: [erm]
run: {backbone: test_resnet, image_size: 32, epochs: 3, patience: 0, batch_size: 32, bootstrap: 20, num_workers: 0,
      device: cpu}
"""


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def call(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=1800)


def runs(uri: str, query: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=query, max_results=5000) if ids else []


def trial_states(storage: str, name: str) -> list[str]:
    import optuna

    try:
        return [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    except KeyError:
        return []


def wait_for_epoch(query: Callable[[], bool], proc: subprocess.Popen, seconds: float) -> bool:
    """Wait until ``query`` says a trial has logged an epoch (or the worker exits, or time runs out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1)
        with contextlib.suppress(Exception):
            if query():
                return True
    return False


def sqlite_epochs(db: Path) -> bool:
    if not db.exists():
        return False
    with sqlite3.connect(db, timeout=30) as con:
        return con.execute("select count(*) from metrics where key = 'val/epoch_auc'").fetchone()[0] > 0


def concurrent_runs(n: int, args: list[str], first_seed: int = 0) -> int:
    procs = [start(["run", "--method", "erm", *TINY, "--epochs", "1", "--seed", str(first_seed + i), *args])
             for i in range(n)]  # fmt: skip
    return sum(p.wait(timeout=1800) != 0 for p in procs)


def complete_runs(uri: str, seeds: range) -> int:
    wanted = {str(s) for s in seeds}
    found = runs(uri, "tags.`fairbench.kind` = 'run' and attributes.status = 'FINISHED'")
    full = [r for r in found if r.data.tags["fairbench.seed"] in wanted and "test/auc" in r.data.metrics]
    return len(full)


def fault_concurrent_fresh(folder: Path, repeats: int, rng: random.Random) -> tuple[str, str, str]:
    crashed = found = 0
    for i in range(repeats):
        results = folder / f"fresh{i}"
        crashed += concurrent_runs(8, ["--results-dir", str(results)])
        found += complete_runs(f"sqlite:///{results / 'mlflow.db'}", range(8))
    return f"runs {8 * repeats}", f"runs {found}, crashed processes {crashed}", ""


def fault_concurrent_existing(folder: Path, repeats: int, rng: random.Random) -> tuple[str, str, str]:
    results = folder / "existing"
    from fairbench import tracking

    tracking.open_store(f"sqlite:///{results / 'mlflow.db'}")
    crashed = found = 0
    for i in range(repeats):
        crashed += concurrent_runs(8, ["--results-dir", str(results)], first_seed=100 * (i + 1))
        found += complete_runs(f"sqlite:///{results / 'mlflow.db'}", range(100 * (i + 1), 100 * (i + 1) + 8))
    return f"runs {8 * repeats}", f"runs {found}, crashed processes {crashed}", ""


def fault_damaged_store(folder: Path, repeats: int, rng: random.Random) -> tuple[str, str, str]:
    from fairbench import tracking

    refused = unchanged = 0
    for i in range(repeats):
        db = folder / f"damaged{i}" / "mlflow.db"
        tracking.open_store(f"sqlite:///{db}")
        with sqlite3.connect(db) as con:
            con.execute("create table _alembic_tmp_tags (key text)")
        before = hashlib.sha256(db.read_bytes()).hexdigest()
        out = call(["run", *TINY, "--epochs", "1", "--results-dir", str(db.parent)])
        refused += out.returncode == 1 and "is damaged" in out.stderr + out.stdout
        unchanged += hashlib.sha256(db.read_bytes()).hexdigest() == before
    return f"refused {repeats}, unchanged {repeats}", f"refused {refused}, unchanged {unchanged}", ""


def fault_killed_tune_worker(folder: Path, repeats: int, rng: random.Random) -> tuple[str, str, str]:
    complete = killed = 0
    for i in range(repeats):
        results = folder / f"tune{i}"
        base = ["tune", "--method", "erm", *TINY, "--trials", "2", "--pruner", "none", "--results-dir", str(results)]
        slow = start([*base, "--epochs", "500"])
        wait_for_epoch(lambda r=results: sqlite_epochs(r / "mlflow.db"), slow, 600)
        slow.send_signal(signal.SIGKILL)
        slow.wait()
        call([*base, "--epochs", "1"])
        complete += trial_states(f"sqlite:///{results / 'optuna.db'}", "erm-synthetic").count("COMPLETE")
        trial_runs = runs(f"sqlite:///{results / 'mlflow.db'}", "tags.`fairbench.kind` = 'trial'")
        killed += sum(r.info.status == "KILLED" for r in trial_runs)
    return (
        f"complete trials {2 * repeats}, KILLED runs {repeats}",
        f"complete trials {complete}, KILLED runs {killed}",
        "",
    )


def fault_killed_suite(folder: Path, repeats: int, rng: random.Random) -> tuple[str, str, str]:
    complete = finished = duplicates = redone = 0
    delays = []
    for i in range(repeats):
        results = folder / f"suite{i}"
        path = folder / f"faults{i}.yaml"
        path.write_text(SUITE)
        args = ["suite", str(path), "--results-dir", str(results)]
        delay = rng.uniform(5, 60)
        delays.append(f"{delay:.0f}")
        proc = start(args)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = 0
        with contextlib.suppress(Exception):
            done = trial_states(f"sqlite:///{results / 'optuna.db'}", "faults-synthetic-erm").count("COMPLETE")
        out = call(args)
        new = int(out.stdout.split(" new trials")[0].rsplit(" ", 1)[1]) if " new trials" in out.stdout else -1
        redone += new - (3 - done)  # trials trained again although they had finished
        complete += trial_states(f"sqlite:///{results / 'optuna.db'}", "faults-synthetic-erm").count("COMPLETE")
        final = runs(
            f"sqlite:///{results / 'mlflow.db'}", "tags.`fairbench.kind` = 'run' and attributes.status = 'FINISHED'"
        )
        seeds = [r.data.tags["fairbench.seed"] for r in final]
        finished += len(set(seeds))
        duplicates += len(seeds) - len(set(seeds))
    return (
        f"complete trials {3 * repeats}, seeds {2 * repeats}, redone 0, duplicates 0",
        f"complete trials {complete}, seeds {finished}, redone {redone}, duplicates {duplicates}",
        f"killed after {', '.join(delays)} s",
    )


def server_faults(folder: Path, repeats: int, rng: random.Random) -> list[tuple[str, str, str, str, str]]:
    import mlflow
    import optuna
    from servers import UnavailableError, running_mlflow_server, running_postgres

    names = ["3 tune workers, one PostgreSQL study", "worker SIGKILLed on another machine (heartbeat)",
             "8 concurrent runs into the MLflow server"]  # fmt: skip
    try:
        with running_postgres() as pg, running_mlflow_server(pg, folder) as server:
            storage = pg.create_database("optuna")
            rows = []
            base = ["tune", "--method", "erm", *TINY, "--epochs", "1", "--pruner", "none", "--storage", storage,
                    "--tracking-uri", server, "--results-dir", str(folder / "server")]  # fmt: skip
            complete = trial_runs = 0
            for i in range(repeats):
                procs = [start([*base, "--trials", "5", "--study-name", f"three{i}"]) for _ in range(3)]
                [p.wait(timeout=1800) for p in procs]
                complete += trial_states(storage, f"three{i}").count("COMPLETE")
                trial_runs += len(
                    runs(server, f"tags.`fairbench.study` = 'three{i}' and tags.`fairbench.kind` = 'trial'")
                )
            rows.append((names[0], f"x{repeats}", f"trials {5 * repeats}, runs {5 * repeats}",
                         f"trials {complete}, runs {trial_runs}", "budget 5 per study"))  # fmt: skip
            complete = killed = 0
            for i in range(repeats):
                name = f"remote{i}"
                args = [*base, "--trials", "2", "--study-name", name, "--heartbeat-interval", "1",
                        "--grace-period", "4"]  # fmt: skip
                query = f"tags.`fairbench.study` = '{name}' and tags.`fairbench.kind` = 'trial'"
                slow = start([*args, "--epochs", "500"])
                wait_for_epoch(lambda q=query: "val/epoch_auc" in runs(server, q)[0].data.metrics, slow, 600)
                slow.send_signal(signal.SIGKILL)
                slow.wait()
                store = optuna.load_study(study_name=name, storage=storage)._storage
                trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(name), 0)
                store.set_trial_user_attr(trial_id, "worker", "elsewhere:1:1")
                mlflow.MlflowClient(server).set_tag(
                    runs(server, query)[0].info.run_id, "fairbench.worker", "elsewhere:1:1"
                )
                time.sleep(5)
                call(args)
                complete += trial_states(storage, name).count("COMPLETE")
                killed += sum(r.info.status == "KILLED" for r in runs(server, query))
            rows.append((names[1], f"x{repeats}", f"complete trials {2 * repeats}, KILLED runs {repeats}",
                         f"complete trials {complete}, KILLED runs {killed}", "grace period 4 s"))  # fmt: skip
            crashed = found = 0
            for i in range(repeats):
                first = 1000 * (i + 1)
                crashed += concurrent_runs(
                    8, ["--tracking-uri", server, "--results-dir", str(folder / "server")], first
                )
                found += complete_runs(server, range(first, first + 8))
            rows.append((names[2], f"x{repeats}", f"runs {8 * repeats}", f"runs {found}, crashed processes {crashed}",
                         ""))  # fmt: skip
            return rows
    except UnavailableError as exc:
        return [(name, "-", "-", f"not measured: {exc}", "") for name in names]


FAULTS = [
    ("8 concurrent runs, new SQLite store", fault_concurrent_fresh),
    ("8 concurrent runs, existing SQLite store", fault_concurrent_existing),
    ("store damaged by an interrupted migration", fault_damaged_store),
    ("tune worker SIGKILLed mid-trial (SQLite)", fault_killed_tune_worker),
    ("suite SIGKILLed at a random point, restarted", fault_killed_suite),
]


def header() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"### Fault table ({stamp})\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"`nice -n 10 python benchmarks/faults.py {shlex.join(sys.argv[1:])}`.\n\n"
        "| fault injected | how often | expected | found | note |\n| --- | --- | --- | --- | --- |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="injections per fault")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--no-servers", action="store_true", help="skip the PostgreSQL / MLflow server rows")
    parser.add_argument("--skip", action="append", default=[], help="skip the faults whose name holds this text")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    print(header(), flush=True)  # rows follow as each fault is done

    def row(values: tuple[str, ...]) -> None:
        print("| " + " | ".join(values) + " |", flush=True)

    with tempfile.TemporaryDirectory(prefix="fairbench-faults-") as tmp:
        folder = Path(tmp)
        for name, fault in FAULTS:
            if any(text in name for text in args.skip):
                row((name, "-", "-", "not measured: skipped (--skip)", ""))
                continue
            expected, found, note = fault(folder, args.repeats, rng)
            row((name, f"x{args.repeats}", expected, found, note))
        if args.no_servers:
            row(("PostgreSQL / MLflow server faults", "-", "-", "not measured: --no-servers", ""))
        else:
            server = folder / "servers"
            server.mkdir()
            for values in server_faults(server, args.repeats, rng):
                row(values)
    print(f"\nTotal {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
