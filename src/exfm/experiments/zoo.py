"""The model zoo on the synthetic stream: one preset config per model, with its role.

Teachers (foundation models) see every feature, including the synthetic stream's
:data:`~exfm.data.synth.TEACHER_ONLY_FEATURES`; students (vertical models) do not. The two-tower
student splits the remaining features into a user tower and an item tower.

Used by ``exfm models`` (parameter and FLOP table), ``benchmarks/bench_models.py`` (throughput)
and the closing tables of the model-zoo issue (next-day metrics per model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from exfm.data.synth import TEACHER_ONLY_FEATURES
from exfm.models.registry import ModelConfig, parse_model_config
from exfm.schema import Schema

USER_SIDE = ("user_id", "user_segment", "device", "hour", "hist_items", "user_activity")


@dataclass(frozen=True)
class ZooEntry:
    """A model of the zoo: its config and its role in ExFM."""

    config: ModelConfig
    role: Literal["teacher", "student"]


def synthetic_zoo(schema: Schema, embedding_dim: int = 16) -> dict[str, ZooEntry]:
    """Preset configs of every model for the synthetic schema (or any schema with its feature names)."""
    student = [f.name for f in schema.features if f.name not in TEACHER_ONLY_FEATURES]
    user = [name for name in student if name in USER_SIDE]
    item = [name for name in student if name not in USER_SIDE]
    dim = {"embedding_dim": embedding_dim}
    students = {
        "fm": {"name": "fm"},
        "fmfm": {"name": "fmfm", "variant": "matrixed"},
        "deepfm": {"name": "deepfm"},
        "dlrm": {"name": "dlrm"},
    }
    teachers = {
        "dcn": {"name": "dcn"},
        "dcnv2": {"name": "dcnv2", "low_rank": 32},
        "dmin": {"name": "dmin"},
    }
    zoo = {
        name: ZooEntry(parse_model_config({**spec, **dim, "features": student}, name), "student")
        for name, spec in students.items()
    }
    zoo["two_tower"] = ZooEntry(
        parse_model_config({"name": "two_tower", **dim, "user_features": user, "item_features": item}), "student"
    )
    for name, spec in teachers.items():
        zoo[name] = ZooEntry(parse_model_config({**spec, **dim}, name), "teacher")
    zoo["multitask(dcnv2)"] = ZooEntry(
        parse_model_config({"name": "multitask", "bottom": {"name": "dcnv2", "low_rank": 32, **dim}}), "teacher"
    )
    return zoo
