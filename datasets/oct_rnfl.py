"""oct_rnfl: Harvard-GF retinal nerve fibre layer thickness maps for glaucoma (Luo et al.,
"Harvard Glaucoma Fairness", IEEE TMI 2024; 3,300 patients).

Reads the download as published: ``Training/``, ``Validation/``, ``Test/`` (or ``train/``,
``val/``, ``test/``) of ``data_XXXX.npz`` files. Only the keys the protocol needs are read
(``rnflt``, ``glaucoma``, ``race``, ``male``, ``hispanic``, ``age``); the large
``oct_bscans`` volume is never loaded (npz members load lazily).

Input: the 200 x 200 RNFLT map, one channel. Invalid pixels (-2, any negative value) are set to
0. The map is stored in microns as float16 and scaled by 1/``RNFLT_SCALE`` (350 µm, about the
thickest normal RNFL) when batches are built, so values lie roughly in [0, 1].

Protocol: label ``glaucoma``; attributes ``race`` {Asian, Black, White} (stored as integers
0/1/2 or as strings such as "Black or African American"; any other value is an error listing
the values seen), ``sex`` {female, male} (from ``male``), ``age`` {<60, ≥60}, ``ethnicity``
{non-Hispanic, Hispanic} (from ``hispanic``; -1 unknown). Splits as shipped: select on
Validation, score on Test.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from fairbench import cache
from fairbench.data import Dataset, Split, Splits
from fairbench.errors import FairbenchError
from fairbench.prepare import decode_images

RNFLT_SCALE = 350.0
KEYS = ("rnflt", "glaucoma", "race", "male", "hispanic", "age")
FOLDERS = {"train": ("Training", "train"), "val": ("Validation", "val"), "test": ("Test", "test")}
RACE = {
    "asian": 0,
    "black": 1,
    "black or african american": 1,
    "white": 2,
    "white or caucasian": 2,
}


def _scalar(value: np.ndarray) -> Any:
    item = np.asarray(value).reshape(-1)[0] if np.asarray(value).size else None
    return item.decode() if isinstance(item, bytes) else (item.item() if hasattr(item, "item") else item)


def read_rnflt(path: Path, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The RNFLT map of one npz file as (1, S, S) float16 microns, and its label and attributes."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise FairbenchError(
                    f"{path}: no key(s) {', '.join(missing)} (keys: {', '.join(f.files)}); "
                    "this is not a Harvard-GF OCT-RNFL file — re-download it"
                )
            rnflt = np.asarray(f["rnflt"], dtype=np.float32)
            info = {k: _scalar(f[k]) for k in KEYS if k != "rnflt"}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise FairbenchError(
            f"{path}: not a readable npz file ({exc}); replace it with the file from the download"
        ) from None
    if rnflt.ndim != 2:
        raise FairbenchError(f"{path}: rnflt has shape {rnflt.shape}, expected a 2-D map (200 x 200)")
    rnflt = np.where(rnflt < 0, 0.0, rnflt)
    if rnflt.shape != (size, size):
        from PIL import Image

        rnflt = np.asarray(Image.fromarray(rnflt, mode="F").resize((size, size), Image.BILINEAR))
    return rnflt[None].astype(np.float16), info


def race_code(value: Any) -> int | None:
    """0 Asian, 1 Black, 2 White from an integer code or a released string; None if unknown."""
    if isinstance(value, (int, np.integer, float)) and float(value).is_integer() and int(value) in (0, 1, 2):
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("0", "1", "2"):
            return int(text)
        return RACE.get(text)
    return None


def find_files(source: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for split, names in FOLDERS.items():
        folder = next((source / n for n in names if (source / n).is_dir()), None)
        if folder is None:
            raise FairbenchError(
                f"{source}: no {names[0]}/ (or {names[1]}/) folder; pass --source the folder that holds "
                "Training/, Validation/ and Test/ of the Harvard-GF download"
            )
        files = sorted(folder.glob("*.npz"))
        if not files:
            raise FairbenchError(f"{folder}: no .npz files; it should hold data_XXXX.npz files")
        found[split] = files
    return found


class OCTRNFL(Dataset):
    """Harvard-GF OCT RNFL thickness maps for glaucoma (Luo et al. 2024); race, sex, age, ethnicity."""

    name: ClassVar[str] = "oct_rnfl"
    attributes: ClassVar[dict[str, list[str]]] = {
        "race": ["Asian", "Black", "White"],
        "sex": ["female", "male"],
        "age": ["<60", "≥60"],
        "ethnicity": ["non-Hispanic", "Hispanic"],
    }
    label_names: ClassVar[tuple[str, ...]] = ("glaucoma", "no glaucoma")
    in_chans: ClassVar[int] = 1
    default_image_size: ClassVar[int] = 200
    cache_size: ClassVar[int] = 200

    def is_prepared(self, data_dir: Path) -> bool:
        return cache.read_manifest(data_dir, self.name) is not None

    def prepare(self, source: Path, folder: Path, *, size: int, skip_missing: bool, workers: int | None):
        files = find_files(source)
        paths = [p for split in FOLDERS for p in files[split]]
        infos = decode_images(
            paths, folder, size=size, channels=1, reader=read_rnflt, dtype=np.float16, workers=workers
        )
        table = pd.DataFrame(infos)
        table.insert(0, "file", [str(p.relative_to(source)) for p in paths])
        table.insert(1, "split", [split for split in FOLDERS for _ in files[split]])
        return self._codes(table, source)

    def _codes(self, table: pd.DataFrame, source: Path) -> pd.DataFrame:
        race = table["race"].map(race_code)
        if race.isna().any():
            seen = sorted({str(v) for v in table["race"][race.isna()]})
            example = table["file"][race.isna()].iloc[0]
            raise FairbenchError(
                f"{source / example}: unknown race value(s) {', '.join(map(repr, seen))}; expected 0/1/2 or "
                "Asian, Black (or African American), White (or Caucasian)"
            )
        for key, allowed in (("glaucoma", {0, 1}), ("male", {0, 1}), ("hispanic", {-1, 0, 1})):
            values = pd.to_numeric(table[key], errors="coerce")
            bad = values.isna() | ~values.isin(allowed)
            if bad.any():
                raise FairbenchError(
                    f"{source / table['file'][bad].iloc[0]}: {key} = {table[key][bad].iloc[0]!r}; "
                    f"expected one of {sorted(allowed)}"
                )
        age = pd.to_numeric(table["age"], errors="coerce")
        out = table.copy()
        out["label"] = table["glaucoma"].astype(np.int64)
        out["race"] = race.astype(np.int64)
        out["sex"] = table["male"].astype(np.int64)
        out["age"] = np.where(age.isna(), -1, (age >= 60).astype(np.int64))
        out["ethnicity"] = table["hispanic"].astype(np.int64)
        out["age_years"] = age
        out["race_raw"] = table["race"]
        return out

    def load(self, data_dir: Path, image_size: int) -> Splits:
        images, meta, _ = cache.load(data_dir, self.name)
        attrs = meta[list(self.attributes)].to_numpy(np.int64)
        labels = meta["label"].to_numpy(np.int64)
        splits = {}
        for name in FOLDERS:
            rows = np.flatnonzero(meta["split"].to_numpy() == name)
            splits[name] = Split(images=images, labels=labels[rows], attrs=attrs[rows], rows=rows)
        return Splits(
            **splits,
            attributes={k: list(v) for k, v in self.attributes.items()},
            mean=(0.0,),
            std=(1.0,),
            scale=1.0 / RNFLT_SCALE,
            augment=("crop", "rotate"),  # no flips: they would swap nasal and temporal sides
            size=image_size,
        )
