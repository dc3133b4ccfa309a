"""The ``fairbench`` command line.

Heavy libraries (torch, timm, mlflow) are imported inside the commands that need them, so
``fairbench --help`` and ``fairbench list`` answer quickly.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from fairbench import __version__
from fairbench.errors import FairbenchError


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a FairbenchError as one line and exit with its code; Ctrl-C exits 130."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FairbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: any active run was recorded as KILLED", err=True)
            sys.exit(130)

    return wrapper


def _console():
    from rich.console import Console

    return Console()


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fairbench")
def main() -> None:
    """Compare fairness methods for medical image classification on equal terms."""


@main.command("list")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of prepared datasets [default: $FAIRBENCH_DATA or ~/.cache/fairbench].",
)
@_fail_cleanly
def list_(data_dir: str | None) -> None:
    """List the methods and datasets that are installed (from a cached catalog: no torch import)."""
    from pathlib import Path

    from rich.table import Table

    from fairbench import registry
    from fairbench.paths import default_data_dir

    folder = Path(data_dir) if data_dir else default_data_dir()
    found = registry.catalog()
    broken = []
    console = _console()
    table = Table(title="methods")
    table.add_column("name")
    table.add_column("uses attributes in training")
    table.add_column("uses attributes at test")
    table.add_column("description")
    for name, entry in found["methods"].items():
        if "error" in entry:
            broken.append(entry["error"])
            continue
        yes_no = ["yes" if entry[k] else "no" for k in ("uses_attributes", "uses_attributes_at_test")]
        table.add_row(name, *yes_no, entry["summary"])
    console.print(table)
    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("attributes (groups)")
    table.add_column("prepared")
    for name, entry in found["datasets"].items():
        if "error" in entry:
            broken.append(entry["error"])
            continue
        attrs = "; ".join(f"{a}: {', '.join(g)}" for a, g in entry["attributes"].items())
        if not entry["needs_prepare"]:
            state = "built in"
        else:
            state = "yes" if registry.is_prepared(folder, entry) else f"no (fairbench prepare {name})"
        table.add_row(name, attrs, state)
    console.print(table)
    for line in broken:
        click.echo(f"warning: {line}", err=True)


@main.command()
@click.argument("dataset")
@click.option(
    "--source", required=True, type=click.Path(file_okay=False), help="Folder of the raw download, as published."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where prepared datasets go [default: $FAIRBENCH_DATA or ~/.cache/fairbench].",
)
@click.option(
    "--size",
    type=click.IntRange(min=8),
    default=None,
    help="Side of the cached square images [default: the dataset's].",
)
@click.option("--force", is_flag=True, help="Rebuild the cache even if it exists.")
@click.option("--skip-missing", is_flag=True, help="Leave out images listed in the metadata but not found.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Decoding processes [default: the core count]."
)
@_fail_cleanly
def prepare(
    dataset: str,
    source: str,
    data_dir: str | None,
    size: int | None,
    force: bool,
    skip_missing: bool,
    workers: int | None,
) -> None:
    """Read a dataset's raw download once, validate it and cache it for training."""
    import time

    from fairbench import registry
    from fairbench.config import RunConfig
    from fairbench.prepare import prepare as run_prepare

    cls = registry.datasets.get(dataset)
    if not cls.needs_prepare:
        raise FairbenchError(f"dataset '{dataset}' is built in and needs no preparation")
    folder = RunConfig(data_dir=data_dir).resolved_data_dir()
    started = time.perf_counter()
    done = run_prepare(cls(), source, folder, size=size, force=force, skip_missing=skip_missing, workers=workers)
    if done.reused:
        click.echo(f"{dataset} is already prepared in {done.folder} from this source (--force rebuilds it)")
    _print_report(dataset, done.report)
    for key, value in done.report.items():  # dataset-specific counts, e.g. subjects left out
        if key not in ("total", "splits", "skipped_missing"):
            click.echo(f"{key.replace('_', ' ')}: {value}")
    if done.report.get("skipped_missing"):
        click.echo(f"warning: {done.report['skipped_missing']} listed image(s) were missing and left out", err=True)
    if not done.reused:
        n = done.report["total"]
        seconds = time.perf_counter() - started
        click.echo(
            f"prepared {n} images in {seconds:.1f} s ({1000 * seconds / max(n, 1):.1f} ms per image) into {done.folder}"
        )


