"""Intersectional attributes: names, codes, splits, training attribute and metric keys."""

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame, true_positive_rate

from fairbench import attributes as crossed
from fairbench.data import Split, Splits
from fairbench.errors import UnknownNameError
from fairbench.experiment import resolve
from fairbench.metrics import evaluate

ATTRS = {"race": ["White", "Black", "Asian"], "sex": ["female", "male"]}


@pytest.mark.parametrize("spelling", ["race×sex", "race*sex", "race_x_sex", " race × sex "])
def test_every_spelling_has_one_canonical_name(spelling):
    assert crossed.parts(spelling) == ("race", "sex")
    assert crossed.resolve(spelling, ATTRS, "demo") == "race_x_sex"


def test_plain_names_pass_and_unknown_parts_are_named():
    assert crossed.parts("race") is None
    assert crossed.resolve("sex", ATTRS, "demo") == "sex"
    with pytest.raises(UnknownNameError, match="no attribute 'skin'"):
        crossed.resolve("race×skin", ATTRS, "demo")
    with pytest.raises(UnknownNameError, match="exactly two"):
        crossed.parts("race×sex×age")
    with pytest.raises(UnknownNameError, match="two different"):
        crossed.resolve("sex*sex", ATTRS, "demo")


def test_codes_and_group_names_by_hand():
    race = np.array([0, 1, 2, 1, -1, 2])
    sex = np.array([1, 0, 1, -1, 0, 0])
    assert crossed.codes(race, sex, 2).tolist() == [1, 2, 5, -1, -1, 4]
    names = crossed.groups(ATTRS["race"], ATTRS["sex"])
    assert names == ["White×female", "White×male", "Black×female", "Black×male", "Asian×female", "Asian×male"]
    assert names[2] == "Black×female"


def _splits(n=40, seed=0):
    rng = np.random.default_rng(seed)
    parts = {}
    for name in ("train", "val", "test"):
        attrs = np.column_stack([rng.integers(-1, 3, n), rng.integers(-1, 2, n)])
        parts[name] = Split(np.zeros((n, 1, 4, 4), np.uint8), rng.integers(0, 2, n), attrs)
    return Splits(**parts, attributes=ATTRS, mean=(0.5,), std=(0.25,))


def test_crossed_columns_are_appended_to_every_split():
    splits = _splits()
    out = crossed.add_crossed(splits, ["race×sex", "race_x_sex"])  # two spellings, one column
    assert list(out.attributes) == ["race", "sex", "race_x_sex"]
    assert out.attributes["race_x_sex"][3] == "Black×male"
    for name in ("train", "val", "test"):
        a = out[name].attrs
        assert a.shape[1] == 3
        expected = np.where((a[:, 0] >= 0) & (a[:, 1] >= 0), a[:, 0] * 2 + a[:, 1], -1)
        assert (a[:, 2] == expected).all()
    assert splits.train.attrs.shape[1] == 2  # the input is not changed
    assert crossed.add_crossed(splits, ["sex"]) is splits


def test_crossed_attribute_metric_keys_match_fairlearn():
    rng = np.random.default_rng(1)
    n = 2400
    race, sex = rng.integers(0, 3, n), rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    scores = np.clip(0.5 * y + 0.1 * race + rng.normal(0.2, 0.25, n), 0, 1)
    splits = Splits(
        **{
            k: Split(np.zeros((n, 1, 2, 2), np.uint8), y, np.column_stack([race, sex]))
            for k in ("train", "val", "test")
        },
        attributes=ATTRS,
        mean=(0.5,),
        std=(0.25,),
    )
    splits = crossed.add_crossed(splits, ["race×sex"])
    report = evaluate(scores, y, splits.test.attrs, splits.attributes, threshold=0.5)
    flat = report.flat()
    assert "race_x_sex/tpr_gap" in flat and "race_x_sex/auc_gap" in flat
    frame = MetricFrame(
        metrics=true_positive_rate,
        y_true=y,
        y_pred=(scores >= 0.5).astype(int),
        sensitive_features=splits.test.attrs[:, 2],
    )
    assert flat["race_x_sex/tpr_gap"] == pytest.approx(frame.difference(), abs=1e-12)
    assert any(key.startswith("race_x_sex/auc/Black") for key in flat)


def test_resolve_accepts_a_crossed_training_attribute(tiny_config):
    config = resolve(tiny_config(method="reweight", attribute="sex*age"))
    assert config.attribute == "sex_x_age"
    with pytest.raises(UnknownNameError, match="no attribute 'race'"):
        resolve(tiny_config(method="reweight", attribute="race×sex"))


def test_reweight_trains_on_the_crossed_groups(monkeypatch):
    from conftest import TINY_DATA
    from fairbench.datasets.synthetic import Synthetic
    from fairbench.methods import reweight

    from fairbench.model import create_backbone
    from fairbench.trainer import TrainConfig, fit

    seen = {}
    original = reweight.Reweight.__init__

    def spy(self, backbone, info, **options):
        seen["groups"], seen["names"], seen["attribute"] = info.groups.clone(), info.group_names, info.attribute
        original(self, backbone, info, **options)

    monkeypatch.setattr(reweight.Reweight, "__init__", spy)
    splits = crossed.add_crossed(Synthetic(**TINY_DATA).load(None, 32), ["sex×age"])
    backbone = create_backbone("test_resnet", splits.in_chans, pretrained=False)
    config = TrainConfig(epochs=1, patience=0, batch_size=32, num_workers=0, device="cpu")
    result = fit(reweight.Reweight, {}, backbone, splits, "sex_x_age", config, progress=False)
    assert seen["attribute"] == "sex_x_age"
    assert seen["names"] == ("female×<60", "female×≥60", "male×<60", "male×≥60")
    sex, age = splits.train.attrs[:, 0], splits.train.attrs[:, 1]
    assert seen["groups"].tolist() == crossed.codes(sex, age, 2).tolist()
    assert result.test.attrs.shape[1] == 3  # predictions carry the crossed codes
