"""Typed training configuration, read from YAML.

Example (``configs/synthetic_fm.yaml``)::

    data: data/synthetic              # a dataset directory (exfm ingest / exfm synth)
    model: {name: fm, embedding_dim: 16}
    tasks: [click]                    # default: every label of the schema
    train_days: [1, 4]                # first and last day, inclusive, trained once in order
    eval_days: [5]                    # evaluated after training
    view: {domains: [a], traffic_fraction: 0.5, traffic_salt: vm-a}   # optional: this VM's slice of the data
    batch_size: 4096
    distillation: {method: ah, loss_weight: 1.0, label_scale: 1.0, gradient_scale: 1.0}   # optional
    dense_optimizer: {name: adam, lr: 0.001}
    sparse_optimizer: {name: rowwise_adagrad, lr: 0.05}
    checkpoint_every: 500             # batches (0 = only at day ends)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exfm.data.views import View
from exfm.models.registry import ModelConfig
from exfm.schema import Schema, format_validation_error, read_yaml


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


class StudentAdapterConfig(_Strict):
    """The Student Adapter (SA, Algorithm 1): a small MLP that maps the FM's logit — and optionally a
    few context features — to a corrected probability, trained on fresh labels only.

    ``p_sa = σ(SA([logit(p_fm), context]))``; context features are numeric features of the schema
    (their transformed values) or categorical ones (a small embedding of width ``context_dim``).
    """

    hidden: list[int] = Field(default_factory=lambda: [16], description="MLP widths; [] = affine recalibration")
    context_features: list[str] = Field(default_factory=list)
    context_dim: int = Field(4, gt=0, description="embedding width of a categorical context feature")
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)


class DistillationConfig(_Strict):
    """How the vertical model learns from the logged FM predictions (DESIGN.md §1).

    * ``none``: ``BCE(σ(h_s(x)), y)`` (Eq. 1).
    * ``kd``: ``BCE(σ(h_s(x)), y) + LW·BCE(σ(h_s(x)), p_fm)`` (Eq. 2, single serving head).
    * ``ah``: ``BCE(σ(h_s(x)), y) + LW·BCE(σ(h_d(GS(x))), min(LS·p_fm, 1))`` (Eq. 3–5).
    * ``ah_sa``: the AH loss ``+ LW_sa·BCE(σ(h_a(x)), sg(p_sa))`` with the Student Adapter (Eq. 6–7).

    Rows whose FM prediction is missing (NaN) train the serving head on their label only.
    """

    method: Literal["none", "kd", "ah", "ah_sa"] = "none"
    loss_weight: float = Field(1.0, ge=0, description="LW: weight of the distillation term")
    label_scale: float = Field(1.0, gt=0, description="LS: pseudo-label min(LS·p_fm, 1)")
    gradient_scale: float = Field(1.0, ge=0, description="GS: backbone gradient from the distillation head × GS")
    adapter_loss_weight: float = Field(1.0, ge=0, description="LW_sa: weight of the adapter head's term")
    head_hidden: list[int] | None = Field(
        None, description="MLP widths of the distillation and adapter heads; None = same as the serving head"
    )
    adapter: StudentAdapterConfig = StudentAdapterConfig()


class PublishConfig(_Strict):
    """Publish the served model to a DAS Snapshot Publishing Database at every training day's end."""

    spd: Path = Field(description="the SPD directory (created if missing)")
    fm: str = Field(description="the FM's name: its Zeus pointer key")


class TrainConfig(_Strict):
    """One one-pass streaming training job."""

    data: Path
    model: ModelConfig
    tasks: list[str] | None = Field(None, min_length=1, description="default: every schema label")
    train_days: tuple[int, int] = Field(description="first and last training day, inclusive")
    eval_days: list[int] = Field(default_factory=list)
    view: View | None = Field(None, description="the rows this model trains and is evaluated on; None = all")
    batch_size: int = Field(4096, gt=0)
    distillation: DistillationConfig = DistillationConfig()
    publish: PublishConfig | None = Field(None, description="as an FM: publish a DAS snapshot at each day end")
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

    def tasks_for(self, schema: Schema) -> list[str]:
        """The model's tasks: ``tasks`` or else every label of ``schema``; unknown ones are an error."""
        tasks = self.tasks or schema.tasks
        unknown = sorted(set(tasks) - set(schema.tasks))
        if unknown:
            raise ValueError(f"tasks {unknown} are not labels of the dataset's schema ({schema.tasks})")
        return list(tasks)

    @property
    def train_day_list(self) -> list[int]:
        return list(range(self.train_days[0], self.train_days[1] + 1))

    def to_yaml(self) -> str:
        """The config as YAML; optional sections that are unset (``view``, ``publish``, ...) are left
        out, so a run's ``config.yaml`` does not change when a new optional section is added."""
        data = {key: value for key, value in self.model_dump(mode="json").items() if value is not None}
        return yaml.safe_dump(data, sort_keys=False)


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