def _print_report(dataset: str, report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{dataset}: images per split x label x group")
    table.add_column("attribute")
    table.add_column("group")
    splits = list(report["splits"])
    for split in splits:
        table.add_column(f"{split} neg", justify="right")
        table.add_column(f"{split} pos", justify="right")
    first = report["splits"][splits[0]]
    attributes = [k for k in first if k not in ("n", "label")]
    table.add_row("(all)", "", *[report["splits"][s]["label"].get(y, 0).__str__() for s in splits for y in "01"])
    for attr in attributes:
        groups = list(dict.fromkeys(g for s in splits for g in report["splits"][s][attr]))
        for group in groups:
            cells = [str(report["splits"][s][attr].get(group, {}).get(y, 0)) for s in splits for y in "01"]
            table.add_row(attr, group, *cells)
    _console().print(table)


def _complete_names(kind: str) -> Callable[..., list[str]]:
    """Shell completion of plugin names from the entry points alone (nothing is imported)."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        from fairbench import registry

        reg = registry.methods if kind == "method" else registry.datasets
        return [n for n in reg.names() if n.startswith(incomplete)]

    return complete


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that define a run; shared by ``run`` and ``tune``."""
    for option in reversed(_RUN_OPTIONS):
        fn = option(fn)
    return fn


_RUN_OPTIONS = [
    click.option(
        "--method",
        "-m",
        default="erm",
        show_default=True,
        shell_complete=_complete_names("method"),
        help="Method name (see 'fairbench list').",
    ),
    click.option(
        "--dataset",
        "-d",
        default="synthetic",
        show_default=True,
        shell_complete=_complete_names("dataset"),
        help="Dataset name.",
    ),
    click.option(
        "--option",
        "-o",
        "method_pairs",
        multiple=True,
        metavar="KEY=VALUE",
        help="A method option, e.g. -o lambda_nir=0.2 (repeatable).",
    ),
    click.option(
        "--dataset-option",
        "-D",
        "dataset_pairs",
        multiple=True,
        metavar="KEY=VALUE",
        help="A dataset option, e.g. -D label_noise=0.3 (repeatable).",
    ),
    click.option("--backbone", default="resnet18", show_default=True, help="Any timm model name."),
    click.option(
        "--pretrained/--no-pretrained",
        default=False,
        show_default=True,
        help="Start from timm's pretrained weights (downloads them).",
    ),
    click.option(
        "--pretrained-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Start from weights in a local checkpoint (offline).",
    ),
    click.option(
        "--finetune",
        type=click.Choice(["full", "linear", "lora", "last-n"]),
        default="full",
        show_default=True,
        help="Which backbone parameters train: all, the head only (linear probing), LoRA adapters + head, "
        "or the last --last-n blocks + head.",
    ),
    click.option(
        "--last-n",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Blocks trained by --finetune last-n.",
    ),
    click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True),
    click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True),
    click.option(
        "--lora-targets",
        default=None,
        metavar="NAMES",
        help="Comma-separated module names LoRA adapts, e.g. attn.qkv,attn.proj [default: ViT attention qkv and "
        "proj; other models every non-grouped conv and linear layer].",
    ),
    click.option("--lora-dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True),
    click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True),
    click.option(
        "--patience",
        type=click.IntRange(min=0),
        default=3,
        show_default=True,
        help="Stop after this many epochs without a better validation AUC (0: never).",
    ),
    click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True),
    click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True),
    click.option("--optimizer", type=click.Choice(["adamw", "adam"]), default="adamw", show_default=True),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option(
        "--image-size", type=click.IntRange(min=8), default=None, help="Input size in pixels [default: the dataset's]."
    ),
    click.option(
        "--threshold",
        default="0.5",
        show_default=True,
        help="Decision threshold: a number, or 'youden' / 'f1' fitted on validation.",
    ),
    click.option(
        "--attribute",
        default=None,
        help="Attribute given to attribute-aware methods in training [default: the dataset's first]; "
        "two crossed, e.g. race×sex (or race*sex, race_x_sex), are intersectional groups. "
        "Evaluation always covers every attribute.",
    ),
    click.option(
        "--bootstrap",
        type=click.IntRange(min=0),
        default=1000,
        show_default=True,
        help="Bootstrap resamples for the test confidence intervals.",
    ),
    click.option(
        "--select",
        type=click.Choice(["val_auc", "worst_group_auc", "val_loss"]),
        default="val_auc",
        show_default=True,
        help="Validation rule that picks the epoch (and drives early stopping); worst_group_auc uses --attribute.",
    ),
    click.option(
        "--min-group-count",
        type=click.IntRange(min=1),
        default=20,
        show_default=True,
        help="A group enters a gap only with this many positives (TPR) / negatives (FPR) / both (AUC).",
    ),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option(
        "--num-workers",
        type=click.IntRange(min=0),
        default=None,
        help="DataLoader workers [default: from the core count].",
    ),
    click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the backbone."),
    click.option(
        "--deterministic/--no-deterministic",
        default=True,
        show_default=True,
        help="Deterministic kernels: the same seed gives the same numbers (see README, 'The fast path').",
    ),
    click.option(
        "--label-bias",
        default=None,
        metavar="ATTR=GROUP:FRACTION",
        help="Flip that fraction of the group's positive training labels to negative, e.g. sex=female:0.3.",
    ),
    click.option(
        "--track-nc/--no-track-nc",
        default=False,
        show_default=True,
        help="Log neural-collapse metrics per subgroup each epoch (one extra pass over the training set).",
    ),
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder of prepared datasets [default: $FAIRBENCH_DATA or ~/.cache/fairbench].",
    ),
    click.option("--results-dir", type=click.Path(file_okay=False), default="results", show_default=True),
    click.option(
        "--tracking-uri",
        default=None,
        help="MLflow store [default: $MLFLOW_TRACKING_URI or sqlite:///<results-dir>/mlflow.db].",
    ),
]


