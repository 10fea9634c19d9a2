"""Evaluation metrics for binary CTR-style tasks: AUC, LogLoss, NE, NE gain and calibration.

Definitions (``y`` a 0/1 label, ``z`` a logit, ``p = σ(z)``, ``n`` entries, ``p̄ = Σ y / n``):

- **AUC**: the probability that a random positive scores above a random negative, ties counting
  one half (the Mann-Whitney U statistic with average ranks)::

      AUC = Σ_{i ∈ pos} ( #{j ∈ neg : s_j < s_i} + ½ #{j ∈ neg : s_j = s_i} ) / (n_pos · n_neg)

  It is exact (no histogram buckets) and NaN when only one class is present.
- **LogLoss**: mean binary cross-entropy ``BCE(p, y) = -(y log p + (1-y) log(1-p))``, computed from
  logits in the stable softplus form ``BCE = softplus(z) - y·z`` (finite at ``|z| = 100``); a second
  path takes probabilities (logged FM predictions) clipped to ``[1e-7, 1 - 1e-7]``.
- **NE**, normalized entropy (He et al. 2014; the definition of ``torchrec.metrics.ne``)::

      NE = mean BCE / H(p̄),   H(p) = -(p log p + (1-p) log(1-p))

  i.e. the log loss relative to always predicting the evaluated data's own base rate
  (NE = 1 for that constant predictor, lower is better); NaN when ``p̄`` is 0 or 1.
- **NE gain %** against a baseline: ``(NE_base - NE) / NE_base · 100`` (positive = better).
- **Calibration**: ``Σ p / Σ y`` (1 = calibrated, > 1 = over-predicts); NaN without positives.

Three ways to compute them:

- :func:`compute_metrics` — exact, over one evaluation set held in memory.
- :class:`StreamingMetrics` — the same numbers accumulated batch by batch, per task and per domain
  (O(1) float64 running sums for LogLoss / NE / calibration; exact AUC from the kept scores).
- :class:`ProgressiveNE` — progressive (prequential) evaluation during one-pass training: every
  batch is scored by the current model *before* it trains on it; cumulative LogLoss / NE /
  calibration over the whole stream and exact metrics (AUC included) over a sliding window.

All sums are float64. Inputs may be torch tensors or numpy arrays; outputs are Python floats.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ALL",
    "PROB_EPS",
    "MetricSet",
    "ProgressiveNE",
    "StreamingMetrics",
    "auc",
    "calibration",
    "compute_metrics",
    "log_loss_from_logits",
    "log_loss_from_probs",
    "ne_gain",
    "normalized_entropy",
]

PROB_EPS = 1e-7
"""Probabilities are clipped to ``[PROB_EPS, 1 - PROB_EPS]`` before a log (logged FM predictions)."""

ALL = "all"
"""Key of the whole-set metrics next to the per-domain ones; no domain may be named so."""

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]

# Columns of the running-sum tables: entries, Σ y, Σ σ(z), Σ BCE.
_N, _POS, _PROB, _BCE = range(4)
_NUM_STATS = 4


# --------------------------------------------------------------------------------------------
# Conversions and checks
# --------------------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _to_float64(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _check_same_shape(labels: Any, values: Any, what: str) -> None:
    if tuple(labels.shape) != tuple(values.shape):
        raise ValueError(
            f"labels and {what} must have the same shape, got {tuple(labels.shape)} and {tuple(values.shape)}"
        )


def _positive_mask(labels: np.ndarray) -> np.ndarray:
    """``labels == 1`` as a bool array; raises unless every label is 0 or 1."""
    if labels.dtype == np.bool_:
        return labels
    positive = labels == 1
    if not np.all(positive | (labels == 0)):
        bad = labels[~(positive | (labels == 0))][0]
        raise ValueError(f"labels must be 0 or 1, found {bad!r}")
    return positive


def _auc_from_mask(positive: np.ndarray, scores: np.ndarray) -> float:
    """Exact tie-aware AUC of 1-D ``scores`` with a bool ``positive`` mask (no label checks)."""
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    pos = scores[positive]
    neg = np.sort(scores[~positive])
    if pos.size == 0 or neg.size == 0:
        return math.nan
    if np.isnan(pos).any() or np.isnan(neg[-1]):  # NaN sorts last
        return math.nan
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)  # #neg strictly below
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((below + below_or_tied) / (2.0 * pos.size * neg.size))


# --------------------------------------------------------------------------------------------
# Scalar metrics
# --------------------------------------------------------------------------------------------


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact ROC AUC with ties counted one half (Mann-Whitney U / (n_pos · n_neg)).

    ``AUC = Σ_{i ∈ pos} (#{j ∈ neg : s_j < s_i} + ½ #{j ∈ neg : s_j = s_i}) / (n_pos · n_neg)``,
    computed in O(n log n) by sorting the negatives and binary-searching every positive; equal to
    ``sklearn.metrics.roc_auc_score``. Any monotone transform of the scores gives the same value,
    so logits and probabilities are interchangeable (logits avoid the ties that ``σ`` creates by
    saturating in float32).

    Args:
        labels: ``[...]`` 0/1 labels (bool, int or float).
        scores: ``[...]`` scores of the same shape (logits or probabilities).

    Returns:
        The AUC; NaN when only one class is present (or nothing at all) or a score is NaN.

    Raises:
        ValueError: if the shapes differ or a label is neither 0 nor 1.
    """
    y = _to_numpy(labels)
    s = _to_numpy(scores)
    _check_same_shape(y, s, "scores")
    return _auc_from_mask(_positive_mask(y.reshape(-1)), s.reshape(-1))


