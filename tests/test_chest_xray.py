"""CheXpert and MIMIC-CXR-JPG adapters on fixtures in the published formats."""

import gzip
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fairbench.datasets.chest_xray import race_code
from fairbench.datasets.chexpert import CheXpert
from rawdata import write_chexpert, write_mimic
from tiny import TINY_RUN

from fairbench import cache
from fairbench.cli import main


def prepare(dataset, source, data_dir, *extra):
    args = ["prepare", dataset, "--source", str(source), "--data-dir", str(data_dir), "--size", "32"]
    return CliRunner().invoke(main, [*args, "--workers", "1", *extra])


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    info = write_chexpert(root / "raw")
    assert prepare("chexpert", root / "raw", root / "data").exit_code == 0
    return root, info


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    info = write_mimic(root / "raw")
    out = prepare("mimic_cxr", root / "raw", root / "data")
    assert out.exit_code == 0, out.output
    return root, info


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("White, Hispanic", 0),
        ("WHITE - OTHER EUROPEAN", 0),
        ("Black, non-Hispanic", 1),
        ("BLACK/CAPE VERDEAN", 1),
        ("Asian - Historical Conv", 2),
        ("ASIAN - SOUTH EAST ASIAN", 2),
        ("HISPANIC/LATINO - PUERTO RICAN", 3),
        ("Native Hawaiian or Other Pacific Islander", 3),
        ("Patient Refused", -1),
        ("UNABLE TO OBTAIN", -1),
        ("PATIENT DECLINED TO ANSWER", -1),
        ("", -1),
        ("Martian", None),
    ],
)
def test_race_text_maps_to_a_group_unknown_or_nothing(text, code):
    assert race_code(text) == code


def test_chexpert_cache_codes_and_report(chexpert):
    root, info = chexpert
    images, meta, _ = cache.load(root / "data", "chexpert")
    assert images.shape == (info["images"] - 2, 1, 32, 32)  # the conflicting patient's two images are dropped
    assert info["conflict"] not in set(meta["patient"])
    report = json.loads((root / "data" / "chexpert" / "report.json").read_text())
    assert report["race_conflicts"] == {"patients": 1, "images": 2}
    assert "race_x_sex" in report["splits"]["train"]
    assert (meta.loc[meta["Age"] == 0, ["age", "age4"]] == -1).all().all()
    assert (meta.loc[meta["Sex"] == "Unknown", "sex"] == -1).all()
    codes = meta["race_text"].fillna("").map(race_code)
    assert (meta["race"] == codes).all()
    assert (meta.loc[meta["race_text"] == "Patient Refused", "race"] == -1).all()
    assert (meta.loc[meta["race_text"] == "White, Hispanic", "race"] == 0).all()
    # frontal views only by default; the rest is excluded, not in any split
    assert (meta.loc[meta["Frontal/Lateral"] == "Lateral", "split"] == "excluded").all()
    assert set(meta.loc[meta["Frontal/Lateral"] == "Frontal", "split"]) == {"train", "val", "test"}
    blank = (meta["Frontal/Lateral"] == "Frontal") & meta["AP/PA"].isna()
    assert blank.any() and (meta.loc[blank, "split"] != "excluded").all()  # frontal even without AP/PA
    assert (meta["label"] == (meta["No Finding"] == 1)).all()


def test_chexpert_resplit_is_patient_disjoint_70_10_20_and_seeded(chexpert):
    root, _ = chexpert
    meta = pd.read_csv(root / "data" / "chexpert" / "metadata.csv", keep_default_na=False, na_values=[""])
    table = CheXpert(views="all").table(meta)
    assert (table.groupby("patient")["split"].nunique() == 1).all()
    per_patient = table.groupby("patient")["split"].first().value_counts(normalize=True)
    assert per_patient["train"] == pytest.approx(0.7, abs=0.02)
    assert per_patient["val"] == pytest.approx(0.1, abs=0.02)
    other = CheXpert(views="all", split_seed=1).table(meta)
    assert not np.array_equal(other["split"], table["split"])


