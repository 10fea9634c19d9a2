"""Typed training configuration, read from YAML.

Example (``configs/synthetic_fm.yaml``)::

    data: data/synthetic              # a dataset directory (exfm ingest / exfm synth)
    model: {name: fm, embedding_dim: 16}
    tasks: [click]                    # default: every label of the schema
    train_days: [1, 4]                # first and last day, inclusive, trained once in order
    eval_days: [5]                    # evaluated after training
    batch_size: 4096
    dense_optimizer: {name: adam, lr: 0.001}
    sparse_optimizer: {name: rowwise_adagrad, lr: 0.05}
    checkpoint_every: 500             # batches (0 = only at day ends)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exfm.models.registry import ModelConfig
from exfm.schema import format_validation_error, read_yaml


class ConfigError(ValueError):
    """A configuration file is missing or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DenseOptimizerConfig(_Strict):
    """Optimizer of the dense parameters (MLPs, cross layers, heads)."""

    name: Literal["adam", "adagrad"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class SparseOptimizerConfig(_Strict):
    """Optimizer of the embedding tables; only the rows a batch touches are updated.

    ``rowwise_adagrad`` (default): one Adagrad accumulator per row (fbgemm's exact row-wise
    Adagrad, :class:`exfm.train.optim.RowWiseAdagrad`), the fastest on CPU; ``adagrad``:
    ``torch.optim.Adagrad`` on sparse gradients (one accumulator per element); ``adam``:
    ``torch.optim.SparseAdam`` (lazy Adam: a row's moments advance only when the row is used).
    """

    name: Literal["rowwise_adagrad", "adagrad", "adam"] = "rowwise_adagrad"
    lr: float = Field(0.05, gt=0)


class TrainConfig(_Strict):
    """One one-pass streaming training job."""

    data: Path
    model: ModelConfig
    tasks: list[str] | None = Field(None, min_length=1, description="default: every schema label")
    train_days: tuple[int, int] = Field(description="first and last training day, inclusive")
    eval_days: list[int] = Field(default_factory=list)
    batch_size: int = Field(4096, gt=0)
    dense_optimizer: DenseOptimizerConfig = DenseOptimizerConfig()
    sparse_optimizer: SparseOptimizerConfig = SparseOptimizerConfig()
    checkpoint_every: int = Field(500, ge=0, description="batches between checkpoints; 0 = day ends only")
    log_every: int = Field(50, gt=0, description="batches between progress records in metrics.jsonl")
    progressive_window: int = Field(100_000, gt=0, description="rows in the progressive AUC window")
    device: str = "cpu"
    prefetch: int = Field(4, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _days_in_order(self) -> TrainConfig:
        first, last = self.train_days
        if not 1 <= first <= last:
            raise ValueError(f"train_days must be [first, last] with 1 <= first <= last, got {list(self.train_days)}")
        return self

    @property
    def train_day_list(self) -> list[int]:
        return list(range(self.train_days[0], self.train_days[1] + 1))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_train_config(data: object, origin: str = "<config>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a training config YAML; ``overrides`` replace top-level keys (e.g. from the CLI).

    A relative ``data`` path is resolved against the current directory.
    """
    data = read_yaml(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_train_config(data, str(path))
