"""fitzpatrick17k: clinical images of skin conditions with Fitzpatrick skin types (Groh et al.,
"Evaluating deep neural networks trained on clinical images in dermatology with the
Fitzpatrick 17k dataset", CVPR Workshops 2021).

Reads the download as published: ``fitzpatrick17k.csv`` (columns ``md5hash,
fitzpatrick_scale, fitzpatrick_centaur, label, nine_partition_label, three_partition_label,
qc, url, url_alphanum``) and the images the user fetched from ``url``, stored as
``<md5hash>.jpg`` in a folder below the source (``--skip-missing`` leaves out those that could
not be fetched). Images are cached like HAM10000's: RGB, short side to the cache size, centre
square kept. A row whose ``md5hash`` repeats an earlier one (the same image) is left out and
counted, so no image can land in two splits.

Protocol (``-D`` options, applied at load): label = ``three_partition_label == malignant`` (or
``label=benign`` / ``non-neoplastic``); attributes ``skin_type`` {I–II, III–IV, V–VI} and the
six-level ``fitzpatrick`` from ``fitzpatrick_scale`` (-1 unknown); split 70/10/20 stratified by
``three_partition_label`` with ``split_seed`` (no patient ids are published).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from fairbench.datasets.chest_xray import check_values, read_table

from fairbench import cache
from fairbench.data import Dataset, Splits, splits_of_table
from fairbench.errors import FairbenchError
from fairbench.prepare import decode_images, read_jpeg

CSV = "fitzpatrick17k.csv"
REQUIRED = ("md5hash", "fitzpatrick_scale", "label", "three_partition_label")
CLASSES = ("benign", "malignant", "non-neoplastic")
SCALE = {str(k): k for k in range(1, 7)} | {"-1": -1}
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
FIX = "use the published fitzpatrick17k.csv"


def find_csv(source: Path) -> Path:
    for path in (source / CSV, *sorted(source.glob(f"*/{CSV}"))):
        if path.is_file():
            return path
    raise FairbenchError(f"{source}: no {CSV} found; pass --source the folder that holds {CSV} and the images")


def read_metadata(path: Path) -> tuple[pd.DataFrame, int]:
    """The checked table, without repeated ``md5hash`` rows (their count returned)."""
    meta = read_table(path, REQUIRED, FIX)
    meta = meta.apply(lambda col: col.str.strip())
    scale = meta["fitzpatrick_scale"].str.replace(r"\.0$", "", regex=True)
    check_values(meta.assign(fitzpatrick_scale=scale), "fitzpatrick_scale", set(SCALE), path)
    check_values(meta, "three_partition_label", set(CLASSES), path)
    meta["fitzpatrick_scale"] = scale.map(SCALE)
    repeated = meta["md5hash"].duplicated()
    return meta[~repeated].reset_index(drop=True), int(repeated.sum())


def stratified_split(classes: np.ndarray, seed: int) -> np.ndarray:
    """70/10/20 within each class, shuffled with ``seed``; ``train``, ``val`` or ``test`` per row."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(classes), dtype=object)
    for value in sorted(set(classes)):
        rows = np.flatnonzero(classes == value)
        rows = rows[rng.permutation(len(rows))]
        cut_train = round(SPLIT_FRACTIONS[0] * len(rows))
        cut_val = round((SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * len(rows))
        out[rows[:cut_train]], out[rows[cut_train:cut_val]], out[rows[cut_val:]] = "train", "val", "test"
    return out.astype(str)


class Fitzpatrick17k(Dataset):
    """Fitzpatrick17k clinical dermatology images (Groh et al. 2021); Fitzpatrick skin type."""

    name: ClassVar[str] = "fitzpatrick17k"
    attributes: ClassVar[dict[str, list[str]]] = {
        "skin_type": ["I–II", "III–IV", "V–VI"],
        "fitzpatrick": ["I", "II", "III", "IV", "V", "VI"],
    }
    label_names: ClassVar[tuple[str, ...]] = CLASSES
    in_chans: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 224
    cache_size: ClassVar[int] = 256

    def __init__(self, *, label: Literal["malignant", "benign", "non-neoplastic"] = "malignant", split_seed: int = 0):
        self.label = label
        self.split_seed = split_seed

    def is_prepared(self, data_dir: Path) -> bool:
        return cache.read_manifest(data_dir, self.name) is not None

    def table(self, meta: pd.DataFrame) -> pd.DataFrame:
        """Label, attribute codes and split from ``three_partition_label`` and ``fitzpatrick_scale``."""
        out = meta.copy()
        classes = meta["three_partition_label"].to_numpy().astype(str)
        out["label"] = (classes == self.label).astype(np.int64)
        scale = meta["fitzpatrick_scale"].to_numpy(np.int64)
        known = scale >= 1
        out["fitzpatrick"] = np.where(known, scale - 1, -1)
        out["skin_type"] = np.where(known, (scale - 1) // 2, -1)
        out["split"] = stratified_split(classes, self.split_seed)
        return out

    def prepare(self, source: Path, folder: Path, *, size: int, skip_missing: bool, workers: int | None):
        """Validate the download in ``source``, decode every listed image into ``folder``; the table."""
        csv_path = find_csv(source)
        meta, repeated = read_metadata(csv_path)
        images: dict[str, Path] = {}
        for path in sorted(source.rglob("*.jpg")):
            images.setdefault(path.stem, path)
        missing = [h for h in meta["md5hash"] if h not in images]
        if missing and not skip_missing:
            raise FairbenchError(
                f"{csv_path}: {len(missing)} listed image(s) not found, e.g. {missing[0]}.jpg; fetch them from "
                "the url column into a folder under the source, or pass --skip-missing to leave them out"
            )
        meta = meta[~meta["md5hash"].isin(missing)].reset_index(drop=True)
        paths = [images[h] for h in meta["md5hash"]]
        decode_images(paths, folder, size=size, channels=3, reader=read_jpeg, workers=workers)
        table = self.table(meta)
        table["source_file"] = [str(p.relative_to(source)) for p in paths]
        table.attrs["skipped_missing"] = len(missing)
        table.attrs["report"] = {"repeated_md5hash_rows": repeated}
        return table

    def load(self, data_dir: Path, image_size: int) -> Splits:
        images, meta, _ = cache.load(data_dir, self.name)
        table = self.table(meta)
        parts = splits_of_table(images, table, self.attributes)
        return Splits(
            **parts,
            attributes={k: list(v) for k, v in self.attributes.items()},
            mean=(0.485, 0.456, 0.406),  # ImageNet statistics, matching timm's pretrained backbones
            std=(0.229, 0.224, 0.225),
            augment=("crop", "hflip", "vflip", "rotate"),
            size=image_size,
        )
