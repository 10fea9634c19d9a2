"""Training objectives: the loss a trainer minimises, computed from a model's heads.

The loss lives with the training method, never inside a model. An :class:`Objective` runs the
model's backbone once per batch, applies the heads it needs and returns the loss together with the
serving heads' logits (which the trainer scores for progressive evaluation before the step).
:class:`SupervisedObjective` is Eq. 1 (distillation method ``none``); the distillation methods
(KD, AH, AH+SA, :mod:`exfm.distill.objectives`) extend it, and
:func:`exfm.distill.objectives.build_objective` builds the one a config names.

One training step of the trainer, for any objective::

    objective.before_step(batch)          # work outside the VM's graph (the Student Adapter's step)
    out = objective.forward(model, batch) # loss and serving logits [B, T]
    out.loss.backward(); optimizers.step()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from exfm.data.batch import Batch
from exfm.models.base import RecModel


@dataclass
class ObjectiveOutput:
    """What one forward of an objective gives the trainer.

    Attributes:
        loss: the scalar to back-propagate.
        logits: ``[B, T]`` serving-head logits in task order (still attached to the graph).
    """

    loss: torch.Tensor
    logits: torch.Tensor


class Objective(ABC):
    """A training method: the loss of a batch, plus any state of its own.

    Args:
        tasks: the model's serving heads (task names).
        label_index: the column of each task in ``batch.labels`` (schema order).

    Attributes:
        reads_fm_predictions: the trainer must read the logged ``fm:<task>`` columns.
    """

    reads_fm_predictions: bool = False

    def __init__(self, tasks: Sequence[str], label_index: Sequence[int]):
        self.tasks = list(tasks)
        self.label_index = torch.tensor(list(label_index), dtype=torch.long)

    def labels(self, batch: Batch) -> torch.Tensor:
        """The model's labels ``[B, T]`` out of the batch's ``[B, T_schema]``."""
        return batch.labels.index_select(1, self.label_index.to(batch.labels.device))

    def before_step(self, batch: Batch) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Work on ``batch`` before the model's step, outside the model's graph (default: none)."""

    @abstractmethod
    def forward(self, model: RecModel, batch: Batch) -> ObjectiveOutput:
        """The loss of ``batch`` and the serving logits, from one backbone pass."""

    def log_record(self) -> dict[str, Any]:
        """Extra fields for the trainer's ``progress`` / ``day_end`` records (default: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The objective's own training state, for checkpoints (``weights_only``-safe)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore :meth:`state_dict`."""


class SupervisedObjective(Objective):
    """Eq. 1: ``Σ_t mean_b BCE(σ(h_t(x_b)), y_bt)`` over the model's tasks, from logits."""

    def true_label_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``Σ_t mean_b BCE-with-logits(logits_bt, y_bt)`` for serving logits ``[B, T]``."""
        per_task = F.binary_cross_entropy_with_logits(logits, self.labels(batch), reduction="none").mean(0)
        return per_task.sum()

    def __call__(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Eq. 1 from a model's output ``{task: [B]}`` (e.g. ``model(batch)``)."""
        return self.true_label_loss(torch.stack([logits[t] for t in self.tasks], dim=1), batch)

    def forward(self, model: RecModel, batch: Batch) -> ObjectiveOutput:
        logits = self.serving_logits(model, model.backbone(batch))
        return ObjectiveOutput(self.true_label_loss(logits, batch), logits)

    def serving_logits(self, model: RecModel, x: torch.Tensor) -> torch.Tensor:
        """``[B, T]``: the serving heads on the representation ``x``, in task order."""
        logits = model.apply_heads(x, self.tasks)
        return torch.stack([logits[t] for t in self.tasks], dim=1)
