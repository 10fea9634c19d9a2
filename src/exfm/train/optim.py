"""The optimizer pair of a model: row-wise sparse for embedding tables, Adam/Adagrad for the rest."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from exfm.models.base import RecModel
from exfm.train.config import DenseOptimizerConfig, SparseOptimizerConfig


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for embedding tables (fbgemm's ``EXACT_ROWWISE_ADAGRAD``).

    For every row r that the batch touches, with ``g_r [d]`` the row's summed gradient::

        s_r ← s_r + mean_j g_rj²
        w_r ← w_r − lr · g_r / (√s_r + eps)

    One accumulator per row (1/d of Adagrad's state); only touched rows are read and written, so
    a step costs O(rows in the batch · d), not O(table). Accepts sparse or dense gradients of 2-D
    parameters ``[rows, d]``.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 0.05, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad needs 2-D parameters [rows, d], got {tuple(param.shape)}")
                state = self.state[param]
                if "sum" not in state:
                    state["sum"] = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)
                grad = param.grad
                if grad.is_sparse:
                    indices, values = grad._indices()[0], grad._values()
                    rows, inverse = torch.unique(indices, return_inverse=True)
                    summed = torch.zeros(len(rows), param.shape[1], dtype=values.dtype, device=values.device)
                    summed.index_add_(0, inverse, values)
                else:
                    rows, summed = None, grad
                accumulator = state["sum"] if rows is None else state["sum"].index_select(0, rows)
                accumulator.add_(summed.square().mean(dim=1))
                scale = accumulator.sqrt().add_(group["eps"]).reciprocal_().mul_(-group["lr"]).unsqueeze(1)
                if rows is None:
                    param.add_(summed * scale)
                else:
                    state["sum"].index_copy_(0, rows, accumulator)
                    param.index_add_(0, rows, summed.mul_(scale))
        return None


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
            self.optimizers.append(_SPARSE[sparse.name](sparse_params, lr=sparse.lr))

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


_SPARSE = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "adam": torch.optim.SparseAdam}
