"""The four training methods of external distillation (DESIGN.md §1), as objectives of the trainer.

With ``x = backbone(batch)`` computed once per batch, ``h_s`` the serving head, ``h_d`` the
distillation head and ``h_a`` the adapter head of a task (:mod:`exfm.distill.heads`), ``y`` the
label and ``p_fm`` the FM's logged probability (column ``fm:<task>``), per task ``t``::

    none   L = BCE(σ(h_s(x)), y)                                                     (Eq. 1)
    kd     L = BCE(σ(h_s(x)), y) + LW·BCE(σ(h_s(x)), p_fm)                            (Eq. 2)
    ah     L = BCE(σ(h_s(x)), y) + LW·BCE(σ(h_d(GS(x))), min(LS·p_fm, 1))             (Eq. 3–5)
    ah_sa  L = L_ah + LW_sa·BCE(σ(h_a(x)), sg(p_sa)),  p_sa = σ(SA(logit(p_fm), c))   (Eq. 6–7)

and the model's loss is ``Σ_t L_t``. Every BCE is computed from logits
(``binary_cross_entropy_with_logits``). GS is :func:`~exfm.distill.gradient_scaling.gradient_scale`
on the input of ``h_d`` only; the serving and adapter heads read ``x`` itself.

**Normalisation and missing supervision.** The label term is a mean over all B rows, as in
Eq. 1. A distillation term of task t is a mean over the rows that *have* an FM prediction for t
(``p_fm`` not NaN), ``(1/n_t) Σ_{b: p_fm,bt known} BCE_bt``, and 0 when ``n_t = 0``: a row without a
prediction trains the serving head on its label only. A task with no prediction in the batch does
not even apply its distillation or adapter head (those heads get no gradient), so a batch without
any FM prediction gives exactly the ``none`` loss and gradient. The objective counts, per task,
the rows with a prediction (``rows``) and without (``missing``), cumulatively over the run; the
trainer logs them in its ``progress`` / ``day_end`` records as
``"supervision": {"click": {"rows": n, "missing": m}}``.

**Algorithm 1** (``ah_sa``), per training batch, in this order:

1. :meth:`DistillationObjective.before_step`: one optimizer step of the Student Adapter on
   ``Σ_t mean_{b: p_fm known} BCE(σ(SA_t(p_fm)), y)``, the batch's fresh labels (its own optimizer);
2. in :meth:`DistillationObjective.forward`: ``p_sa = σ(SA(p_fm))`` from the *updated* SA under
   ``torch.no_grad`` (a constant of the VM's loss);
3. the trainer back-propagates the VM's loss and steps the VM's optimizers.

The SA never sees the VM's representation and the VM's loss holds ``p_sa`` as a constant, so no VM
gradient reaches the SA and the SA's loss never reaches the VM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from exfm.data.batch import Batch
from exfm.distill.adapter import StudentAdapter
from exfm.distill.gradient_scaling import gradient_scale
from exfm.distill.heads import ADAPTER_HEAD_PREFIX, DISTILL_HEAD_PREFIX, add_heads
from exfm.models.base import RecModel
from exfm.schema import Schema
from exfm.train.config import DistillationConfig
from exfm.train.objective import Objective, ObjectiveOutput, SupervisedObjective


def ah_pseudo_label(p_fm: Tensor, label_scale: float) -> Tensor:
    """LS, label scaling: the AH target ``min(LS·p_fm, 1)``."""
    return (p_fm * label_scale).clamp_(max=1.0)


@dataclass
class Supervision:
    """The FM supervision of one batch, restricted to the tasks that have any.

    Attributes:
        columns: indices (into the objective's tasks) of the tasks with ``n_t > 0``, in order.
        complete: every task has some supervision (``columns`` are all of them).
        p_fm: ``[B, T']`` FM probabilities of those tasks, missing ones filled with 0.5.
        weight: ``[B, T']`` ``1 / n_t`` where the prediction is known, else 0: a weighted sum is
            the mean over the supervised rows of each task.
        labels: ``[B, T']`` those tasks' labels.
    """

    columns: list[int]
    complete: bool
    p_fm: Tensor
    weight: Tensor
    labels: Tensor

    def select(self, per_task: Tensor) -> Tensor:
        """The ``columns`` of a ``[B, T]`` tensor (itself when complete: no copy)."""
        return per_task if self.complete else per_task[:, self.columns]


class DistillationTerm(ABC):
    """One weighted distillation term ``weight · Σ_t mean_{b: known} BCE(σ(logit_bt), target_bt)``.

    Args:
        weight: LW or LW_sa.
    """

    def __init__(self, weight: float) -> None:
        self.weight = weight

    @abstractmethod
    def logits_and_targets(
        self, model: RecModel, x: Tensor, serving: Tensor, supervision: Supervision, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        """``(logits, targets)``, each ``[B, T']`` over ``supervision.columns``."""

    def loss(self, model: RecModel, x: Tensor, serving: Tensor, supervision: Supervision, batch: Batch) -> Tensor:
        """The weighted term: a scalar attached to the heads' graph.

        Args:
            model: the student (its heads).
            x: ``[B, d]`` the representation of the batch.
            serving: ``[B, T]`` the serving heads' logits on ``x``.
            supervision: the batch's FM supervision.
            batch: the batch.
        """
        logits, targets = self.logits_and_targets(model, x, serving, supervision, batch)
        bce = F.binary_cross_entropy_with_logits(logits, targets, weight=supervision.weight, reduction="sum")
        return self.weight * bce


class KDTerm(DistillationTerm):
    """KD (Eq. 2): ``LW·BCE(σ(h_s(x)), p_fm)`` on the serving head itself."""

    def logits_and_targets(self, model, x, serving, supervision, batch):
        return supervision.select(serving), supervision.p_fm


class AuxiliaryHeadTerm(DistillationTerm):
    """AH (Eq. 3–5): ``LW·BCE(σ(h_d(GS(x))), min(LS·p_fm, 1))`` through one distillation head per task.

    Adds the heads ``distill:<task>`` to ``model``.

    Args:
        model: the student.
        tasks: its tasks.
        config: LW, LS, GS and the head architecture.
    """

    def __init__(self, model: RecModel, tasks: Sequence[str], config: DistillationConfig) -> None:
        super().__init__(config.loss_weight)
        self.label_scale = config.label_scale
        self.gradient_scale = config.gradient_scale
        self.heads = add_heads(model, tasks, DISTILL_HEAD_PREFIX, config.head_hidden)

    def logits_and_targets(self, model, x, serving, supervision, batch):
        names = [self.heads[c] for c in supervision.columns]
        logits = model.apply_heads(gradient_scale(x, self.gradient_scale), names)
        targets = ah_pseudo_label(supervision.p_fm, self.label_scale)
        return torch.stack([logits[n] for n in names], dim=1), targets


class AdapterTerm(DistillationTerm):
    """SA (Eq. 6–7): ``LW_sa·BCE(σ(h_a(x)), sg(p_sa))`` through one adapter head per task.

    Adds the heads ``adapter:<task>`` to ``model``; ``p_sa`` comes from ``adapter`` after its step.

    Args:
        model: the student.
        tasks: its tasks.
        config: LW_sa and the head architecture.
        adapter: the trained Student Adapter.
    """

    def __init__(
        self, model: RecModel, tasks: Sequence[str], config: DistillationConfig, adapter: StudentAdapter
    ) -> None:
        super().__init__(config.adapter_loss_weight)
        self.adapter = adapter
        self.heads = add_heads(model, tasks, ADAPTER_HEAD_PREFIX, config.head_hidden)

    def logits_and_targets(self, model, x, serving, supervision, batch):
        names = [self.heads[c] for c in supervision.columns]
        logits = model.apply_heads(x, names)
        targets = self.adapter.predict(supervision.p_fm, batch, supervision.columns)
        return torch.stack([logits[n] for n in names], dim=1), targets


class DistillationObjective(SupervisedObjective):
    """KD, AH or AH+SA: the label loss of Eq. 1 plus the method's distillation terms (module docstring).

    Building it adds the method's training heads to ``model``: build it before the optimizers.

    Args:
        config: the method and its settings (``method`` must not be ``none``).
        model: the student; receives the heads ``distill:<task>`` / ``adapter:<task>``.
        schema: the dataset schema (label and ``fm:<task>`` columns, SA context features).
        tasks: the model's tasks; task t distils from ``fm:<t>``.
    """

    reads_fm_predictions = True

    def __init__(self, config: DistillationConfig, model: RecModel, schema: Schema, tasks: Sequence[str]) -> None:
        if config.method == "none":
            raise ValueError("DistillationObjective needs a distillation method; `none` is SupervisedObjective")
        super().__init__(tasks, [schema.tasks.index(t) for t in tasks])
        self.terms: list[DistillationTerm] = []
        self.adapter: StudentAdapter | None = None
        if config.method == "kd":
            self.terms.append(KDTerm(config.loss_weight))
        else:
            self.terms.append(AuxiliaryHeadTerm(model, self.tasks, config))
        if config.method == "ah_sa":
            device = next(model.parameters()).device
            self.adapter = StudentAdapter(config.adapter, schema, self.tasks, device)
            self.terms.append(AdapterTerm(model, self.tasks, config, self.adapter))
        self.rows = [0] * len(self.tasks)
        self.missing = [0] * len(self.tasks)

    def supervision(self, batch: Batch) -> tuple[Supervision | None, list[int]]:
        """The batch's FM supervision (None if no task has any) and ``n_t`` per task (one host sync).

        Raises:
            ValueError: the batch was read without its FM predictions.
        """
        if batch.fm_predictions is None:
            raise ValueError("distillation needs the logged FM predictions: read with with_fm_predictions=True")
        index = self.label_index.to(batch.fm_predictions.device)
        p_fm = batch.fm_predictions.index_select(1, index)
        known = ~torch.isnan(p_fm)
        counts = known.sum(0).tolist()
        columns = [t for t, n in enumerate(counts) if n]
        if not columns:
            return None, counts
        complete = len(columns) == len(self.tasks)
        if not complete:
            p_fm, known = p_fm[:, columns], known[:, columns]
        n = p_fm.new_tensor([counts[c] for c in columns])
        labels = self.labels(batch)
        supervision = Supervision(
            columns=columns,
            complete=complete,
            p_fm=torch.where(known, p_fm, 0.5),
            weight=known.to(p_fm.dtype) / n,
            labels=labels if complete else labels[:, columns],
        )
        return supervision, counts

    def before_step(self, batch: Batch) -> None:
        """Algorithm 1, step 1: the Student Adapter's own step on the batch's fresh labels (``ah_sa``)."""
        if self.adapter is None:
            return
        supervision, _ = self.supervision(batch)
        if supervision is not None:
            self.adapter.step(supervision.p_fm, supervision.labels, supervision.weight, batch, supervision.columns)

    def forward(self, model: RecModel, batch: Batch) -> ObjectiveOutput:
        x = model.backbone(batch)
        serving = self.serving_logits(model, x)
        loss = self.true_label_loss(serving, batch)
        supervision, counts = self.supervision(batch)
        for t, n in enumerate(counts):
            self.rows[t] += n
            self.missing[t] += batch.size - n
        if supervision is not None:
            for term in self.terms:
                loss = loss + term.loss(model, x, serving, supervision, batch)
        return ObjectiveOutput(loss, serving)

    def log_record(self) -> dict[str, Any]:
        """``{"supervision": {task: {"rows": with a prediction, "missing": without}}}``, since the run began."""
        return {
            "supervision": {
                task: {"rows": self.rows[t], "missing": self.missing[t]} for t, task in enumerate(self.tasks)
            }
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rows": list(self.rows), "missing": list(self.missing)}
        if self.adapter is not None:
            state["adapter"] = self.adapter.training_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.missing = list(state["rows"]), list(state["missing"])
        if self.adapter is not None:
            self.adapter.load_training_state(state["adapter"])


def build_objective(config: DistillationConfig, model: RecModel, schema: Schema, tasks: Sequence[str]) -> Objective:
    """The objective of ``config.method``; adds its training heads to ``model`` (call before the optimizers).

    ``none`` gives :class:`~exfm.train.objective.SupervisedObjective` (Eq. 1, unchanged), every
    other method a :class:`DistillationObjective`.
    """
    if config.method == "none":
        return SupervisedObjective(tasks, [schema.tasks.index(t) for t in tasks])
    return DistillationObjective(config, model, schema, tasks)
