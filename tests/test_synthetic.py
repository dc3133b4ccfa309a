import numpy as np
import pytest
from fairbench.datasets.synthetic import Synthetic

from fairbench.errors import FairbenchError

SIZES = {"n_train": 400, "n_val": 200, "n_test": 200}


def test_same_seed_same_data_other_seed_other_data():
    a = Synthetic(**SIZES, seed=1).load(None, 32)
    b = Synthetic(**SIZES, seed=1).load(None, 32)
    c = Synthetic(**SIZES, seed=2).load(None, 32)
    assert np.array_equal(a.train.images, b.train.images)
    assert np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)


def test_contract_shapes_and_codes():
    s = Synthetic(**SIZES).load(None, 48)
    assert s.train.images.shape == (400, 3, 48, 48)
    assert s.train.images.dtype == np.uint8
    assert s.in_chans == 3
    assert list(s.attributes) == ["sex", "age"]
    for split in (s.train, s.val, s.test):
        assert set(np.unique(split.attrs)) <= {0, 1}
        assert set(np.unique(split.labels)) == {0, 1}


def marker_on(images):
    # the marker is a blue square in the top-left corner
    patch = images[:, :, 1:3, 1:3].astype(int)
    return (patch[:, 2] - patch[:, 0]).mean(axis=(1, 2)) > 80


def test_label_noise_flips_only_the_noise_groups_training_positives():
    clean = Synthetic(**SIZES, label_noise=0.0, shortcut=0.0).load(None, 32)
    noisy = Synthetic(**SIZES, label_noise=0.5, shortcut=0.0).load(None, 32)
    flipped = (clean.train.labels == 1) & (noisy.train.labels == 0)
    female_pos = (clean.train.attrs[:, 0] == 0) & (clean.train.labels == 1)
    assert flipped.sum() == round(0.5 * female_pos.sum())
    assert (noisy.train.attrs[flipped, 0] == 0).all()
    assert ((noisy.train.labels == 1) & (clean.train.labels == 0)).sum() == 0
    assert np.array_equal(clean.test.labels, noisy.test.labels)


def test_shortcut_marks_the_training_groups_positives_only():
    s = Synthetic(n_train=3000, n_val=300, n_test=300, shortcut=1.0, label_noise=0.0).load(None, 32)
    old = s.train.attrs[:, 1] == 1
    m = marker_on(s.train.images)
    assert np.array_equal(m[old], s.train.labels[old] == 1)
    assert not m[~old].any()
    assert not marker_on(s.test.images).any()
    partial = Synthetic(n_train=3000, n_val=10, n_test=10, shortcut=0.6, label_noise=0.0).load(None, 32)
    old = partial.train.attrs[:, 1] == 1
    m = marker_on(partial.train.images)
    pos = partial.train.labels == 1
    assert m[old & pos].mean() == pytest.approx(0.8, abs=0.05)
    assert m[old & ~pos].mean() == pytest.approx(0.2, abs=0.05)


def test_validation_gets_the_training_shortcut_by_default_and_none_without_it():
    biased = Synthetic(n_train=10, n_val=3000, n_test=3000, shortcut=1.0, label_noise=0.0).load(None, 32)
    old = biased.val.attrs[:, 1] == 1
    m = marker_on(biased.val.images)
    assert np.array_equal(m[old], biased.val.labels[old] == 1)
    assert not m[~old].any() and m.any()
    partial = Synthetic(n_train=10, n_val=3000, n_test=10, shortcut=0.6, label_noise=0.0).load(None, 32)
    old, pos = partial.val.attrs[:, 1] == 1, partial.val.labels == 1
    m = marker_on(partial.val.images)
    assert m[old & pos].mean() == pytest.approx(0.8, abs=0.05)
    assert m[old & ~pos].mean() == pytest.approx(0.2, abs=0.05)
    unbiased = Synthetic(n_train=10, n_val=3000, n_test=10, shortcut=1.0, val_bias="none").load(None, 32)
    assert not marker_on(unbiased.val.images).any()


def test_validation_gets_the_training_label_noise_by_default_and_none_without_it():
    sizes = {"n_train": 10, "n_val": 2000, "n_test": 500, "shortcut": 0.0}
    clean = Synthetic(**sizes, label_noise=0.0).load(None, 32)
    noisy = Synthetic(**sizes, label_noise=0.5).load(None, 32)
    flipped = (clean.val.labels == 1) & (noisy.val.labels == 0)
    female_pos = (clean.val.attrs[:, 0] == 0) & (clean.val.labels == 1)
    assert flipped.sum() == round(0.5 * female_pos.sum()) > 0
    assert (noisy.val.attrs[flipped, 0] == 0).all()
    assert ((noisy.val.labels == 1) & (clean.val.labels == 0)).sum() == 0
    unbiased = Synthetic(**sizes, label_noise=0.5, val_bias="none").load(None, 32)
    assert np.array_equal(unbiased.val.labels, clean.val.labels)


@pytest.mark.parametrize("val_bias", ["train", "none"])
def test_the_test_split_is_never_biased(val_bias):
    options = {"n_train": 10, "n_val": 10, "n_test": 2000, "shortcut": 1.0, "val_bias": val_bias}
    clean = Synthetic(**options, label_noise=0.0).load(None, 32)
    noisy = Synthetic(**options, label_noise=0.5).load(None, 32)
    assert not marker_on(noisy.test.images).any()
    assert np.array_equal(noisy.test.labels, clean.test.labels)
    other = Synthetic(**{**options, "val_bias": "none" if val_bias == "train" else "train"}).load(None, 32)
    assert np.array_equal(noisy.test.images, other.test.images)


@pytest.mark.parametrize(
    ("option", "value"), [("label_noise", 1.5), ("noise_group", "other"), ("n_val", 2), ("val_bias", "test")]
)
def test_bad_options_are_refused(option, value):
    with pytest.raises(FairbenchError, match=option):
        Synthetic(**{option: value})
