"""The prepared cache of a dataset: images resized once, a metadata table, a report.

Layout of ``<data-dir>/<dataset>/``:

- ``images.npy``: every image, (N, C, S, S), uint8 or float16; memory-mapped when loaded, so
  loader workers share one copy through the page cache;
- ``metadata.csv``: one row per image, in the order of ``images.npy``: the source
  identifiers, the raw fields the protocol reads, and the split, label and attribute codes;
- ``report.json``: counts per split x label x group of every attribute;
- ``manifest.json``: what was prepared from where; written last, so it marks a complete cache.

A cache is built in a hidden sibling folder and moved into place only when complete; a
failure or Ctrl-C removes the partial folder, so a cache is never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import fairbench

MANIFEST = "manifest.json"
IMAGES = "images.npy"
METADATA = "metadata.csv"
REPORT = "report.json"
FORMAT_VERSION = 1


def location(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / name


def read_manifest(data_dir: Path, name: str) -> dict[str, Any] | None:
    path = location(data_dir, name) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@contextmanager
def building(data_dir: Path, name: str) -> Iterator[Path]:
    """A fresh folder to write the cache into; moved to its place on success, removed otherwise."""
    final = location(data_dir, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = final.parent / f".{name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, **values: Any) -> None:
    manifest = {"format_version": FORMAT_VERSION, "fairbench_version": fairbench.__version__, **values}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / REPORT).write_text(json.dumps(report, indent=2))


def open_images(folder: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    """A writable memory-mapped ``images.npy`` of ``shape``."""
    return np.lib.format.open_memmap(folder / IMAGES, mode="w+", dtype=dtype, shape=shape)


def load(data_dir: Path, name: str) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """The memory-mapped images, the metadata table and the manifest of a prepared cache."""
    folder = location(data_dir, name)
    manifest = read_manifest(data_dir, name)
    if manifest is None:
        raise FileNotFoundError(folder / MANIFEST)
    images = np.load(folder / IMAGES, mmap_mode="r")
    meta = pd.read_csv(folder / METADATA, keep_default_na=False, na_values=[""])
    return images, meta, manifest


def counts_report(meta: pd.DataFrame, attributes: dict[str, list[str]]) -> dict[str, Any]:
    """Counts per split x label x group for each attribute (code -1 reported as 'unknown')."""
    report: dict[str, Any] = {"total": len(meta), "splits": {}}
    for split, part in meta.groupby("split", sort=False):
        entry: dict[str, Any] = {
            "n": len(part),
            "label": {str(k): int(v) for k, v in part["label"].value_counts().sort_index().items()},
        }
        for attr, groups in attributes.items():
            names = {code: g for code, g in enumerate(groups)} | {-1: "unknown"}
            table = part.groupby([attr, "label"]).size()
            entry[attr] = {
                names[int(code)]: {str(int(label)): int(n) for (c, label), n in table.items() if c == code}
                for code in sorted(part[attr].unique())
            }
        report["splits"][str(split)] = entry
    return report
