"""Writers of tiny datasets in the exact raw formats their publishers ship."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
DX_CYCLE = ["nv", "nv", "mel", "bkl", "nv", "akiec", "bcc", "nv", "df", "vasc", "mel", "nv"]


def write_ham(
    root: Path,
    n_lesions: int = 120,
    layout: str = "parts",
    metadata: str = "csv",
    dataset_column: bool = False,
    seed: int = 0,
    size=(60, 45),
) -> list[dict]:
    """A HAM10000-like download: lesions with 1-3 images each, unknown sex and missing ages."""
    rng = np.random.default_rng(seed)
    rows = []
    n = 0
    for lesion in range(n_lesions):
        dx = DX_CYCLE[lesion % len(DX_CYCLE)]
        age = "" if lesion % 17 == 0 else f"{5 * rng.integers(0, 18):.1f}"
        sex = "unknown" if lesion % 13 == 0 else ("male" if lesion % 2 else "female")
        for _ in range(1 + lesion % 3):
            n += 1
            rows.append(
                {
                    "lesion_id": f"HAM_{lesion:07d}",
                    "image_id": f"ISIC_{n:07d}",
                    "dx": dx,
                    "dx_type": "histo",
                    "age": age,
                    "sex": sex,
                    "localization": "back",
                }
            )
    root.mkdir(parents=True, exist_ok=True)
    columns = HAM_COLUMNS + (["dataset"] if dataset_column else [])
    sep = "\t" if metadata == "tab" else ","
    name = {"csv": "HAM10000_metadata.csv", "tab": "HAM10000_metadata.tab", "noext": "HAM10000_metadata"}[metadata]
    lines = [sep.join(columns)]
    for r in rows:
        lines.append(sep.join([r[c] for c in HAM_COLUMNS] + (["vidir_modern"] if dataset_column else [])))
    (root / name).write_text("\n".join(lines) + "\n")
    for i, r in enumerate(rows):
        folder = root / (
            ("HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2") if layout == "parts" else "images"
        )
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{r['image_id']}.jpg", quality=85)
    return rows


OCT_RACES_STR = ["Asian", "Black or African American", "White or Caucasian"]


def write_oct(
    root: Path, per_split=(12, 6, 8), naming: str = "long", race_as: str = "str", seed: int = 0, side: int = 20
) -> None:
    """A Harvard-GF OCT-RNFL-like download of npz files (small maps, a tiny oct_bscans volume)."""
    rng = np.random.default_rng(seed)
    names = ("Training", "Validation", "Test") if naming == "long" else ("train", "val", "test")
    n = 0
    for folder, count in zip(names, per_split, strict=True):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            n += 1
            rnflt = rng.uniform(20, 300, (side, side)).astype(np.float32)
            rnflt[0, :3] = -2
            race = n % 3
            np.savez(
                root / folder / f"data_{n:04d}.npz",
                rnflt=rnflt,
                glaucoma=np.array(n % 2),
                race=np.array(OCT_RACES_STR[race] if race_as == "str" else race),
                male=np.array((n // 2) % 2),
                hispanic=np.array(-1 if n % 7 == 0 else n % 2),
                age=np.array(40.0 + n),
                language=np.array("English"),
                maritalstatus=np.array("Married"),
                md=np.array(-1.5),
                tds=rng.normal(size=52),
                oct_bscans=np.zeros((2, 2, 2), dtype=np.uint8),
            )