def test_chexpert_options_need_no_new_prepare(chexpert):
    root, _ = chexpert
    meta = pd.read_csv(root / "data" / "chexpert" / "metadata.csv", keep_default_na=False, na_values=[""])
    default = CheXpert().load(root / "data", 32)
    every = CheXpert(views="all").load(root / "data", 32)
    n_frontal = (meta["Frontal/Lateral"] == "Frontal").sum()
    assert sum(len(default[s]) for s in ("train", "val", "test")) == n_frontal
    assert sum(len(every[s]) for s in ("train", "val", "test")) == len(meta)
    pa = CheXpert(views="pa").table(meta)
    assert set(meta.loc[pa["split"] != "excluded", "AP/PA"]) == {"PA"}
    cardio = meta["Cardiomegaly"].to_numpy()
    for policy, uncertain_label in (("zeros", 0), ("ones", 1)):
        table = CheXpert(label="cardiomegaly", uncertain=policy).table(meta)
        assert (table["label"][cardio == -1] == uncertain_label).all()
        assert (table["label"][np.isnan(cardio)] == 0).all()
    dropped = CheXpert(label="Cardiomegaly", uncertain="drop").table(meta)
    assert (dropped["split"][cardio == -1] == "excluded").all()
    assert CheXpert.label_names[0] == "No Finding" and len(CheXpert.label_names) == 14
    assert default.in_chans == 1


def test_chexpert_reads_the_csv_conversion_of_the_demographics(tmp_path):
    write_chexpert(tmp_path / "raw", n_patients=20, demo="csv")
    out = prepare("chexpert", tmp_path / "raw", tmp_path / "data")
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "data" / "chexpert" / "report.json").read_text())["race_conflicts"]["patients"] == 1


def test_mimic_cache_joins_mimic_iv_and_keeps_the_official_split(mimic):
    root, info = mimic
    _, meta, _ = cache.load(root / "data", "mimic_cxr")
    report = json.loads((root / "data" / "mimic_cxr" / "report.json").read_text())
    assert report["race_conflicts"]["subjects"] == 1
    assert report["unlabelled_study_images"] >= 1
    assert int(info["conflict"]) not in set(meta["subject_id"])
    assert int(info["unlabelled_study"]) not in set(meta["study_id"])
    assert report["total"] == len(meta)
    assert len(meta) == info["images"] - report["race_conflicts"]["images"] - report["unlabelled_study_images"]
    split = pd.read_csv(info["base"] / "mimic-cxr-2.0.0-split.csv.gz", dtype=str).set_index("dicom_id")["split"]
    official = meta["dicom_id"].map(split).map({"train": "train", "validate": "val", "test": "test"})
    kept = meta["split"] != "excluded"
    assert (meta["split"][kept] == official[kept]).all()
    assert set(meta.loc[kept, "ViewPosition"]) == {"PA", "AP"}
    assert (meta.loc[meta["gender"].isna(), "sex"] == -1).all()  # a subject missing from patients.csv.gz
    assert meta["gender"].isna().any()
    admissions = pd.read_csv(info["hosp"] / "admissions.csv.gz", dtype=str)
    subject = admissions.groupby("subject_id")["race"].first()
    expected = meta["subject_id"].astype(str).map(subject).map(race_code)
    assert (meta["race"] == expected).all()
    sex = meta["sex"].to_numpy()
    race = meta["race"].to_numpy()
    crossed = np.where((race >= 0) & (sex >= 0), race * 2 + sex, -1)
    assert (meta["race_x_sex"] == crossed).all()


def test_mimic_reads_the_ethnicity_column_of_mimic_iv_1(tmp_path):
    write_mimic(tmp_path / "raw", n_subjects=20, race_column="ethnicity")
    assert prepare("mimic_cxr", tmp_path / "raw", tmp_path / "data").exit_code == 0


def _rewrite_gz(path, old, new):
    with gzip.open(path, "rt") as fh:
        text = fh.read()
    assert old in text
    with gzip.open(path, "wt") as fh:
        fh.write(text.replace(old, new, 1))


def _first_image(raw):
    return sorted(raw.rglob("*.jpg"))[0]


def _chexpert_edit(old, new):
    def edit(raw):
        path = raw / "CheXpert-v1.0-small" / "train.csv"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    return edit


def _demo_race(raw):
    from openpyxl import load_workbook

    book = load_workbook(raw / "CHEXPERT DEMO.xlsx")
    book.active["D2"] = "Martian"
    book.save(raw / "CHEXPERT DEMO.xlsx")


def _mimic_two_splits(raw):
    path = next(raw.rglob("mimic-cxr-2.0.0-split.csv.gz"))
    frame = pd.read_csv(path, dtype=str)
    subject = frame["subject_id"][frame["subject_id"].duplicated()].iloc[0]
    row = frame.index[frame["subject_id"] == subject][0]
    frame.loc[row, "split"] = "test" if frame.loc[row, "split"] != "test" else "train"
    frame.to_csv(path, index=False, compression="gzip")


