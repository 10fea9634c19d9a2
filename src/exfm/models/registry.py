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
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from torch.utils._python_dispatch import TorchDispatchMode

from exfm.data.batch import Batch, KeyedJagged
from exfm.models.base import RecModel
from exfm.models.dcn import DCNModel
from exfm.models.dcnv2 import DCNv2Model
from exfm.models.deepfm import DeepFMModel
from exfm.models.dlrm import DLRMModel
from exfm.models.dmin import DMINModel
from exfm.models.fm import FMModel
from exfm.models.fmfm import FmFMModel
from exfm.models.multitask import MultiTaskModel
from exfm.models.two_tower import TwoTowerModel
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


class DCNConfig(_ModelConfigBase):
    """:class:`~exfm.models.dcn.DCNModel`."""

    name: Literal["dcn"] = "dcn"
    num_cross_layers: int = Field(3, ge=0)
    deep_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 128])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    head_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return DCNModel(
            schema,
            tasks,
            self.embedding_dim,
            self.features,
            num_cross_layers=self.num_cross_layers,
            deep_hidden=self.deep_hidden,
            dropout=self.dropout,
            head_hidden=self.head_hidden,
        )


class DMINConfig(_ModelConfigBase):
    """:class:`~exfm.models.dmin.DMINModel`."""

    name: Literal["dmin"] = "dmin"
    sequence: str | None = Field(None, description="the attended sequence feature; None = the first selected")
    num_heads: int = Field(2, gt=0, description="heads of the behaviour refiner")
    head_dim: int | None = Field(None, gt=0, description="width of each refiner head; None = embedding_dim / num_heads")
    num_interests: int = Field(4, gt=0, description="interests (heads of the multi-interest extractor)")
    interest_dim: int | None = Field(None, gt=0, description="width of each interest; None = embedding_dim")
    position_dim: int = Field(8, ge=0, description="width of the learned recency embedding; 0 = none")
    attention_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [80, 40], min_length=1)
    causal: bool = Field(False, description="causal self-attention (the paper's is not)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    deep_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 128])
    head_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _heads_divide_embedding(self) -> DMINConfig:
        if self.head_dim is None and self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim {self.embedding_dim} is not a multiple of num_heads {self.num_heads}; set head_dim"
            )
        return self

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return DMINModel(
            schema,
            tasks,
            self.embedding_dim,
            self.features,
            sequence=self.sequence,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_interests=self.num_interests,
            interest_dim=self.interest_dim,
            position_dim=self.position_dim,
            attention_hidden=self.attention_hidden,
            causal=self.causal,
            dropout=self.dropout,
            deep_hidden=self.deep_hidden,
            head_hidden=self.head_hidden,
        )


class FmFMConfig(_ModelConfigBase):
    """:class:`~exfm.models.fmfm.FmFMModel`."""

    name: Literal["fmfm"] = "fmfm"
    variant: Literal["vectorized", "matrixed"] = Field("matrixed", description="k-vector or k×k matrix per pair")

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return FmFMModel(schema, tasks, self.embedding_dim, self.features, self.variant)


class DeepFMConfig(_ModelConfigBase):
    """:class:`~exfm.models.deepfm.DeepFMModel`."""

    name: Literal["deepfm"] = "deepfm"
    deep_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 128], min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return DeepFMModel(
            schema, tasks, self.embedding_dim, self.features, deep_hidden=self.deep_hidden, dropout=self.dropout
        )


class DLRMConfig(_ModelConfigBase):
    """:class:`~exfm.models.dlrm.DLRMModel`."""

    name: Literal["dlrm"] = "dlrm"
    bottom_hidden: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [64], description="bottom MLP widths before its embedding_dim output"
    )
    top_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256, 128])

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return DLRMModel(
            schema,
            tasks,
            self.embedding_dim,
            self.features,
            bottom_hidden=self.bottom_hidden,
            top_hidden=self.top_hidden,
        )


class TwoTowerConfig(_ModelConfigBase):
    """:class:`~exfm.models.two_tower.TwoTowerModel`; ``features`` is unused (each tower names its own)."""

    name: Literal["two_tower"] = "two_tower"
    user_features: list[str] = Field(min_length=1)
    item_features: list[str] = Field(min_length=1)
    tower_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [128, 64])
    output_dim: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0.0, description="logit = <u, i> / temperature")
    bias: bool = Field(True, description="a learned bias per task head")
    learn_head_weights: bool = Field(False, description="per-task weights <u, w_task * i> instead of 1/temperature")

    @model_validator(mode="after")
    def _towers_name_the_features(self) -> TwoTowerConfig:
        if self.features is not None:
            raise ValueError("features is unused by two_tower: set user_features and item_features")
        shared = sorted(set(self.user_features) & set(self.item_features))
        if shared:
            raise ValueError(f"feature(s) {shared} are in both towers")
        return self

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return TwoTowerModel(
            schema,
            tasks,
            self.user_features,
            self.item_features,
            self.embedding_dim,
            tower_hidden=self.tower_hidden,
            output_dim=self.output_dim,
            temperature=self.temperature,
            bias=self.bias,
            learn_head_weights=self.learn_head_weights,
        )


_SingleModelConfig = (
    FMConfig | FmFMConfig | DeepFMConfig | DLRMConfig | TwoTowerConfig | DCNv2Config | DCNConfig | DMINConfig
)
BackboneConfig = Annotated[_SingleModelConfig, Field(discriminator="name")]
"""Every config of a single model: what a multi-task model's shared bottom may be."""


class MultiTaskConfig(BaseModel):
    """:class:`~exfm.models.multitask.MultiTaskModel`: a shared ``bottom`` and one tower per task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["multitask"] = "multitask"
    bottom: BackboneConfig = Field(description="the shared bottom (its features, embeddings and backbone)")
    tower_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64])
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in the towers")

    @model_validator(mode="after")
    def _towers_are_the_heads(self) -> MultiTaskConfig:
        if getattr(self.bottom, "head_hidden", None):
            raise ValueError("bottom.head_hidden is unused: the towers are the task heads (set tower_hidden)")
        return self

    def build(self, schema: Schema, tasks: Sequence[str]) -> RecModel:
        return MultiTaskModel(self.bottom.build(schema, tasks), self.tower_hidden, self.dropout)


ModelConfig = Annotated[_SingleModelConfig | MultiTaskConfig, Field(discriminator="name")]
MODEL_CONFIGS: dict[str, type[BaseModel]] = {
    "fm": FMConfig,
    "fmfm": FmFMConfig,
    "deepfm": DeepFMConfig,
    "dlrm": DLRMConfig,
    "two_tower": TwoTowerConfig,
    "dcnv2": DCNv2Config,
    "dcn": DCNConfig,
    "dmin": DMINConfig,
    "multitask": MultiTaskConfig,
}
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
