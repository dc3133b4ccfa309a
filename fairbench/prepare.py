"""``fairbench prepare``: read a raw download once, validate it, and write the prepared cache.

Files are decoded in a process pool; each worker writes its images straight into the
memory-mapped ``images.npy``, so no image travels between processes. This module imports no
torch, so the workers start fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairbench import cache
from fairbench.errors import FairbenchError

Reader = Callable[[Path, int], tuple[np.ndarray, dict[str, Any]]]
CHUNK = 32


def read_jpeg(path: Path, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """An RGB image resized so its short side is ``size``, centre ``size x size`` kept; (3, S, S) uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FairbenchError(
            f"{path}: not a readable image ({exc}); replace it with the file from the download"
        ) from None
    return array.transpose(2, 0, 1), {}


def _work(reader: Reader, paths: Sequence[Path], rows: Sequence[int], images_path: str, size: int):
    out = np.load(images_path, mmap_mode="r+")
    infos = []
    for path, row in zip(paths, rows, strict=True):
        array, info = reader(Path(path), size)
        out[row] = array
        infos.append(info)
    out.flush()
    return list(rows), infos


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores))


def decode_images(
    paths: Sequence[Path],
    folder: Path,
    *,
    size: int,
    channels: int,
    reader: Reader = read_jpeg,
    dtype: Any = np.uint8,
    workers: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Decode every file with ``reader`` into ``folder/images.npy``; returns each file's info dict."""
    images = cache.open_images(folder, (len(paths), channels, size, size), np.dtype(dtype))
    del images  # the file exists with its header; workers open it themselves
    target = str(folder / cache.IMAGES)
    chunks = [list(range(i, min(i + CHUNK, len(paths)))) for i in range(0, len(paths), CHUNK)]
    infos: list[dict[str, Any]] = [{} for _ in paths]
    workers = default_workers() if workers is None else workers
    bar = _Bar(len(paths), progress)
    if workers <= 1:
        for rows in chunks:
            done, got = _work(reader, [paths[r] for r in rows], rows, target, size)
            for r, info in zip(done, got, strict=True):
                infos[r] = info
            bar.advance(len(rows))
        bar.close()
        return infos
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_work, reader, [paths[r] for r in rows], rows, target, size) for rows in chunks]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    done, got = future.result()
                    for r, info in zip(done, got, strict=True):
                        infos[r] = info
                    bar.advance(len(done))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            bar.close()
    return infos


class _Bar:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            console = Console(stderr=True)
            if console.is_terminal:
                self.progress = Progress(console=console, transient=True)
                self.task = self.progress.add_task("decoding", total=total)
                self.progress.start()

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@dataclass
class Prepared:
    folder: Path
    report: dict[str, Any]
    reused: bool


def prepare(
    dataset: Any,
    source: str | Path,
    data_dir: str | Path,
    *,
    size: int | None = None,
    force: bool = False,
    skip_missing: bool = False,
    workers: int | None = None,
) -> Prepared:
    """Prepare ``dataset`` from the download in ``source`` into ``data_dir/<name>``.

    Re-running on the same source with the same settings reuses the cache unless ``force``.
    """
    import json

    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise FairbenchError(f"--source {source}: no such folder; give the folder of the {dataset.name} download")
    data_dir = Path(data_dir)
    size = size or dataset.cache_size
    wanted = {"source": str(source), "size": size, "skip_missing": skip_missing}
    manifest = cache.read_manifest(data_dir, dataset.name)
    folder = cache.location(data_dir, dataset.name)
    if manifest is not None and not force:
        if all(manifest.get(k) == v for k, v in wanted.items()):
            report = json.loads((folder / cache.REPORT).read_text())
            return Prepared(folder=folder, report=report, reused=True)
        raise FairbenchError(
            f"{folder} already holds {dataset.name} prepared from {manifest.get('source')} "
            f"(size {manifest.get('size')}); pass --force to replace it"
        )
    with cache.building(data_dir, dataset.name) as partial:
        table = dataset.prepare(source, partial, size=size, skip_missing=skip_missing, workers=workers)
        table.to_csv(partial / cache.METADATA, index=False)
        report = cache.counts_report(table, dataset.attributes)
        report["skipped_missing"] = int(table.attrs.get("skipped_missing", 0))
        cache.write_report(partial, report)
        cache.write_manifest(partial, dataset=dataset.name, n=len(table), **wanted)
    return Prepared(folder=folder, report=report, reused=False)
