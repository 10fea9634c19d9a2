"""GS, gradient scaling: the identity forward, a scaled gradient backward (ExFM Eq. 5).

The auxiliary (distillation) head reads ``GS(x)`` instead of ``x``::

    forward:   GS(x) = x
    backward:  ∂L/∂x  ←  GS · ∂L/∂GS(x)

so the distillation loss trains its head at full strength while the gradient it sends into the
shared backbone is multiplied by ``GS`` (``GS < 1`` shields the backbone from the FM's bias,
``GS = 0`` detaches it, ``GS = 1`` is plain back-propagation).
"""

from __future__ import annotations

import torch
from torch import Tensor


class GradientScale(torch.autograd.Function):
    """``y = x`` forward; ``∂L/∂x = scale · ∂L/∂y`` backward (``scale`` receives no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gradient_scale(x: Tensor, scale: float) -> Tensor:
    """``GS(x)``: ``x`` unchanged, with the gradient that flows back through it multiplied by ``scale``.

    Args:
        x: any tensor (typically the representation ``[B, d]``).
        scale: GS ≥ 0.

    Returns:
        A tensor equal to ``x`` (a view) whose backward multiplies the incoming gradient by ``scale``.
    """
    return GradientScale.apply(x, float(scale))
