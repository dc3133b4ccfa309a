"""``fairbench analyze``: read a run's analyses back from MLflow, tabulate and plot them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fairbench import tracking
from fairbench.errors import FairbenchError


def _client(tracking_uri: str, run_id: str) -> Any:
    import mlflow

    tracking.open_store(tracking_uri, create=False)
    tracking.use_store(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise FairbenchError(
            f"no run {run_id} in {tracking_uri}; 'mlflow ui' or the run's summary shows its id"
        ) from None
    return client


def nc_series(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every ``nc/...`` metric of the run as (epoch, value) series."""
    client = _client(tracking_uri, run_id)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("nc/")]
    if not keys:
        raise FairbenchError(f"run {run_id} has no neural-collapse metrics; train it with --track-nc")
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in sorted(keys)}


def plot_nc(series: dict[str, list[tuple[int, float]]], path: Path, metric: str = "nc1") -> Path:
    """One panel per split x attribute: ``metric`` over epochs, a line per subgroup and overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for key, values in series.items():
        parts = key.split("/")  # nc/<split>/<metric> or nc/<split>/<attr>/<group>/<metric>
        if parts[-1] != metric:
            continue
        if len(parts) == 3:
            continue
        panels.setdefault((parts[1], parts[2]), {})[parts[3]] = values
    overall = {
        parts.split("/")[1]: v for parts, v in series.items() if parts.count("/") == 2 and parts.endswith(f"/{metric}")
    }
    if not panels:
        raise FairbenchError(f"no per-subgroup {metric} series to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, ((split, attr), groups) in zip(axes[0], sorted(panels.items()), strict=True):
        for group, values in sorted(groups.items()):
            ax.plot([s + 1 for s, _ in values], [v for _, v in values], marker="o", label=group)
        if split in overall:
            ax.plot([s + 1 for s, _ in overall[split]], [v for _, v in overall[split]], "k--", label="all")
        ax.set_title(f"{metric.upper()} on {split}, by {attr}")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def neurons(tracking_uri: str, run_id: str) -> dict[str, Any]:
    client = _client(tracking_uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, "neurons.json", tmp)).read_text())
        except Exception:
            raise FairbenchError(
                f"run {run_id} has no neurons.json (runs record it when they score the test split)"
            ) from None


def plot_neurons(data: dict[str, Any], path: Path) -> Path:
    """Incidence per neuron (sorted) under positive and negative predictions, and the dominant
    neuron's mean activation by group and by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = data["dominant_activation_by_group"]
    fig, axes = plt.subplots(1, 2 + len(groups), figsize=(4.2 * (2 + len(groups)), 3.6), squeeze=False)
    axes = axes[0]
    for side, color in (("positive", "C3"), ("negative", "C0")):
        values = np.sort(np.abs(np.asarray(data[f"{side}_incidence"])))[::-1]
        axes[0].plot(np.arange(1, len(values) + 1), values, color=color, label=f"{side} predictions")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("neuron rank")
    axes[0].set_ylabel("|weighted mean activation|")
    axes[0].set_title("incidence per neuron")
    axes[0].legend(fontsize=8)
    lead = data["dominant_neurons"][0]
    labels = data["dominant_activation_by_label"]
    axes[1].bar([f"label {k}" for k in labels], list(labels.values()), color="0.5")
    axes[1].set_title(f"neuron {lead} by label")
    for ax, (attr, values) in zip(axes[2:], groups.items(), strict=True):
        ax.bar(list(values), list(values.values()))
        ax.set_title(f"neuron {lead} by {attr}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
