"""stridenet: learnable token masking, adversarial confusion and optimal-transport alignment to
clinical label embeddings (Stride-Net, arXiv 2602.10875).

Tokens F (B x T x D) are the backbone's final tokens: a ViT's ``forward_features`` (prefix and
patch tokens); a CNN's final feature map, one token per spatial position. T is found by one
forward pass at construction, so it follows the run's image size.

- Mask: an MLP on the flattened tokens, T*D -> ``mask_hidden`` (ReLU) -> T*C, sigmoid, gives
  M (B x T x C), C = number of label embeddings. Token t is weighted by w_t = sum_c M[t, c];
  the masked tokens are F * w.
- Disease head: an MLP D -> ``disease_hidden`` -> ``disease_hidden2`` -> 1 (ReLU) on every
  masked token; the token outputs are averaged into the logit (its last layer in float32),
  trained with BCE.
- Attribute head: linear D -> groups on every token, averaged (for a linear head this equals
  the head applied to the mean token). (a) On the masked tokens its prediction is pushed to
  uniform by the confusion loss -mean_k log softmax_k (``confusion_weight``, 0.2 in the
  authors' code); (b) on the detached masked tokens it learns to predict the group with
  cross-entropy (``attr_weight``, 1), so the encoder never learns to help it.
- Group optimal transport (``got_weight``, 1) between the masked tokens and the label
  embeddings (projected to D by a learned linear map when their width differs): cosine costs,
  entries below min + ``cost_threshold`` * (max - min) set to 0, IPOT Wasserstein W (uniform
  marginals, ``ipot_iterations`` = 30, transport restricted by M) and Gromov-Wasserstein GW;
  GOT = ``gw_share`` * GW + (1 - ``gw_share``) * W with ``gw_share`` = 0.9.
- ``l1_weight`` * sum |theta| (1e-4) over every trained parameter (backbone without its unused
  timm classifier, mask, heads, projection), and gradients clipped to norm ``clip_grad_norm``
  (1.0), both from the authors' code.

Choices where the description is silent (each an option, see the README): the mask enters W's
kernel as a factor, i.e. as an extra cost -beta * log M (``ot_mask=kernel``; ``none`` ignores
it); gradients flow through W's unrolled IPOT iterations, so the mask is trained by W
(``ot_grad=unrolled``; ``plan_detached`` differentiates the costs only), while GW is always
differentiated at its fixed plan, as POT's ``gromov_wasserstein2`` does; the IPOT step
``ipot_beta`` = 0.5 and ``gw_outer`` = 5 linearisations of GW; the thresholds use each
matrix's own min and max; GW compares the token-token and label-label cosine costs after the
projection; the confusion loss does not update the attribute head (``confusion_head_grad``,
following the confusion loss of Alvi et al., ECCV-W 2018), so the head is trained by (b) alone.
Samples of unknown group (-1) are left out of both attribute losses.

Label embeddings (``label_embeddings``): ``auto`` reads ``label_embeddings.npy`` from the
dataset's prepared folder (written by ``fairbench embed-labels <dataset>``; missing there is
an error naming that command). A dataset without any folder (generated in memory, such as
``synthetic``) gets one-hot embeddings instead, with a warning. ``onehot`` asks for them
explicitly: C x C identity rows, which the learned projection turns into one learned vector
per label name. Any other value is the path of a (C x E) ``.npy`` file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairbench import embeddings
from fairbench.errors import FairbenchError
from fairbench.method import Batch, Method, TrainInfo
from fairbench.model import Backbone, ModelOutput, head_fp32
from fairbench.options import Interval
from fairbench.transport import got_distance


class LabelEmbeddingWarning(UserWarning):
    """A run falls back to one-hot label embeddings."""


def as_tokens(features: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, T, D) tokens from a timm ``forward_features`` output: ViT tokens as they are, a CNN
    map (B, D, H, W) or (B, H, W, D) as its H*W positions, a pooled (B, D) as one token."""
    if features.ndim == 3:
        return features
    if features.ndim == 2:
        return features[:, None]
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2) if features.shape[1] == dim else features.flatten(1, 2)
    raise FairbenchError(f"stridenet: backbone features of shape {tuple(features.shape)} are not tokens")


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """-mean_k log softmax_k per sample, averaged: minimal (log K) at the uniform prediction."""
    return -F.log_softmax(logits.float(), dim=-1).mean(dim=-1).mean()


