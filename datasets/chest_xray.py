"""The chest X-ray protocol shared by CheXpert and MIMIC-CXR-JPG (not a dataset itself).

Protocol (each a ``-D`` option, applied at load, so none needs a new ``prepare``):

- ``label``: one of the 14 CheXpert findings (Irvin et al. 2019), ``No Finding`` by default: its
  false positives are the under-diagnosis that chest X-ray fairness studies measure
  (Seyyed-Kalantari et al., Nature Medicine 2021). Blank (not mentioned) = 0.
- ``uncertain``: what an uncertain (-1) label becomes: ``zeros`` (default), ``ones`` or ``drop``
  (the image is left out).
- ``views``: ``frontal`` (default: PA and AP), ``pa``, ``ap`` or ``all``.
- attributes ``sex`` {female, male}, ``age`` {<60, ≥60}, ``age4`` {18–39, 40–59, 60–79, 80+}
  (younger ages have no ``age4`` group), ``race`` {White, Black, Asian, Other}; unknown, refused
  or unobtainable values are -1, never a group; crossed ``race_x_sex`` is evaluated by default.

Race is recorded as free text; :func:`race_code` maps it. A subject whose known race values
map to different groups is left out at ``prepare`` and counted in the report, never guessed.

Images are cached once as one-channel uint8, short side resized to the cache size (256 by
default) and the centre square kept; no flips in training (the heart is on the left).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd

from fairbench import cache
from fairbench.data import Dataset, Splits, splits_of_table
from fairbench.errors import FairbenchError, UnknownNameError

FINDINGS = (
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
)
ATTRIBUTES = {
    "sex": ["female", "male"],
    "age": ["<60", "≥60"],
    "age4": ["18–39", "40–59", "60–79", "80+"],
    "race": ["White", "Black", "Asian", "Other"],
}
AGE4_EDGES = (40, 60, 80)
WHITE, BLACK, ASIAN, OTHER, UNKNOWN = 0, 1, 2, 3, -1
# Race text as published (CheXpert PRIMARY_RACE; MIMIC-IV admissions race / ethnicity), lower
# case, after an ethnicity suffix such as ", non-Hispanic" is removed.
RACE_TEXT = {
    "white": WHITE,
    "white or caucasian": WHITE,
    "caucasian": WHITE,
    "black": BLACK,
    "black or african american": BLACK,
    "african american": BLACK,
    "asian": ASIAN,
    "asian - historical conv": ASIAN,
    "other": OTHER,
    "native hawaiian or other pacific islander": OTHER,
    "pacific islander": OTHER,
    "american indian or alaska native": OTHER,
    "american indian/alaska native": OTHER,
    "native american": OTHER,
    "hispanic/latino": OTHER,
    "hispanic or latino": OTHER,
    "multiple race/ethnicity": OTHER,
    "portuguese": OTHER,
    "south american": OTHER,
    "": UNKNOWN,
    "unknown": UNKNOWN,
    "race and ethnicity unknown": UNKNOWN,
    "patient refused": UNKNOWN,
    "declined": UNKNOWN,
    "patient declined to answer": UNKNOWN,
    "unable to obtain": UNKNOWN,
}
# MIMIC-IV writes subgroups after a prefix: "WHITE - OTHER EUROPEAN", "BLACK/CAPE VERDEAN", ...
RACE_PREFIX = (("white - ", WHITE), ("black/", BLACK), ("asian - ", ASIAN), ("hispanic/latino - ", OTHER))
_ETHNICITY_SUFFIX = re.compile(r",\s*(non-hispanic|hispanic)$")
SEX = {"female": 0, "f": 0, "male": 1, "m": 1, "unknown": -1, "": -1}
FINDING_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": np.nan}


def race_code(text: object) -> int | None:
    """0 White, 1 Black, 2 Asian, 3 Other, -1 unknown for published race text; None if unrecognised."""
    text = text if isinstance(text, str) else ""  # a blank cell read back as NaN
    key = _ETHNICITY_SUFFIX.sub("", " ".join(text.split()).lower())
    if key in RACE_TEXT:
        return RACE_TEXT[key]
    return next((code for prefix, code in RACE_PREFIX if key.startswith(prefix)), None)


def check_race(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """Race codes of ``values``; an unrecognised text is an error that lists every one seen."""
    distinct = pd.unique(values)
    mapping = {v: race_code(v) for v in distinct}
    bad = sorted(str(v) for v, code in mapping.items() if code is None)
    if bad:
        raise FairbenchError(
            f"{path}: unknown {column} value(s) {', '.join(map(repr, bad[:5]))}; expected published categories "
            "such as White, Black or African American, Asian, Other, Unknown; check that this is the published file"
        )
    return values.map(mapping).to_numpy(np.int64)


def subject_race(subjects: pd.Series, texts: pd.Series, path: Path, column: str) -> tuple[pd.Series, set]:
    """Per subject, the race text that stands for it, and the subjects whose known values conflict.

    Known values (not unknown or refused) of one subject must map to one group; the first
    known text is kept (the first text when none is known).
    """
    frame = pd.DataFrame({"subject": subjects.to_numpy(), "text": texts.to_numpy()})
    frame["code"] = check_race(frame["text"], path, column)
    known = frame[frame["code"] >= 0]
    groups = known.groupby("subject")["code"].nunique()
    conflicts = set(groups.index[groups > 1])
    chosen = pd.concat([known, frame]).drop_duplicates("subject")
    return chosen.set_index("subject")["text"], conflicts


def read_table(path: Path, required: tuple[str, ...], what: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV (plain or gzipped) or xlsx table as strings, with ``required`` columns checked.

    CSVs are read with only the ``required`` and present ``extra`` columns, so a large table
    (MIMIC's 377k-row metadata) costs memory only for what the protocol uses.
    """
    try:
        if path.suffix.lower() == ".xlsx":
            frame = pd.read_excel(path, dtype=str, engine="openpyxl")
            columns = [str(c).strip() for c in frame.columns]
        else:
            columns = [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
    except Exception as exc:  # any parser error: the file is not the published table
        raise FairbenchError(f"{path}: not a readable table ({type(exc).__name__}: {exc}); {what}") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise FairbenchError(
            f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(columns[:12])}); {what}"
        )
    if path.suffix.lower() != ".xlsx":
        wanted = [*required, *(c for c in extra if c in columns)]
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: str(c).strip() in wanted)
        except Exception as exc:
            raise FairbenchError(f"{path}: not a readable table ({type(exc).__name__}: {exc}); {what}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.fillna("")


def check_values(frame: pd.DataFrame, column: str, allowed: dict[str, object] | set[str], path: Path) -> None:
    """Refuse a value of ``column`` outside ``allowed``, naming the file, the column and the values."""
    bad = sorted(set(frame[column].str.strip()) - set(allowed))
    if bad:
        shown = ", ".join(repr(v) for v in sorted(allowed) if v)
        raise FairbenchError(
            f"{path}: unknown {column} value(s) {', '.join(map(repr, bad[:5]))}; expected {shown} (or blank)"
        )


def check_findings(frame: pd.DataFrame, path: Path) -> None:
    for finding in FINDINGS:
        check_values(frame, finding, FINDING_VALUES, path)


def findings_values(frame: pd.DataFrame, finding: str) -> np.ndarray:
    """1.0, 0.0, -1.0 or NaN (blank) of one finding (raw text or already numeric)."""
    return pd.to_numeric(frame[finding], errors="coerce").to_numpy(np.float64)


def age_codes(age: np.ndarray) -> dict[str, np.ndarray]:
    """``age`` {<60, ≥60} and ``age4`` {18–39, 40–59, 60–79, 80+} codes; NaN is unknown (-1)."""
    known = ~np.isnan(age)
    years = np.nan_to_num(age)
    age2 = np.where(known, (years >= 60).astype(np.int64), -1)
    age4 = np.where(known & (years >= 18), np.searchsorted(AGE4_EDGES, years, side="right"), -1)
    return {"age": age2, "age4": age4.astype(np.int64)}


def find_file(roots: list[Path], names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` found directly in one of ``roots``; otherwise an error that says where it belongs."""
    for root in roots:
        for name in names:
            if (root / name).is_file():
                return root / name
    raise FairbenchError(f"{roots[0]}: no {names[0]} found; {what}")


class ChestXray(Dataset):
    """Base of the chest X-ray adapters: the protocol options, label and attribute codes, and ``load``."""

    attributes: ClassVar[dict[str, list[str]]] = ATTRIBUTES
    label_names: ClassVar[tuple[str, ...]] = FINDINGS
    crossings: ClassVar[tuple[str, ...]] = ("race_x_sex",)
    in_chans: ClassVar[int] = 1
    default_image_size: ClassVar[int] = 224
    cache_size: ClassVar[int] = 256

    def __init__(
        self,
        *,
        label: str = "No Finding",
        uncertain: Literal["zeros", "ones", "drop"] = "zeros",
        views: Literal["frontal", "pa", "ap", "all"] = "frontal",
    ) -> None:
        wanted = {f.lower().replace(" ", "_"): f for f in FINDINGS}
        key = label.strip().lower().replace(" ", "_")
        if key not in wanted:
            raise UnknownNameError(f"-D label={label}: not a finding; choose one of {', '.join(FINDINGS)}")
        self.label = wanted[key]
        self.uncertain = uncertain
        self.views = views

    def is_prepared(self, data_dir: Path) -> bool:
        return cache.read_manifest(data_dir, self.name) is not None

    def view_positions(self, meta: pd.DataFrame) -> np.ndarray:
        """Each image's view as PA, AP or another string (lateral and the rest)."""
        raise NotImplementedError

    def frontal(self, meta: pd.DataFrame) -> np.ndarray:
        """Whether each image is a frontal view, as the dataset defines it."""
        return np.isin(self.view_positions(meta), ["PA", "AP"])

    def raw_codes(self, meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sex codes, age in years (NaN unknown) and race text of every image."""
        raise NotImplementedError

    def splits_of(self, meta: pd.DataFrame) -> np.ndarray:
        """``train``, ``val`` or ``test`` per image, patient-disjoint."""
        raise NotImplementedError

    def table(self, meta: pd.DataFrame) -> pd.DataFrame:
        """Label, attribute codes and split from the raw columns; images that this protocol
        leaves out (other views, dropped uncertain labels) get split ``excluded``."""
        out = meta.copy()
        raw = findings_values(meta, self.label)
        uncertain = raw == -1
        out["label"] = np.where(uncertain, 1 if self.uncertain == "ones" else 0, raw == 1).astype(np.int64)
        sex, years, race_text = self.raw_codes(meta)
        out["sex"] = sex
        for attr, values in age_codes(years).items():
            out[attr] = values
        texts = pd.Series(race_text, dtype=object).fillna("")
        out["race"] = texts.map({t: race_code(t) for t in pd.unique(texts)}).to_numpy(np.int64)
        view = self.view_positions(meta)
        keep = self.frontal(meta) if self.views == "frontal" else np.ones(len(meta), dtype=bool)
        if self.views in ("pa", "ap"):
            keep = view == self.views.upper()
        if self.uncertain == "drop":
            keep &= ~uncertain
        out["split"] = np.where(keep, self.splits_of(meta), "excluded")
        return out

    def load(self, data_dir: Path, image_size: int) -> Splits:
        images, meta, _ = cache.load(data_dir, self.name)
        table = self.table(meta)
        parts = splits_of_table(images, table, self.attributes)
        return Splits(
            **parts,
            attributes={k: list(v) for k, v in self.attributes.items()},
            # ImageNet statistics averaged over RGB: timm sums the RGB filters for in_chans=1
            mean=(0.449,),
            std=(0.226,),
            augment=("crop", "rotate"),
            size=image_size,
        )
