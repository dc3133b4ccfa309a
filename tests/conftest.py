"""Shared fixtures: tiny, fast settings for end-to-end runs on CPU."""

from __future__ import annotations

import pytest

from fairbench.config import RunConfig
from fairbench.trainer import TrainConfig

TINY_DATA = {"n_train": 96, "n_val": 64, "n_test": 80}


@pytest.fixture
def tiny_config(tmp_path):
    """A RunConfig that trains timm's test_resnet on 32 px synthetic images for two epochs."""

    def make(**overrides):
        train = TrainConfig(
            epochs=2, patience=0, batch_size=32, num_workers=0, device="cpu", **overrides.pop("train", {})
        )
        values = dict(
            method="erm",
            dataset="synthetic",
            dataset_options=dict(TINY_DATA),
            backbone="test_resnet",
            image_size=32,
            bootstrap=50,
            min_group_count=1,  # tiny groups: every group enters the gaps
            train=train,
            results_dir=str(tmp_path / "results"),
            tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}",
        )
        values.update(overrides)
        return RunConfig(**values)

    return make
