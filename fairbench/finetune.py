"""Training regimes for a (pretrained) backbone: which of its parameters are trained.

- ``full``: every parameter (the default).
- ``linear``: linear probing; only the classifier head.
- ``last-n``: the last ``n`` blocks and the head. Blocks are timm's coarse parameter groups
  (``group_matcher(coarse=True)``, the grouping timm uses for layer-wise learning-rate decay):
  after the stem, one group per transformer block (ViT, DINOv2) or per stage (ResNet
  ``layerK``, ConvNeXt ``stages.K``); the final norm belongs to the last block.
- ``lora``: low-rank adapters (Hu et al., ICLR 2022) through the ``peft`` library, injected
  in place after any pretrained weights are loaded; only the adapters and the head train.
  Default targets: in a ViT (any model with ``attn.qkv`` layers) the attention's ``qkv`` and
  output ``proj`` of every block, as in the LoRA paper; in any other model every convolution
  with ``groups == 1`` and every linear layer except the head (depthwise convolutions have too
  few weights for a low-rank update). ``lora_targets`` overrides them with module-name
  suffixes (peft's matching: a name equal to the target or ending in ``.<target>``).

The head is always trainable. Modules a method adds later (adversaries, extra heads) are
created trainable and stay so. BatchNorm layers whose parameters are frozen keep their running
statistics (they stay in eval mode while training), so frozen features really are fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fairbench.errors import FairbenchError

if TYPE_CHECKING:
    from torch import nn

Regime = Literal["full", "linear", "lora", "last-n"]
REGIMES: tuple[str, ...] = ("full", "linear", "lora", "last-n")


@dataclass(frozen=True)
class Finetune:
    """A training regime and its settings. LoRA defaults are peft's ``LoraConfig`` defaults
    (rank 8, alpha 8, no dropout)."""

    regime: Regime = "full"
    last_n: int = 1
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise FairbenchError(f"--finetune {self.regime}: choose one of {', '.join(REGIMES)}")
        checks = (
            ("--last-n", self.last_n, self.last_n >= 1, ">= 1"),
            ("--lora-rank", self.lora_rank, self.lora_rank >= 1, ">= 1"),
            ("--lora-alpha", self.lora_alpha, self.lora_alpha > 0, "> 0"),
            ("--lora-dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "in [0, 1)"),
        )
        for option, value, ok, rule in checks:
            if not ok:
                raise FairbenchError(f"{option} {value}: must be {rule}")


def count_trainable(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``module``."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _head_names(net: nn.Module) -> set[str]:
    head = {id(p) for p in net.get_classifier().parameters()}
    return {name for name, p in net.named_parameters() if id(p) in head}


def block_groups(net: nn.Module) -> list[list[str]]:
    """Parameter names of the network's blocks in forward order (timm's coarse groups without
    the stem and the head)."""
    from timm.models import group_parameters

    try:
        groups = group_parameters(net, net.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        raise FairbenchError(
            f"--finetune last-n: '{type(net).__name__}' declares no block structure (timm group_matcher); "
            "use --finetune full, linear or lora"
        ) from None
    head = _head_names(net)
    ordered = [groups[k] for k in sorted(groups)]
    blocks = [[n for n in names if n not in head] for names in ordered[1:]]
    return [b for b in blocks if b]


def default_lora_targets(net: nn.Module) -> list[str]:
    """Full module names LoRA adapts by default (see the module docstring)."""
    from torch import nn

    names = dict(net.named_modules())
    attention = [n for n in names if n.endswith("attn.qkv") and isinstance(names[n], nn.Linear)]
    if attention:
        proj = [n[: -len("qkv")] + "proj" for n in attention]
        return [n for pair in zip(attention, proj, strict=True) for n in pair if isinstance(names.get(n), nn.Linear)]
    head = {id(m) for m in net.get_classifier().modules()}
    return [
        n
        for n, m in names.items()
        if id(m) not in head and ((isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear))
    ]


def _inject_lora(net: nn.Module, spec: Finetune) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(spec.lora_targets) or default_lora_targets(net)
    if not targets:
        raise FairbenchError(
            f"--finetune lora: '{type(net).__name__}' has no default target layers; name them with --lora-targets"
        )
    config = LoraConfig(
        r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=targets
    )
    try:
        inject_adapter_in_model(config, net)
    except ValueError as exc:
        raise FairbenchError(
            f"--lora-targets {','.join(targets)}: {str(exc).splitlines()[0]}; give module-name suffixes "
            "of the backbone, e.g. attn.qkv,attn.proj"
        ) from None


def apply(net: nn.Module, spec: Finetune) -> list[str]:
    """Set which parameters of timm model ``net`` train under ``spec`` (LoRA adapters are
    injected); returns the names of the BatchNorm modules left frozen."""
    from torch import nn

    if spec.regime == "full":
        return []
    if spec.regime == "lora":
        _inject_lora(net, spec)
    trainable: set[str] = set()
    if spec.regime == "last-n":
        blocks = block_groups(net)
        if spec.last_n > len(blocks):
            raise FairbenchError(
                f"--last-n {spec.last_n}: '{type(net).__name__}' has {len(blocks)} blocks; give at most {len(blocks)}"
            )
        trainable = {n for block in blocks[-spec.last_n :] for n in block}
    head = _head_names(net)
    for name, p in net.named_parameters():
        if spec.regime == "lora":
            p.requires_grad_(p.requires_grad or name in head)  # peft left only the adapters trainable
        else:
            p.requires_grad_(name in trainable or name in head)
    return [
        name
        for name, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]
