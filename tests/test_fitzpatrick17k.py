"""Fitzpatrick17k adapter on a fixture in the published format."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fairbench.datasets.fitzpatrick17k import Fitzpatrick17k
from rawdata import write_fitzpatrick
from tiny import TINY_RUN

from fairbench import cache
from fairbench.cli import main


def prepare(source, data_dir, *extra):
    args = ["prepare", "fitzpatrick17k", "--source", str(source), "--data-dir", str(data_dir), "--size", "32"]
    return CliRunner().invoke(main, [*args, "--workers", "1", *extra])


def test_codes_split_and_label_options(tmp_path):
    rows = write_fitzpatrick(tmp_path / "raw")
    out = prepare(tmp_path / "raw", tmp_path / "data")
    assert out.exit_code == 0, out.output
    images, meta, _ = cache.load(tmp_path / "data", "fitzpatrick17k")
    assert images.shape == (len(rows), 3, 32, 32)
    scale = meta["fitzpatrick_scale"].to_numpy()
    assert (meta["fitzpatrick"] == np.where(scale > 0, scale - 1, -1)).all()
    assert (meta.loc[scale == -1, "skin_type"] == -1).all()
    assert meta.loc[scale == 3, "skin_type"].eq(1).all() and meta.loc[scale == 6, "skin_type"].eq(2).all()
    assert (meta["label"] == (meta["three_partition_label"] == "malignant")).all()
    for cls in ("malignant", "benign", "non-neoplastic"):
        part = meta[meta["three_partition_label"] == cls]["split"].value_counts(normalize=True)
        assert part["train"] == pytest.approx(0.7, abs=0.04) and part["test"] == pytest.approx(0.2, abs=0.04)
    benign = Fitzpatrick17k(label="benign").table(meta)
    assert (benign["label"] == (meta["three_partition_label"] == "benign")).all()
    assert (benign["split"] == meta["split"]).all()  # the split does not depend on the label option
    assert not (Fitzpatrick17k(split_seed=3).table(meta)["split"] == meta["split"]).all()


def test_repeated_md5hash_rows_are_left_out_and_counted(tmp_path):
    write_fitzpatrick(tmp_path / "raw", n=40)
    path = tmp_path / "raw" / "fitzpatrick17k.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    report = json.loads((tmp_path / "data" / "fitzpatrick17k" / "report.json").read_text())
    assert report["repeated_md5hash_rows"] == 1 and report["total"] == 40


def _edit(old, new):
    def edit(raw):
        path = raw / "fitzpatrick17k.csv"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    return edit


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: (raw / "fitzpatrick17k.csv").unlink(), "no fitzpatrick17k.csv found"),
        (_edit("three_partition_label", "partition"), "missing column(s) three_partition_label"),
        (_edit(",malignant,", ",cancer,"), "unknown three_partition_label value(s) 'cancer'"),
        (_edit(",3,3,", ",7,3,"), "unknown fitzpatrick_scale value(s) '7'"),
        (lambda raw: sorted((raw / "images").iterdir())[0].unlink(), "1 listed image(s) not found"),
        (lambda raw: sorted((raw / "images").iterdir())[0].write_bytes(b"nope"), "not a readable image"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, damage, message):
    write_fitzpatrick(tmp_path / "raw", n=40)
    damage(tmp_path / "raw")
    out = prepare(tmp_path / "raw", tmp_path / "data")
    assert out.exit_code == 1, out.output
    assert message in out.output and str(tmp_path / "raw") in out.output
    assert len(out.output.strip().splitlines()) == 1
    assert list((tmp_path / "data").iterdir()) == [] if (tmp_path / "data").exists() else True


def test_prepare_then_run_nir_on_skin_type(tmp_path):
    write_fitzpatrick(tmp_path / "raw")
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    args = ["run", "-m", "nir", "-d", "fitzpatrick17k", "--attribute", "skin_type", *TINY_RUN, "--epochs", "1"]
    out = CliRunner().invoke(
        main, [*args, "--data-dir", str(tmp_path / "data"), "--results-dir", str(tmp_path / "results")]
    )
    assert out.exit_code == 0, out.output
    assert "skin_type: worst-group AUC" in out.output and "fitzpatrick: TPR gap" in out.output
    assert pd.read_csv(tmp_path / "data" / "fitzpatrick17k" / "metadata.csv")["skin_type"].nunique() == 4
