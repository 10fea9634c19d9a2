"""Training objectives: the loss a trainer minimises, read from a model's logits.

The loss lives with the training method, never inside a model. The distillation methods
(KD, AH, AH+SA) are further objectives with the same call signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from exfm.data.batch import Batch


class SupervisedObjective:
    """Eq. 1: ``Σ_t mean_b BCE(σ(h_t(x_b)), y_bt)`` over the model's tasks, from logits.

    Args:
        tasks: the model's serving heads (task names).
        label_index: the column of each task in ``batch.labels``.
    """

    def __init__(self, tasks: Sequence[str], label_index: Sequence[int]):
        self.tasks = list(tasks)
        self.label_index = torch.tensor(list(label_index), dtype=torch.long)

    def labels(self, batch: Batch) -> torch.Tensor:
        """The model's labels ``[B, T]`` out of the batch's ``[B, T_schema]``."""
        return batch.labels.index_select(1, self.label_index.to(batch.labels.device))

    def __call__(self, logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        stacked = torch.stack([logits[t] for t in self.tasks], dim=1)
        per_task = F.binary_cross_entropy_with_logits(stacked, self.labels(batch), reduction="none").mean(0)
        return per_task.sum()
