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


# Models whose dense parameters are only their heads (plus FmFM's field-pair transforms) take a
# much higher dense learning rate than MLP models: with the default rate their heads' biases
# cannot reach the base-rate logits (e.g. -5.4 for follow) within one pass.
HEAD_ONLY_DENSE_LR = 0.1
FMFM_DENSE_LR = 0.05
MLP_DENSE_LR = 0.002
BATCH_SIZE = 1024
"""One pass over 4 days of the 1M-row stream is ~500 steps at this batch size (125 at 4096)."""


@dataclass(frozen=True)
class ZooEntry:
    """A model of the zoo: its config, its role in ExFM and its tuned one-pass training settings."""

    config: ModelConfig
    role: Literal["teacher", "student"]
    dense_lr: float = MLP_DENSE_LR

    def train_settings(self) -> dict:
        """The ``TrainConfig`` keys this preset sets (model, batch size, dense optimizer)."""
        return {
            "model": self.config.model_dump(),
            "batch_size": BATCH_SIZE,
            "dense_optimizer": {"name": "adam", "lr": self.dense_lr},
        }


def synthetic_zoo(schema: Schema, embedding_dim: int = 16) -> dict[str, ZooEntry]:
    """Preset configs of every model for a schema (the two-tower only if it has the synthetic user-side names)."""
    student = [f.name for f in schema.features if f.name not in TEACHER_ONLY_FEATURES]
    user = [name for name in student if name in USER_SIDE]
    item = [name for name in student if name not in USER_SIDE]
    dim = {"embedding_dim": embedding_dim}
    students = {
        "fm": ({"name": "fm"}, HEAD_ONLY_DENSE_LR),
        "fmfm": ({"name": "fmfm", "variant": "matrixed"}, FMFM_DENSE_LR),
        "deepfm": ({"name": "deepfm"}, MLP_DENSE_LR),
        "dlrm": ({"name": "dlrm"}, MLP_DENSE_LR),
    }
    teachers = {
        "dcn": {"name": "dcn"},
        "dcnv2": {"name": "dcnv2"},
        "dmin": {"name": "dmin"},
        "multitask(dcnv2)": {"name": "multitask", "bottom": {"name": "dcnv2", **dim}},
    }
    zoo = {
        name: ZooEntry(parse_model_config({**spec, **dim, "features": student}, name), "student", lr)
        for name, (spec, lr) in students.items()
    }
    if user and item:  # a schema without the synthetic stream's user-side names has no two-tower preset
        two_tower = {"name": "two_tower", **dim, "user_features": user, "item_features": item}
        zoo["two_tower"] = ZooEntry(parse_model_config(two_tower), "student", HEAD_ONLY_DENSE_LR / 10)
    for name, spec in teachers.items():
        extra = {} if spec["name"] == "multitask" else dim
        zoo[name] = ZooEntry(parse_model_config({**spec, **extra}, name), "teacher")
    return zoo
