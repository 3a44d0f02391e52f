"""The training configuration: every field a run is made of (what `config.json` holds)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step")



@dataclass
class TrainConfig:
    rule: str = "backprop"
    dataset: str = "digits"
    model: str = "mlp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    latent_dim: int = 32
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=dict)
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    eval_batch_size: int = 1000

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
