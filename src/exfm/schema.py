"""Declarative feature schema: what each raw column means and how it becomes a model input.

A schema is a YAML file validated into :class:`Schema` (pydantic). Errors name the offending
field, e.g. ``features.3.buckets: Input should be greater than 1``. The format is documented
with a complete example in ``docs/schema.md``.

Column kinds:

* ``categorical``: an id hashed with :func:`exfm.data.hashing.stable_hash` into ``buckets``
  buckets (bucket 0 is reserved for a missing value); no vocabulary is ever fitted.
* ``numeric``: a float with a documented ``transform`` (see :class:`NumericTransform`); any
  standardisation uses causal statistics only (data strictly before the batch).
* ``sequence``: a list of ids in one column joined by ``separator``, oldest first; the reader keeps
  the ``max_len`` most recent items; its ids share the embedding table of ``embedding``
  (a categorical feature's name) so e.g. a clicked-item history and the candidate item agree.
* ``labels``: one binary column per task.
* ``time``: the event time column (``unit``: s, ms, us, or ``iso`` for ISO-8601 strings).
* ``domain``: an optional column naming the traffic / domain of each row.
* ``passthrough``: extra float columns carried to the dataset unchanged (e.g. the synthetic
  stream's true probabilities), never fed to a model.
* ``split``: how time is cut into N "days".
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class SchemaError(ValueError):
    """A schema file is missing, unparsable or invalid; the message names the field."""


def _check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'Asia/Shanghai')") from exc
    return value


TimeZoneName = Annotated[str, AfterValidator(_check_zone)]
"""An IANA time zone name such as ``Asia/Shanghai``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CategoricalFeature(_Strict):
    """An id column hashed into ``buckets`` buckets (bucket 0 = missing / padding)."""

    type: Literal["categorical"] = "categorical"
    name: str
    column: str | None = Field(None, description="raw column name; defaults to `name`")
    buckets: int = Field(gt=1)

    @property
    def source(self) -> str:
        return self.column or self.name


class NumericTransform(StrEnum):
    """How a raw float x becomes a model input (applied by the reader, in this order).

    * ``none``: x.
    * ``log1p``: sign(x)·log(1+|x|) — for heavy-tailed counts and prices.
    * ``standardize``: (x − μ)/σ with μ, σ from all rows *before* the batch (causal).
    * ``log1p_standardize``: log1p, then causal standardisation.
    """

    NONE = "none"
    LOG1P = "log1p"
    STANDARDIZE = "standardize"
    LOG1P_STANDARDIZE = "log1p_standardize"

    @property
    def log1p(self) -> bool:
        """Whether the transform starts with sign(x)·log(1+|x|)."""
        return self in (NumericTransform.LOG1P, NumericTransform.LOG1P_STANDARDIZE)

    @property
    def standardizes(self) -> bool:
        """Whether the transform ends with the causal (x − μ)/σ."""
        return self in (NumericTransform.STANDARDIZE, NumericTransform.LOG1P_STANDARDIZE)


class NumericFeature(_Strict):
    """A float column; missing values become ``fill`` before the transform."""

    type: Literal["numeric"] = "numeric"
    name: str
    column: str | None = None
    transform: NumericTransform = NumericTransform.NONE
    fill: float = 0.0
    clip: float | None = Field(None, gt=0, description="clip the transformed value to [-clip, clip]")

    @property
    def source(self) -> str:
        return self.column or self.name


class SequenceFeature(_Strict):
    """A behaviour sequence: ids joined by ``separator``, oldest first, most recent last."""

    type: Literal["sequence"] = "sequence"
    name: str
    column: str | None = None
    separator: str = Field("|", min_length=1)
    max_len: int = Field(gt=0)
    embedding: str = Field(description="name of the categorical feature whose table this shares")

    @property
    def source(self) -> str:
        return self.column or self.name


Feature = Annotated[CategoricalFeature | NumericFeature | SequenceFeature, Field(discriminator="type")]


class Label(_Strict):
    """One binary task; values must be 0/1 (also accepted: true/false)."""

    name: str
    column: str | None = None

    @property
    def source(self) -> str:
        return self.column or self.name


