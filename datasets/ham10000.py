"""ham10000: dermatoscopic images of pigmented skin lesions (Tschandl, Rosendahl & Kittler,
Scientific Data 2018; doi:10.7910/DVN/DBW86T).

Reads the download as published: ``HAM10000_metadata.csv`` (or ``.tab``, or without an
extension; comma or tab separated; with or without the final ``dataset`` column) and the JPEGs
``<image_id>.jpg`` in ``HAM10000_images_part_1/`` and ``_part_2/`` or any other folder below
the source. Images are resized once so the short side is ``size`` (default 256) and the centre
``size x size`` square is kept, in RGB order.

Protocol (each a logged option):
- label: positive = {mel, akiec} (the convention of fairness benchmarks on HAM10000), or
  ``label=malignant`` = {mel, bcc, akiec};
- attributes: ``sex`` {female, male} (unknown -> -1), ``age`` {<60, ≥60} (missing -> -1),
  ``age5`` {0–19, 20–39, 40–59, 60–79, 80+};
- split 80/10/10 by ``lesion_id`` (no lesion in two splits), stratified by label, drawn from
  ``split_seed``, which is independent of the training seed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd

from fairbench import cache
from fairbench.data import Dataset, Splits, splits_of_table
from fairbench.errors import FairbenchError
from fairbench.prepare import decode_images

DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
LABELS = {"mel_akiec": {"mel", "akiec"}, "malignant": {"mel", "bcc", "akiec"}}
SEX = {"female": 0, "male": 1, "unknown": -1}
AGE5_EDGES = (20, 40, 60, 80)
REQUIRED = ("lesion_id", "image_id", "dx", "age", "sex")
METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def find_metadata(source: Path) -> Path:
    for name in METADATA_NAMES:
        for path in (source / name, *sorted(source.glob(f"*/{name}"))):
            if path.is_file():
                return path
    raise FairbenchError(
        f"{source}: no HAM10000_metadata.csv (or .tab, or without extension) found; "
        "pass --source the folder that holds the HAM10000 download"
    )


def read_metadata(path: Path) -> pd.DataFrame:
    """The metadata table with its values checked; names the file and field of any problem."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        first = fh.readline()
    sep = "\t" if first.count("\t") > first.count(",") else ","
    try:
        meta = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FairbenchError(f"{path}: not a readable table ({exc}); re-download HAM10000_metadata") from None
    meta.columns = [c.strip().strip('"') for c in meta.columns]
    missing = [c for c in REQUIRED if c not in meta.columns]
    if missing:
        raise FairbenchError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED)} "
            f"(found {', '.join(meta.columns)}); re-download HAM10000_metadata"
        )
    meta = meta[list(REQUIRED)].apply(lambda col: col.str.strip())
    bad_dx = sorted(set(meta["dx"]) - set(DX))
    if bad_dx:
        raise FairbenchError(f"{path}: unknown dx value(s) {', '.join(map(repr, bad_dx))}; expected {', '.join(DX)}")
    meta["sex"] = meta["sex"].replace("", "unknown")  # an empty field means unknown, as "unknown" does
    bad_sex = sorted(set(meta["sex"]) - set(SEX))
    if bad_sex:
        raise FairbenchError(
            f"{path}: unknown sex value(s) {', '.join(map(repr, bad_sex))}; expected male, female or unknown"
        )
    age = pd.to_numeric(meta["age"].replace({"": None, "NA": None, "nan": None}), errors="coerce")
    bad_age = meta["age"][age.isna() & ~meta["age"].isin(["", "NA", "nan"])]
    if len(bad_age):
        raise FairbenchError(f"{path}: age value {bad_age.iloc[0]!r} is not a number; ages are years such as 45.0")
    meta["age"] = age
    if meta["image_id"].duplicated().any():
        dup = meta["image_id"][meta["image_id"].duplicated()].iloc[0]
        raise FairbenchError(f"{path}: image_id {dup} is listed twice; re-download HAM10000_metadata")
    return meta.rename(columns={"age": "raw_age", "sex": "raw_sex"})


def find_images(source: Path) -> dict[str, Path]:
    """image_id -> JPEG path, from any folder below ``source`` (first in sorted order wins)."""
    found: dict[str, Path] = {}
    for path in sorted(source.rglob("*.jpg")) + sorted(source.rglob("*.JPG")):
        found.setdefault(path.stem, path)
    return found


