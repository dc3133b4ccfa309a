"""Streaming ``fairbench prepare`` on a generated 50,000-image chest X-ray download.

Writes a CheXpert-layout source (``train.csv``, ``valid.csv``, ``CHEXPERT DEMO.xlsx`` and
50,000 grayscale 320 x 390 JPEGs, two frontal views per patient; a few distinct images are
encoded once and their bytes copied, so generating is fast), then runs
``fairbench prepare chexpert`` in a subprocess and samples the memory of its whole process
tree (main process and decoding workers) every 0.1 s. Prints the peak of the summed RSS (an
upper bound: pages shared between processes count once per process) and of the summed PSS
(shared pages split between processes), its CPU time, images/s (wall clock and per CPU-second), and the
cache size on disk: measured at the prepared size, computed from the array shape at 224 and
256 px.

Usage: ``python benchmarks/prepare_stream.py [--n 50000] [--size 256] [--workers N] [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil
from openpyxl import Workbook
from PIL import Image

FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]  # fmt: skip
RACES = ["White", "Black or African American", "Asian", "Other", "Unknown", "White, non-Hispanic"]
DISTINCT = 64


def make_download(root: Path, n: int) -> None:
    """A CheXpert-v1.0-small layout with ``n`` frontal images (two per patient)."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(DISTINCT):
        coarse = rng.uniform(30, 220, (12, 10)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((320, 390), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
    rows = {"train": [header], "valid": [header]}
    book = Workbook(write_only=True)
    sheet = book.create_sheet()
    sheet.append(["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"])
    for i in range(n):
        p = i // 2 + 1
        part = "valid" if p % 100 == 0 else "train"
        rel = f"{part}/patient{p:05d}/study{i % 2 + 1}/view1_frontal.jpg"
        folder = base / rel.rsplit("/", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(blobs[i % DISTINCT])
        sex = "Female" if p % 2 else "Male"
        findings = ["1.0" if i % 3 == 0 else ""] + ["" for _ in FINDINGS[1:]]
        rows[part].append([f"CheXpert-v1.0-small/{rel}", sex, str(20 + p % 70), "Frontal", "AP", *findings])
        if i % 2 == 0:
            sheet.append([f"patient{p:05d}", sex.upper(), str(20 + p % 70), RACES[p % len(RACES)], "Unknown"])
    for part, lines in rows.items():
        with open(base / f"{part}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(lines)
    book.save(root / "CHEXPERT DEMO.xlsx")


def tree_sample(root: psutil.Process, cpu: dict[int, float]) -> tuple[int, int]:
    """Summed RSS and PSS (bytes) of ``root`` and all its descendants; records each one's CPU seconds in ``cpu``."""
    rss = pss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        cpu[proc.pid] = times.user + times.system
    return rss, pss


def run_prepare(source: Path, data: Path, size: int, workers: int) -> tuple[float, int, int, float]:
    """Wall time, peak tree RSS / PSS and CPU seconds of ``fairbench prepare chexpert`` in a subprocess."""
    command = [str(Path(sys.executable).with_name("fairbench")), "prepare", "chexpert", "--source", str(source),
               "--data-dir", str(data), "--size", str(size), "--workers", str(workers)]  # fmt: skip
    peak = [0, 0]
    cpu: dict[int, float] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                rss, pss = tree_sample(psutil.Process(proc.pid), cpu)
            except psutil.NoSuchProcess:
                return
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {err.strip()}")
    return seconds, peak[0], peak[1], sum(cpu.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        t0 = time.perf_counter()
        make_download(raw, args.n)
        print(f"generated {args.n} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
        load_before = os.getloadavg()[0]
        seconds, rss, pss, cpu_seconds = run_prepare(raw, Path(tmp) / "data", args.size, args.workers)
        load_after = os.getloadavg()[0]
        images = Path(tmp) / "data" / "chexpert" / "images.npy"
        measured = images.stat().st_size
    computed = {side: args.n * side * side for side in (224, 256)}
    full = {side: 377_110 * side * side for side in (224, 256)}
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## Streaming prepare, {args.n:,} generated chest X-rays ({date.today().isoformat()}, "
        f"CPU {cpu}, {os.cpu_count()} cores shared with other jobs)",
        "",
        f"`python benchmarks/prepare_stream.py --n {args.n} --size {args.size} --workers {args.workers}`: "
        "CheXpert layout, 320×390 grayscale JPEGs, `fairbench prepare chexpert` in a subprocess, "
        f"{args.workers} decoding processes, memory and CPU time of the whole process tree sampled every 0.1 s; "
        f"load average {load_before:.1f} before and {load_after:.1f} after on this shared machine, so wall-clock "
        "rates understate what the code does on an idle machine: the CPU-time rate is the per-core figure.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| wall time (validation, decoding, checksums) | {seconds:.1f} s |",
        f"| images/s | {args.n / seconds:.0f} |",
        f"| images/s per decoding process (wall clock) | {args.n / seconds / args.workers:.0f} |",
        f"| CPU time of the process tree (user + system) | {cpu_seconds:.0f} s |",
        f"| images per CPU-second (images/s per core) | {args.n / cpu_seconds:.0f} |",
        f"| peak memory, summed RSS of the process tree (upper bound) | {rss / 2**20:.0f} MiB |",
        f"| peak memory, summed PSS of the process tree | {pss / 2**20:.0f} MiB |",
        f"| images.npy at {args.size} px, measured | {measured / 2**30:.2f} GiB ({measured:,} bytes) |",
        f"| images.npy at 224 / 256 px, computed (N×1×S×S uint8) | "
        f"{computed[224] / 2**30:.2f} / {computed[256] / 2**30:.2f} GiB |",
        f"| full MIMIC-CXR-JPG (377,110 images) at 224 / 256 px, computed | "
        f"{full[224] / 2**30:.1f} / {full[256] / 2**30:.1f} GiB |",
        "| GPU | not measured: prepare runs on the CPU |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
