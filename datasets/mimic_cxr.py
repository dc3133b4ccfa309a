"""mimic_cxr: MIMIC-CXR-JPG 2.0.0 / 2.1.0 chest radiographs (Johnson et al., Scientific Data 2019;
PhysioNet) with sex, age and race from MIMIC-IV (Johnson et al., Scientific Data 2023).

Reads the downloads as published (``--source`` is the MIMIC-CXR-JPG folder, or its parent):
``mimic-cxr-2.0.0-metadata.csv.gz``, ``-chexpert.csv.gz`` and ``-split.csv.gz`` (plain ``.csv``
accepted too) next to ``files/pNN/pSUBJECT/sSTUDY/<dicom_id>.jpg``; and MIMIC-IV's
``hosp/patients.csv.gz`` and ``hosp/admissions.csv.gz`` (``core/`` in MIMIC-IV 1.0) in the
source, one or two folders below it.

Protocol: see :mod:`fairbench.datasets.chest_xray`. Frontal = ``ViewPosition`` PA or AP.
Labels: the study's row of the CheXpert-labeler table (an image whose study has none is left
out and counted). Sex: ``gender``; age: ``anchor_age`` (the age in the subject's anchor year,
the age MIMIC-IV publishes); race: ``race`` (``ethnicity`` in MIMIC-IV 1.0) over all of the
subject's admissions. A subject without a MIMIC-IV row has unknown sex, age or race. Splits:
the official split file (``validate`` is the validation split); a subject in two splits is an
error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

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

PREFIX = "mimic-cxr-2.0.0-"
TABLES = {
    "metadata": ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    "chexpert": ("subject_id", "study_id", *FINDINGS),
    "split": ("dicom_id", "study_id", "subject_id", "split"),
}
SPLITS = {"train": "train", "validate": "val", "test": "test"}
CXR_FIX = "re-download it from PhysioNet (MIMIC-CXR-JPG)"
IV_FIX = "re-download it from PhysioNet (MIMIC-IV, hosp module)"
_IMAGE_TREE = re.compile(r"[ps]\d+")


def folders(source: Path, depth: int = 3) -> list[Path]:
    """``source`` and the folders up to ``depth`` levels below it, breadth first, without
    entering the image tree (``pNN``, ``pSUBJECT`` and ``sSTUDY`` folders)."""
    found, level = [source], [source]
    for _ in range(depth):
        level = [c for f in level for c in sorted(f.iterdir()) if c.is_dir() and not _IMAGE_TREE.fullmatch(c.name)]
        found += level
    return found


def find_base(source: Path) -> Path:
    """The MIMIC-CXR-JPG folder: the first folder below ``source`` holding the metadata table."""
    for folder in folders(source):
        if any((folder / f"{PREFIX}metadata{ext}").is_file() for ext in (".csv.gz", ".csv")):
            return folder
    raise FairbenchError(
        f"{source}: no {PREFIX}metadata.csv.gz found; pass --source the MIMIC-CXR-JPG folder "
        "(the one holding files/ and the mimic-cxr-2.0.0-*.csv.gz tables) or a folder above it"
    )


def find_mimic_iv(source: Path) -> Path:
    """The MIMIC-IV ``hosp/`` (or 1.0 ``core/``) folder, at most three folders below ``source``."""
    for folder in folders(source):
        for module in ("hosp", "core"):
            if any((folder / module / f"patients{ext}").is_file() for ext in (".csv.gz", ".csv")):
                return folder / module
    raise FairbenchError(
        f"{source}: no MIMIC-IV hosp/patients.csv.gz found; put the MIMIC-IV folder holding "
        "hosp/patients.csv.gz and hosp/admissions.csv.gz inside the source folder"
    )


def table_path(folder: Path, stem: str, fix: str) -> Path:
    return find_file([folder], (f"{stem}.csv.gz", f"{stem}.csv"), fix)


def read_images(base: Path) -> tuple[pd.DataFrame, int]:
    """One row per image with its official split and findings; images of unlabelled studies left out."""
    paths = {name: table_path(base, f"{PREFIX}{name}", CXR_FIX) for name in TABLES}
    meta, labels, split = (read_table(paths[n], TABLES[n], CXR_FIX)[list(TABLES[n])] for n in TABLES)
    check_values(split, "split", set(SPLITS), paths["split"])
    check_findings(labels, paths["chexpert"])
    for name, frame in (("metadata", meta), ("split", split)):
        if frame["dicom_id"].duplicated().any():
            dup = frame["dicom_id"][frame["dicom_id"].duplicated()].iloc[0]
            raise FairbenchError(f"{paths[name]}: dicom_id {dup} is listed twice; {CXR_FIX}")
    per_subject = split.groupby("subject_id")["split"].nunique()
    if (per_subject > 1).any():
        subject = per_subject.index[per_subject > 1][0]
        raise FairbenchError(
            f"{paths['split']}: subject_id {subject} is in more than one split "
            f"({', '.join(sorted(set(split['split'][split['subject_id'] == subject])))}); splits must be "
            "patient-disjoint: use the published split file"
        )
    if labels.duplicated(["subject_id", "study_id"]).any():
        row = labels[labels.duplicated(["subject_id", "study_id"])].iloc[0]
        raise FairbenchError(f"{paths['chexpert']}: study_id {row['study_id']} is listed twice; {CXR_FIX}")
    table = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="left", validate="one_to_one")
    if table["split"].isna().any():
        dicom = table["dicom_id"][table["split"].isna()].iloc[0]
        raise FairbenchError(f"{paths['split']}: no split row for dicom_id {dicom}; {CXR_FIX}")
    table = table.rename(columns={"split": "official_split"})
    table = table.merge(labels, on=["subject_id", "study_id"], how="left", validate="many_to_one", indicator=True)
    labelled = table.pop("_merge").to_numpy() == "both"
    return table[labelled].reset_index(drop=True), int((~labelled).sum())


def read_demographics(folder: Path) -> tuple[pd.DataFrame, pd.Series, set]:
    """Sex and anchor age per subject; race text per subject; subjects whose known races conflict."""
    patients_path = table_path(folder, "patients", IV_FIX)
    patients = read_table(patients_path, ("subject_id", "gender", "anchor_age"), IV_FIX)
    patients = patients[["subject_id", "gender", "anchor_age"]].apply(lambda col: col.str.strip())
    check_values(patients, "gender", {"M", "F", ""}, patients_path)
    age = pd.to_numeric(patients["anchor_age"].replace("", None), errors="coerce")
    bad = age.isna() & (patients["anchor_age"] != "")
    if bad.any():
        raise FairbenchError(
            f"{patients_path}: anchor_age value {patients['anchor_age'][bad].iloc[0]!r} is not a number; {IV_FIX}"
        )
    admissions_path = table_path(folder, "admissions", IV_FIX)
    admissions = read_table(admissions_path, ("subject_id",), IV_FIX, extra=("race", "ethnicity"))
    column = next((c for c in ("race", "ethnicity") if c in admissions.columns), None)
    if column is None:
        raise FairbenchError(f"{admissions_path}: missing column race (MIMIC-IV ≥ 2.0) or ethnicity (1.0); {IV_FIX}")
    race, conflicts = subject_race(
        admissions["subject_id"].str.strip(), admissions[column].str.strip(), admissions_path, column
    )
    return patients.drop_duplicates("subject_id").set_index("subject_id"), race, conflicts


def image_path(files: Path, subject: str, study: str, dicom: str) -> str:
    return os.path.join(files, f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom}.jpg")


class MIMICCXR(ChestXray):
    """MIMIC-CXR-JPG chest X-rays (Johnson et al. 2019) with MIMIC-IV demographics; official split."""

    name: ClassVar[str] = "mimic_cxr"

    def view_positions(self, meta: pd.DataFrame) -> np.ndarray:
        return meta["ViewPosition"].fillna("").astype(str).str.strip().str.upper().to_numpy()

    def raw_codes(self, meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sex = meta["gender"].fillna("").astype(str).str.lower().map(SEX).to_numpy(np.int64)
        age = pd.to_numeric(meta["anchor_age"], errors="coerce").to_numpy(np.float64)
        return sex, age, meta["race_text"].to_numpy()

    def splits_of(self, meta: pd.DataFrame) -> np.ndarray:
        return meta["official_split"].map(SPLITS).to_numpy()

    def prepare(self, source: Path, folder: Path, *, size: int, skip_missing: bool, workers: int | None):
        """Validate the downloads in ``source``, decode every listed image into ``folder``; the table."""
        base = find_base(source)
        meta, unlabelled = read_images(base)
        patients, race, conflicts = read_demographics(find_mimic_iv(source))
        dropped = meta["subject_id"].isin(conflicts)
        meta = meta[~dropped].reset_index(drop=True)
        meta["gender"] = meta["subject_id"].map(patients["gender"]).fillna("")
        meta["anchor_age"] = meta["subject_id"].map(patients["anchor_age"]).fillna("")
        meta["race_text"] = meta["subject_id"].map(race).fillna("")
        files = base / "files"
        paths = [
            image_path(files, *row) for row in zip(meta["subject_id"], meta["study_id"], meta["dicom_id"], strict=True)
        ]
        present = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
        if not present.all() and not skip_missing:
            raise FairbenchError(
                f"{base / (PREFIX + 'metadata.csv.gz')}: {(~present).sum()} listed image(s) not found, e.g. "
                f"{paths[int(np.argmin(present))]}; complete the download or pass --skip-missing to leave them out"
            )
        meta = meta[present].reset_index(drop=True)
        paths = [p for p, ok in zip(paths, present, strict=True) if ok]
        decode_images(paths, folder, size=size, channels=1, reader=read_gray, workers=workers)
        table = self.table(meta)
        table.attrs["skipped_missing"] = int((~present).sum())
        table.attrs["report"] = {
            "race_conflicts": {"subjects": len(conflicts), "images": int(dropped.sum())},
            "unlabelled_study_images": unlabelled,
        }
        return table
