"""synthetic: a built-in, download-free dataset with planted, controllable bias.

Each image is a skin-like patch with one lesion. The label is the disease: a positive lesion
has a ring around it whose contrast varies from faint to clear, so some cases are hard.
Both sensitive attributes are visible, as they are in real images: ``sex`` shifts the skin
tint, ``age`` adds fine texture. Two knobs plant the two kinds of bias studied in the
fairness literature, in the training split and (by default) in the validation split; the test
split is never biased:

- ``shortcut``: in the training images of the ``shortcut_group`` only, a small square marker
  co-occurs with the label (present on a fraction (1 + shortcut)/2 of its positives and
  (1 - shortcut)/2 of its negatives); no other image carries it. A model can learn the marker
  instead of the disease, and then misses that group's positives at test, where the marker is
  absent: a spurious correlation.
- ``label_noise``: that fraction of the ``noise_group``'s positive training labels is flipped
  to negative: under-diagnosis, i.e. label bias.
- ``val_bias``: ``train`` (default) draws the validation split from the training distribution,
  with the same shortcut and label noise; ``none`` leaves it unbiased like test. A researcher
  with a biased data source has no unbiased validation set either: selecting epochs, thresholds
  and hyperparameters on an unbiased one uses the test domain as an oracle and flatters
  methods. ``none`` gives the earlier behaviour, to measure how much that oracle flatters.

Everything is drawn from ``seed`` (fixed per split), so a dataset is reproducible from its
options alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from fairbench.data import Dataset, Split, Splits
from fairbench.errors import FairbenchError
from fairbench.metrics import group_key

ATTRIBUTES = {"sex": ["female", "male"], "age": ["<60", "≥60"]}
RING_CONTRAST = (0.12, 0.45)  # range of the disease ring's contrast, faint to clear
_SKIN = {0: (0.80, 0.62, 0.55), 1: (0.68, 0.56, 0.58)}  # female, male base tint (RGB in [0, 1])


def _group_code(attribute: str, group: str, option: str) -> int:
    if attribute not in ATTRIBUTES:
        raise FairbenchError(f"synthetic option {option}: no attribute '{attribute}'; use sex or age")
    for code, name in enumerate(ATTRIBUTES[attribute]):
        if group in (name, group_key(name)):
            return code
    names = ", ".join(f"{n} ({group_key(n)})" for n in ATTRIBUTES[attribute])
    raise FairbenchError(f"synthetic option {option}: no {attribute} group '{group}'; groups: {names}")


class Synthetic(Dataset):
    """Generated skin-lesion-like images with a planted shortcut and label noise (no download)."""

    name: ClassVar[str] = "synthetic"
    attributes: ClassVar[dict[str, list[str]]] = ATTRIBUTES
    label_names: ClassVar[tuple[str, ...]] = ("lesion with a ring", "lesion without a ring")
    in_chans: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 48
    needs_prepare: ClassVar[bool] = False

    def __init__(
        self,
        *,
        n_train: int = 1500,
        n_val: int = 500,
        n_test: int = 1000,
        prevalence: float = 0.35,
        shortcut: float = 0.9,
        shortcut_attribute: str = "age",
        shortcut_group: str = "ge60",
        label_noise: float = 0.4,
        noise_attribute: str = "sex",
        noise_group: str = "female",
        val_bias: Literal["train", "none"] = "train",
        seed: int = 0,
    ) -> None:
        for name, value in (("shortcut", shortcut), ("label_noise", label_noise), ("prevalence", prevalence)):
            if not 0.0 <= value <= 1.0:
                raise FairbenchError(f"synthetic option {name}={value} must lie in [0, 1]")
        for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value < 4:
                raise FairbenchError(f"synthetic option {name}={value} must be at least 4")
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.prevalence = prevalence
        self.shortcut = shortcut
        self.shortcut_col = list(ATTRIBUTES).index(shortcut_attribute) if shortcut_attribute in ATTRIBUTES else -1
        self.shortcut_code = _group_code(shortcut_attribute, shortcut_group, "shortcut_group")
        self.label_noise = label_noise
        self.noise_col = list(ATTRIBUTES).index(noise_attribute) if noise_attribute in ATTRIBUTES else -1
        self.noise_code = _group_code(noise_attribute, noise_group, "noise_group")
        if val_bias not in ("train", "none"):
            raise FairbenchError(f"synthetic option val_bias={val_bias}: use train or none")
        self.biased = {"train": True, "val": val_bias == "train", "test": False}
        self.seed = seed

    def load(self, data_dir: Path, image_size: int) -> Splits:
        splits = {
            name: self._split(i, n, image_size, biased=self.biased[name])
            for i, (name, n) in enumerate(self.sizes.items())
        }
        return Splits(
            **splits,
            attributes={k: list(v) for k, v in ATTRIBUTES.items()},
            mean=(0.62, 0.50, 0.48),
            std=(0.20, 0.18, 0.18),
        )

    def _split(self, split_id: int, n: int, size: int, biased: bool) -> Split:
        rng = np.random.default_rng([self.seed, split_id])
        attrs = rng.integers(0, 2, size=(n, 2))
        disease = (rng.random(n) < self.prevalence).astype(np.int64)
        marker_p = np.zeros(n)
        labels = disease.copy()
        if biased:
            in_group = attrs[:, self.shortcut_col] == self.shortcut_code
            marker_p[in_group] = np.where(disease[in_group] == 1, 1 + self.shortcut, 1 - self.shortcut) / 2
            noisy = np.flatnonzero((attrs[:, self.noise_col] == self.noise_code) & (disease == 1))
            flipped = rng.permutation(noisy)[: round(self.label_noise * noisy.size)]
            labels[flipped] = 0
        marker = rng.random(n) < marker_p
        images = self._render(rng, size, attrs, disease, marker)
        return Split(images=images, labels=labels, attrs=attrs)

    @staticmethod
    def _render(rng, size, attrs, disease, marker) -> np.ndarray:
        n = len(disease)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        skin = np.array([_SKIN[int(s)] for s in attrs[:, 0]], dtype=np.float32)  # (n, 3)
        brightness = rng.normal(1.0, 0.06, size=(n, 1, 1)).astype(np.float32)
        # lesion: a dark elliptical blob at a random place
        cx, cy = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype(np.float32)
        r = rng.uniform(0.10, 0.18, (n, 1, 1)).astype(np.float32)
        d = np.sqrt((xx - cx) ** 2 + ((yy - cy) * 1.2) ** 2)
        lesion = np.exp(-((d / r) ** 2))
        # disease: a bright ring just outside the lesion, with contrast from faint to clear
        contrast = rng.uniform(*RING_CONTRAST, (n, 1, 1)).astype(np.float32) * disease[:, None, None]
        ring = contrast * np.exp(-(((d - 1.35 * r) / (0.22 * r)) ** 2))
        # age: fine texture, stronger in the older group
        texture_amp = np.where(attrs[:, 1] == 1, 0.09, 0.025).astype(np.float32)[:, None, None]
        texture = texture_amp * np.sin(xx * 60 + rng.uniform(0, 6.3, (n, 1, 1))) * np.sin(yy * 55)
        noise = rng.normal(0, 0.06, (n, size, size)).astype(np.float32)
        shade = brightness - 0.45 * lesion + ring + texture + noise  # (n, H, W)
        img = skin[:, :, None, None] * shade[:, None]
        s = max(2, size // 10)
        img[marker, :, 1 : 1 + s, 1 : 1 + s] = np.array([0.2, 0.35, 0.9], dtype=np.float32)[:, None, None]
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
