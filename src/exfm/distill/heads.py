"""Training-only heads of external distillation: the distillation head ``h_d`` and the adapter head ``h_a``.

Every vertical model (VM) is ``backbone -> x [B, d]`` plus heads (:class:`~exfm.models.base.RecModel`).
Distillation adds, per task ``t``, heads on the same ``x`` with :meth:`RecModel.add_head`::

    distill:<t>   h_d, the auxiliary head of AH (Eq. 3–5): reads GS(x), learns min(LS·p_fm, 1)
    adapter:<t>   h_a, the adapter head of AH+SA (Eq. 6–7): reads x, learns sg(p_sa)

They are added before the optimizers are built, so the dense optimizer trains them with the rest of
the model, and they are saved in the model's ``state_dict`` (checkpoints). Serving uses the serving
heads alone (``model.serving_heads``); these heads never change a served prediction.

Architecture (``DistillationConfig.head_hidden``):

* ``None`` (default): a copy of the task's serving head *as initialised* (``copy.deepcopy`` of the
  freshly built model's head, including which of its parameters are trainable). The copy keeps
  the model's own head init, which is meaningful for some students: FM's head starts at unit
  weights (the head of a plain FM), DeepFM's at "FM logit + deep logit", the two-tower head at a
  fixed ``1/τ`` (a dot product). ``h_d`` and ``h_s`` start as the same function and diverge as
  they learn different targets; no random numbers are drawn.
* a list of widths: ``MLP(d, head_hidden, 1)`` (:class:`~exfm.models.blocks.MLP`, PyTorch's
  default init), the same for every student.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from exfm.models.base import RecModel
from exfm.models.blocks import MLP

DISTILL_HEAD_PREFIX = "distill:"
ADAPTER_HEAD_PREFIX = "adapter:"


def distill_head_name(task: str) -> str:
    """``distill:<task>``, the name of the task's distillation head ``h_d``."""
    return f"{DISTILL_HEAD_PREFIX}{task}"


def adapter_head_name(task: str) -> str:
    """``adapter:<task>``, the name of the task's adapter head ``h_a``."""
    return f"{ADAPTER_HEAD_PREFIX}{task}"


def make_head(model: RecModel, task: str, hidden: Sequence[int] | None) -> nn.Module:
    """A new head ``[B, d] -> [B, 1]`` for ``task``, on the device of the task's serving head.

    Args:
        model: the student; call this before it trains (``None`` copies its current serving head).
        task: one of ``model.serving_heads``.
        hidden: ``None`` = a deep copy of the serving head; else ``MLP(d, hidden, 1)``.
    """
    serving = model.heads[task]
    if hidden is None:
        return copy.deepcopy(serving)
    device = next(serving.parameters()).device
    return MLP(model.representation_dim, hidden, 1).to(device)


def add_heads(model: RecModel, tasks: Sequence[str], prefix: str, hidden: Sequence[int] | None) -> list[str]:
    """Add one head ``<prefix><task>`` per task (:func:`make_head`); returns their names, in task order."""
    names = []
    for task in tasks:
        name = f"{prefix}{task}"
        model.add_head(name, make_head(model, task, hidden))
        names.append(name)
    return names
