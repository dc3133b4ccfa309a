"""Writers of tiny datasets in the exact raw formats their publishers ship."""

from __future__ import annotations

import csv
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


CXR_FINDINGS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
CHEXPERT_RACES = [
    "White",
    "Black or African American",
    "Asian",
    "White, non-Hispanic",
    "Black, non-Hispanic",
    "Asian, non-Hispanic",
    "White, Hispanic",
    "Other",
    "Unknown",
    "Patient Refused",
    "Asian - Historical Conv",
    "Native Hawaiian or Other Pacific Islander",
]
MIMIC_RACES = [
    "WHITE",
    "BLACK/AFRICAN AMERICAN",
    "ASIAN - CHINESE",
    "WHITE - OTHER EUROPEAN",
    "BLACK/CAPE VERDEAN",
    "ASIAN",
    "HISPANIC/LATINO - PUERTO RICAN",
    "OTHER",
    "UNKNOWN",
    "UNABLE TO OBTAIN",
    "PATIENT DECLINED TO ANSWER",
    "AMERICAN INDIAN/ALASKA NATIVE",
]

MIMIC_VARIANT = {"WHITE": "WHITE - RUSSIAN", "ASIAN": "ASIAN - KOREAN", "BLACK/AFRICAN AMERICAN": "BLACK/AFRICAN"}


class JpegPool:
    """A few encoded grayscale (or RGB) JPEGs whose bytes are copied, so fixtures write fast."""

    def __init__(self, size=(40, 32), mode: str = "L", n: int = 8, seed: int = 0) -> None:
        import io

        rng = np.random.default_rng(seed)
        self.blobs = []
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        for _ in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buffer, format="JPEG", quality=85)
            self.blobs.append(buffer.getvalue())

    def write(self, path: Path, i: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.blobs[i % len(self.blobs)])


def _findings(rng: np.random.Generator, positive: bool) -> list[str]:
    values = [rng.choice(["", "0.0", "1.0", "-1.0"], p=[0.5, 0.2, 0.2, 0.1]) for _ in CXR_FINDINGS[1:]]
    if positive:
        values = ["" if v == "1.0" else v for v in values]
    return ["1.0" if positive else ""] + [str(v) for v in values]