CHEXPERT_CASES = [
    (lambda raw: (raw / "CheXpert-v1.0-small" / "valid.csv").unlink(), "no CheXpert train.csv and valid.csv"),
    (lambda raw: (raw / "CHEXPERT DEMO.xlsx").unlink(), "no CHEXPERT DEMO.xlsx found"),
    (_chexpert_edit(",Frontal/Lateral,", ",View,"), "missing column(s) Frontal/Lateral"),
    (_chexpert_edit(",Female,", ",F,"), "unknown Sex value(s) 'F'"),
    (_chexpert_edit(",1.0,", ",2.0,"), "value(s) '2.0'; expected '-1', '-1.0', '0'"),
    (_demo_race, "unknown PRIMARY_RACE value(s) 'Martian'"),
    (lambda raw: _first_image(raw).unlink(), "1 listed image(s) not found"),
    (lambda raw: _first_image(raw).write_bytes(b"not a jpeg"), "not a readable image"),
]
MIMIC_CASES = [
    (lambda raw: next(raw.rglob("*-split.csv.gz")).unlink(), "no mimic-cxr-2.0.0-split.csv.gz found"),
    (lambda raw: next(raw.rglob("patients.csv.gz")).unlink(), "no MIMIC-IV hosp/patients.csv.gz found"),
    (_mimic_two_splits, "is in more than one split"),
    (lambda raw: _rewrite_gz(next(raw.rglob("patients.csv.gz")), ",gender,", ",sex,"), "missing column(s) gender"),
    (lambda raw: _rewrite_gz(next(raw.rglob("patients.csv.gz")), ",M,", ",X,"), "unknown gender value(s) 'X'"),
    (lambda raw: _rewrite_gz(next(raw.rglob("admissions.csv.gz")), ",WHITE", ",MARTIAN"), "unknown race value(s)"),
    (lambda raw: _rewrite_gz(next(raw.rglob("*-split.csv.gz")), ",train", ",training"), "unknown split value(s)"),
    (lambda raw: _first_image(raw).unlink(), "1 listed image(s) not found"),
    (lambda raw: _first_image(raw).write_bytes(b"\xff\xd8broken"), "not a readable image"),
]


@pytest.mark.parametrize(
    ("dataset", "damage", "message"),
    [("chexpert", *case) for case in CHEXPERT_CASES] + [("mimic_cxr", *case) for case in MIMIC_CASES],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, dataset, damage, message):
    raw = tmp_path / "raw"
    if dataset == "chexpert":
        write_chexpert(raw, n_patients=12)
    else:
        write_mimic(raw, n_subjects=12)
    damage(raw)
    out = prepare(dataset, raw, tmp_path / "data")
    assert out.exit_code == 1, out.output
    assert message in out.output
    assert "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1
    assert str(raw) in out.output  # the line names the file
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


def test_skip_missing_leaves_missing_images_out(tmp_path):
    info = write_mimic(tmp_path / "raw", n_subjects=12)
    _first_image(tmp_path / "raw").unlink()
    out = prepare("mimic_cxr", tmp_path / "raw", tmp_path / "data", "--skip-missing")
    assert out.exit_code == 0, out.output
    assert "1 listed image(s) were missing" in out.output
    report = json.loads((tmp_path / "data" / "mimic_cxr" / "report.json").read_text())
    assert report["skipped_missing"] == 1
    assert report["total"] < info["images"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One MLflow store for both runs (creating a store is the slow part of a tiny run)."""
    return tmp_path_factory.mktemp("results")


@pytest.mark.parametrize("fixture", ["chexpert", "mimic"])
def test_prepare_then_run_nir_on_race_x_sex(request, results, fixture):
    root, _ = request.getfixturevalue(fixture)
    dataset = {"chexpert": "chexpert", "mimic": "mimic_cxr"}[fixture]
    args = ["run", "-m", "nir", "-d", dataset, "--attribute", "race×sex", *TINY_RUN, "--epochs", "1"]
    out = CliRunner().invoke(main, [*args, "--data-dir", str(root / "data"), "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    assert "race_x_sex: worst-group AUC" in out.output
    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(dataset).experiment_id])[0]
    assert run.data.params["attribute"] == "race_x_sex"
    pred = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions_test.csv"))
    sex, race = pred["sex"].to_numpy(), pred["race"].to_numpy()
    assert (pred["race_x_sex"] == np.where((race >= 0) & (sex >= 0), race * 2 + sex, -1)).all()
