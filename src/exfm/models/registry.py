"""Typed model configs, the model factory and model statistics (parameters, compute).

A model config is a pydantic model discriminated by ``name``; a YAML block such as::

    model:
      name: dcnv2
      embedding_dim: 16
      low_rank: 64

validates into :data:`ModelConfig` (:func:`parse_model_config`) and
``build_model(config, schema, tasks)`` builds the :class:`~exfm.models.base.RecModel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from exfm.data.batch import Batch, KeyedJagged
from exfm.models.base import RecModel
from exfm.models.dcnv2 import DCNv2Model
from exfm.models.fm import FMModel
from exfm.schema import Schema, format_validation_error


class _ModelConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_dim: int = Field(16, gt=0, description="embedding width k")
    features: list[str] | None = Field(None, description="features the model uses; None = all")


class FMConfig(_ModelConfigBase):
    """:class:`~exfm.models.fm.FMModel`."""

    name: Literal["fm"] = "fm"

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return FMModel(schema, tasks, self.embedding_dim, self.features)


class DCNv2Config(_ModelConfigBase):
    """:class:`~exfm.models.dcnv2.DCNv2Model`."""

    name: Literal["dcnv2"] = "dcnv2"
    num_cross_layers: int = Field(3, ge=0)
    low_rank: int | None = Field(None, gt=0, description="None = full-rank cross layers")
    num_experts: int = Field(4, gt=0)
    structure: Literal["stacked", "parallel"] = "parallel"
    deep_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 128])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    head_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return DCNv2Model(
            schema,
            tasks,
            self.embedding_dim,
            self.features,
            num_cross_layers=self.num_cross_layers,
            low_rank=self.low_rank,
            num_experts=self.num_experts,
            structure=self.structure,
            deep_hidden=self.deep_hidden,
            dropout=self.dropout,
            head_hidden=self.head_hidden,
        )


ModelConfig = Annotated[FMConfig | DCNv2Config, Field(discriminator="name")]
MODEL_CONFIGS: dict[str, type[_ModelConfigBase]] = {"fm": FMConfig, "dcnv2": DCNv2Config}
_MODEL_CONFIG_ADAPTER: TypeAdapter[ModelConfig] = TypeAdapter(ModelConfig)


def parse_model_config(data: object, origin: str = "<model>") -> ModelConfig:
    """Validate a parsed YAML/JSON mapping into a model config.

    Raises:
        ValueError: one line per problem, ``origin: field.path: message``.
    """
    try:
        return _MODEL_CONFIG_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, origin)) from None


def build_model(config: ModelConfig, schema: Schema, tasks: Sequence[str]) -> RecModel:
    """Build the model of ``config`` for a dataset ``schema`` with one serving head per task.

    Raises:
        ValueError: a task that is not one of the schema's labels.
        SchemaError: a feature that is not in the schema.
    """
    unknown = [t for t in tasks if t not in schema.tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for schema {schema.name!r} (tasks: {schema.tasks})")
    return config.build(schema, tasks)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model: embedding tables (sparse) and everything else (dense)."""

    sparse: int
    dense: int

    @property
    def total(self) -> int:
        return self.sparse + self.dense


def count_parameters(model: RecModel) -> ParameterCount:
    """Count the sparse (embedding) and dense parameters of a model, all heads included."""
    return ParameterCount(
        sparse=sum(p.numel() for p in model.sparse_parameters()),
        dense=sum(p.numel() for p in model.dense_parameters()),
    )


@dataclass(frozen=True)
class ComputeCost:
    """Approximate forward cost of one example.

    Attributes:
        dense_macs: multiply-adds of matrix products plus one per output element of pointwise
            float ops and per input element of reductions (an approximation of the dense part).
        lookup_rows: embedding rows gathered (all tables; sequences at full length).
        lookup_values: floats gathered from embedding tables.
    """

    dense_macs: int
    lookup_rows: int
    lookup_values: int


_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}
_SOFTMAX = {torch.ops.aten._softmax.default, torch.ops.aten._log_softmax.default}


class _CostCounter(TorchDispatchMode):
    def __init__(self, tables: set[int]) -> None:
        super().__init__()
        self.tables = tables
        self.macs = 0
        self.rows = 0
        self.values = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.index_select.default and args[0].data_ptr() in self.tables:
            self.rows += args[2].numel()
            self.values += out.numel()
        elif func in _MATMULS:
            a, b = args[-2], args[-1]
            self.macs += a.numel() * b.shape[-1]
        elif isinstance(out, torch.Tensor) and out.is_floating_point():
            if torch.Tag.pointwise in func.tags:
                self.macs += out.numel()
            elif torch.Tag.reduction in func.tags or func in _SOFTMAX:
                self.macs += args[0].numel()
        return out


def _example_batch(schema: Schema, batch_size: int) -> Batch:
    """A batch of id-1 features, full-length sequences and zero dense values."""
    keys = [f.name for f in schema.categorical] + [s.name for s in schema.sequences]
    lengths = [1] * len(schema.categorical) + [s.max_len for s in schema.sequences]
    lengths_tensor = torch.tensor(lengths, dtype=torch.int32).repeat_interleave(batch_size)
    return Batch(
        sparse=KeyedJagged(
            keys=keys,
            values=torch.ones(int(lengths_tensor.sum()), dtype=torch.long),
            lengths=lengths_tensor,
            stride=batch_size,
            num_single=len(schema.categorical),
        ),
        dense=torch.zeros(batch_size, len(schema.numeric)),
        labels=torch.zeros(batch_size, len(schema.tasks)),
        time_us=torch.zeros(batch_size, dtype=torch.long),
        domain=torch.full((batch_size,), -1, dtype=torch.long),
        day=1,
    )


def flops_per_example(model: RecModel, schema: Schema) -> ComputeCost:
    """Measure a model's forward cost per example (all heads) on a synthetic batch of ``schema``.

    Every aten op of one forward pass is counted (``TorchDispatchMode``), so a new model needs no
    cost formula of its own: ``[m, n] @ [n, p]`` counts ``m·n·p``; gathers from the model's
    embedding tables count as lookups, not MACs; integer index arithmetic is not counted.
    """
    batch_size = 8
    batch = _example_batch(schema, batch_size).to(next(model.parameters()).device)
    tables = {p.data_ptr() for p in model.sparse_parameters()}
    counter = _CostCounter(tables)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(batch)
    finally:
        model.train(was_training)
    return ComputeCost(
        dense_macs=counter.macs // batch_size,
        lookup_rows=counter.rows // batch_size,
        lookup_values=counter.values // batch_size,
    )
