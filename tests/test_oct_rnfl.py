import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fairbench.datasets.oct_rnfl import OCTRNFL, RNFLT_SCALE, race_code
from rawdata import write_oct

from fairbench import cache
from fairbench.cli import main


def prepare(source, data_dir, *extra):
    return CliRunner().invoke(
        main, ["prepare", "oct_rnfl", "--source", str(source), "--data-dir", str(data_dir), "--workers", "2", *extra]
    )


@pytest.mark.parametrize(("naming", "race_as"), [("long", "str"), ("short", "int")])
def test_prepare_reads_both_namings_and_race_encodings(tmp_path, naming, race_as):
    write_oct(tmp_path / "raw", naming=naming, race_as=race_as)
    out = prepare(tmp_path / "raw", tmp_path / "data", "--size", "20")
    assert out.exit_code == 0, out.output
    images, meta, _ = cache.load(tmp_path / "data", "oct_rnfl")
    assert images.shape == (26, 1, 20, 20) and images.dtype == np.float16
    assert list(meta["split"].value_counts().sort_index()) == [8, 12, 6]  # test, train, val as shipped
    assert list(meta["race"][:3]) == [1, 2, 0]  # files 1, 2, 3 -> Black, White, Asian
    assert (images[:, 0, 0, :3] == 0).all()  # invalid -2 pixels set to 0
    first = np.load(tmp_path / "raw" / ("Training" if naming == "long" else "train") / "data_0001.npz")
    assert np.allclose(images[0, 0, 1:], first["rnflt"][1:], rtol=1e-3)
    report = json.loads((tmp_path / "data" / "oct_rnfl" / "report.json").read_text())
    assert report["splits"]["train"]["n"] == 12
    assert sum(sum(v.values()) for v in report["splits"]["train"]["ethnicity"].values()) == 12


def test_load_gives_one_scaled_channel_resized_on_request(tmp_path):
    write_oct(tmp_path / "raw")
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    splits = OCTRNFL().load(tmp_path / "data", 32)
    assert splits.in_chans == 1
    assert splits.scale == pytest.approx(1 / RNFLT_SCALE)
    assert len(splits.train) == 12 and len(splits.val) == 6 and len(splits.test) == 8
    meta = pd.read_csv(tmp_path / "data" / "oct_rnfl" / "metadata.csv")
    assert (meta["ethnicity"] == -1).sum() == sum(1 for n in range(1, 27) if n % 7 == 0)
    assert set(meta["sex"]) == {0, 1}


def test_the_large_volume_is_never_read(tmp_path, monkeypatch):
    write_oct(tmp_path / "raw", per_split=(2, 2, 2))
    opened = []
    real = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):
        opened.append(key)
        return real(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    out = prepare(tmp_path / "raw", tmp_path / "data", "--workers", "1")
    assert out.exit_code == 0, out.output
    assert opened and "oct_bscans" not in opened


def test_race_codes():
    assert race_code(0) == 0 and race_code(np.int64(2)) == 2
    assert race_code("Black or African American") == 1
    assert race_code("White or Caucasian") == 2
    assert race_code("Other") is None and race_code(5) is None


def _bad_race(raw):
    path = raw / "Training" / "data_0002.npz"
    data = dict(np.load(path))
    data["race"] = np.array("Martian")
    np.savez(path, **data)


def _drop_key(raw):
    path = raw / "Validation" / "data_0013.npz"
    data = dict(np.load(path))
    del data["glaucoma"]
    np.savez(path, **data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_bad_race, "unknown race value(s) 'Martian'"),
        (_drop_key, "data_0013.npz: no key(s) glaucoma"),
        (lambda raw: (raw / "Test" / "data_0020.npz").write_bytes(b"junk"), "data_0020.npz: not a readable npz"),
        (lambda raw: (raw / "Validation").rename(raw / "Valid"), "no Validation/ (or val/) folder"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_no_cache(tmp_path, damage, message):
    write_oct(tmp_path / "raw")
    damage(tmp_path / "raw")
    out = prepare(tmp_path / "raw", tmp_path / "data")
    assert out.exit_code == 1
    assert message in out.output
    assert len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "oct_rnfl").exists()
    assert not list((tmp_path / "data").glob(".oct_rnfl*")) if (tmp_path / "data").exists() else True


def test_run_on_prepared_oct(tmp_path):
    write_oct(tmp_path / "raw", per_split=(24, 12, 12))
    assert prepare(tmp_path / "raw", tmp_path / "data").exit_code == 0
    out = CliRunner().invoke(
        main,
        [
            "run",
            "--method",
            "nir",
            "--dataset",
            "oct_rnfl",
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
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--results-dir",
            str(tmp_path / "results"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "race: equalized-odds gap" in out.output