def lesion_split(meta: pd.DataFrame, labels: np.ndarray, seed: int) -> np.ndarray:
    """80/10/10 split by lesion, stratified by label: no lesion_id lands in two splits.

    Within each label stratum, lesions are shuffled with ``seed`` and given to train until it
    holds 80% of the stratum's images, then to val until 90%, then to test.
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"lesion": meta["lesion_id"].to_numpy(), "label": labels})
    lesion_label = frame.groupby("lesion")["label"].max()
    lesion_size = frame.groupby("lesion").size()
    assignment: dict[str, str] = {}
    for label in (0, 1):
        lesions = lesion_label.index[lesion_label == label].to_numpy()
        lesions = lesions[rng.permutation(len(lesions))]
        sizes = lesion_size[lesions].to_numpy()
        total = sizes.sum()
        before = np.cumsum(sizes) - sizes  # images already assigned when this lesion comes
        cut_train, cut_val = SPLIT_FRACTIONS[0] * total, (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * total
        for lesion, b in zip(lesions, before, strict=True):
            assignment[lesion] = "train" if b < cut_train else ("val" if b < cut_val else "test")
    return frame["lesion"].map(assignment).to_numpy()


def codes(meta: pd.DataFrame) -> dict[str, np.ndarray]:
    """Attribute codes per image (-1 unknown) from the raw ``raw_age`` and ``raw_sex`` columns."""
    age = meta["raw_age"].to_numpy(dtype=float)
    known = ~np.isnan(age)
    age2 = np.where(known, (np.nan_to_num(age) >= 60).astype(np.int64), -1)
    age5 = np.where(known, np.searchsorted(AGE5_EDGES, np.nan_to_num(age), side="right"), -1)
    return {"sex": meta["raw_sex"].map(SEX).to_numpy(np.int64), "age": age2, "age5": age5.astype(np.int64)}


class HAM10000(Dataset):
    """HAM10000 dermatoscopy (Tschandl et al. 2018): 10,015 images; sex and age."""

    name: ClassVar[str] = "ham10000"
    attributes: ClassVar[dict[str, list[str]]] = {
        "sex": ["female", "male"],
        "age": ["<60", "≥60"],
        "age5": ["0–19", "20–39", "40–59", "60–79", "80+"],
    }
    label_names: ClassVar[tuple[str, ...]] = (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    )
    in_chans: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 224
    cache_size: ClassVar[int] = 256

    def __init__(self, *, label: Literal["mel_akiec", "malignant"] = "mel_akiec", split_seed: int = 0) -> None:
        self.label = label
        self.split_seed = split_seed

    def is_prepared(self, data_dir: Path) -> bool:
        return cache.read_manifest(data_dir, self.name) is not None

    def table(self, meta: pd.DataFrame) -> pd.DataFrame:
        """The protocol's label, attribute codes and split from the raw columns
        (``lesion_id``, ``image_id``, ``dx``, ``raw_age``, ``raw_sex``)."""
        out = meta.copy()
        out["label"] = meta["dx"].isin(LABELS[self.label]).astype(np.int64).to_numpy()
        for attr, values in codes(meta).items():
            out[attr] = values
        out["split"] = lesion_split(meta, out["label"].to_numpy(), self.split_seed)
        return out

    def prepare(self, source: Path, folder: Path, *, size: int, skip_missing: bool, workers: int) -> pd.DataFrame:
        """Read the download in ``source`` and write images and metadata into ``folder``."""
        meta_path = find_metadata(source)
        meta = read_metadata(meta_path)
        images = find_images(source)
        if not images:
            raise FairbenchError(
                f"{source}: no .jpg images found; put HAM10000_images_part_1/ and _part_2/ (or one folder "
                "of <image_id>.jpg files) under the source folder"
            )
        missing = [i for i in meta["image_id"] if i not in images]
        if missing and not skip_missing:
            raise FairbenchError(
                f"{meta_path}: {len(missing)} listed image(s) not found, e.g. {missing[0]}.jpg; "
                "complete the download or pass --skip-missing to leave them out"
            )
        meta = meta[~meta["image_id"].isin(missing)].reset_index(drop=True)
        paths = [images[i] for i in meta["image_id"]]
        decode_images(paths, folder, size=size, channels=3, workers=workers)
        table = self.table(meta)
        table["source_file"] = [str(p.relative_to(source)) for p in paths]
        table.attrs["skipped_missing"] = len(missing)
        return table

    def load(self, data_dir: Path, image_size: int) -> Splits:
        images, meta, _ = cache.load(data_dir, self.name)
        table = self.table(meta)
        splits = splits_of_table(images, table, self.attributes)
        return Splits(
            **splits,
            attributes={k: list(v) for k, v in self.attributes.items()},
            mean=(0.485, 0.456, 0.406),  # ImageNet statistics, matching timm's pretrained backbones
            std=(0.229, 0.224, 0.225),
            augment=("crop", "hflip", "vflip", "rotate"),  # lesions have no canonical orientation
            size=image_size,
        )
