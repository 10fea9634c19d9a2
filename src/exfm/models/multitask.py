"""The multi-task shared-bottom teacher (hard parameter sharing, Caruana 1997).

Any single-model backbone is the shared bottom; each task gets its own tower::

    x       = bottom.backbone(batch)                  [B, d], shared by every task
    logit_t = tower_t(x) = MLP(d, tower_hidden, 1)    one tower per task (the serving heads)

All tasks train at once: the trainer's objective sums the per-task losses of the towers'
logits, so every task's gradient reaches the shared bottom, and the trainer's progressive and
daily metrics are reported per task.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from exfm.models.base import RecModel
from exfm.models.blocks import MLP
from exfm.models.embedding import FeatureTensors


class MultiTaskModel(RecModel):
    """Shared bottom plus one tower per task.

    The bottom is a complete model built for the same tasks; its own heads are dropped and the
    towers take their place as this model's serving heads (named after the tasks), so
    :meth:`~RecModel.add_head` and serving work as for any model.

    Init: the bottom's; towers PyTorch's default. Regularisation: ``dropout`` after every hidden
    ReLU of the towers (the bottom's own dropout is set in its config).

    Args:
        bottom: the shared bottom (its ``backbone`` is used; its heads are removed).
        tower_hidden: hidden widths of each tower (``[]`` = one linear layer per task).
        dropout: dropout probability in the towers.
    """

    def __init__(self, bottom: RecModel, tower_hidden: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__(bottom.serving_heads)
        bottom.heads.clear()
        self.bottom = bottom
        self.representation_dim = bottom.representation_dim
        for task in self.serving_heads:
            self.add_head(task, MLP(self.representation_dim, tower_hidden, 1, dropout=dropout))

    def encode(self, features: FeatureTensors) -> Tensor:
        """``[B, d]``: the shared bottom's representation."""
        return self.bottom.encode(features)
