"""Time ``fairbench prepare ham10000`` on a generated download of HAM10000's size and format.

Writes 10,015 JPEGs of 600 x 450 (smooth, photo-like content, quality 90) and a metadata file
in the published layout, then prepares them with the default settings and prints the wall
time and the time per image.

Usage: ``python benchmarks/prepare_ham.py [--n 10015] [--workers N] [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
from _common import emit, machine
from fairbench.datasets.ham10000 import HAM10000
from PIL import Image

from fairbench.prepare import default_workers, prepare

DX = ["nv"] * 67 + ["mel"] * 11 + ["bkl"] * 11 + ["bcc"] * 5 + ["akiec"] * 3 + ["vasc", "df"]


def _write(args: tuple[Path, int, int]) -> None:
    folder, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        coarse = rng.uniform(60, 220, (9, 12, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((600, 450), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (450, 600, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"ISIC_{i:07d}.jpg", quality=90)


def make_download(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization,dataset"]
    for i in range(n):
        age = "" if i % 175 == 0 else f"{5 * rng.integers(0, 18):.1f}"
        sex = ["male", "female", "unknown"][0 if i % 2 else (2 if i % 200 == 0 else 1)]
        lines.append(f"HAM_{i // 2:07d},ISIC_{i:07d},{DX[i % len(DX)]},histo,{age},{sex},back,vidir_modern")
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    half = n // 2
    parts = [(root / "HAM10000_images_part_1", 0, half), (root / "HAM10000_images_part_2", half, n)]
    jobs = []
    for folder, a, b in parts:
        folder.mkdir()
        jobs += [(folder, s, min(s + 200, b)) for s in range(a, b, 200)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write, jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10015)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        t0 = time.perf_counter()
        make_download(raw, args.n)
        print(f"generated {args.n} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        done = prepare(HAM10000(), raw, Path(tmp) / "data", workers=workers)
        seconds = time.perf_counter() - t0
        size_mb = (done.folder / "images.npy").stat().st_size / 2**20
    emit(
        [
            f"## Preparing HAM10000 ({date.today().isoformat()}, {machine()})",
            "",
            f"{args.n} generated 600×450 JPEGs in the published layout -> 256×256 uint8 cache ({size_mb:.0f} MiB), "
            f"{workers} decoding processes:",
            "",
            "| images | wall time | per image | per image × workers |",
            "| --- | --- | --- | --- |",
            f"| {args.n} | {seconds:.1f} s | {1000 * seconds / args.n:.2f} ms | "
            f"{1000 * seconds * workers / args.n:.2f} ms |",
            "",
        ],
        args.append,
    )


if __name__ == "__main__":
    main()
