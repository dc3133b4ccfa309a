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
    assert np.array_equal(clean.val.labels, noisy.val.labels)
    assert np.array_equal(clean.test.labels, noisy.test.labels)


def test_shortcut_correlates_with_label_in_the_training_group_only():
    s = Synthetic(n_train=3000, n_val=3000, n_test=10, shortcut=1.0, label_noise=0.0).load(None, 32)
    old = s.train.attrs[:, 1] == 1
    m = marker_on(s.train.images)
    assert np.array_equal(m[old], s.train.labels[old] == 1)
    young_corr = np.corrcoef(m[~old], s.train.labels[~old])[0, 1]
    val_corr = np.corrcoef(marker_on(s.val.images), s.val.labels)[0, 1]
    assert abs(young_corr) < 0.1
    assert abs(val_corr) < 0.1


@pytest.mark.parametrize(("option", "value"), [("label_noise", 1.5), ("noise_group", "other"), ("n_val", 2)])
def test_bad_options_are_refused(option, value):
    with pytest.raises(FairbenchError, match=option):
        Synthetic(**{option: value})
