"""External distillation: GS, the training heads, the Student Adapter and the KD / AH / AH+SA objectives.

See ``docs/distillation.md`` and :mod:`exfm.distill.objectives` for the methods' equations.
"""

from exfm.distill.adapter import StudentAdapter, fm_logit
from exfm.distill.gradient_scaling import GradientScale, gradient_scale
from exfm.distill.heads import ADAPTER_HEAD_PREFIX, DISTILL_HEAD_PREFIX, adapter_head_name, distill_head_name
from exfm.distill.objectives import (
    AdapterTerm,
    AuxiliaryHeadTerm,
    DistillationObjective,
    DistillationTerm,
    KDTerm,
    Supervision,
    ah_pseudo_label,
    build_objective,
)

__all__ = [
    "ADAPTER_HEAD_PREFIX",
    "DISTILL_HEAD_PREFIX",
    "AdapterTerm",
    "AuxiliaryHeadTerm",
    "DistillationObjective",
    "DistillationTerm",
    "GradientScale",
    "KDTerm",
    "StudentAdapter",
    "Supervision",
    "adapter_head_name",
    "ah_pseudo_label",
    "build_objective",
    "distill_head_name",
    "fm_logit",
    "gradient_scale",
]