@main.command()
@run_options
@_fail_cleanly
def run(method_pairs: tuple[str, ...], dataset_pairs: tuple[str, ...], **kw: Any) -> None:
    """Train one method on one dataset, evaluate it and record it in MLflow."""
    from fairbench.experiment import run_experiment

    config = _run_config(method_pairs, dataset_pairs, kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = run_experiment(config)
    _print_summary(config, result)
    _show_warnings([w for w in caught if w.category.__module__.startswith("fairbench")])
    for w in result.test.warnings:
        click.echo(f"warning: test: {w}", err=True)


TRAIN_OPTIONS = (
    "epochs",
    "patience",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "seed",
    "device",
    "num_workers",
    "compile",
    "select",
    "deterministic",
)


def _run_config(method_pairs: tuple[str, ...], dataset_pairs: tuple[str, ...], kw: dict[str, Any]) -> Any:
    """The RunConfig the run options describe; plugin options converted by the plugin's signature."""
    from fairbench import options, registry
    from fairbench.config import RunConfig
    from fairbench.trainer import TrainConfig

    method_cls = registry.methods.get(kw["method"])
    dataset_cls = registry.datasets.get(kw["dataset"])
    train = TrainConfig(**{k: kw.pop(k) for k in TRAIN_OPTIONS})
    return RunConfig(
        method_options=options.parse(method_cls, method_pairs, f"method '{kw['method']}'"),
        dataset_options=options.parse(dataset_cls, dataset_pairs, f"dataset '{kw['dataset']}'"),
        train=train,
        **kw,
    )


def heartbeat_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How a worker signals it is alive, and when a silent one counts as dead; shared by tune and suite."""
    fn = click.option(
        "--grace-period",
        type=click.IntRange(min=2),
        default=120,
        show_default=True,
        help="Seconds without a heartbeat after which another worker's trial or run counts as dead.",
    )(fn)
    return click.option(
        "--heartbeat-interval",
        type=click.IntRange(min=1),
        default=60,
        show_default=True,
        help="Seconds between heartbeats of a running trial or run.",
    )(fn)


@main.command()
@run_options
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Budget: finished trials the study should hold (a rerun continues up to it).",
)
@click.option(
    "--objective",
    "objective",
    default=None,
    help="Validation metric to optimise [default: val/auc], e.g. val/sex/eo_gap.",
)
@click.option(
    "--objectives",
    "objectives",
    default=None,
    help="Several validation metrics, comma-separated, for a Pareto front, e.g. val/auc,val/sex/eo_gap.",
)
@click.option("--storage", default=None, help="Optuna storage URL [default: sqlite:///<results-dir>/optuna.db].")
@click.option("--study-name", default=None, help="[default: <method>-<dataset>]")
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default="median", show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Stop starting trials after this many s.")
@click.option("--sampler-seed", type=int, default=0, show_default=True)
@heartbeat_options
@_fail_cleanly
def tune(
    method_pairs,
    dataset_pairs,
    trials,
    objective,
    objectives,
    storage,
    study_name,
    pruner,
    timeout,
    sampler_seed,
    heartbeat_interval,
    grace_period,
    **kw: Any,
) -> None:
    """Tune a method's hyperparameters on validation metrics with Optuna (resumable, shareable)."""
    from pathlib import Path

    from fairbench.tuning import TuneConfig, save_front
    from fairbench.tuning import tune as run_tune

    if objective and objectives:
        raise FairbenchError("give --objective or --objectives, not both")
    names = [o.strip() for o in (objectives or objective or "val/auc").split(",") if o.strip()]
    cfg = TuneConfig(
        base=_run_config(method_pairs, dataset_pairs, kw),
        trials=trials,
        objectives=names,
        storage=storage,
        study_name=study_name,
        pruner=pruner,
        timeout=timeout,
        sampler_seed=sampler_seed,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
    )
    result = run_tune(cfg, progress=False)
    written = save_front(result, Path(cfg.base.results_dir) / "studies", names)
    _print_best(result, names)
    click.echo(
        f"study '{result.study.study_name}' in {cfg.storage_url()}: {len(result.study.trials)} trials "
        f"({result.new_trials} new); MLflow study run {result.parent_run_id}",
        err=True,
    )
    click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


def _print_best(result: Any, objectives: list[str]) -> None:
    from rich.table import Table

    title = "Pareto front" if len(objectives) > 1 else "best trial"
    table = Table(title=f"{result.study.study_name}: {title} (validation)")
    table.add_column("trial")
    for name in objectives:
        table.add_column(name)
    table.add_column("parameters")
    for entry in result.best:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["params"].items())
        table.add_row(str(entry["trial"]), *[f"{entry['values'][n]:.4f}" for n in objectives], params)
    _console().print(table)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--results-dir", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--tracking-uri", default=None, help="MLflow store (or $MLFLOW_TRACKING_URI).")
