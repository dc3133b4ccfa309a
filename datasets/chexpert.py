"""chexpert: CheXpert chest radiographs (Irvin et al., AAAI 2019; Stanford AIMI) with the
CHEXPERT DEMO race table.

Reads the download as published: a root folder ``CheXpert-v1.0/`` or ``CheXpert-v1.0-small/``
(``--source`` may be the root or its parent) holding ``train.csv``, ``valid.csv`` and the
JPEGs under ``train/patientNNNNN/studyN/viewN_frontal.jpg``; and ``CHEXPERT DEMO.xlsx`` (or its
CSV conversion, ``CHEXPERT DEMO.csv``) in the source, the root or the root's parent.

Protocol: see :mod:`fairbench.datasets.chest_xray` (label, uncertain labels, views, attributes).
Sex and age come from the CSVs (``Age`` 0 means unknown); race is ``PRIMARY_RACE`` of the
demographics table, joined on the patient id (a patient missing from it has unknown race).
Splits: the official validation set (200 patients) is too small for subgroup metrics, so
train and valid together are re-split 70/10/20 by patient (no patient in two splits) with
``split_seed``, independent of the training seed and of every other option.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from fairbench.datasets.chest_xray import (
    FINDINGS,
    SEX,
    ChestXray,
    check_findings,
    check_values,
    find_file,
    read_table,
    subject_race,
)

from fairbench.errors import FairbenchError
from fairbench.prepare import decode_images, read_gray

CSVS = ("train.csv", "valid.csv")
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS)
DEMO_NAMES = ("CHEXPERT DEMO.xlsx", "CHEXPERT DEMO.csv")
DEMO_REQUIRED = ("PATIENT", "PRIMARY_RACE")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
REDOWNLOAD = "re-download it from Stanford AIMI"


def find_root(source: Path) -> Path:
    """The folder holding train.csv and valid.csv: ``source`` or a CheXpert folder inside it."""
    candidates = [source, *sorted(p for p in source.iterdir() if p.is_dir())]
    for folder in candidates:
        if all((folder / name).is_file() for name in CSVS):
            return folder
    raise FairbenchError(
        f"{source}: no CheXpert train.csv and valid.csv found; pass --source the CheXpert-v1.0 "
        "(or CheXpert-v1.0-small) folder or the folder that holds it"
    )


def read_labels(root: Path) -> pd.DataFrame:
    """train.csv and valid.csv with every value checked, plus ``patient`` and ``source_split``."""
    frames = []
    for name in CSVS:
        path = root / name
        frame = read_table(path, REQUIRED, REDOWNLOAD)[list(REQUIRED)]
        frame = frame.apply(lambda col: col.str.strip())
        check_values(frame, "Sex", {"Male", "Female", "Unknown", ""}, path)
        check_values(frame, "Frontal/Lateral", {"Frontal", "Lateral"}, path)
        check_values(frame, "AP/PA", {"AP", "PA", "LL", "RL", ""}, path)
        check_findings(frame, path)
        age = pd.to_numeric(frame["Age"], errors="coerce")
        if age.isna().any():
            raise FairbenchError(
                f"{path}: Age value {frame['Age'][age.isna()].iloc[0]!r} is not a number; ages are whole years"
            )
        patient = frame["Path"].str.extract(r"(?:^|/)(patient\d+)/", expand=False)
        if patient.isna().any():
            raise FairbenchError(
                f"{path}: Path {frame['Path'][patient.isna()].iloc[0]!r} has no patientNNNNN folder; {REDOWNLOAD}"
            )
        frame.insert(1, "patient", patient)
        frame.insert(2, "source_split", name.removesuffix(".csv"))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    if table["Path"].duplicated().any():
        raise FairbenchError(f"{root}: Path {table['Path'][table['Path'].duplicated()].iloc[0]} is listed twice")
    return table


def read_demographics(source: Path, root: Path) -> tuple[pd.Series, set]:
    """Race text per patient and the patients whose known race values conflict."""
    path = find_file(
        list(dict.fromkeys([source, root, root.parent])),
        DEMO_NAMES,
        "put CHEXPERT DEMO.xlsx (from the Stanford AIMI CheXpert demographics download) next to train.csv",
    )
    demo = read_table(path, DEMO_REQUIRED, "use the published CHEXPERT DEMO.xlsx")
    demo["PATIENT"] = demo["PATIENT"].str.strip()
    return subject_race(demo["PATIENT"], demo["PRIMARY_RACE"].str.strip(), path, "PRIMARY_RACE")


def image_path(root: Path, listed: str) -> str:
    """The file of a ``Path`` entry: it starts with the root folder's name (whatever it is called now)."""
    parts = listed.split("/")
    return os.path.join(root, *(parts if parts[0] in ("train", "valid") else parts[1:]))


