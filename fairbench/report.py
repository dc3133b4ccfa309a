"""One self-contained HTML page with everything a reviewer needs to judge the results.

Per dataset and attribute: the leaderboard table, the accuracy-vs-fairness and per-group rate
plots, and the runs behind them; each tuning study's best trials (and Pareto front); the
datasets' counts per split x label x group (from the ``report.json`` of prepared caches); the
evaluation protocol; the methods with the papers they come from.

The page works offline and forever: plots are inlined as ``data:`` URIs, the CSS is inline,
there is no script, and a Content-Security-Policy forbids every network request. Links into the
MLflow UI are added only when a server URL is given.

Methods are cited from their module docstring's first line, which by convention names the
method and its paper (``nir: Neuron Incidence Redistribution (Shoby, ..., arXiv ...)``).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

import fairbench
from fairbench import leaderboard as lb
from fairbench.errors import FairbenchError

PROTOCOL = [
    "Model selection (early stopping on validation AUC) and every decision threshold use the validation "
    "split only; the test split is scored once per run.",
    "The threshold is 0.5, or fitted on validation by a named rule (youden, f1) and then applied to test; "
    "the rule is logged with each run.",
    "Per sensitive attribute: group AUC, worst-group AUC, TPR/FPR gaps (max - min over groups with enough "
    "samples), equalized-odds gap = max(TPR gap, FPR gap), ES-AUC = AUC / (1 + sum_g |AUC - AUC_g|).",
    "Test metrics carry 95% bootstrap intervals stratified by group x label; a leaderboard cell is the mean "
    "± std over seeds, compared with ERM by a paired bootstrap of the saved test predictions.",
    "Tuning (Optuna) sees validation metrics only, with the same trial budget for every method.",
]

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1.5rem; color: #1d2433; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 2px solid #dde3ee; padding-bottom: .2rem;
margin-top: 2.2rem; } h3 { margin-top: 1.6rem; } .meta, .note { color: #5b6478; font-size: .9rem; }
nav a { margin-right: 1rem; } .scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .88rem; }
th, td { border: 1px solid #dde3ee; padding: .25rem .5rem; text-align: left; white-space: nowrap; }
th { background: #f3f6fb; } table.wrap td { white-space: normal; } tr:nth-child(even) td { background: #fafbfd; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; } img { max-width: 100%; height: auto; }
code { background: #f3f6fb; padding: 0 .2rem; }
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(
    frame: pd.DataFrame, links: dict[str, str] | None = None, link_column: str = "run", wrap: bool = False
) -> str:
    """An HTML table of ``frame`` (escaped), with cells of ``link_column`` linked through ``links``."""
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = []
        for col, value in zip(frame.columns, row, strict=True):
            url = (links or {}).get(str(value)) if col == link_column else None
            text = f'<a href="{_e(url)}">{_e(value)}</a>' if url else _e(value)
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="wrap"' if wrap else ""
    return f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption class='note'>{_e(caption)}</figcaption></figure>"
    )


def _slug(*parts: str) -> str:
    return "-".join("".join(c if c.isalnum() else "-" for c in str(p).lower()) for p in parts if p)


class _Links:
    """URLs of runs in the MLflow UI (``<url>/#/experiments/<id>/runs/<run>``), when a URL is given."""

    def __init__(self, client: Any, mlflow_url: str | None) -> None:
        self.client = client
        self.url = mlflow_url.rstrip("/") if mlflow_url else None
        self._experiments: dict[str, str | None] = {}

    def run(self, run_id: str | None) -> str | None:
        if not self.url or not run_id:
            return None
        if run_id not in self._experiments:
            try:
                self._experiments[run_id] = self.client.get_run(run_id).info.experiment_id
            except Exception:  # a run deleted since: no link
                self._experiments[run_id] = None
        eid = self._experiments[run_id]
        return f"{self.url}/#/experiments/{eid}/runs/{run_id}" if eid else None


def _leaderboard_sections(board: Any, runs: Any, links: _Links, folder: Path) -> tuple[list[str], list[str]]:
    """HTML per dataset x attribute (table, plots, runs) and their navigation entries."""
    parts, nav = [], []
    table = board.table
    metrics = list(lb.HEADLINE)
    for dataset in sorted(table["dataset"].unique()):
        anchor = _slug("dataset", dataset)
        nav.append(f'<a href="#{anchor}">{_e(dataset)}</a>')
        parts.append(f'<h2 id="{anchor}">{_e(dataset)}</h2>')
        here = table[table["dataset"] == dataset]
        for attr in sorted(here["attribute"].unique()):
            part = here[here["attribute"] == attr]
            section = _slug("leaderboard", dataset, attr)
            shown = lb.display_frame(part, metrics).drop(columns=["attribute"], errors="ignore")
            parts.append(f'<section id="{section}" class="leaderboard"><h3>{_e(dataset)}: {_e(attr)}</h3>')
            parts.append(_table(shown))
            plots = folder / section
            written = lb.plot(part, runs, plots)
            parts.append("".join(_image(p, p.stem.replace("_", " ")) for p in written if p.suffix == ".png"))
            parts.append("</section>")
        frame = runs.frame[runs.frame["dataset"] == dataset]
        cols = [c for c in ("method", "backbone", "seed", "auc") if c in frame]
        listing = frame[["run_id", *cols]].rename(columns={"run_id": "run", "auc": "test AUC"})
        if "test AUC" in listing:
            listing = listing.assign(**{"test AUC": listing["test AUC"].map(lambda v: f"{v:.3f}")})
        listing = listing.sort_values([c for c in ("method", "seed") if c in listing])
        urls = {rid: links.run(rid) for rid in listing["run"]}
        parts.append(f'<section id="{_slug("runs", dataset)}" class="runs"><h3>{_e(dataset)}: runs</h3>')
        parts.append(_table(listing, {k: v for k, v in urls.items() if v}))
        parts.append("</section>")
    return parts, nav


def _studies(client: Any, links: _Links) -> str:
    """Each tuning study's best trial(s) and Pareto plot, from its MLflow study run's artifacts."""
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string="tags.`fairbench.kind` = 'study'", max_results=1000) if ids else []
    if not found:
        return "<p class='note'>No tuning studies in this store (see <code>fairbench tune</code>).</p>"
    out = []
    for run in sorted(found, key=lambda r: r.data.tags.get("fairbench.study", "")):
        name = run.data.tags.get("fairbench.study", run.info.run_name)
        objectives = run.data.params.get("objectives", "val/auc").split(",")
        out.append(f"<h3>{_e(name)}</h3>")
        out.append(
            f"<p class='note'>{_e(run.data.tags.get('fairbench.method', ''))} on "
            f"{_e(run.data.tags.get('fairbench.dataset', ''))}; objectives {_e(', '.join(objectives))}; "
            f"status {_e(run.info.status)}</p>"
        )
        with tempfile.TemporaryDirectory() as tmp:
            try:
                best = json.loads(Path(client.download_artifacts(run.info.run_id, "best_trials.json", tmp)).read_text())
            except Exception:  # a study still running, or one with no complete trial yet
                best = []
            if best:
                rows = [
                    {
                        "trial": str(b["trial"]),
                        **{o: f"{b['values'].get(o, float('nan')):.4f}" for o in objectives},
                        "parameters": ", ".join(
                            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items()
                        ),
                        "run": b.get("mlflow_run_id") or "",
                    }
                    for b in best
                ]
                urls = {b.get("mlflow_run_id"): links.run(b.get("mlflow_run_id")) for b in best}
                out.append(_table(pd.DataFrame(rows), {k: v for k, v in urls.items() if k and v}))
            else:
                out.append("<p class='note'>No complete trial recorded yet.</p>")
            try:
                png = Path(client.download_artifacts(run.info.run_id, "pareto_front.png", tmp))
                out.append(_image(png, f"{name}: Pareto front (validation)"))
            except Exception:  # single-objective studies have no front
                pass
    return "".join(out)