def write_chexpert(
    root: Path, n_patients: int = 80, demo: str = "xlsx", folder: str = "CheXpert-v1.0-small", seed: int = 0
) -> dict:
    """A CheXpert download: train.csv / valid.csv with studies of frontal and lateral views,
    and the CHEXPERT DEMO table (xlsx, or its CSV conversion) with race text, unknowns and one
    patient whose two rows conflict (White and Black)."""
    from openpyxl import Workbook

    rng = np.random.default_rng(seed)
    pool = JpegPool(seed=seed)
    base = root / folder
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CXR_FINDINGS]
    lines = {"train": [header], "valid": [header]}
    demo_rows = []
    n = 0
    for p in range(1, n_patients + 1):
        patient = f"patient{p:05d}"
        part = "valid" if p % 10 == 0 else "train"
        sex = ["Female", "Male", "Female", "Male", "Unknown"][p % 5] if p % 11 else "Unknown"
        age = "0" if p % 13 == 0 else str(20 + (p * 7) % 70)
        for study in range(1, 2 + p % 2):
            positive = (p + study) % 3 == 0
            findings = _findings(rng, positive)
            position = "" if p % 7 == 0 else ["AP", "PA"][(p + study) % 2]  # some frontal views lack AP/PA
            views = [("Frontal", position)] + ([("Lateral", "")] if p % 4 == 0 else [])
            for v, (fl, appa) in enumerate(views, 1):
                rel = f"{part}/{patient}/study{study}/view{v}_{fl.lower()}.jpg"
                lines[part].append([f"{folder}/{rel}", sex, age, fl, appa, *findings])
                pool.write(base / rel, n)
                n += 1
        demo_rows.append(
            [patient, sex.upper(), age, CHEXPERT_RACES[p % len(CHEXPERT_RACES)], "Non-Hispanic/Non-Latino"]
        )
    conflict = "patient00003"
    demo_rows.append([conflict, "FEMALE", "40", "Black or African American", "Unknown"])
    base.mkdir(parents=True, exist_ok=True)
    for part, rows in lines.items():
        with open(base / f"{part}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    demo_header = ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
    if demo == "xlsx":
        book = Workbook()
        sheet = book.active
        for row in [demo_header, *demo_rows]:
            sheet.append(row)
        book.save(root / "CHEXPERT DEMO.xlsx")
    else:
        with open(root / "CHEXPERT DEMO.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([demo_header, *demo_rows])
    return {"base": base, "images": n, "conflict": conflict, "train_csv": base / "train.csv"}


def _write_gz(path: Path, rows: list[list]) -> None:
    import gzip
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    with gzip.open(path, "wt", newline="") as fh:
        fh.write(text.getvalue())


def write_mimic(root: Path, n_subjects: int = 60, race_column: str = "race", seed: int = 0) -> dict:
    """A MIMIC-CXR-JPG download (gzipped tables, files/pNN/p<subject>/s<study>/<dicom>.jpg) and a
    MIMIC-IV hosp/ folder. Subjects have 1-2 studies of PA/AP/LATERAL images and 1-2 admissions;
    one subject's races conflict, one subject is missing from patients.csv.gz and one study has
    no CheXpert-labeler row."""
    rng = np.random.default_rng(seed)
    pool = JpegPool(seed=seed)
    base = root / "mimic-cxr-jpg" / "2.0.0"
    meta = [["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"]]  # fmt: skip
    labels = [["subject_id", "study_id", *CXR_FINDINGS]]
    split = [["dicom_id", "study_id", "subject_id", "split"]]
    patients = [["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]]
    admissions = [["subject_id", "hadm_id", "admittime", "admission_type", "insurance", race_column]]
    n = 0
    unlabelled = None
    for s in range(n_subjects):
        subject = str(10000032 + s * 137031)
        part = ["train"] * 7 + ["validate", "test", "test"]
        official = part[s % 10]
        if s != 5:
            patients.append([subject, "MF"[s % 2], str(18 + (s * 11) % 73), "2150", "2014 - 2016", ""])
        race = MIMIC_RACES[s % len(MIMIC_RACES)]
        # a second admission repeats the race, refines it (WHITE -> WHITE - RUSSIAN) or does not know it
        for a, text in enumerate([race, [race, MIMIC_VARIANT.get(race, race), "UNKNOWN"][s % 3]][: 1 + s % 2]):
            admissions.append([subject, str(20000000 + 10 * s + a), "2150-01-01 00:00:00", "EW EMER.", "Other", text])
        if s == 7:
            admissions.append(
                [subject, str(20000000 + 10 * s + 9), "2151-01-01 00:00:00", "EW EMER.", "Other", "WHITE"]
            )
            admissions.append(
                [subject, str(20000000 + 10 * s + 8), "2152-01-01 00:00:00", "EW EMER.", "Other", "ASIAN"]
            )
        for t in range(1 + s % 2):
            study = str(50000000 + 10 * s + t)
            if s == 9 and t == 0:
                unlabelled = study
            else:
                labels.append([subject, study, *_findings(rng, (s + t) % 3 == 0)])
            for v, view in enumerate(["PA", "AP", "LATERAL"][: 1 + (s + t) % 3]):
                dicom = f"{s:04x}{t:02x}{v:02x}-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"
                meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "3056", "2544", "21800506",
                             "213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])  # fmt: skip
                split.append([dicom, study, subject, official])
                pool.write(base / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", n)
                n += 1
    _write_gz(base / "mimic-cxr-2.0.0-metadata.csv.gz", meta)
    _write_gz(base / "mimic-cxr-2.0.0-chexpert.csv.gz", labels)
    _write_gz(base / "mimic-cxr-2.0.0-split.csv.gz", split)
    hosp = root / "mimiciv" / "hosp"
    _write_gz(hosp / "patients.csv.gz", patients)
    _write_gz(hosp / "admissions.csv.gz", admissions)
    return {
        "base": base,
        "hosp": hosp,
        "images": n,
        "unlabelled_study": unlabelled,
        "conflict": str(10000032 + 7 * 137031),
    }


FITZ_LABELS = [
    ("psoriasis", "inflammatory", "non-neoplastic"),
    ("melanoma", "malignant melanoma", "malignant"),
    ("basal cell carcinoma", "malignant epidermal", "malignant"),
    ("seborrheic keratosis", "benign epidermal", "benign"),
    ("eczema", "inflammatory", "non-neoplastic"),
]


def write_fitzpatrick(root: Path, n: int = 150, seed: int = 0) -> list[dict]:
    """A Fitzpatrick17k download: fitzpatrick17k.csv and the fetched images as <md5hash>.jpg."""
    import hashlib

    pool = JpegPool(mode="RGB", seed=seed)
    header = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
              "three_partition_label", "qc", "url", "url_alphanum"]  # fmt: skip
    rows = []
    for i in range(n):
        md5 = hashlib.md5(f"image {i}".encode()).hexdigest()
        label, nine, three = FITZ_LABELS[i % len(FITZ_LABELS)]
        scale = [-1, 1, 2, 3, 4, 5, 6][(i // 5) % 7]
        url = f"https://example.org/atlas/{md5}.jpg"
        rows.append({"md5hash": md5, "fitzpatrick_scale": str(scale), "fitzpatrick_centaur": str(scale),
                     "label": label, "nine_partition_label": nine, "three_partition_label": three, "qc": "",
                     "url": url, "url_alphanum": "".join(c for c in url if c.isalnum())})  # fmt: skip
        pool.write(root / "images" / f"{md5}.jpg", i)
    with open(root / "fitzpatrick17k.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return rows
