"""Analyses of why a model is unfair: neural collapse per subgroup, neuron incidence, label bias.

Neural collapse (Papyan, Han & Donoho, PNAS 2020), as used per subgroup by Mouheb, Elbatel,
Klein & Bron (MICCAI 2024), on penultimate features H (N x D) with labels y and K = 2 classes.
Papyan et al. study balanced data, where the global mean μ_G (the mean of all samples) equals
the mean of the class means and every class carries the same weight in Σ_W. Subgroups of a
medical dataset are not balanced, and their prevalences differ by design (under-diagnosis
lowers a group's prevalence), so the sample-weighted forms would measure prevalence instead of
geometry: with identical class-conditional features, the sample mean moves toward the larger
class and NC1, NC3 and tr(Σ_W) change with the class ratio alone. We therefore keep the
balanced-data definitions literally, giving every class equal weight:

- class means μ_k (the sample means of class k); global mean μ_G = (1/K) Σ_k μ_k, the mean of
  the class means;
- between-class covariance Σ_B = (1/K) Σ_k (μ_k − μ_G)(μ_k − μ_G)ᵀ;
- within-class covariance Σ_W = (1/K) Σ_k Σ_k, the average of the per-class covariances
  Σ_k = (1/n_k) Σ_{i: y_i = k} (h_i − μ_k)(h_i − μ_k)ᵀ;
- NC1 = tr(Σ_W Σ_B⁺) / K: within-class scatter relative to between-class scatter (0 when every
  sample sits on its class mean);
- NC3 = ‖W/‖W‖ − M/‖M‖‖_F: distance between the normalised classifier weights (the one-logit
  head w read as the two class vectors −w/2 and w/2) and the normalised centred class means
  M = [μ_k − μ_G]_k;
- NC4: the rate at which the model's prediction differs from the nearest-class-centre rule,
  averaged over the classes (each class's own rate, weighted equally, as balanced accuracy is);
- within-class variability tr(Σ_W).

All of these depend only on the class-conditional distributions of the features (and of the
predictions), never on how many samples each class has.

NC2 (equiangular class means) is not reported: with two classes the centred means μ_k − μ_G
always point in opposite directions (cosine −1), so it carries no information.

Neuron incidence (the analysis of Shoby, Palmer & Kurian 2026, arXiv 2605.19393): per
penultimate neuron, the prediction-weighted mean activation under positive predictions
(weights p) and under negative ones (weights 1 - p); how concentrated the positive incidence is
(share of the top-k neurons, normalised entropy); and how strongly each group and each label
activates the dominant neuron.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fairbench.errors import FairbenchError
from fairbench.metrics import group_key

EPS = 1e-12


def neural_collapse(
    features: np.ndarray, labels: np.ndarray, predictions: np.ndarray, head: np.ndarray
) -> dict[str, float]:
    """NC1, NC3, NC4 and within-class variability of one set of samples (both classes needed),
    with every class weighted equally (see the module docstring), so the values do not move with
    class prevalence.

    ``predictions`` are the model's 0/1 decisions (score > 0.5, i.e. logit > 0); ``head`` is the
    weight vector of the one-logit linear head.
    """
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        return {}
    classes = [h[y == k] for k in (0, 1)]
    means = np.stack([c.mean(axis=0) for c in classes])
    m = means - means.mean(axis=0)
    sigma_w = np.mean([(c - mu).T @ (c - mu) / len(c) for c, mu in zip(classes, means, strict=True)], axis=0)
    sigma_b = m.T @ m / 2
    nc1 = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, hermitian=True)) / 2)
    w = np.asarray(head, dtype=np.float64).reshape(-1)
    weights = np.stack([-w / 2, w / 2])
    nc3 = float(np.linalg.norm(weights / (np.linalg.norm(weights) + EPS) - m / (np.linalg.norm(m) + EPS)))
    nearest = np.argmin(((h[:, None, :] - means[None]) ** 2).sum(axis=2), axis=1)
    mismatch = nearest != np.asarray(predictions).astype(int)
    nc4 = float(np.mean([mismatch[y == k].mean() for k in (0, 1)]))
    return {"nc1": nc1, "nc3": nc3, "nc4": nc4, "within_var": float(np.trace(sigma_w))}


def neural_collapse_by_group(
    features: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    head: np.ndarray,
    attrs: np.ndarray,
    attributes: Mapping[str, Sequence[str]],
) -> dict[str, float]:
    """Neural-collapse metrics overall (``nc1``) and per subgroup (``sex/female/nc1``)."""
    out = dict(neural_collapse(features, labels, predictions, head))
    for a, (attr, groups) in enumerate(attributes.items()):
        for code, group in enumerate(groups):
            m = np.asarray(attrs)[:, a] == code
            if m.sum() < 2:
                continue
            part = neural_collapse(features[m], labels[m], predictions[m], head)
            out.update({f"{attr}/{group_key(group)}/{k}": v for k, v in part.items()})
    return out


def weighted_means(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per neuron, the ``weights``-weighted mean activation."""
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * np.asarray(features, dtype=np.float64)).sum(axis=0) / (w.sum() + EPS)


