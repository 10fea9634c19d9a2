"""Masked attention over right-padded behaviour sequences: self-attention and target attention.

A sequence is a tensor ``[B, L, D]`` with a mask ``[B, L]`` (True = a real item), as
:class:`~exfm.models.embedding.SequenceEmbedding` gives it. Every block here follows the same
masking rules:

1. **Keys**: a padded key gets weight exactly 0 (:func:`masked_softmax`), so neither what a padded
   slot holds nor how many padded slots there are changes any output.
2. **Queries**: the output at a padded query position is exactly 0, so nothing downstream
   (pooling, another attention layer, a residual) sees a value computed for padding.
3. **Empty rows**: a query with no allowed key (every query of an empty sequence, every padded
   query) gets all-zero weights and so outputs 0: never the NaN of a softmax over only −∞.
4. **Heads**: one mask ``[B, 1, L, L]`` broadcast over the H heads; a per-example mask is never
   reshaped into ``B·H`` rows, so no head sees another example's mask.
5. **Causality** (optional): query i attends to keys j ≤ i only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exfm.models.blocks import MLP


def masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the last dimension restricted to the allowed entries.

    ``w_j = allowed_j · exp(s_j) / Σ_i allowed_i · exp(s_i)``, and ``w = 0`` for a row with no
    allowed entry. Disallowed scores are replaced by the dtype's lowest finite value before the
    softmax (not −∞, which gives NaN on empty rows) and the weights are multiplied by the mask
    after it, so a disallowed entry has weight exactly 0 and gets no gradient.

    Shapes: ``scores [..., L]``, ``allowed`` bool broadcastable to it → ``[..., L]``.
    """
    filled = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return filled.softmax(dim=-1) * allowed


class SelfAttentionHeads(nn.Module):
    """H heads of scaled dot-product self-attention over a padded sequence, kept apart.

    With ``Q_h = X W_h^Q``, ``K_h = X W_h^K``, ``V_h = X W_h^V`` (``W ∈ R^{D×d_h}``)::

        head_h = masked_softmax(Q_h K_hᵀ / √d_h, allowed) V_h
        allowed[b, i, j] = m_bi ∧ m_bj  (∧ j ≤ i if causal)

    so ``head_h[b, i] = 0`` at a padded position i. Init: one fused Xavier-uniform projection
    ``[3·H·d_h, D]`` without bias (as ``nn.MultiheadAttention``). Regularisation: ``dropout`` on
    the attention weights (after masking, so padded keys stay at weight 0).

    Args:
        in_dim: D, the item width.
        num_heads: H.
        head_dim: d_h, the width of each head.
        causal: restrict query i to keys j ≤ i.
        dropout: dropout probability on the attention weights.

    Shapes: ``x [B, L, D]``, ``mask [B, L]`` bool → ``[B, H, L, d_h]``.
    """

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, *, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.causal = causal
        self.qkv = nn.Linear(in_dim, 3 * num_heads * head_dim, bias=False)
        nn.init.xavier_uniform_(self.qkv.weight)
        self.dropout = nn.Dropout(dropout)

    def allowed(self, mask: Tensor) -> Tensor:
        """``[B, 1, L, L]`` bool: which key j each query i may attend to (shared by all heads)."""
        allowed = mask[:, None, :, None] & mask[:, None, None, :]
        if self.causal:
            length = mask.shape[1]
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        return allowed

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        weights = self.dropout(masked_softmax(scores, self.allowed(mask)))
        return torch.matmul(weights, v)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over a padded sequence (Vaswani et al. 2017), padding-safe.

    ``MHSA(X) = [head_1, …, head_H] W^O`` with the heads of :class:`SelfAttentionHeads` and a
    bias-free ``W^O ∈ R^{H·d_h×D_out}``: the output is exactly 0 at padded positions.
    Init: Xavier-uniform projections, no biases. Regularisation: dropout on attention weights.

    Args:
        in_dim: D, the item width.
        num_heads: H.
        head_dim: d_h, the width of each head.
        out_dim: D_out (None = D).
        causal: restrict query i to keys j ≤ i.
        dropout: dropout probability on the attention weights.

    Shapes: ``x [B, L, D]``, ``mask [B, L]`` bool → ``[B, L, D_out]``.
    """

    def __init__(
        self,
        in_dim: int,
        num_heads: int,
        head_dim: int,
        out_dim: int | None = None,
        *,
        causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads = SelfAttentionHeads(in_dim, num_heads, head_dim, causal=causal, dropout=dropout)
        self.output = nn.Linear(num_heads * head_dim, out_dim or in_dim, bias=False)
        nn.init.xavier_uniform_(self.output.weight)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.heads(x, mask).transpose(1, 2).flatten(2))


class TargetAttention(nn.Module):
    """Pools a padded sequence by its relevance to a target (DIN's activation unit, softmax-normalised).

    For keys ``k_j ∈ R^D``, the target ``q ∈ R^D`` and optional per-position features ``e_j ∈ R^E``::

        s_j = MLP([k_j, q, k_j ⊙ q, e_j])            (hidden ReLU layers, then → 1)
        a   = masked_softmax(s, m)                    (a = 0 for an empty sequence)
        out = Σ_j a_j k_j

    The first layer is applied by input block, ``W_k [k_j, k_j ⊙ q] + (W_q q + b) + W_e e_j``: the
    same function as one linear layer on the concatenation, but ``q`` is projected once per row
    and ``e`` once per position instead of once per (row, position). DIN's ``k_j − q`` input is
    left out: it is a linear function of ``k_j`` and ``q`` and adds nothing to the first layer.

    Init: PyTorch's default for each linear block. Regularisation: dropout after each hidden ReLU.

    Args:
        dim: D, the width of keys and target.
        hidden: widths of the scorer's hidden layers (at least one).
        extra_dim: E, the width of the per-position features (0 = none).
        dropout: dropout probability in the scorer.

    Shapes: ``keys [..., L, D]``, ``query [..., D]``, ``mask`` bool broadcastable to ``[..., L]``,
    ``extra`` broadcastable to ``[..., L, E]`` → ``[..., D]``.
    """

    def __init__(self, dim: int, hidden: Sequence[int], extra_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("TargetAttention needs at least one hidden layer")
        self.key_projection = nn.Linear(2 * dim, hidden[0], bias=False)
        self.query_projection = nn.Linear(dim, hidden[0])
        self.extra_projection = nn.Linear(extra_dim, hidden[0], bias=False) if extra_dim else None
        self.activation = nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.scorer = MLP(hidden[0], hidden[1:], 1, dropout=dropout)

    def forward(self, keys: Tensor, query: Tensor, mask: Tensor, extra: Tensor | None = None) -> Tensor:
        query = query.unsqueeze(-2)
        # in place on the fresh [..., L, hidden[0]] activations (the largest tensors of the block)
        h = self.key_projection(torch.cat([keys, keys * query], dim=-1))
        h += self.query_projection(query)
        if self.extra_projection is not None:
            if extra is None:
                raise ValueError("this TargetAttention was built with extra_dim > 0 and needs `extra`")
            h += self.extra_projection(extra)
        scores = self.scorer(self.activation(h)).squeeze(-1)
        weights = masked_softmax(scores, mask)
        return torch.matmul(weights.unsqueeze(-2), keys).squeeze(-2)
