"""The run configuration: the single source of every knob of one training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fairbench.finetune import Finetune
from fairbench.paths import default_data_dir
from fairbench.trainer import TrainConfig

__all__ = ["RunConfig", "default_data_dir"]


@dataclass
class RunConfig:
    """Everything that determines one run; logged as MLflow parameters.

    ``method_options`` and ``dataset_options`` hold the plugin's full resolved options
    (defaults included), so a logged run can be repeated from its parameters alone.
    """

    method: str = "erm"
    dataset: str = "synthetic"
    method_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_file: str | None = None
    finetune: str = "full"
    last_n: int = 1
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: str | None = None
    lora_dropout: float = 0.0
    image_size: int | None = None
    attribute: str | None = None
    threshold: str = "0.5"
    bootstrap: int = 1000
    min_group_count: int = 20
    label_bias: str | None = None
    track_nc: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    results_dir: str = "results"
    tracking_uri: str | None = None
    data_dir: str | None = None

    def params(self) -> dict[str, Any]:
        """Flat parameters: top-level knobs, trainer knobs, ``method.*`` and ``dataset.*`` options."""
        out = {k: v for k, v in asdict(self).items() if k not in ("method_options", "dataset_options", "train")}
        out.update(asdict(self.train))
        out.update({f"method.{k}": v for k, v in self.method_options.items()})
        out.update({f"dataset.{k}": v for k, v in self.dataset_options.items()})
        return out

    def finetune_spec(self) -> Finetune:
        """The training regime of the backbone (``lora_targets``: comma-separated module names)."""
        targets = tuple(t.strip() for t in (self.lora_targets or "").split(",") if t.strip())
        return Finetune(
            regime=self.finetune,
            last_n=self.last_n,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_targets=targets,
            lora_dropout=self.lora_dropout,
        )

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()
