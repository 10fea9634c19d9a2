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
    """FmFM's interaction vector over all field pairs, with no loop over the pairs.

    The P = m(m−1)/2 pair transforms are scattered once per call into one block matrix that is
    zero on and below the diagonal, then applied to all pairs by one batched matrix product::

        vectorized:  W ∈ R^{k×m×m},  W[j, f, g] = w_fg[j] (f < g)
                     out[:, j] = Σ_f v_f[j] · (W[j] v[j])_f  = Σ_{f<g} v_f[j] w_fg[j] v_g[j]
        matrixed:    M ∈ R^{mk×mk},  block (f, g) = M_fg (f < g)
                     out = Σ_g (flatten(v) M)_g ⊙ v_g          = Σ_{f<g} (v_f M_fg) ⊙ v_g

    Cost per example: m²·k (vectorized) or m²·k² (matrixed) multiply-adds, about twice the pair
    count because the zero blocks are multiplied too; on CPU one large matrix product is still
    2–3× faster than P small ones over gathered ``[P, B, k]`` pairs, and needs no ``[P, B, k]``
    buffers. Init: every transform the identity (``w_fg = 1``, ``M_fg = I``), so the block starts
    as :class:`~exfm.models.blocks.FMInteraction`.

    Args:
        num_fields: m.
        dim: k.
        variant: ``vectorized`` (``transform [P, k]``) or ``matrixed`` (``transform [P, k, k]``),
            pairs in row-major order ``(0, 1), (0, 2), …, (m−2, m−1)``.

    Shapes: ``fields [B, m, k] → [B, k]``.
    """

    def __init__(self, num_fields: int, dim: int, variant: Literal["vectorized", "matrixed"]) -> None:
        super().__init__()
        if variant not in ("vectorized", "matrixed"):
            raise ValueError(f"variant must be 'vectorized' or 'matrixed', not {variant!r}")
        left, right = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("left", left.clone(), persistent=False)  # own storage each: export saves them apart
        self.register_buffer("right", right.clone(), persistent=False)
        self.num_fields = num_fields
        self.dim = dim
        self.variant = variant
        num_pairs = left.numel()
        if variant == "vectorized":
            self.transform = nn.Parameter(torch.ones(num_pairs, dim))
        else:
            self.transform = nn.Parameter(torch.eye(dim).expand(num_pairs, dim, dim).clone())

    @property
    def num_pairs(self) -> int:
        """P = m(m−1)/2."""
        return self.left.numel()

    def forward(self, fields: Tensor) -> Tensor:
        m, k = self.num_fields, self.dim
        if self.variant == "vectorized":
            weights = fields.new_zeros(k, m, m)
            weights[:, self.left, self.right] = self.transform.t()
            by_dim = fields.permute(2, 1, 0).contiguous()  # [k, m, B]
            return (torch.bmm(weights, by_dim) * by_dim).sum(1).t()
        blocks = fields.new_zeros(m, m, k, k)
        blocks[self.left, self.right] = self.transform
        flat = fields.reshape(-1, m * k)
        transformed = flat @ blocks.transpose(1, 2).reshape(m * k, m * k)  # [B, (g, j)]: Σ_{f<g} (v_f M_fg)_j
        return (transformed * flat).view(-1, m, k).sum(1)


class FmFMModel(FMModel):
    """FmFM: :class:`~exfm.models.fm.FMModel` with FM's interaction replaced by :class:`FieldPairInteraction`.

    Representation ``[Σ_f w_f, FmFM(v)] ∈ R^{k+1}``, one linear head per task.
    Init: as FM (``v ~ N(0, 0.01²)``, first-order weights 0, heads unit weights and zero bias) and
    identity transforms: at init the model computes a plain FM; while the heads keep unit weights
    it is the paper's FmFM.
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
