import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fairbench.datasets.ham10000 import HAM10000
from rawdata import write_ham

from fairbench import cache
from fairbench.cli import main


def prepare(source, data_dir, *extra):
    return CliRunner().invoke(
        main,
        [
            "prepare",
            "ham10000",
            "--source",
            str(source),
            "--data-dir",
            str(data_dir),
            "--size",
            "32",
            "--workers",
            "2",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    ("layout", "metadata", "dataset_column"),
    [("parts", "csv", False), ("flat", "tab", True), ("parts", "noext", True)],
)
def test_prepare_reads_every_published_layout(tmp_path, layout, metadata, dataset_column):
    rows = write_ham(tmp_path / "raw", layout=layout, metadata=metadata, dataset_column=dataset_column)
    out = prepare(tmp_path / "raw", tmp_path / "data")
    assert out.exit_code == 0, out.output
    assert f"prepared {len(rows)} images" in out.output
    images, meta, manifest = cache.load(tmp_path / "data", "ham10000")
    assert images.shape == (len(rows), 3, 32, 32)
    assert manifest["size"] == 32
    assert list(meta["image_id"]) == [r["image_id"] for r in rows]


def test_splits_are_grouped_by_lesion_stratified_and_80_10_10(tmp_path):
    rows = write_ham(tmp_path / "raw", n_lesions=300)
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    meta = pd.read_csv(tmp_path / "data" / "ham10000" / "metadata.csv")
    assert (meta.groupby("lesion_id")["split"].nunique() == 1).all()
    n = len(rows)
    for label in (0, 1):
        part = meta[meta["label"] == label]
        sizes = part["split"].value_counts()
        # lesions hold at most 3 images: each split is within one lesion of its share
        assert abs(sizes["train"] - 0.8 * len(part)) <= 3
        assert abs(sizes["val"] - 0.1 * len(part)) <= 3
    assert abs(meta["split"].value_counts()["train"] / n - 0.8) < 0.01
    # the split seed, not the training seed, decides; another seed gives another split
    other = HAM10000(split_seed=1).table(meta[["lesion_id", "image_id", "dx", "raw_age", "raw_sex"]])
    assert not np.array_equal(other["split"], meta["split"])


def test_report_counts_labels_and_unknowns(tmp_path):
    rows = write_ham(tmp_path / "raw")
    out = prepare(tmp_path / "raw", tmp_path / "data")
    report = json.loads((tmp_path / "data" / "ham10000" / "report.json").read_text())
    assert report["total"] == len(rows)
    unknown_sex = sum(r["sex"] == "unknown" for r in rows)
    missing_age = sum(r["age"] == "" for r in rows)
    assert sum(sum(s["sex"].get("unknown", {}).values()) for s in report["splits"].values()) == unknown_sex
    assert sum(sum(s["age"].get("unknown", {}).values()) for s in report["splits"].values()) == missing_age
    positives = sum(r["dx"] in ("mel", "akiec") for r in rows)
    assert sum(s["label"].get("1", 0) for s in report["splits"].values()) == positives
    assert "images per split x label x group" in out.output


def test_labels_and_attribute_codes(tmp_path):
    write_ham(tmp_path / "raw")
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    meta = pd.read_csv(tmp_path / "data" / "ham10000" / "metadata.csv", keep_default_na=False, na_values=[""])
    assert (meta["label"] == meta["dx"].isin(["mel", "akiec"])).all()
    malignant = HAM10000(label="malignant").table(meta[["lesion_id", "image_id", "dx", "raw_age", "raw_sex"]])
    assert (malignant["label"] == meta["dx"].isin(["mel", "bcc", "akiec"])).all()
    assert (meta.loc[meta["raw_sex"] == "unknown", "sex"] == -1).all()
    assert (meta.loc[meta["raw_age"].isna(), ["age", "age5"]] == -1).all().all()
    assert (meta.loc[meta["raw_age"] == 60, ["age", "age5"]] == [1, 3]).all().all()
    splits = HAM10000().load(tmp_path / "data", 32)
    all_attrs = np.concatenate([splits.train.attrs, splits.val.attrs, splits.test.attrs])
    assert set(np.unique(all_attrs[:, 0])) == {-1, 0, 1}  # sex with unknown
    assert set(np.unique(all_attrs[:, 1])) <= {-1, 0, 1}
    assert -1 in all_attrs[:, 2]
    assert splits.train.images is splits.val.images  # one memory-mapped cache shared by the splits
    assert isinstance(splits.train.images, np.memmap)


def test_rerun_is_a_no_op_unless_forced(tmp_path):
    write_ham(tmp_path / "raw", n_lesions=20)
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    stamp = (tmp_path / "data" / "ham10000" / "images.npy").stat().st_mtime_ns
    again = prepare(tmp_path / "raw", tmp_path / "data")
    assert "already prepared" in again.output
    assert (tmp_path / "data" / "ham10000" / "images.npy").stat().st_mtime_ns == stamp
    forced = prepare(tmp_path / "raw", tmp_path / "data", "--force")
    assert forced.exit_code == 0 and "prepared" in forced.output
    assert (tmp_path / "data" / "ham10000" / "images.npy").stat().st_mtime_ns != stamp


def _drop_column(raw):
    path = raw / "HAM10000_metadata.csv"
    lines = [",".join(line.split(",")[:4] + line.split(",")[5:]) for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines))


