"""The interface of every exfm model: a backbone to a representation, plus named heads.

::

    x = model.backbone(batch)                     # [B, d], d = model.representation_dim
    logits = {name: head(x).squeeze(-1) for name, head in model.heads.items()}   # [B] each

A backbone reads plain tensors: ``backbone(batch)`` converts the batch to
:class:`~exfm.models.embedding.FeatureTensors` (:meth:`RecModel.feature_tensors`) and calls
:meth:`RecModel.encode`, the one method a model implements. The exported serving model
(:mod:`exfm.serving`) calls ``encode`` on the same tensors, so training and serving share one path.

The heads a model creates for its tasks are its *serving heads* (``model.serving_heads``, one per
task, named after it). The distillation layer adds training-only heads (auxiliary, adapter) with
:meth:`RecModel.add_head` without touching the model's code; serving uses only the serving heads.
Losses never live in a model: ``forward`` returns logits, and the loss reads them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import replace

from torch import Tensor, nn

from exfm.data.batch import Batch
from exfm.models.embedding import EmbeddingCollection, FeatureLayout, FeatureTensors


class RecModel(nn.Module, ABC):
    """Base class of all models: ``backbone(batch) -> [B, d]`` and heads ``[B, d] -> [B, 1]``.

    Subclasses call ``super().__init__(tasks)``, build their embedding collection(s) and backbone,
    set ``representation_dim``, add one serving head per task with :meth:`add_head` and implement
    :meth:`encode`.

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
    def encode(self, features: FeatureTensors) -> Tensor:
        """The representation ``x`` of plain-tensor inputs: ``[B, representation_dim]``.

        ``features`` are laid out as the embedding collections' ``source`` (:meth:`feature_tensors`).
        """

    def backbone(self, inputs: Batch | FeatureTensors) -> Tensor:
        """The representation ``x``: ``[B, representation_dim]``, of a batch or of its feature tensors."""
        return self.encode(self.feature_tensors(inputs) if isinstance(inputs, Batch) else inputs)

    def embedding_collections(self) -> list[EmbeddingCollection]:
        """The backbone's embedding collections (one for most models, one per tower for two-tower).

        Heads read the representation, never the inputs, so a collection inside a head is not one.
        """
        return [
            module
            for name, child in self.named_children()
            if name != "heads"
            for module in child.modules()
            if isinstance(module, EmbeddingCollection)
        ]

    @property
    def input_layout(self) -> FeatureLayout:
        """The features the model reads (every collection's selection), in schema order.

        These are the plain-tensor inputs of the exported serving model.
        """
        collections = self.embedding_collections()
        names = {name for collection in collections for name in collection.layout.names}
        return collections[0].source.subset(names)

    def feature_tensors(self, batch: Batch) -> FeatureTensors:
        """The batch as the collections read it: its ids and dense columns (no copy), the used sequences padded."""
        collections = self.embedding_collections()
        source = collections[0].source
        used = {name for collection in collections for name in collection.sequence_features}
        sequences = tuple(s for s in source.sequences if s[0] in used)
        return replace(source, sequences=sequences).read(batch, source)

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
