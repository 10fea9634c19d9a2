"""The optimizer pair of a model: row-wise sparse for embedding tables, Adam/Adagrad for the rest."""

from __future__ import annotations

import torch

from exfm.models.base import RecModel
from exfm.train.config import DenseOptimizerConfig, SparseOptimizerConfig


class Optimizers:
    """A dense and a sparse optimizer stepped together (either may be absent)."""

    def __init__(self, model: RecModel, dense: DenseOptimizerConfig, sparse: SparseOptimizerConfig):
        # Sparse gradients of embedding lookups are well formed by construction; opting out of
        # torch's invariant checks explicitly keeps them off and silences its warning.
        torch.sparse.check_sparse_tensor_invariants.disable()
        dense_params = [p for p in model.dense_parameters() if p.requires_grad]
        sparse_params = [p for p in model.sparse_parameters() if p.requires_grad]
        self.optimizers: list[torch.optim.Optimizer] = []
        if dense_params:
            cls = torch.optim.Adam if dense.name == "adam" else torch.optim.Adagrad
            self.optimizers.append(cls(dense_params, lr=dense.lr, weight_decay=dense.weight_decay))
        if sparse_params:
            if sparse.name == "adam":
                self.optimizers.append(torch.optim.SparseAdam(sparse_params, lr=sparse.lr))
            else:
                self.optimizers.append(torch.optim.Adagrad(sparse_params, lr=sparse.lr))

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> list[dict]:
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