def _replace(old, new):
    def edit(raw):
        path = raw / "HAM10000_metadata.csv"
        path.write_text(path.read_text().replace(old, new, 1))

    return edit


def _delete_image(raw):
    next(raw.glob("HAM10000_images_part_1/*.jpg")).unlink()


def _corrupt_image(raw):
    next(raw.glob("HAM10000_images_part_1/*.jpg")).write_bytes(b"not a jpeg")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: (raw / "HAM10000_metadata.csv").unlink(), "no HAM10000_metadata.csv"),
        (lambda raw: [p.unlink() for p in raw.rglob("*.jpg")], "no .jpg images found"),
        (_delete_image, "1 listed image(s) not found"),
        (_corrupt_image, "not a readable image"),
        (_replace(",nv,", ",nevus,"), "unknown dx value(s) 'nevus'"),
        (_replace(",female,", ",F,"), "unknown sex value(s) 'F'"),
        (_drop_column, "missing column(s) age"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_no_cache(tmp_path, damage, message):
    raw = tmp_path / "raw"
    write_ham(raw, n_lesions=40)
    damage(raw)
    out = prepare(raw, tmp_path / "data")
    assert out.exit_code == 1
    assert message in out.output
    assert "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "ham10000").exists()
    assert list((tmp_path / "data").iterdir()) == [] if (tmp_path / "data").exists() else True


def test_skip_missing_leaves_them_out_and_says_how_many(tmp_path):
    rows = write_ham(tmp_path / "raw", n_lesions=40)
    _delete_image(tmp_path / "raw")
    out = prepare(tmp_path / "raw", tmp_path / "data", "--skip-missing")
    assert out.exit_code == 0, out.output
    assert "1 listed image(s) were missing" in out.output
    assert json.loads((tmp_path / "data" / "ham10000" / "report.json").read_text())["total"] == len(rows) - 1


def test_run_without_prepare_names_the_command_and_runs_after_it(tmp_path):
    args = [
        "run",
        "--method",
        "nir",
        "--dataset",
        "ham10000",
        "--data-dir",
        str(tmp_path / "data"),
        "--backbone",
        "test_resnet",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--bootstrap",
        "10",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--results-dir",
        str(tmp_path / "results"),
    ]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1
    assert "fairbench prepare ham10000 --source" in out.output
    write_ham(tmp_path / "raw", n_lesions=150)
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "age5: worst-group AUC" in out.output