@click.option("--storage", default=None, help="Optuna storage URL [default: sqlite:///<results-dir>/optuna.db].")
@heartbeat_options
@_fail_cleanly
def suite(
    path: str,
    results_dir: str,
    tracking_uri: str | None,
    storage: str | None,
    heartbeat_interval: int,
    grace_period: int,
) -> None:
    """Run a suite: tune every dataset x method with one budget, retrain on seeds, compare."""
    from click import get_current_context

    from fairbench import suite as suites

    spec = suites.load(path)
    counts = suites.run_suite(
        spec,
        results_dir,
        tracking_uri,
        storage,
        say=click.echo,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
    )
    click.echo(
        f"suite {spec.name}: {counts['trials']} new trials, {counts['runs']} new runs, "
        f"{counts['skipped_runs']} finished runs kept"
        + (f", {counts['elsewhere']} runs still training in other workers" if counts["elsewhere"] else "")
    )
    if counts["orphans"]:
        click.echo(f"marked {counts['orphans']} run(s) of dead workers KILLED; their seeds trained again", err=True)
    get_current_context().invoke(
        leaderboard,
        suite=spec.name,
        results_dir=results_dir,
        tracking_uri=tracking_uri,
        datasets=(),
        attributes=(),
        metrics=(),
        fmt=None,
        bootstrap=1000,
        correction="bh",
        plots=True,
    )


