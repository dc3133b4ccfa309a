"""``fairbench prepare``: read a raw download once, validate it, and write the prepared cache.

Decoding streams: files are decoded in chunks of ``CHUNK`` by a process pool with at most two
chunks per worker in flight, and each worker writes its images straight into the
memory-mapped ``images.npy``, so no image travels between processes and memory stays bounded
whatever the dataset's size. Every finished chunk is recorded in the build folder; after
Ctrl-C or a crash, preparing the same source with the same settings decodes only the chunks
that are not recorded (see :func:`fairbench.cache.building`). This module imports no torch,
so the workers start fast.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairbench import cache
from fairbench.errors import FairbenchError

Reader = Callable[[Path, int], tuple[np.ndarray, dict[str, Any]]]
CHUNK = 256
DECODE = "decode.json"
DECODED = "decoded.jsonl"
_NO_INFO: dict[str, Any] = {}


def _square(path: Path, size: int, mode: str) -> np.ndarray:
    """The image in ``mode`` ("RGB" or "L") resized so its short side is ``size``, centre square kept."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft(mode, (size, size))  # JPEG: decode at a reduced scale when the image is large
            img = img.convert(mode)
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FairbenchError(
            f"{path}: not a readable image ({exc}); replace it with the file from the download"
        ) from None


def read_jpeg(path: Path, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """An RGB image resized so its short side is ``size``, centre ``size x size`` kept; (3, S, S) uint8."""
    return _square(path, size, "RGB").transpose(2, 0, 1), _NO_INFO


def read_gray(path: Path, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A grayscale image (e.g. a chest X-ray) resized like :func:`read_jpeg`; (1, S, S) uint8."""
    return _square(path, size, "L")[None], _NO_INFO


def _quiet_worker() -> None:
    """Workers ignore Ctrl-C: the main process stops handing out chunks and lets running ones end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _work(reader: Reader, paths: Sequence[str], start: int, images_path: str, size: int) -> list[dict[str, Any]]:
    out = np.load(images_path, mmap_mode="r+")
    infos = []
    for row, path in enumerate(paths, start):
        array, info = reader(Path(path), size)
        out[row] = array
        infos.append(info)
    out.flush()
    del out
    return infos


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores))


def _fingerprint(paths: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\n")
    return digest.hexdigest()


def _resume(folder: Path, key: dict[str, Any]) -> dict[int, list[dict[str, Any]] | None]:
    """Chunks already decoded into ``folder`` by a build with the same ``key`` (else none)."""
    state, log = folder / DECODE, folder / DECODED
    if not (state.is_file() and log.is_file() and (folder / cache.IMAGES).is_file()):
        return {}
    if json.loads(state.read_text()) != key:
        return {}
    done: dict[int, list[dict[str, Any]] | None] = {}
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: that chunk is decoded again
            continue
        done[int(entry["chunk"])] = entry.get("infos")
    return done


def _json_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def decode_images(
    paths: Sequence[Any],
    folder: Path,
    *,
    size: int,
    channels: int,
    reader: Reader = read_jpeg,
    dtype: Any = np.uint8,
    workers: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Decode every file with ``reader`` into ``folder/images.npy``; returns each file's info dict.

    Resumable: chunks recorded as done in ``folder`` by an earlier call with the same files,
    shape, dtype and reader are not decoded again.
    """
    n = len(paths)
    shape = (n, channels, size, size)
    key = {
        "shape": list(shape),
        "dtype": np.dtype(dtype).str,
        "chunk": CHUNK,
        "reader": f"{reader.__module__}.{reader.__qualname__}",
        "files": _fingerprint(paths),
    }
    done = _resume(folder, key)
    if not done:
        images = cache.open_images(folder, shape, np.dtype(dtype))
        del images  # the file exists with its header; workers open it themselves
        (folder / DECODED).write_text("")
        (folder / DECODE).write_text(json.dumps(key))
    todo = [c for c in range(-(-n // CHUNK)) if c not in done]
    infos: list[dict[str, Any]] = [_NO_INFO] * n
    for c, got in done.items():
        if got:
            infos[c * CHUNK : c * CHUNK + len(got)] = got
    target = str(folder / cache.IMAGES)
    workers = default_workers() if workers is None else workers
    bar = _Bar(n, sum(min(CHUNK, n - c * CHUNK) for c in done), progress)

    def jobs() -> Iterator[tuple[int, tuple[Any, ...]]]:
        for c in todo:
            begin = c * CHUNK
            yield c, (reader, [str(p) for p in paths[begin : begin + CHUNK]], begin, target, size)

    with open(folder / DECODED, "a") as log:
        try:
            for c, got in _run(jobs(), workers):
                if any(got):
                    infos[c * CHUNK : c * CHUNK + len(got)] = got
                entry = {"chunk": c, "infos": got if any(got) else None}
                log.write(json.dumps(entry, default=_json_value) + "\n")
                log.flush()
                os.fsync(log.fileno())
                bar.advance(len(got))
        finally:
            bar.close()
    return infos


def _run(jobs: Iterator[tuple[int, tuple[Any, ...]]], workers: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(chunk, infos) as chunks finish; in this process, or in a pool with bounded work in flight."""
    if workers <= 1:
        for c, args in jobs:
            yield c, _work(*args)
        return
    # forkserver: workers start from a small server process, not as copies of this one (which
    # may hold torch and a large metadata table), so their memory stays small
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_worker) as pool:
        pending: dict[Future, int] = {}
        try:
            while True:
                while len(pending) < 2 * workers and (job := next(jobs, None)) is not None:
                    pending[pool.submit(_work, *job[1])] = job[0]
                if not pending:
                    return
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


class _Bar:
    """A rich progress bar with rate and time left on a terminal; silent otherwise."""

    def __init__(self, total: int, completed: int, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = Console(stderr=True)
            if console.is_terminal:
                self.progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(),
                    TextColumn("left"),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                )
                label = "decoding" if not completed else f"decoding (resumed, {completed} done before)"
                self.task = self.progress.add_task(label, total=total, completed=completed, rate="")
                self.progress.start()

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)
            speed = self.progress.tasks[0].speed
            self.progress.update(self.task, rate=f"{speed:.0f} img/s" if speed else "")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class PrepareInterruptedError(FairbenchError):
    """Ctrl-C during ``prepare``: the decoded part is kept for the next run."""

    exit_code = 130


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
    An interrupted or crashed run resumes where it stopped when started again with the same
    source and settings; ``force`` starts over.
    """
    from fairbench import attributes as crossed

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
    key = {"dataset": dataset.name, "format_version": cache.FORMAT_VERSION, **wanted}
    try:
        with cache.building(data_dir, dataset.name, key, fresh=force) as partial:
            table = dataset.prepare(source, partial, size=size, skip_missing=skip_missing, workers=workers)
            table, attributes = crossed.cross_table(table, dataset.attributes, getattr(dataset, "crossings", ()))
            table.to_csv(partial / cache.METADATA, index=False)
            report = cache.counts_report(table, attributes)
            report["skipped_missing"] = int(table.attrs.get("skipped_missing", 0))
            report.update(table.attrs.get("report", {}))
            cache.write_report(partial, report)
            for name in (DECODE, DECODED):
                (partial / name).unlink(missing_ok=True)
            cache.write_manifest(partial, dataset=dataset.name, n=len(table), **wanted)
    except KeyboardInterrupt:
        raise PrepareInterruptedError(
            f"interrupted; what was decoded is kept in {cache.partial_location(data_dir, dataset.name)}: "
            "run the same command again to resume (--force starts over)"
        ) from None
    return Prepared(folder=folder, report=report, reused=False)