def label_embeddings_for(spec: str, info: TrainInfo) -> np.ndarray:
    """The (C, E) label embeddings that option ``label_embeddings=spec`` names for this dataset."""
    names = info.label_names
    if spec == "onehot":
        return np.eye(len(names) or 2, dtype=np.float32)
    if spec != "auto":
        return embeddings.read(Path(spec), names)
    folder = info.data_folder
    if folder is not None and (folder / embeddings.ARRAY).is_file():
        return embeddings.read(folder / embeddings.ARRAY, names)
    if folder is not None and folder.is_dir():
        raise FairbenchError(
            f"stridenet: no label embeddings in {folder}; run 'fairbench embed-labels {folder.name}' "
            "(or pass -o label_embeddings=PATH.npy, or -o label_embeddings=onehot)"
        )
    warnings.warn(
        f"stridenet: the dataset has no prepared folder ({folder}), so no text label embeddings; using one-hot "
        "label embeddings (label_embeddings=onehot). 'fairbench embed-labels <dataset>' computes text ones.",
        LabelEmbeddingWarning,
        stacklevel=2,
    )
    return np.eye(len(names) or 2, dtype=np.float32)


class StrideNet(Method):
    """Stride-Net: token mask, attribute confusion and optimal transport to label embeddings."""

    uses_attributes = True

    def __init__(
        self,
        backbone: Backbone,
        info: TrainInfo,
        *,
        label_embeddings: str = "auto",
        confusion_weight: Annotated[float, Interval(ge=0)] = 0.2,
        attr_weight: Annotated[float, Interval(ge=0)] = 1.0,
        got_weight: Annotated[float, Interval(ge=0)] = 1.0,
        gw_share: Annotated[float, Interval(ge=0, le=1)] = 0.9,
        cost_threshold: Annotated[float, Interval(ge=0, lt=1)] = 0.1,
        ipot_iterations: Annotated[int, Interval(ge=1)] = 30,
        ipot_beta: Annotated[float, Interval(gt=0)] = 0.5,
        gw_outer: Annotated[int, Interval(ge=1)] = 5,
        ot_mask: Literal["kernel", "none"] = "kernel",
        ot_grad: Literal["unrolled", "plan_detached"] = "unrolled",
        l1_weight: Annotated[float, Interval(ge=0)] = 1e-4,
        clip_grad_norm: Annotated[float, Interval(ge=0)] = 1.0,
        mask_hidden: Annotated[int, Interval(ge=1)] = 128,
        disease_hidden: Annotated[int, Interval(ge=1)] = 256,
        disease_hidden2: Annotated[int, Interval(ge=1)] = 128,
        confusion_head_grad: bool = False,
    ) -> None:
        super().__init__(backbone, info)
        if len(info.group_names) < 2:
            raise FairbenchError("stridenet needs a training attribute with at least two groups: pass --attribute")
        self.weights = {"confusion": confusion_weight, "attr_ce": attr_weight, "got": got_weight, "l1": l1_weight}
        self.got_options = {
            "gw_share": gw_share,
            "threshold": cost_threshold,
            "beta": ipot_beta,
            "iterations": ipot_iterations,
            "gw_outer": gw_outer,
            "detach_plan": ot_grad == "plan_detached",
        }
        self.ot_mask = ot_mask
        self.confusion_head_grad = confusion_head_grad
        self.clip_grad_norm = clip_grad_norm or None
        labels = torch.as_tensor(label_embeddings_for(label_embeddings, info))
        self.register_buffer("label_embeddings", labels)
        n_tokens, dim = self._token_shape(info.input_shape)
        self.n_tokens, self.dim, self.n_labels = n_tokens, dim, labels.shape[0]
        self.label_proj = nn.Linear(labels.shape[1], dim) if labels.shape[1] != dim else nn.Identity()
        self.mask_net = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(n_tokens * dim, mask_hidden),
            nn.ReLU(),
            nn.Linear(mask_hidden, n_tokens * self.n_labels),
        )
        self.disease_body = nn.Sequential(
            nn.Linear(dim, disease_hidden), nn.ReLU(), nn.Linear(disease_hidden, disease_hidden2), nn.ReLU()
        )
        self.disease_out = nn.Linear(disease_hidden2, 1)
        self.attr_head = nn.Linear(dim, len(info.group_names))

    @torch.no_grad()
    def _token_shape(self, input_shape: tuple[int, int, int]) -> tuple[int, int]:
        """(T, D) of the backbone's tokens at the run's input size, from one dry forward pass."""
        net = self.backbone.net
        was_training = net.training
        net.eval()
        tokens = as_tokens(net.forward_features(torch.zeros(2, *input_shape)), self.backbone.feature_dim)
        net.train(was_training)
        return int(tokens.shape[1]), int(tokens.shape[2])

    def _trained(self) -> list[nn.Parameter]:
        """Every parameter the loss uses: all but the backbone's own (unused) classifier."""
        unused = {id(p) for p in self.backbone.net.get_classifier().parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in unused]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        tokens = as_tokens(self.backbone.net.forward_features(x), self.backbone.feature_dim)
        if tokens.shape[1] != self.n_tokens:
            raise FairbenchError(
                f"stridenet: the backbone gives {tokens.shape[1]} tokens but the mask was built for "
                f"{self.n_tokens}; train and predict at one image size"
            )
        mask = torch.sigmoid(self.mask_net(tokens).view(-1, self.n_tokens, self.n_labels))
        masked = tokens * mask.sum(dim=-1, keepdim=True).to(tokens.dtype)
        logits = head_fp32(self.disease_out, self.disease_body(masked)).squeeze(-1).mean(dim=1)
        return ModelOutput(logits=logits, features=masked.mean(dim=1), extras={"mask": mask, "tokens": masked})

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        bce = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label)
        known = batch.group >= 0
        features = out.features.float()[known]
        head_w, head_b = self.attr_head.weight, self.attr_head.bias
        if not self.confusion_head_grad:
            head_w, head_b = head_w.detach(), head_b.detach()
        zero = bce * 0.0
        confusion = confusion_loss(F.linear(features, head_w, head_b)) if known.any() else zero
        attr_ce = F.cross_entropy(self.attr_head(features.detach()), batch.group[known]) if known.any() else zero
        with torch.autocast(out.logits.device.type, enabled=False):
            tokens = out.extras["tokens"].float()
            labels = self.label_proj(self.label_embeddings).expand(tokens.shape[0], -1, -1)
            weight = out.extras["mask"].float() if self.ot_mask == "kernel" else None
            got, w, gw = (v.mean() for v in got_distance(tokens, labels, weight, **self.got_options))
        l1 = torch.stack([p.abs().sum() for p in self._trained()]).sum()
        ws = self.weights
        total = bce + ws["confusion"] * confusion + ws["attr_ce"] * attr_ce + ws["got"] * got + ws["l1"] * l1
        return {"loss": total, "bce": bce, "confusion": confusion, "attr_ce": attr_ce, "got": got, "w": w, "gw": gw,
                "l1": l1}  # fmt: skip

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": self._trained()}]

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {
            "confusion_weight": trial.suggest_float("confusion_weight", 0.02, 2.0, log=True),
            "got_weight": trial.suggest_float("got_weight", 0.1, 10.0, log=True),
            "l1_weight": trial.suggest_float("l1_weight", 1e-6, 1e-3, log=True),
        }