def _store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--results-dir`` and ``--tracking-uri``: where the MLflow store of the runs is."""
    fn = click.option(
        "--tracking-uri",
        default=None,
        help="MLflow store [default: $MLFLOW_TRACKING_URI or sqlite:///<results-dir>/mlflow.db].",
    )(fn)
    return click.option("--results-dir", type=click.Path(file_okay=False), default="results", show_default=True)(fn)


_bootstrap_option = click.option(
    "--bootstrap",
    type=click.IntRange(min=100),
    default=1000,
    show_default=True,
    help="Paired-bootstrap resamples of the test set for the comparison with ERM.",
)


@main.command()
@click.option("--dataset", "datasets", multiple=True, help="Only these datasets (repeatable).")
@click.option(
    "--attribute", "attributes", multiple=True, help="Only these attributes (repeatable; race×sex for a crossing)."
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Only these metrics (repeatable): auc, worst_auc, tpr_gap, fpr_gap, eo_gap, es_auc.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown", "csv", "json", "latex"]),
    default=None,
    help="What to print [default: a table fitted to the terminal, markdown when not a terminal].",
)
@_bootstrap_option
@click.option(
    "--correction",
    type=click.Choice(["bh", "holm", "none"]),
    default="bh",
    show_default=True,
    help="Multiplicity adjustment over every comparison in the table (Benjamini–Hochberg, Holm, none).",
)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG plots.")
@click.option("--suite", default=None, help="Only the runs of this suite.")
@_store_options
@_fail_cleanly
def leaderboard(
    datasets, attributes, metrics, fmt, bootstrap, correction, plots, suite, results_dir, tracking_uri
) -> None:
    """Compare the finished runs: one row per configuration, significance vs ERM, ranks, plots.

    Always writes <results-dir>/leaderboard.md and leaderboard.csv, and the plots under
    <results-dir>/plots/.
    """
    from pathlib import Path

    from fairbench import leaderboard as lb
    from fairbench.attributes import canonical
    from fairbench.tracking import resolve_tracking_uri

    runs = lb.load_runs(resolve_tracking_uri(results_dir, tracking_uri), suite=suite)
    board = lb.build(runs, n_bootstrap=bootstrap, correction=correction)
    table, shown = lb.filtered(board, datasets, tuple(canonical(a) for a in attributes), metrics)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = lb.to_markdown(table, board.ranks, shown, board.notes, correction)
    if fmt is None:
        fmt = "table" if _console().is_terminal else "markdown"
    (out / "leaderboard.md").write_text(markdown)
    table.drop(columns="config").to_csv(out / "leaderboard.csv", index=False)
    written = lb.plot(table, runs, out / "plots") if plots else []
    if fmt == "markdown":
        click.echo(markdown)
    elif fmt == "csv":
        click.echo(table.drop(columns="config").to_csv(index=False), nl=False)
    elif fmt == "json":
        import json

        payload = {"rows": table.to_dict(orient="records"), "ranks": board.ranks.to_dict(orient="records")}
        click.echo(json.dumps(payload, indent=2, default=float))
    elif fmt == "latex":
        click.echo(lb.to_latex(table, shown))
    else:
        print_leaderboard(_console(), table, board.ranks, shown, correction)
    note = f"wrote {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}"
    click.echo(note + (f" and {len(written)} plots in {out / 'plots'}" if written else ""), err=True)
    if board.skipped:
        click.echo(f"skipped {board.skipped} run(s) without test metrics (failed, interrupted or older)", err=True)
    if fmt != "markdown":  # the markdown carries the notes itself
        for line in board.notes:
            click.echo(f"note: {line}", err=True)


@main.command()
@_store_options
@click.option("--mlflow-url", default=None, help="MLflow UI address, e.g. http://host:5000: run ids become links.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Prepared datasets, for their counts [default: $FAIRBENCH_DATA or ~/.cache/fairbench].",
)
@_bootstrap_option
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None, help="[default: <results-dir>/report.html]"
)
@_fail_cleanly
def report(results_dir, tracking_uri, mlflow_url, data_dir, bootstrap, output) -> None:
    """Write one self-contained HTML page: leaderboards, plots, studies, datasets, protocol, methods."""
    from pathlib import Path

    from fairbench import report as rp

    text = rp.build(results_dir, tracking_uri, mlflow_url=mlflow_url, data_dir=data_dir, n_bootstrap=bootstrap)
    path = rp.write(text, output or Path(results_dir) / "report.html")
    click.echo(f"wrote {path} ({len(text) / 1e6:.1f} MB)", err=True)


def print_leaderboard(console: Any, table: Any, ranks: Any, shown: list[str], correction: str) -> None:
    """The leaderboard as boxed tables fitted to the console's width; no cell is ever broken."""
    from rich.table import Table

    from fairbench import leaderboard as lb

    width = console.width
    shown_frame = lb.display_frame(table, shown)
    for dataset, part in shown_frame.groupby("dataset", sort=True):
        fitted, hidden = lb.fit_columns(part.drop(columns="dataset"), width)
        rich_table = Table(title=str(dataset))
        for col in fitted.columns:
            rich_table.add_column(str(col), no_wrap=True, overflow="ellipsis")
        for row in fitted.itertuples(index=False):
            rich_table.add_row(*[str(v) for v in row])
        console.print(rich_table)
        if hidden:
            console.print(f"not shown at this width: {', '.join(hidden)} (--format markdown or csv shows all)")
    ranked, _ = lb.fit_columns(ranks[["method", *shown]].round(2).rename(columns=lb.LABELS), width)
    rank_table = Table(title="average rank (1 = best)")
    for col in ranked.columns:
        rank_table.add_column(str(col), no_wrap=True, overflow="ellipsis")
    for row in ranked.itertuples(index=False):
        rank_table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(rank_table)
    console.print(lb.footnote(correction), soft_wrap=False)


