"""Shared building blocks of the model zoo: MLP, DCN and DCNv2 cross layers, FM pairwise interaction.

Every block maps float tensors to float tensors and owns no embedding (those live in
:class:`exfm.models.embedding.EmbeddingCollection`), so any model composes them freely.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """``[Linear → ReLU (→ Dropout)] × len(hidden)``, then an optional output ``Linear``.

    ``MLP(d, [], 1)`` is a single ``Linear(d, 1)``; ``MLP(d, [])`` is the identity. No batch norm.
    Init: PyTorch's default for ``nn.Linear`` (Kaiming-uniform weights and bias).

    Args:
        in_dim: input width.
        hidden: widths of the hidden layers (each followed by ReLU and, if > 0, dropout).
        out_dim: width of a final linear layer without activation; None = end at the last hidden.
        dropout: dropout probability after each hidden activation.

    Shapes: ``[..., in_dim] → [..., output_dim]``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        super().__init__(*layers)
        self.output_dim = width


class CrossLayerV2(nn.Module):
    """Full-rank DCNv2 cross layer (Wang et al. 2021, Eq. 1).

    ``x_{l+1} = x_0 ⊙ (W x_l + b) + x_l`` with ``W ∈ R^{D×D}``, ``b ∈ R^D``.
    Init: Xavier-uniform ``W``, zero ``b``. Shapes: ``x0, x: [B, D] → [B, D]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x


class LowRankMixtureCrossLayer(nn.Module):
    """DCNv2's low-rank mixture-of-experts cross layer (Wang et al. 2021, Eq. 3–4).

    With E experts of rank r, ``g = tanh`` and a softmax gate ``G(x_l) = softmax(W_g x_l)``::

        E_i(x_l) = x_0 ⊙ (U_i g(C_i g(V_iᵀ x_l)) + b)      U_i, V_i ∈ R^{D×r}, C_i ∈ R^{r×r}
        x_{l+1}  = Σ_i G_i(x_l) E_i(x_l) + x_l

    (the bias ``b ∈ R^D`` is shared by the experts, as in the reference implementations).
    Init: Xavier-uniform per expert matrix and gate, zero bias. Shapes: ``x0, x: [B, D] → [B, D]``.
    """

    def __init__(self, dim: int, rank: int, num_experts: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(num_experts, dim, rank))
        self.v = nn.Parameter(torch.empty(num_experts, dim, rank))
        self.c = nn.Parameter(torch.empty(num_experts, rank, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)
        for weight in (self.u, self.v, self.c):
            for expert in weight:
                nn.init.xavier_uniform_(expert)
        nn.init.xavier_uniform_(self.gate.weight)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("bd,edr->ber", x, self.v))
        h = torch.tanh(torch.einsum("ber,esr->bes", h, self.c))
        experts = x0.unsqueeze(1) * (torch.einsum("bes,eds->bed", h, self.u) + self.bias)
        gate = torch.softmax(self.gate(x), dim=-1)
        return torch.einsum("be,bed->bd", gate, experts) + x


class CrossNetV2(nn.Module):
    """A stack of DCNv2 cross layers: ``x_{l+1} = cross_l(x_0, x_l)``, returns ``x_L``.

    Args:
        dim: D, the width of ``x_0``.
        num_layers: L (0 = the identity).
        low_rank: None for full-rank layers (:class:`CrossLayerV2`), else the rank r of
            :class:`LowRankMixtureCrossLayer`.
        num_experts: experts per low-rank layer.

    Shapes: ``[B, D] → [B, D]``.
    """

    def __init__(self, dim: int, num_layers: int, low_rank: int | None = None, num_experts: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CrossLayerV2(dim) if low_rank is None else LowRankMixtureCrossLayer(dim, low_rank, num_experts)
            for _ in range(num_layers)
        )

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class CrossLayerV1(nn.Module):
    """DCN cross layer (Wang et al. 2017, Eq. 3): a rank-one feature cross in O(D).

    ``x_{l+1} = x_0 (x_lᵀ w) + b + x_l`` with ``w, b ∈ R^D``.
    Init: Xavier-uniform ``w``, zero ``b``. Shapes: ``x0, x: [B, D] → [B, D]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Linear(dim, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.xavier_uniform_(self.weight.weight)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.weight(x) + self.bias + x


class CrossNetV1(nn.Module):
    """A stack of DCN cross layers (:class:`CrossLayerV1`): ``x_{l+1} = cross_l(x_0, x_l)``, returns ``x_L``.

    Args:
        dim: D, the width of ``x_0``.
        num_layers: L (0 = the identity).

    Shapes: ``[B, D] → [B, D]``.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossLayerV1(dim) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class _FMPairwise(torch.autograd.Function):
    """``0.5 ((Σ_f v_f)² − Σ_f v_f²)`` with the closed-form backward ``∂/∂v_f = g ⊙ (Σ v − v_f)``.

    The closed form costs two passes over ``[B, F, k]`` where autograd's chain costs about six.
    """

    @staticmethod
    def forward(ctx, fields: Tensor) -> Tensor:
        total = fields.sum(1)
        ctx.save_for_backward(fields, total)
        return 0.5 * (total * total - (fields * fields).sum(1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        fields, total = ctx.saved_tensors
        return (total.unsqueeze(1) - fields).mul_(grad.unsqueeze(1))


class FMInteraction(nn.Module):
    """FM pairwise interaction vector (Rendle 2010): all field pairs in O(F·k).

    ``FM(v)_j = Σ_{f<g} v_{f,j} v_{g,j} = 0.5 ((Σ_f v_{f,j})² − Σ_f v_{f,j}²)``; summing it over j
    gives the classic FM second-order term ``Σ_{f<g} ⟨v_f, v_g⟩``.

    Shapes: ``fields [B, F, k] → [B, k]``.
    """

    def forward(self, fields: Tensor) -> Tensor:
        return _FMPairwise.apply(fields)
