"""DMIN (Xiao et al. 2020, "Deep Multi-Interest Network for Click-through Rate Prediction").

One behaviour sequence ``E = [e_1, …, e_L]`` (items of the table it shares with the candidate,
e.g. ``hist_items`` and ``item_id``), its mask ``m`` and the candidate's embedding ``e_t``::

    Z   = E + MHSA(E)                                   behaviour refiner (H heads, residual)
    I_h = head_h(Z) ∈ R^{L×d_I},  h = 1..H_I            multi-interest extractor: one self-attention
                                                        head per interest
    u_h = Σ_j a_hj I_hj,  a_h = masked_softmax_j(g([I_hj, q_h, I_hj ⊙ q_h, p_j]))
          q_h = W_h e_t + c_h,  p_j = P[r_j],  r_j = Σ_{i>j} m_i        target attention, with a
                                                        learned embedding of the recency r_j
    x   = MLP([u_1, …, u_{H_I}, v_1, …, v_F, pooled other sequences, dense])

and each task's serving head is ``MLP(d, head_hidden, 1)``. Every attention is masked by the rules
of :mod:`exfm.models.attention`: padding never reaches an output, the padding length does not
matter, an empty sequence gives ``u_h = 0``. The recency ``r_j`` counts the real items after slot
j (0 = the most recent), so it too is blind to padding. The paper's auxiliary loss on the refined
sequence (extra training-only supervision of ``Z``) is not implemented: losses live with the
training objective, never in a model (DESIGN §5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exfm.models.attention import MultiHeadSelfAttention, SelfAttentionHeads, TargetAttention
from exfm.models.base import RecModel
from exfm.models.blocks import MLP
from exfm.models.embedding import EmbeddingCollection, FeatureTensors
from exfm.schema import Schema, SchemaError


def recency(mask: Tensor) -> Tensor:
    """``r_j = Σ_{i>j} m_i``: the real items after slot j (0 = the most recent item).

    Shapes: ``mask [B, L]`` bool → ``[B, L]`` int64 in ``[0, L)``.
    """
    after = mask.long().flip(1).cumsum(1).flip(1)
    return after - mask.long()


class MultiInterestArch(nn.Module):
    """DMIN's behaviour refiner and multi-interest extractor: a sequence and a target to interests.

    Init: attention projections Xavier-uniform, recency embeddings ``N(0, 0.01²)``, linear layers
    PyTorch's default. Regularisation: ``dropout`` on attention weights and in the scorer MLP.

    Args:
        dim: k, the item width.
        max_len: L_max, the longest sequence (the rows of the recency table).
        num_heads: H, the refiner's heads.
        head_dim: d_h, the width of each refiner head.
        num_interests: H_I, the interests (extractor heads).
        interest_dim: d_I, the width of each interest.
        position_dim: width of the recency embedding (0 = none).
        attention_hidden: hidden widths of the target-attention scorer ``g``.
        causal: causal self-attention (query i sees keys j ≤ i) in refiner and extractor.
        dropout: dropout probability.

    Shapes: ``sequence [B, L, k]``, ``mask [B, L]`` bool, ``target [B, k]`` → ``[B, H_I·d_I]``.
    """

    def __init__(
        self,
        dim: int,
        max_len: int,
        num_heads: int,
        head_dim: int,
        num_interests: int,
        interest_dim: int,
        position_dim: int,
        attention_hidden: Sequence[int],
        *,
        causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_interests = num_interests
        self.interest_dim = interest_dim
        self.output_dim = num_interests * interest_dim
        self.refiner = MultiHeadSelfAttention(dim, num_heads, head_dim, causal=causal, dropout=dropout)
        self.extractor = SelfAttentionHeads(dim, num_interests, interest_dim, causal=causal, dropout=dropout)
        self.target_projection = nn.Linear(dim, self.output_dim)
        self.position = nn.Embedding(max_len, position_dim) if position_dim else None
        if self.position is not None:
            nn.init.normal_(self.position.weight, 0.0, 0.01)
        self.target_attention = TargetAttention(interest_dim, attention_hidden, position_dim, dropout)

    def refine(self, sequence: Tensor, mask: Tensor) -> Tensor:
        """The refined sequence ``Z = E + MHSA(E)``, zero at padding: ``[B, L, k]``."""
        return (sequence + self.refiner(sequence, mask)) * mask.unsqueeze(-1)

    def forward(self, sequence: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        interests = self.extractor(self.refine(sequence, mask), mask)  # [B, H_I, L, d_I]
        query = self.target_projection(target).view(-1, self.num_interests, self.interest_dim)
        positions = None if self.position is None else self.position(recency(mask)).unsqueeze(1)
        return self.target_attention(interests, query, mask.unsqueeze(1), positions).flatten(1)


class DMINModel(RecModel):
    """DMIN: multi-interest target attention over one behaviour sequence, an MLP, a head per task.

    The attended sequence's candidate is the categorical feature whose table it shares (e.g.
    ``item_id`` for ``hist_items``); that feature must be among the model's features. Every other
    selected sequence enters the MLP as its mean (like the other models), every categorical as its
    embedding, every numeric as itself.

    Init: embeddings ``N(0, 0.01²)``; see :class:`MultiInterestArch`; MLPs PyTorch's default.
    Regularisation: ``dropout`` on attention weights and after every hidden ReLU (scorer, deep
    network, heads).

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        embedding_dim: k.
        features: the features the model uses (None = all).
        sequence: the attended sequence feature (None = the first selected sequence).
        num_heads: H, the refiner's heads.
        head_dim: d_h, the width of each refiner head (None = k / H).
        num_interests: H_I, the interests.
        interest_dim: d_I, the width of each interest (None = k).
        position_dim: width of the recency embedding (0 = none).
        attention_hidden: hidden widths of the target-attention scorer.
        causal: causal self-attention in refiner and extractor (the paper's is not causal).
        dropout: dropout probability.
        deep_hidden: hidden widths of the deep network (``[]``: the representation is its input).
        head_hidden: hidden widths of each head (``[]`` = one linear layer).

    Raises:
        SchemaError: no selected sequence, an unknown ``sequence``, or its candidate not selected.
        ValueError: ``head_dim`` is None and k is not a multiple of H.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str],
        embedding_dim: int = 16,
        features: list[str] | None = None,
        sequence: str | None = None,
        num_heads: int = 2,
        head_dim: int | None = None,
        num_interests: int = 4,
        interest_dim: int | None = None,
        position_dim: int = 8,
        attention_hidden: Sequence[int] = (80, 40),
        causal: bool = False,
        dropout: float = 0.0,
        deep_hidden: Sequence[int] = (256, 128),
        head_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(tasks)
        self.embedding = EmbeddingCollection(schema, features, embedding_dim)
        selected = self.embedding.sequence_features
        if sequence is None and not selected:
            raise SchemaError(f"DMIN needs a sequence feature; none is selected from schema {schema.name!r}")
        self.sequence = sequence or selected[0]
        if self.sequence not in selected:
            raise SchemaError(f"DMIN sequence {self.sequence!r} is not a selected sequence feature ({selected})")
        spec = schema.feature(self.sequence)
        if spec.embedding not in self.embedding.single_features:
            raise SchemaError(
                f"DMIN attends {self.sequence!r} with its candidate {spec.embedding!r}, which is not among the "
                f"model's features"
            )
        if head_dim is None:
            if embedding_dim % num_heads:
                raise ValueError(f"embedding_dim {embedding_dim} is not a multiple of num_heads {num_heads}")
            head_dim = embedding_dim // num_heads
        self._target = self.embedding.single_features.index(spec.embedding)
        self.interests = MultiInterestArch(
            embedding_dim,
            spec.max_len,
            num_heads,
            head_dim,
            num_interests,
            interest_dim or embedding_dim,
            position_dim,
            attention_hidden,
            causal=causal,
            dropout=dropout,
        )
        other_fields = self.embedding.num_fields - 1
        input_dim = self.interests.output_dim + other_fields * embedding_dim + self.embedding.num_dense
        self.deep = MLP(input_dim, deep_hidden, dropout=dropout)
        self.representation_dim = self.deep.output_dim
        for task in self.serving_heads:
            self.add_head(task, MLP(self.representation_dim, head_hidden, 1, dropout=dropout))

    def encode(self, features: FeatureTensors) -> Tensor:
        """``[B, d]``: ``MLP([interests, categorical embeddings, pooled other sequences, dense])``."""
        emb = self.embedding(features)
        seq = emb.sequences[self.sequence]
        interests = self.interests(seq.values, seq.mask, emb.single[:, self._target])
        others = [s.pooled() for name, s in emb.sequences.items() if name != self.sequence]
        return self.deep(torch.cat([interests, emb.single.flatten(1), *others, emb.dense], dim=1))