@main.command("embed-labels")
@click.argument("dataset")
@click.option(
    "--model",
    default="dmis-lab/biobert-base-cased-v1.2",
    show_default=True,
    help="Local model: a Hugging Face name already in the cache, or the folder of a saved model.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of prepared datasets [default: $FAIRBENCH_DATA or ~/.cache/fairbench].",
)
@_fail_cleanly
def embed_labels(dataset: str, model: str, data_dir: str | None) -> None:
    """Embed a dataset's finding names with a local language model, offline (for stridenet)."""
    from fairbench.config import RunConfig
    from fairbench.embeddings import embed_dataset

    path = embed_dataset(dataset, model, RunConfig(data_dir=data_dir).resolved_data_dir())
    click.echo(f"wrote {path}")


@main.group()
def analyze() -> None:
    """Analyses of a finished run: neural collapse per subgroup, neuron incidence."""


@analyze.command("nc")
@click.argument("run_id")
@click.option("--metric", type=click.Choice(["nc1", "nc3", "nc4", "within_var"]), default="nc1", show_default=True)
@_store_options
@_fail_cleanly
def analyze_nc(run_id: str, metric: str, results_dir: str, tracking_uri: str | None) -> None:
    """Plot a run's neural-collapse series per subgroup (run trained with --track-nc)."""
    from pathlib import Path

    from rich.table import Table

    from fairbench import analyze as an
    from fairbench.tracking import resolve_tracking_uri

    series = an.nc_series(resolve_tracking_uri(results_dir, tracking_uri), run_id)
    path = an.plot_nc(series, Path(results_dir) / "analysis" / f"{run_id}_nc_{metric}.png", metric)
    table = Table(title=f"run {run_id}: {metric} by epoch")
    chosen = {k: v for k, v in series.items() if k.endswith(f"/{metric}")}
    epochs = sorted({s for v in chosen.values() for s, _ in v})
    table.add_column("series")
    for e in epochs:
        table.add_column(f"epoch {e + 1}", justify="right")
    for key, values in chosen.items():
        by_epoch = dict(values)
        table.add_row(key.removeprefix("nc/").removesuffix(f"/{metric}"), *[f"{by_epoch[e]:.3g}" for e in epochs])
    _console().print(table)
    click.echo(f"wrote {path}", err=True)