def _counts_table(report: dict[str, Any]) -> pd.DataFrame:
    """Images per split x label for every group, the layout of ``fairbench prepare``'s table."""
    splits = list(report["splits"])
    first = report["splits"][splits[0]]
    attributes = [k for k in first if k not in ("n", "label")]
    columns = ["attribute", "group", *[f"{s} {w}" for s in splits for w in ("neg", "pos")]]
    rows = [["(all)", "", *[report["splits"][s]["label"].get(y, 0) for s in splits for y in "01"]]]
    for attr in attributes:
        groups = list(dict.fromkeys(g for s in splits for g in report["splits"][s].get(attr, {})))
        for group in groups:
            rows.append(
                [attr, group, *[report["splits"][s][attr].get(group, {}).get(y, 0) for s in splits for y in "01"]]
            )
    return pd.DataFrame(rows, columns=columns)


def _datasets(names: Iterable[str], data_dir: Path) -> str:
    from fairbench import registry

    out = []
    for name in sorted(names):
        try:
            folder = registry.datasets.get(name).name or name
        except FairbenchError:
            folder = name
        path = data_dir / folder / "report.json"
        out.append(f"<h3>{_e(name)}</h3>")
        if path.is_file():
            out.append(_table(_counts_table(json.loads(path.read_text()))))
            out.append(f"<p class='note'>From {_e(path)}.</p>")
        else:
            out.append(
                f"<p class='note'>No prepared cache with counts in {_e(data_dir)} (built-in or not prepared).</p>"
            )
    return "".join(out)


