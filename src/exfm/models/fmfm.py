"""FmFM (Sun et al. 2021, "FM²: Field-matrixed Factorization Machines"): FM with a transform per field pair.

Fields are those of :class:`~exfm.models.fm.FMModel` (categoricals, pooled sequences, numerics
``x_n u_n``): m = F + S + N field vectors ``v_f ∈ R^k``. Every field pair ``f < g`` has its own
transform of the left vector before the element-wise product::

    vectorized:  FmFM(v) = Σ_{f<g} (v_f ⊙ w_fg) ⊙ v_g       w_fg ∈ R^k
    matrixed:    FmFM(v) = Σ_{f<g} (v_f M_fg) ⊙ v_g         M_fg ∈ R^{k×k}

Summed over the k dimensions these are the paper's ``⟨v_f ⊙ w_fg, v_g⟩`` and ``⟨v_f M_fg, v_g⟩``;
the vectorized variant is the matrixed one with diagonal matrices, and both are FM when every
transform is the identity. The representation is FM's: ``x = [Σ_f w_f, FmFM(v)] ∈ R^{k+1}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from exfm.models.fm import FMModel
from exfm.schema import Schema


class FieldPairInteraction(nn.Module):
    """FmFM's interaction vector over all field pairs, vectorised over the pairs.

    The P = m(m−1)/2 pairs ``(f, g), f < g`` are gathered once as two ``[P, B, k]`` tensors, then
    transformed and reduced in one batched op (no loop over pairs)::

        vectorized:  out = Σ_p v_{f_p} ⊙ w_p ⊙ v_{g_p}       w ∈ R^{P×k}
        matrixed:    out = Σ_p (v_{f_p} M_p) ⊙ v_{g_p}       M ∈ R^{P×k×k}   (one bmm)

    Cost per example: 3·P·k (vectorized) or P·k² + 2·P·k (matrixed) multiply-adds.
    Init: every transform the identity (``w_p = 1``, ``M_p = I``), so the block starts as
    :class:`~exfm.models.blocks.FMInteraction`.

    Args:
        num_fields: m.
        dim: k.
        variant: ``vectorized`` or ``matrixed``.

    Shapes: ``fields [B, m, k] → [B, k]``.
    """

    def __init__(self, num_fields: int, dim: int, variant: Literal["vectorized", "matrixed"]) -> None:
        super().__init__()
        if variant not in ("vectorized", "matrixed"):
            raise ValueError(f"variant must be 'vectorized' or 'matrixed', not {variant!r}")
        left, right = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)
        self.variant = variant
        num_pairs = left.numel()
        if variant == "vectorized":
            self.transform = nn.Parameter(torch.ones(num_pairs, 1, dim))
        else:
            self.transform = nn.Parameter(torch.eye(dim).expand(num_pairs, dim, dim).clone())

    @property
    def num_pairs(self) -> int:
        """P = m(m−1)/2."""
        return self.left.numel()

    def forward(self, fields: Tensor) -> Tensor:
        by_field = fields.transpose(0, 1)  # [m, B, k]
        left = by_field.index_select(0, self.left)  # [P, B, k]
        right = by_field.index_select(0, self.right)
        transformed = left * self.transform if self.variant == "vectorized" else torch.bmm(left, self.transform)
        return (transformed * right).sum(0)


class FmFMModel(FMModel):
    """FmFM: :class:`~exfm.models.fm.FMModel` with FM's interaction replaced by :class:`FieldPairInteraction`.

    Representation ``[Σ_f w_f, FmFM(v)] ∈ R^{k+1}``, one linear head per task.
    Init: as FM (``v ~ N(0, 0.01²)``, first-order weights 0, heads unit weights and zero bias) and
    identity transforms, so at init the model *is* a plain FM and the heads a plain FmFM.
    Regularisation: none inside the model (weight decay on ``dense_parameters()`` reaches the
    transforms through the optimizer).

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        embedding_dim: k.
        features: the features the model uses (None = all).
        variant: ``vectorized`` (a k-vector per field pair) or ``matrixed`` (a k×k matrix per pair).
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str],
        embedding_dim: int = 16,
        features: list[str] | None = None,
        variant: Literal["vectorized", "matrixed"] = "matrixed",
    ) -> None:
        super().__init__(schema, tasks, embedding_dim, features)
        num_fields = self.embedding.num_fields + self.embedding.num_dense
        self.interaction = FieldPairInteraction(num_fields, embedding_dim, variant)