def log_loss_from_logits(labels: ArrayLike, logits: ArrayLike) -> float:
    """Mean binary cross-entropy from logits, in the numerically stable softplus form.

    ``LogLoss = 1/n Σ softplus(z) - y·z`` (= ``-1/n Σ y log σ(z) + (1-y) log(1-σ(z))``), evaluated
    in float64 by ``binary_cross_entropy_with_logits``: finite for any finite logit.

    Args:
        labels: ``[...]`` targets in ``[0, 1]``.
        logits: ``[...]`` logits of the same shape.

    Returns:
        The mean BCE in nats; NaN for empty inputs.
    """
    y = _to_float64(labels)
    z = _to_float64(logits)
    _check_same_shape(y, z, "logits")
    if y.numel() == 0:
        return math.nan
    return float(F.binary_cross_entropy_with_logits(z, y, reduction="mean"))


def log_loss_from_probs(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean binary cross-entropy from probabilities (e.g. logged FM predictions).

    ``LogLoss = -1/n Σ y log p' + (1-y) log(1-p')`` with ``p' = clip(p, 1e-7, 1 - 1e-7)``, in
    float64; the clip bounds a single confident mistake at ``-log(1e-7) ≈ 16.1`` nats.

    Args:
        labels: ``[...]`` targets in ``[0, 1]``.
        probs: ``[...]`` probabilities of the same shape.

    Returns:
        The mean BCE in nats; NaN for empty inputs.
    """
    return log_loss_from_logits(labels, torch.logit(_to_float64(probs).clamp(PROB_EPS, 1.0 - PROB_EPS)))


def normalized_entropy(mean_bce: float, base_rate: float) -> float:
    """Normalized entropy ``NE = mean_bce / H(p̄)`` (He et al. 2014; ``torchrec.metrics.ne``).

    ``H(p̄) = -(p̄ log p̄ + (1-p̄) log(1-p̄))`` is the log loss of always predicting the base rate
    ``p̄`` of the evaluated labels, so that constant predictor has NE = 1 and lower is better.
    Both terms must use the same log base (nats here).

    Args:
        mean_bce: the mean BCE of the predictions over the evaluated set.
        base_rate: ``p̄ = Σ y / n`` of the same set.

    Returns:
        NE; NaN when ``p̄`` is 0, 1 or NaN (the entropy is 0: NE is undefined).

    Raises:
        ValueError: if ``base_rate`` is outside ``[0, 1]``.
    """
    p = float(base_rate)
    if math.isnan(p) or p in (0.0, 1.0):
        return math.nan
    if not 0.0 < p < 1.0:
        raise ValueError(f"base_rate must lie in [0, 1], got {p}")
    entropy = -(p * math.log(p) + (1.0 - p) * math.log1p(-p))
    return float(mean_bce) / entropy


def ne_gain(ne: float, baseline_ne: float) -> float:
    """Relative NE improvement over a baseline in percent: ``(NE_base - NE) / NE_base · 100``.

    Positive means better than the baseline (the paper's "NE gain"); NaN if either NE is NaN or
    the baseline's NE is 0.
    """
    ne, baseline_ne = float(ne), float(baseline_ne)
    if math.isnan(ne) or math.isnan(baseline_ne) or baseline_ne == 0.0:
        return math.nan
    return (baseline_ne - ne) / baseline_ne * 100.0


def calibration(labels: ArrayLike, probs: ArrayLike) -> float:
    """Calibration ``Σ p / Σ y``: 1 is calibrated, > 1 over-predicts; NaN without positives.

    Args:
        labels: ``[...]`` targets in ``[0, 1]``.
        probs: ``[...]`` predicted probabilities of the same shape (``σ(logits)`` for logits).
    """
    y = _to_float64(labels)
    p = _to_float64(probs)
    _check_same_shape(y, p, "probs")
    positives = float(y.sum())
    return float(p.sum()) / positives if positives > 0 else math.nan


# --------------------------------------------------------------------------------------------
# MetricSet and exact computation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSet:
    """The metrics of one evaluation set (one task, one domain or all).

    Attributes:
        auc: exact tie-aware AUC (NaN with one class, or where AUC is not tracked).
        logloss: mean BCE in nats (NaN when ``n == 0``).
        ne: ``logloss / H(positives / n)`` (NaN when ``n == 0`` or the set has one class).
        calibration: ``Σ σ(z) / Σ y`` (NaN without positives).
        n: number of evaluated entries.
        positives: number of positive labels.
    """

    auc: float
    logloss: float
    ne: float
    calibration: float
    n: int
    positives: int

    @property
    def base_rate(self) -> float:
        """``positives / n`` (NaN when empty)."""
        return self.positives / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, float | int | None]:
        """A JSON-safe dict: every field by name, NaN and ±inf as ``None``."""
        out: dict[str, float | int | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = None if isinstance(value, float) and not math.isfinite(value) else value
        return out

    @classmethod
    def from_sums(cls, n: float, positives: float, sum_prob: float, sum_bce: float, auc: float = math.nan) -> MetricSet:
        """Build from running sums: entries, ``Σ y``, ``Σ σ(z)``, ``Σ BCE`` (+ an AUC if known)."""
        n, positives, sum_prob, sum_bce = float(n), float(positives), float(sum_prob), float(sum_bce)
        if n <= 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0, 0)
        logloss = sum_bce / n
        base_rate = min(max(positives / n, 0.0), 1.0)  # guards float64 rounding only
        return cls(
            auc=float(auc),
            logloss=logloss,
            ne=normalized_entropy(logloss, base_rate),
            calibration=sum_prob / positives if positives > 0 else math.nan,
            n=round(n),
            positives=round(positives),
        )


def compute_metrics(labels: ArrayLike, logits: ArrayLike) -> MetricSet:
    """Exact metrics of one evaluation set held in memory.

    Args:
        labels: ``[...]`` 0/1 labels.
        logits: ``[...]`` logits of the same shape (use ``logit(clip(p))`` for probabilities).

    Returns:
        The :class:`MetricSet` (AUC, LogLoss and NE from logits in float64, calibration).

    Raises:
        ValueError: if the shapes differ or a label is neither 0 nor 1.
    """
    y_np = _to_numpy(labels)
    z_np = _to_numpy(logits)
    _check_same_shape(y_np, z_np, "logits")
    positive = _positive_mask(y_np.reshape(-1))
    y = torch.from_numpy(positive.astype(np.float64))
    z = torch.as_tensor(z_np.reshape(-1), dtype=torch.float64)
    return MetricSet.from_sums(
        n=y.numel(),
        positives=float(y.sum()),
        sum_prob=float(torch.sigmoid(z).sum()),
        sum_bce=float(F.binary_cross_entropy_with_logits(z, y, reduction="sum")),
        auc=_auc_from_mask(positive, z_np.reshape(-1)),
    )


# --------------------------------------------------------------------------------------------
# Batch preparation shared by the streaming classes
# --------------------------------------------------------------------------------------------


def _check_names(tasks: Sequence[str], domains: Sequence[str]) -> tuple[list[str], list[str]]:
    tasks, domains = list(tasks), list(domains)
    if not tasks:
        raise ValueError("at least one task is required")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domain names must be unique, got {domains}")
    if ALL in domains:
        raise ValueError(f"{ALL!r} is reserved for the whole-set metrics and cannot name a domain")
    return tasks, domains


@dataclass
class _Batch:
    """One validated batch: ``logits`` [B, T] (input dtype), ``labels`` [B, T] float64,
    ``mask`` [B, T] bool, ``bins`` [B] int64 domain bins (``D`` = no domain)."""

    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    bins: torch.Tensor


def _prepare(
    logits: torch.Tensor,
    labels: torch.Tensor,
    domain: torch.Tensor | None,
    mask: torch.Tensor | None,
    num_tasks: int,
    num_domains: int,
    device: torch.device,
    check: bool,
) -> _Batch:
    """Validate shapes (and, with ``check``, values: one host sync) and move to ``device``."""
    logits = torch.as_tensor(logits).detach()
    labels = torch.as_tensor(labels).detach()
    if logits.dim() == 1 and num_tasks == 1:
        logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(-1, 1)
    if logits.dim() != 2 or logits.shape[1] != num_tasks:
        raise ValueError(f"logits must have shape [B, {num_tasks}], got {tuple(logits.shape)}")
    _check_same_shape(labels, logits, "logits")
    batch = logits.shape[0]
    if domain is None:
        domain = torch.full((batch,), -1, dtype=torch.int64, device=device)
    domain = torch.as_tensor(domain).detach()
    if domain.dtype.is_floating_point or domain.dtype == torch.bool or domain.is_complex():
        raise TypeError(f"domain must be an integer tensor, got {domain.dtype}")
    if tuple(domain.shape) != (batch,):
        raise ValueError(f"domain must have shape [{batch}], got {tuple(domain.shape)}")
    if mask is None:
        mask = torch.ones(batch, num_tasks, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask).detach()
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    _check_same_shape(mask, logits, "mask")

    logits = logits.to(device)
    labels = labels.to(device=device, dtype=torch.float64)
    mask = mask.to(device)
    domain = domain.to(device=device, dtype=torch.int64)
    if check:
        bad_label = (mask & (labels != 0) & (labels != 1)).any()
        bad_domain = ((domain < -1) | (domain >= num_domains)).any()
        flags = torch.stack([bad_label, bad_domain]).tolist()  # the one host sync
        if flags[0]:
            found = labels[mask & (labels != 0) & (labels != 1)][0].item()
            raise ValueError(f"labels must be 0 or 1 where mask is set (mask out missing labels), found {found}")
        if flags[1]:
            found = domain[(domain < -1) | (domain >= num_domains)][0].item()
            raise ValueError(f"domain indices must lie in [-1, {num_domains - 1}], found {found}")
    # -1 (and, unchecked, any index outside [0, D)) -> the "no domain" bin D: counted in "all" only.
    outside = (domain < 0) | (domain >= num_domains)
    bins = torch.where(outside, torch.full_like(domain, num_domains), domain)
    return _Batch(logits=logits, labels=labels, mask=mask, bins=bins)


def _batch_sums(batch: _Batch, num_bins: int) -> torch.Tensor:
    """Per-task, per-domain-bin sums of one batch: ``[T, num_bins, 4]`` float64.

    ``out[t, d] = Σ_{b : bin_b = d, mask_bt} (1, y_bt, σ(z_bt), BCE(z_bt, y_bt))``, as a one-hot
    contraction ``einsum("bd,btk->tdk")``: vectorised, and deterministic on every device (unlike
    atomic ``index_add_`` on CUDA), so a resumed run reproduces the sums bit for bit.
    """
    mask = batch.mask
    z = torch.where(mask, batch.logits.to(torch.float64), 0.0)
    y = torch.where(mask, batch.labels, 0.0)
    weight = mask.to(torch.float64)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none") * weight
    stats = torch.stack([weight, y, torch.sigmoid(z) * weight, bce], dim=-1)  # [B, T, 4]
    bins = torch.arange(num_bins, device=mask.device)
    one_hot = (batch.bins.unsqueeze(1) == bins).to(torch.float64)  # [B, num_bins]
    return torch.einsum("bd,btk->tdk", one_hot, stats)


def _accumulator_device(device: torch.device) -> torch.device:
    # MPS has no float64: keep the sums on the host there.
    return torch.device("cpu") if device.type == "mps" else device


def _bin_dtype(num_bins: int) -> torch.dtype:
    return torch.int16 if num_bins <= torch.iinfo(torch.int16).max else torch.int32


def _metrics_per_domain(
    sums: torch.Tensor,
    positive: np.ndarray | None,
    scores: np.ndarray | None,
    bins: np.ndarray | None,
    domains: list[str],
) -> dict[str, MetricSet]:
    """``{"all": ..., domain: ...}`` from one task's ``[D+1, 4]`` sums (+ kept scores for AUC)."""
    sums = sums.detach().to("cpu", torch.float64)
    total = sums.sum(dim=0).tolist()

    def _auc(select: np.ndarray | None) -> float:
        if scores is None or positive is None:
            return math.nan
        if select is None:
            return _auc_from_mask(positive, scores)
        return _auc_from_mask(positive[select], scores[select])

    out = {ALL: MetricSet.from_sums(*total, auc=_auc(None))}
    for d, name in enumerate(domains):
        select = None if bins is None else bins == d
        out[name] = MetricSet.from_sums(*sums[d].tolist(), auc=_auc(select))
    return out


# --------------------------------------------------------------------------------------------
# StreamingMetrics
# --------------------------------------------------------------------------------------------


class StreamingMetrics:
    """Accumulates exact metrics batch by batch, per task and per domain.

    LogLoss, NE and calibration come from O(1) float64 running sums per (task, domain):
    entries, ``Σ y``, ``Σ σ(z)`` and ``Σ BCE(z, y)``. AUC is exact, so the scores of every
    evaluated entry are kept on the host: O(n) memory (float32 logit + bool label + int16 domain,
    7 bytes an entry). ``result()`` equals :func:`compute_metrics` on the concatenation of all
    updates (to float64 rounding), for the whole set and for each domain.

    Args:
        tasks: the T task names, in the column order of ``logits`` / ``labels``.
        domains: the D domain names; ``domain`` indices refer to this list, ``-1`` = no domain
            (such entries count in ``"all"`` only).
        check_inputs: validate that unmasked labels are 0/1 and domains lie in ``[-1, D)`` (without
            the check, other domain indices count as "no domain").

    Example::

        metrics = StreamingMetrics(["click", "like"], ["a", "b", "c"])
        for batch in day:
            metrics.update(model(batch)["logits"], batch.labels, batch.domain)
        metrics.result()["click"]["all"].ne
    """

    def __init__(self, tasks: Sequence[str], domains: Sequence[str] = (), *, check_inputs: bool = True):
        self.tasks, self.domains = _check_names(tasks, domains)
        self.check_inputs = check_inputs
        self.reset()

    @property
    def _num_bins(self) -> int:
        return len(self.domains) + 1

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        num_tasks = len(self.tasks)
        self._sums = torch.zeros(num_tasks, self._num_bins, _NUM_STATS, dtype=torch.float64)
        self._scores: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]
        self._labels: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]
        self._bins: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        domain: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            logits: ``[B, T]`` logits (``[B]`` when T = 1), any float dtype and device.
            labels: ``[B, T]`` 0/1 labels.
            domain: ``[B]`` int domain index, ``-1`` = none; ``None`` = no domain for any row.
            mask: ``[B, T]`` bool, False excludes an entry (e.g. a missing label); ``None`` = all.
        """
        batch = _prepare(
            logits,
            labels,
            domain,
            mask,
            len(self.tasks),
            len(self.domains),
            torch.device("cpu"),
            self.check_inputs,
        )
        self._sums += _batch_sums(batch, self._num_bins)
        scores = batch.logits.to(torch.float32)
        positive = batch.labels == 1
        bins = batch.bins.to(_bin_dtype(self._num_bins))
        for t in range(len(self.tasks)):  # a loop over tasks, never rows
            keep = batch.mask[:, t]
            self._scores[t].append(scores[keep, t])
            self._labels[t].append(positive[keep, t])
            self._bins[t].append(bins[keep])

    def _compact(self) -> None:
        """Join each task's kept chunks into one tensor (typed empties for tasks never seen)."""
        empty = (torch.float32, torch.bool, _bin_dtype(self._num_bins))
        for chunks, dtype in zip((self._scores, self._labels, self._bins), empty, strict=True):
            for t, parts in enumerate(chunks):
                if len(parts) != 1:
                    chunks[t] = [torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)]

    def result(self) -> dict[str, dict[str, MetricSet]]:
        """``result()[task][name]`` with name ``"all"`` or a domain name (every domain listed)."""
        self._compact()
        out: dict[str, dict[str, MetricSet]] = {}
        for t, task in enumerate(self.tasks):
            out[task] = _metrics_per_domain(
                self._sums[t],
                self._labels[t][0].numpy(),
                self._scores[t][0].numpy(),
                self._bins[t][0].numpy(),
                self.domains,
            )
        return out

    def to_dict(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """:meth:`result` as JSON-safe nested dicts."""
        return {task: {k: m.to_dict() for k, m in per.items()} for task, per in self.result().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors, lists and strings: ``weights_only``-safe)."""
        self._compact()
        return {
            "format": "exfm.StreamingMetrics/1",
            "tasks": list(self.tasks),
            "domains": list(self.domains),
            "sums": self._sums.clone(),
            "scores": [parts[0].clone() for parts in self._scores],
            "labels": [parts[0].clone() for parts in self._labels],
            "bins": [parts[0].clone() for parts in self._bins],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the tasks and domains must match this instance's."""
        _check_state(state, "exfm.StreamingMetrics/1", self.tasks, self.domains)
        self._sums = state["sums"].to("cpu", torch.float64).clone()
        self._scores = [[s.to("cpu", torch.float32).clone()] for s in state["scores"]]
        self._labels = [[s.to("cpu", torch.bool).clone()] for s in state["labels"]]
        self._bins = [[s.to("cpu", _bin_dtype(self._num_bins)).clone()] for s in state["bins"]]


def _check_state(state: dict[str, Any], fmt: str, tasks: list[str], domains: list[str]) -> None:
    if state.get("format") != fmt:
        raise ValueError(f"not a {fmt} state (format {state.get('format')!r})")
    if list(state["tasks"]) != tasks or list(state["domains"]) != domains:
        raise ValueError(
            f"state was saved for tasks {state['tasks']} / domains {state['domains']}, "
            f"this instance has {tasks} / {domains}"
        )


# --------------------------------------------------------------------------------------------
# ProgressiveNE
# --------------------------------------------------------------------------------------------


class ProgressiveNE:
    """Progressive (prequential) evaluation over a training stream.

    Call :meth:`update` with the logits the *current* model gives a batch **before** it trains on
    that batch: every example is then scored by a model that has not seen it, so the running
    numbers measure how the model does on the stream as it learns.

    - Cumulative, exact over the whole stream, per task and per domain: LogLoss, NE and calibration
      from float64 running sums (O(1) memory; AUC is not tracked cumulatively and stays NaN).
    - Window, exact over the last ``window`` examples (rows): all metrics, AUC included, from a
      deque of the recent batches (the oldest one sliced so exactly ``window`` rows remain).

    ``update`` is vectorised and keeps its state on the logits' device (no host copy); with
    ``check_inputs`` it syncs once per batch to validate labels and domains.

    Args:
        tasks: the T task names, in the column order of ``logits`` / ``labels``.
        domains: the D domain names (``domain`` index ``-1`` = none).
        window: rows in the sliding window (>= 1).
        check_inputs: validate that unmasked labels are 0/1 and domains lie in ``[-1, D)``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        domains: Sequence[str] = (),
        window: int = 100_000,
        *,
        check_inputs: bool = True,
    ):
        self.tasks, self.domains = _check_names(tasks, domains)
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = int(window)
        self.check_inputs = check_inputs
        self.reset()

    @property
    def _num_bins(self) -> int:
        return len(self.domains) + 1

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._sums = torch.zeros(len(self.tasks), self._num_bins, _NUM_STATS, dtype=torch.float64)
        # (logits float32 [b, T], positive bool [b, T], mask bool [b, T], bins [b]) per batch
        self._recent: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self._recent_rows = 0
        self.examples = 0
        self.batches = 0

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        domain: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch, scored before the model trains on it.

        Args:
            logits: ``[B, T]`` logits (``[B]`` when T = 1).
            labels: ``[B, T]`` 0/1 labels.
            domain: ``[B]`` int domain index, ``-1`` = none; ``None`` = no domain for any row.
            mask: ``[B, T]`` bool, False excludes an entry; ``None`` = all.
        """
        device = _accumulator_device(torch.as_tensor(logits).device)
        if self._sums.device != device:
            self._sums = self._sums.to(device)
        batch = _prepare(logits, labels, domain, mask, len(self.tasks), len(self.domains), device, self.check_inputs)
        self._sums += _batch_sums(batch, self._num_bins)
        rows = batch.logits.shape[0]
        self.examples += rows
        self.batches += 1
        if rows == 0:
            return
        self._recent.append(
            (
                batch.logits.to(torch.float32, copy=True),
                batch.labels == 1,
                batch.mask.clone(),
                batch.bins.to(_bin_dtype(self._num_bins)),
            )
        )
        self._recent_rows += rows
        self._trim()

    def _trim(self) -> None:
        while self._recent and self._recent_rows - self._recent[0][0].shape[0] >= self.window:
            self._recent_rows -= self._recent.popleft()[0].shape[0]
        excess = self._recent_rows - self.window
        if excess > 0:
            self._recent[0] = tuple(x[excess:].clone() for x in self._recent[0])  # type: ignore[assignment]
            self._recent_rows -= excess

    def _window_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tasks = len(self.tasks)
        if not self._recent:
            return (
                torch.zeros(0, num_tasks, dtype=torch.float32),
                torch.zeros(0, num_tasks, dtype=torch.bool),
                torch.zeros(0, num_tasks, dtype=torch.bool),
                torch.zeros(0, dtype=_bin_dtype(self._num_bins)),
            )
        parts = list(zip(*self._recent, strict=True))
        return tuple(torch.cat([x.to("cpu") for x in group]) for group in parts)  # type: ignore[return-value]

    def cumulative(self) -> dict[str, dict[str, MetricSet]]:
        """Whole-stream metrics ``[task]["all" | domain]`` (LogLoss, NE, calibration; AUC NaN)."""
        return {
            task: _metrics_per_domain(self._sums[t], None, None, None, self.domains)
            for t, task in enumerate(self.tasks)
        }

    def window_metrics(self) -> dict[str, dict[str, MetricSet]]:
        """Exact metrics over the last ``window`` rows, ``[task]["all" | domain]``."""
        logits, positive, mask, bins = self._window_tensors()
        out: dict[str, dict[str, MetricSet]] = {}
        for t, task in enumerate(self.tasks):
            keep = mask[:, t]
            z = logits[keep, t]
            y = positive[keep, t]
            b = bins[keep].long()
            column = _Batch(
                logits=z.unsqueeze(1),
                labels=y.to(torch.float64).unsqueeze(1),
                mask=torch.ones(z.shape[0], 1, dtype=torch.bool),
                bins=b,
            )
            sums = _batch_sums(column, self._num_bins)[0]
            out[task] = _metrics_per_domain(sums, y.numpy(), z.numpy(), b.numpy(), self.domains)
        return out

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable summary (NaN as ``None``)::

        {"examples": rows seen, "batches": updates, "window_examples": rows in the window,
         "tasks": {task: {"cumulative": {"all": MetricSet.to_dict(), domain: ...},
                          "window": {"all": ..., domain: ...}}}}
        """
        cumulative = self.cumulative()
        window = self.window_metrics()
        return {
            "examples": self.examples,
            "batches": self.batches,
            "window_examples": self._recent_rows,
            "tasks": {
                task: {
                    "cumulative": {k: m.to_dict() for k, m in cumulative[task].items()},
                    "window": {k: m.to_dict() for k, m in window[task].items()},
                }
                for task in self.tasks
            },
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (host tensors; ``weights_only``-safe)."""
        logits, positive, mask, bins = self._window_tensors()
        return {
            "format": "exfm.ProgressiveNE/1",
            "tasks": list(self.tasks),
            "domains": list(self.domains),
            "window": self.window,
            "examples": self.examples,
            "batches": self.batches,
            "sums": self._sums.detach().to("cpu").clone(),
            "recent_logits": logits,
            "recent_labels": positive,
            "recent_mask": mask,
            "recent_bins": bins,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tasks and domains must match; a smaller ``window`` trims)."""
        _check_state(state, "exfm.ProgressiveNE/1", self.tasks, self.domains)
        self.reset()
        self._sums = state["sums"].to("cpu", torch.float64).clone()
        self.examples = int(state["examples"])
        self.batches = int(state["batches"])
        rows = state["recent_logits"].shape[0]
        if rows:
            self._recent.append(
                (
                    state["recent_logits"].to("cpu", torch.float32).clone(),
                    state["recent_labels"].to("cpu", torch.bool).clone(),
                    state["recent_mask"].to("cpu", torch.bool).clone(),
                    state["recent_bins"].to("cpu", _bin_dtype(self._num_bins)).clone(),
                )
            )
            self._recent_rows = rows
            self._trim()