class TimeColumn(_Strict):
    """The event time. ``iso`` parses ISO-8601 strings; naive ones are read in ``timezone``."""

    column: str
    unit: Literal["s", "ms", "us", "iso"] = "s"
    timezone: TimeZoneName = "UTC"


class DomainColumn(_Strict):
    """The column naming each row's domain (traffic slice); values are kept as strings."""

    column: str


class DaySplit(_Strict):
    """How time becomes N numbered days 1..N.

    * ``calendar``: day d covers local calendar date ``start + d - 1`` in ``timezone``;
      ``start`` defaults to the local date of the earliest event.
    * ``equal_spans``: [t_min, t_max] cut into N spans of equal length (t_max in the last span).

    Rows outside days 1..N are counted and dropped (``out_of_range: drop``) or are an error.
    """

    mode: Literal["calendar", "equal_spans"] = "calendar"
    days: int = Field(8, gt=0)
    timezone: TimeZoneName = "UTC"
    start: date | None = None
    out_of_range: Literal["drop", "error"] = "drop"


class Schema(_Strict):
    """A whole dataset schema. Feature names are unique; sequences point at categoricals."""

    name: str
    features: list[Feature] = Field(min_length=1)
    labels: list[Label] = Field(min_length=1)
    time: TimeColumn
    domain: DomainColumn | None = None
    passthrough: list[str] = Field(default_factory=list)
    split: DaySplit = DaySplit()

    @model_validator(mode="after")
    def _consistent(self) -> Schema:
        names = [f.name for f in self.features] + [label.name for label in self.labels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"names must be unique across features and labels; repeated: {duplicates}")
        categorical = {f.name for f in self.categorical}
        for seq in self.sequences:
            if seq.embedding not in categorical:
                raise ValueError(
                    f"sequence feature {seq.name!r}: embedding {seq.embedding!r} is not a categorical feature"
                    f" (categoricals: {sorted(categorical)})"
                )
        return self

    # --- typed views -------------------------------------------------------------------------
    @property
    def categorical(self) -> list[CategoricalFeature]:
        return [f for f in self.features if isinstance(f, CategoricalFeature)]

    @property
    def numeric(self) -> list[NumericFeature]:
        return [f for f in self.features if isinstance(f, NumericFeature)]

    @property
    def sequences(self) -> list[SequenceFeature]:
        return [f for f in self.features if isinstance(f, SequenceFeature)]

    @property
    def tasks(self) -> list[str]:
        return [label.name for label in self.labels]

    def feature(self, name: str) -> CategoricalFeature | NumericFeature | SequenceFeature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"schema {self.name!r} has no feature {name!r}")

    def subset(self, feature_names: list[str] | None) -> Schema:
        """The same schema restricted to ``feature_names`` (None = all), keeping shared tables."""
        if feature_names is None:
            return self
        unknown = sorted(set(feature_names) - {f.name for f in self.features})
        if unknown:
            raise SchemaError(f"unknown feature(s) {unknown} for schema {self.name!r}")
        kept = [f for f in self.features if f.name in feature_names]
        kept_names = {f.name for f in kept}
        for seq in [f for f in kept if isinstance(f, SequenceFeature)]:
            if seq.embedding not in kept_names:
                kept.append(self.feature(seq.embedding))
                kept_names.add(seq.embedding)
        order = {f.name: i for i, f in enumerate(self.features)}
        return self.model_copy(update={"features": sorted(kept, key=lambda f: order[f.name])})

    def fingerprint(self) -> str:
        """A short stable hash of the schema's content (used in manifests and exports)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)


def format_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem: ``origin: field.path: message``."""
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{origin}: {path}: {item['msg']}")
    return "\n".join(lines)


def parse_schema(data: object, origin: str = "<schema>") -> Schema:
    """Validate a parsed YAML/JSON object into a :class:`Schema`, raising :class:`SchemaError`."""
    try:
        return Schema.model_validate(data)
    except ValidationError as exc:
        raise SchemaError(format_validation_error(exc, origin)) from None


def read_yaml(path: str | Path, error: type[ValueError]) -> object:
    """Parse a YAML file, raising ``error`` with the path for a missing or unparsable file."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_schema(path: str | Path) -> Schema:
    """Read and validate a schema YAML file."""
    return parse_schema(read_yaml(path, SchemaError), str(path))
