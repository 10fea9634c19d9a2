"""The interface of every exfm model: a backbone to a representation, plus named heads.

::

    x = model.backbone(batch)                     # [B, d], d = model.representation_dim
    logits = {name: head(x).squeeze(-1) for name, head in model.heads.items()}   # [B] each

The heads a model creates for its tasks are its *serving heads* (``model.serving_heads``, one per
task, named after it). The distillation layer adds training-only heads (auxiliary, adapter) with
:meth:`RecModel.add_head` without touching the model's code; serving uses only the serving heads.
Losses never live in a model: ``forward`` returns logits, and the loss reads them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from exfm.data.batch import Batch
from exfm.models.embedding import EmbeddingCollection


class RecModel(nn.Module, ABC):
    """Base class of all models: ``backbone(batch) -> [B, d]`` and heads ``[B, d] -> [B, 1]``.

    Subclasses call ``super().__init__(tasks)``, build their backbone, set
    ``representation_dim`` and add one serving head per task with :meth:`add_head`.

    Attributes:
        serving_heads: the task names, in order; each has a head of the same name.
        heads: every head by name (serving heads first, then any added later).
        representation_dim: d, the width of the backbone's output.
    """

    representation_dim: int

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a model needs at least one task")
        self.serving_heads: tuple[str, ...] = tuple(tasks)
        self.heads = nn.ModuleDict()

    @abstractmethod
    def backbone(self, batch: Batch) -> Tensor:
        """The representation ``x``: ``[B, representation_dim]``."""

    def add_head(self, name: str, module: nn.Module) -> None:
        """Register a head ``[B, d] -> [B, 1]`` under a new name.

        Raises:
            ValueError: a head of that name exists already.
        """
        if name in self.heads:
            raise ValueError(f"model already has a head named {name!r}")
        self.heads[name] = module

    def apply_heads(self, x: Tensor, heads: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits ``[B]`` of the named heads (None = all) on a representation ``x [B, d]``."""
        names = self.heads.keys() if heads is None else heads
        return {name: self.heads[name](x).squeeze(-1) for name in names}

    def forward(self, batch: Batch, heads: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits ``[B]`` per head name (None = every head; ``model.serving_heads`` to serve)."""
        return self.apply_heads(self.backbone(batch), heads)

    def sparse_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters with sparse gradients: the embedding collections' tables."""
        for module in self.modules():
            if isinstance(module, EmbeddingCollection):
                yield from module.parameters()

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter (dense gradients)."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return (p for p in self.parameters() if id(p) not in sparse)