def concentration(incidence: np.ndarray, k: int = 5) -> dict[str, float]:
    """How concentrated an incidence vector is: top-1 and top-k share of Σ|m|, normalised entropy.

    The normalised entropy is 1 when every neuron carries the same incidence and 0 when one
    neuron carries all of it.
    """
    mass = np.abs(np.asarray(incidence, dtype=np.float64))
    total = mass.sum()
    if total <= 0:
        return {"top1_share": float("nan"), f"top{k}_share": float("nan"), "entropy": float("nan")}
    q = mass / total
    ordered = np.sort(q)[::-1]
    nz = q[q > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(len(q))) if len(q) > 1 else 0.0
    return {"top1_share": float(ordered[0]), f"top{k}_share": float(ordered[:k].sum()), "entropy": entropy}


def neuron_incidence(
    features: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    attrs: np.ndarray,
    attributes: Mapping[str, Sequence[str]],
    top: int = 5,
) -> dict[str, Any]:
    """The neuron-incidence diagnostics of one split (JSON-ready)."""
    p = np.asarray(scores, dtype=np.float64)
    h = np.asarray(features, dtype=np.float64)
    positive = weighted_means(h, p)
    negative = weighted_means(h, 1 - p)
    dominant = [int(j) for j in np.argsort(-np.abs(positive))[:top]]
    lead = dominant[0]
    by_group = {
        attr: {
            g: float(h[np.asarray(attrs)[:, a] == code, lead].mean())
            for code, g in enumerate(groups)
            if (np.asarray(attrs)[:, a] == code).any()
        }
        for a, (attr, groups) in enumerate(attributes.items())
    }
    by_label = {str(y): float(h[np.asarray(labels) == y, lead].mean()) for y in (0, 1) if (labels == y).any()}
    return {
        "positive_incidence": positive.tolist(),
        "negative_incidence": negative.tolist(),
        "dominant_neurons": dominant,
        "positive": concentration(positive, top),
        "negative": concentration(negative, top),
        "dominant_activation_by_group": by_group,
        "dominant_activation_by_label": by_label,
    }


def parse_label_bias(spec: str, attributes: Mapping[str, Sequence[str]]) -> tuple[int, int, float]:
    """``"sex=female:0.3"`` -> (attribute column, group code, fraction), checked against the dataset."""
    try:
        target, fraction_text = spec.rsplit(":", 1)
        attr, group = target.split("=", 1)
        fraction = float(fraction_text)
    except ValueError:
        raise FairbenchError(f"--label-bias {spec}: write ATTRIBUTE=GROUP:FRACTION, e.g. sex=female:0.3") from None
    if attr not in attributes:
        raise FairbenchError(f"--label-bias {spec}: no attribute '{attr}'; attributes: {', '.join(attributes)}")
    groups = list(attributes[attr])
    codes = [i for i, g in enumerate(groups) if group in (g, group_key(g))]
    if not codes:
        names = ", ".join(f"{g} ({group_key(g)})" for g in groups)
        raise FairbenchError(f"--label-bias {spec}: no {attr} group '{group}'; groups: {names}")
    if not 0.0 <= fraction <= 1.0:
        raise FairbenchError(f"--label-bias {spec}: the fraction must lie in [0, 1]")
    return list(attributes).index(attr), codes[0], fraction


def inject_label_bias(
    labels: np.ndarray, attrs: np.ndarray, column: int, code: int, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(fraction x n)`` of the group's n positive labels to 0, chosen from ``seed``.

    Returns the new labels and the flipped positions; the input is not modified.
    """
    labels = np.asarray(labels).copy()
    candidates = np.flatnonzero((np.asarray(attrs)[:, column] == code) & (labels == 1))
    rng = np.random.default_rng([seed, 0x1AB])
    flipped = np.sort(rng.permutation(candidates)[: round(fraction * len(candidates))])
    labels[flipped] = 0
    return labels, flipped
