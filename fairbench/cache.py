"""The prepared cache of a dataset: images resized once, a metadata table, a report.

Layout of ``<data-dir>/<dataset>/``:

- ``images.npy``: every image, (N, C, S, S), uint8 or float16; memory-mapped when loaded, so
  loader workers share one copy through the page cache;
- ``metadata.csv``: one row per image, in the order of ``images.npy``: the source
  identifiers, the raw fields the protocol reads, and the split, label and attribute codes;
- ``report.json``: counts per split x label x group of every attribute;
- ``manifest.json``: what was prepared from where; written last, so it marks a complete cache.

A cache is built in a hidden sibling folder, ``.<dataset>.partial``, and moved into place only
when complete, so the cache in place is never half-written. Bad input (a
:class:`~fairbench.errors.FairbenchError`) removes the partial folder; Ctrl-C or a crash keeps
it, and the next ``prepare`` with the same source and settings resumes from it (any other
source or settings start over).

The manifest records each file's size and SHA-256 (and a sampled SHA-256 of 64 evenly spaced
64 KiB blocks), and :func:`load` checks them, so a truncated or altered cache is refused with the
command that rebuilds it. The check stays cheap: sizes always; the full checksum for files up to
``FULL_CHECK_BYTES`` (256 MiB, well under a second); the sampled checksum (4 MiB read) above it.
"""

from __future__ import annotations

import hashlib
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
from fairbench.errors import FairbenchError

MANIFEST = "manifest.json"
IMAGES = "images.npy"
METADATA = "metadata.csv"
REPORT = "report.json"
BUILD = "build.json"
FORMAT_VERSION = 2
CHECKED = (IMAGES, METADATA)
FULL_CHECK_BYTES = 256 * 2**20
SAMPLE_BLOCKS = 64
BLOCK = 64 * 2**10


def location(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / name


def read_manifest(data_dir: Path, name: str) -> dict[str, Any] | None:
    path = location(data_dir, name) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def partial_location(data_dir: Path, name: str) -> Path:
    """The hidden folder a cache is built in (kept after Ctrl-C or a crash, for resuming)."""
    return Path(data_dir) / f".{name}.partial"


@contextmanager
def building(data_dir: Path, name: str, key: dict[str, Any], fresh: bool = False) -> Iterator[Path]:
    """A folder to write the cache into; moved to its place on success.

    An existing partial folder built with the same ``key`` (source and settings) is handed back
    as it is, so the build resumes; one with another key, or any with ``fresh``, is emptied.
    A :class:`FairbenchError` (bad input) removes the folder; any other exception (Ctrl-C, a
    crash) keeps it for the next run. Two builds of one dataset at once are refused.
    """
    final = location(data_dir, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_location(data_dir, name)
    record = partial / BUILD
    wanted = json.loads(json.dumps(key, default=str))
    partial.mkdir(exist_ok=True)
    lock = _lock(partial, name)
    try:
        if fresh or not record.is_file() or json.loads(record.read_text()) != wanted:
            for child in partial.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        record.write_text(json.dumps(wanted, indent=2))
        yield partial
    except FairbenchError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    record.unlink()
    old = final.parent / f".{name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _lock(folder: Path, name: str) -> int:
    """An exclusive lock on ``folder`` (released when the returned descriptor is closed)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: builds are not guarded
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FairbenchError(
            f"{folder}: another 'fairbench prepare {name}' is writing here; wait for it to finish"
        ) from None
    return fd


def file_record(path: Path) -> dict[str, Any]:
    """Size, full SHA-256 and sampled SHA-256 of one cache file."""
    full = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(2**24):
            full.update(block)
    return {"bytes": path.stat().st_size, "sha256": full.hexdigest(), "sample_sha256": _sampled(path)}


def _sampled(path: Path) -> str:
    """SHA-256 of the size and of ``SAMPLE_BLOCKS`` blocks spread evenly over the file, last byte included."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset in sorted({int(k * max(size - BLOCK, 0) / (SAMPLE_BLOCKS - 1)) for k in range(SAMPLE_BLOCKS)}):
            fh.seek(offset)
            digest.update(fh.read(BLOCK))
    return digest.hexdigest()


def write_manifest(folder: Path, **values: Any) -> None:
    """The manifest, with a size and checksums of each cache file; written last."""
    files = {name: file_record(folder / name) for name in CHECKED}
    manifest = {
        "format_version": FORMAT_VERSION,
        "fairbench_version": fairbench.__version__,
        **values,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def verify(folder: Path, name: str, manifest: dict[str, Any]) -> None:
    """Refuse a cache whose files differ from what the manifest records (see the module docstring)."""
    fix = f"run 'fairbench prepare {name} --source <download folder> --force' to rebuild it"
    files = manifest.get("files")
    if manifest.get("format_version") != FORMAT_VERSION or not isinstance(files, dict):
        raise FairbenchError(
            f"{folder / MANIFEST}: cache format {manifest.get('format_version')} is not the current "
            f"{FORMAT_VERSION} (no file checksums); {fix}"
        )
    for file in CHECKED:
        path, expected = folder / file, files.get(file, {})
        if not path.is_file():
            raise FairbenchError(f"{path}: missing from the prepared cache; {fix}")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise FairbenchError(
                f"{path}: {size} bytes but the manifest records {expected.get('bytes')} (truncated or altered); {fix}"
            )
        if size <= FULL_CHECK_BYTES:
            ok = file_record(path)["sha256"] == expected.get("sha256")
        else:
            ok = _sampled(path) == expected.get("sample_sha256")
        if not ok:
            raise FairbenchError(f"{path}: checksum differs from the manifest (altered or damaged); {fix}")


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / REPORT).write_text(json.dumps(report, indent=2))


def open_images(folder: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    """A writable memory-mapped ``images.npy`` of ``shape``."""
    return np.lib.format.open_memmap(folder / IMAGES, mode="w+", dtype=dtype, shape=shape)


def load(data_dir: Path, name: str) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """The memory-mapped images, the metadata table and the manifest of a prepared cache,
    after checking the files against the manifest (:func:`verify`)."""
    folder = location(data_dir, name)
    manifest = read_manifest(data_dir, name)
    if manifest is None:
        raise FileNotFoundError(folder / MANIFEST)
    verify(folder, name, manifest)
    images = np.load(folder / IMAGES, mmap_mode="r")
    meta = pd.read_csv(folder / METADATA, keep_default_na=False, na_values=[""])
    return images, meta, manifest


def counts_report(meta: pd.DataFrame, attributes: dict[str, list[str]]) -> dict[str, Any]:
    """Counts per split x label x group for each attribute (code -1 reported as 'unknown')."""
    report: dict[str, Any] = {"total": len(meta), "splits": {}}
    order = {"train": 0, "val": 1, "test": 2}
    for split in sorted(meta["split"].unique(), key=lambda s: (order.get(s, 3), str(s))):
        part = meta[meta["split"] == split]
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
