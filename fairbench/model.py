"""A timm backbone with a one-logit head that returns logits and penultimate features."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.finetune import Finetune
from fairbench.finetune import apply as finetune_apply


@dataclass
class ModelOutput:
    """``logits`` (B,) of the positive class, float32, and ``features`` (B, D): what the linear
    head receives. ``extras`` carries whatever else a method's own forward pass computes for its
    loss (e.g. token masks), keyed by name."""

    logits: torch.Tensor
    features: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def head_fp32(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``head(features)`` in float32 with autocast off, so scores keep full precision on CUDA
    (a bf16 logit has 8 mantissa bits: scores would tie and flip near the threshold)."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.float())


class Backbone(nn.Module):
    """Wraps a timm model so one forward pass yields both logits and penultimate features."""

    def __init__(self, net: nn.Module, frozen_norms: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
        self.frozen_norms = tuple(frozen_norms)

    def train(self, mode: bool = True) -> Backbone:
        """Like ``nn.Module.train``, but BatchNorm layers frozen by the training regime stay in
        eval mode, so their running statistics do not drift."""
        super().train(mode)
        for name in self.frozen_norms:
            self.net.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        logits = head_fp32(self.net.get_classifier(), features)
        return ModelOutput(logits=logits.squeeze(-1), features=features)


def _load_local_weights(net: nn.Module, path: Path, in_chans: int) -> None:
    """Load a local checkpoint strictly: only the classifier may be absent or of another size.

    The first convolution is adapted to ``in_chans`` and the checkpoint goes through the model
    family's ``checkpoint_filter_fn`` (e.g. a ViT's position embeddings resampled to the input
    size), the way timm adapts downloaded weights.
    Any other missing or unexpected key is an error, so a wrong file never trains silently
    from random initialisation.
    """
    from timm.models import adapt_input_conv, load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:
        raise FairbenchError(
            f"--pretrained-file {path}: not a readable checkpoint ({type(exc).__name__}: {exc}); "
            "give a state dict saved with torch.save or safetensors"
        ) from None
    family = sys.modules.get(type(net).__module__)
    adapt = getattr(family, "checkpoint_filter_fn", None)
    if adapt is not None:  # timm's own conversion, e.g. position embeddings resampled to the input size
        state = adapt(state, net)
    own = net.state_dict()
    classifier = net.pretrained_cfg.get("classifier", "")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    first_conv = net.pretrained_cfg.get("first_conv", "")
    conv_key = f"{first_conv}.weight" if first_conv else ""
    if conv_key in state and conv_key in own and state[conv_key].shape[1] != in_chans:
        state[conv_key] = adapt_input_conv(in_chans, state[conv_key])
    for key in list(state):
        head = any(c and (key == c or key.startswith(c + ".")) for c in classifiers)
        if head and (key not in own or own[key].shape != state[key].shape):
            del state[key]
    missing = [k for k in own if k not in state and not any(c and k.startswith(c + ".") for c in classifiers)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [
            f"{len(v)} {what} (e.g. {v[0]})"
            for what, v in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys of another shape", wrong),
            )
            if v
        ]
        raise FairbenchError(
            f"--pretrained-file {path} does not fit '{net.pretrained_cfg.get('architecture')}': "
            f"{'; '.join(parts)}; check that the checkpoint belongs to this backbone"
        )
    net.load_state_dict(state, strict=False)


def _create(timm, name: str, image_size: int | None, **kwargs) -> nn.Module:
    """``timm.create_model``, with ``img_size`` for the models that take one (ViTs); CNNs take
    any input size and no such argument."""
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, **kwargs)


def create_backbone(
    name: str,
    in_chans: int,
    *,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    finetune: Finetune | None = None,
    image_size: int | None = None,
) -> Backbone:
    """Create timm model ``name`` with one output logit and ``in_chans`` input channels.

    ``pretrained`` downloads timm's default weights; ``pretrained_file`` loads weights from a
    local checkpoint instead (offline use), strictly: only the classifier may differ. In both
    cases the first convolution is adapted to ``in_chans``. ``finetune`` then sets which
    parameters train (:mod:`fairbench.finetune`; LoRA adapters are injected after loading).
    Models built for a fixed input size (ViTs) are built for ``image_size``.
    """
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown backbone '{name}'{hint} (see timm.list_models())")
    path = None
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise FairbenchError(f"--pretrained-file {path}: no such file; give the path of a saved state dict")
        pretrained = False
    try:
        net = _create(timm, name, image_size, pretrained=pretrained, num_classes=1, in_chans=in_chans)
    except (RuntimeError, OSError) as exc:
        raise FairbenchError(
            f"pretrained weights of '{name}' could not be fetched ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "offline, download them elsewhere and pass --pretrained-file"
        ) from None
    if path is not None:
        _load_local_weights(net, path, in_chans)
    frozen = finetune_apply(net, finetune) if finetune is not None else []
    return Backbone(net, frozen_norms=tuple(frozen))