def _methods(names: Iterable[str]) -> str:
    from fairbench import registry

    rows = []
    for name in sorted(names):
        try:
            cls = registry.methods.get(name)
        except FairbenchError:
            rows.append({"method": name, "source": "not installed here", "summary": "", "attributes": ""})
            continue
        module = sys.modules.get(cls.__module__)
        source = ((module.__doc__ if module else "") or "").strip().splitlines()
        first = source[0] if source else ""
        cited = first.split(":", 1)[1].strip() if first.lower().startswith(f"{name}:") else first
        flags = ["training" if cls.uses_attributes else "", "test" if cls.uses_attributes_at_test else ""]
        rows.append(
            {
                "method": name,
                "source": cited,
                "summary": cls.summary(),
                "attributes": ", ".join(f for f in flags if f) or "none",
            }
        )
    frame = pd.DataFrame(rows).rename(columns={"source": "method and paper", "attributes": "uses attributes in"})
    return _table(frame, wrap=True)


def build(
    results_dir: str | Path,
    tracking_uri: str | None = None,
    mlflow_url: str | None = None,
    data_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
) -> str:
    """The report's HTML for the runs in the store of ``results_dir`` (or ``tracking_uri``)."""
    import mlflow

    from fairbench.paths import default_data_dir
    from fairbench.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(results_dir, tracking_uri)
    runs = lb.load_runs(uri)
    board = lb.build(runs, n_bootstrap=n_bootstrap)
    client = mlflow.MlflowClient(uri)
    links = _Links(client, mlflow_url)
    with tempfile.TemporaryDirectory() as tmp:
        boards, nav = _leaderboard_sections(board, runs, links, Path(tmp))
    notes = "".join(f"<li>{_e(n)}</li>" for n in board.notes)
    footnote = getattr(lb, "FOOTNOTE", "")
    datasets = set(runs.frame["dataset"])
    ranks = board.ranks.copy()
    for col in ranks.columns.drop("method"):
        ranks[col] = ranks[col].map(lambda v: f"{v:.2f}")
    store = uri if not uri.startswith("sqlite:") else f"sqlite:///…/{Path(uri.split(':///', 1)[-1]).name}"
    sections = [
        f"<h1>fairbench report</h1><p class='meta'>fairbench {_e(fairbench.__version__)}; generated "
        f"{_e(dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}; store {_e(store)}; "
        f"{len(runs.frame)} runs ({runs.skipped} without test metrics skipped)</p>",
        "<nav>" + "".join(nav) + '<a href="#studies">studies</a><a href="#datasets">datasets</a>'
        '<a href="#protocol">protocol</a><a href="#methods">methods</a></nav>',
        '<section id="protocol"><h2>Evaluation protocol</h2><ul>'
        + "".join(f"<li>{_e(p)}</li>" for p in PROTOCOL)
        + "</ul></section>",
        *boards,
        f"<p class='note'>{_e(footnote)}</p>" if footnote else "",
        f"<ul class='note'>{notes}</ul>" if notes else "",
        '<section id="ranks"><h2>Average rank (1 = best)</h2>' + _table(ranks) + "</section>",
        '<section id="studies"><h2>Tuning studies</h2>' + _studies(client, links) + "</section>",
        '<section id="datasets"><h2>Datasets</h2>'
        + _datasets(datasets, Path(data_dir) if data_dir else default_data_dir())
        + "</section>",
        '<section id="methods"><h2>Methods</h2>' + _methods(set(runs.frame["method"])) + "</section>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>fairbench report</title><style>{STYLE}</style></head><body>"
        + "\n".join(s for s in sections if s)
        + "</body></html>\n"
    )


def write(text: str, path: str | Path) -> Path:
    """Write the page atomically: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path