def patient_split(patients: np.ndarray, seed: int) -> np.ndarray:
    """70/10/20 of the patients, shuffled with ``seed``; ``train``, ``val`` or ``test`` per entry."""
    unique = np.unique(patients)
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    cut_train = round(SPLIT_FRACTIONS[0] * len(unique))
    cut_val = round((SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * len(unique))
    names = np.array(["train"] * cut_train + ["val"] * (cut_val - cut_train) + ["test"] * (len(unique) - cut_val))
    lookup = pd.Series(names, index=order)
    return lookup[patients].to_numpy()


class CheXpert(ChestXray):
    """CheXpert chest X-rays (Irvin et al. 2019) with race from CHEXPERT DEMO; re-split by patient."""

    name: ClassVar[str] = "chexpert"

    def __init__(
        self,
        *,
        label: str = "No Finding",
        uncertain: Literal["zeros", "ones", "drop"] = "zeros",
        views: Literal["frontal", "pa", "ap", "all"] = "frontal",
        split_seed: int = 0,
    ) -> None:
        super().__init__(label=label, uncertain=uncertain, views=views)
        self.split_seed = split_seed

    def view_positions(self, meta: pd.DataFrame) -> np.ndarray:
        frontal = meta["Frontal/Lateral"].to_numpy() == "Frontal"
        return np.where(frontal, meta["AP/PA"].fillna("").to_numpy(), "LATERAL")

    def frontal(self, meta: pd.DataFrame) -> np.ndarray:
        """``Frontal/Lateral == Frontal``, whatever ``AP/PA`` says (it is blank for some frontal views)."""
        return meta["Frontal/Lateral"].to_numpy() == "Frontal"

    def raw_codes(self, meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sex = meta["Sex"].fillna("").str.lower().map(SEX).to_numpy(np.int64)
        age = pd.to_numeric(meta["Age"], errors="coerce").to_numpy(np.float64)
        age = np.where(age > 0, age, np.nan)  # CheXpert writes 0 for an unknown age
        return sex, age, meta["race_text"].to_numpy()

    def splits_of(self, meta: pd.DataFrame) -> np.ndarray:
        return patient_split(meta["patient"].to_numpy(), self.split_seed)

    def prepare(self, source: Path, folder: Path, *, size: int, skip_missing: bool, workers: int | None):
        """Validate the download in ``source``, decode every listed view into ``folder``; the table."""
        root = find_root(source)
        meta = read_labels(root)
        race, conflicts = read_demographics(source, root)
        dropped = meta["patient"].isin(conflicts)
        meta = meta[~dropped].reset_index(drop=True)
        meta["race_text"] = meta["patient"].map(race).fillna("")
        paths = [image_path(root, p) for p in meta["Path"]]
        present = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
        if not present.all() and not skip_missing:
            example = paths[int(np.argmin(present))]
            raise FairbenchError(
                f"{root / CSVS[0]}: {(~present).sum()} listed image(s) not found, e.g. {example}; "
                "complete the download or pass --skip-missing to leave them out"
            )
        meta = meta[present].reset_index(drop=True)
        paths = [p for p, ok in zip(paths, present, strict=True) if ok]
        decode_images(paths, folder, size=size, channels=1, reader=read_gray, workers=workers)
        table = self.table(meta)
        table.attrs["skipped_missing"] = int((~present).sum())
        table.attrs["report"] = {
            "race_conflicts": {"patients": len(conflicts), "images": int(dropped.sum())},
        }
        return table