@analyze.command("neurons")
@click.argument("run_id")
@_store_options
@_fail_cleanly
def analyze_neurons(run_id: str, results_dir: str, tracking_uri: str | None) -> None:
    """Show a run's neuron-incidence diagnostics on the test split, as a table and a plot."""
    from pathlib import Path

    from rich.table import Table

    from fairbench import analyze as an
    from fairbench.tracking import resolve_tracking_uri

    data = an.neurons(resolve_tracking_uri(results_dir, tracking_uri), run_id)
    path = an.plot_neurons(data, Path(results_dir) / "analysis" / f"{run_id}_neurons.png")
    table = Table(title=f"run {run_id}: neuron incidence (test split)")
    table.add_column("predictions")
    for col in data["positive"]:
        table.add_column(col, justify="right")
    for side in ("positive", "negative"):
        table.add_row(side, *[f"{v:.3f}" for v in data[side].values()])
    console = _console()
    console.print(table)
    lead = data["dominant_neurons"][0]
    console.print(f"dominant neurons: {', '.join(map(str, data['dominant_neurons']))}")
    groups = "; ".join(
        f"{attr}: " + ", ".join(f"{g} {v:.3f}" for g, v in values.items())
        for attr, values in data["dominant_activation_by_group"].items()
    )
    labels = ", ".join(f"label {k} {v:.3f}" for k, v in data["dominant_activation_by_label"].items())
    console.print(f"neuron {lead} mean activation by group: {groups}; by label: {labels}")
    click.echo(f"wrote {path}", err=True)


SUMMARY_METRICS = (
    ("worst_auc", "worst-group AUC"),
    ("tpr_gap", "TPR gap"),
    ("fpr_gap", "FPR gap"),
    ("eo_gap", "equalized-odds gap"),
)


def _print_summary(config: Any, result: Any) -> None:
    from rich.table import Table

    test = result.test
    fit = result.fit
    title = (
        f"{config.method} on {config.dataset}, seed {config.train.seed}: best epoch {fit.best_epoch + 1} "
        f"of {fit.epochs_run}, {fit.seconds:.0f} s"
    )
    table = Table(title=title, caption=f"test split, threshold {test.threshold:.3f}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    rows = [("auc", "AUC")]
    rows += [(f"{attr}/{key}", f"{attr}: {label}") for attr in result.attributes for key, label in SUMMARY_METRICS]
    for key, label in rows:
        v = test.values.get(key, float("nan"))
        lo, hi = test.ci.get(key, (None, None))
        value = "missing" if v != v else f"{v:.3f}"
        table.add_row(label, value, "" if lo is None else f"{lo:.3f} – {hi:.3f}")
    console = _console()
    console.print(table)
    console.print(f"MLflow run {result.run_id}", soft_wrap=True)
    console.print(f"store {result.tracking_uri}", soft_wrap=True)


if __name__ == "__main__":
    main()
