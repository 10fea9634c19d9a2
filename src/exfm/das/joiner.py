"""The joiner: turns impressions and labels into exactly one training example per impression.

Rules (all in event time, microseconds):

* **Window.** Each task has a label window ``W_task``. A label of that task counts for an
  impression at time ``t`` if its event time is at most ``t + W_task``; the boundary
  ``t + W_task`` itself is **inside**. There is no lower bound: a label stamped slightly before
  its impression (clock skew between producers) still counts.
* **Value.** The example is positive for a task if *any* label with value 1 falls inside the
  window (a positive wins over negatives); otherwise it is negative.
* **Emission.** An impression is emitted once, when the watermark reaches the close of *all* its
  tasks' windows, ``close = t + max(W_task)``. A watermark ``w`` promises that every event with
  time ``<= w`` has arrived, so a label exactly at the boundary is seen before the close.
* **Watermark.** Given explicitly to :meth:`Joiner.advance` (an injectable clock), or derived
  from the events: the larger of the maximum event time seen minus ``allowed_lateness_us`` and
  the latest :class:`~exfm.das.events.Watermark` event a producer sent. It never moves back.
* **Duplicates.** A resent impression (same request id) or label (same request, task, time and
  value) changes nothing; both are counted.
* **Early labels.** A label whose impression has not arrived is held, and applied when the
  impression comes. If the watermark passes ``label time + early_label_horizon_us`` first, the
  label is dropped and counted as ``orphan_labels``.
* **Late labels.** A label that arrives after its impression was emitted is **dropped** (never
  emitted as a correction) and counted as ``late_labels`` (per task in ``late_labels_by_task``);
  only a late positive could have changed an example, counted as ``late_positive_labels``.
  The request ids of emitted impressions are remembered for ``emitted_retention_us`` after their
  close; after that a label for them is treated as an early label (and ends as an orphan), and a
  resent impression would be emitted again: the shared store absorbs it by request id.
* Labels of a task the impression is not labelled for, or with no window, are counted as
  ``ignored_labels``.

The output depends only on the set of events and the watermarks given, not on the order in
which events arrive between two calls of :meth:`Joiner.advance`.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from exfm.das.events import Event, Impression, ImpressionBatch, Label, Watermark

US_PER_MINUTE = 60_000_000


@dataclass(frozen=True)
class JoinerConfig:
    """Windows and horizons of a :class:`Joiner` (all durations in microseconds).

    Attributes:
        windows_us: label window per task, e.g. ``{"click": 15 min, "conversion": 1 day}``.
        allowed_lateness_us: how far behind the latest event time the derived watermark stays.
        early_label_horizon_us: how long a label waits for its impression after its own time.
        emitted_retention_us: how long emitted request ids are remembered after their close.
    """

    windows_us: Mapping[str, int]
    allowed_lateness_us: int = 0
    early_label_horizon_us: int = 60 * US_PER_MINUTE
    emitted_retention_us: int = 24 * 60 * US_PER_MINUTE

    def __post_init__(self) -> None:
        if not self.windows_us:
            raise ValueError("JoinerConfig.windows_us: give at least one task's label window")
        for task, window in self.windows_us.items():
            if window < 0:
                raise ValueError(f"JoinerConfig.windows_us.{task}: the window must be >= 0, got {window}")


@dataclass(frozen=True)
class Supervision:
    """The FM's predictions for one impression, and which snapshot made them.

    Attributes:
        probabilities: probability per task the FM predicts (tasks it lacks are absent).
        snapshot_id: the SPD snapshot that predicted.
        trained_through_us: that snapshot's train-through time (µs, UTC).
    """

    probabilities: Mapping[str, float]
    snapshot_id: str
    trained_through_us: int


Source = Impression | ImpressionBatch
"""Where an impression's features live: a single impression, or a row of a batch."""

ImpressionRef = tuple[Source, int]
"""An impression as ``(source, row)``, as :meth:`Joiner.add` returns them."""


def ref_request_id(ref: ImpressionRef) -> str:
    """The request id of an impression given as ``(source, row)``."""
    source, row = ref
    return source.request_id if isinstance(source, Impression) else source.request_ids[row]


@dataclass(slots=True)
class JoinedExample:
    """One impression with its labels, emitted once its windows have closed.

    Attributes:
        request_id: the impression's request id.
        time_us: the impression's event time.
        labels: 0/1 per task the impression was labelled for.
        close_us: when its last window closed (``time_us + max window``).
        source: the impression, or the batch it is row ``row`` of (the features stay there, columnar).
        row: its row in ``source`` if that is a batch.
        supervision: the FM's predictions, None if the example is emitted without supervision.
    """

    request_id: str
    time_us: int
    labels: Mapping[str, int]
    close_us: int
    source: Source
    row: int = 0
    supervision: Supervision | None = None

    @property
    def impression(self) -> Impression:
        """The impression (features, domain) this example was joined from."""
        return self.source if isinstance(self.source, Impression) else self.source.impression(self.row)


@dataclass(slots=True)
class _Pending:
    request_id: str
    time_us: int
    tasks: tuple[str, ...]
    close_us: int
    source: Source
    row: int
    positive: set[str] = field(default_factory=set)


class Joiner:
    """Joins impressions and labels by request id under per-task event-time windows.

    Args:
        config: the windows and horizons.

    Example::

        joiner = Joiner(JoinerConfig({"click": 15 * US_PER_MINUTE}))
        joiner.add([impression, label])
        examples = joiner.advance(watermark_us)
    """

    def __init__(self, config: JoinerConfig):
        self.config = config
        self.counters: Counter[str] = Counter()
        self.late_labels_by_task: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        self._early: dict[str, set[Label]] = {}
        self._seen_labels: dict[str, set[Label]] = {}
        self._emitted: dict[str, int] = {}
        self._all_negative: dict[tuple[str, ...], dict[str, int]] = {}
        # min-heaps of (deadline, request id): window closes, early-label expiries, emitted-id expiries
        self._closing: list[tuple[int, str]] = []
        self._early_expiry: list[tuple[int, str]] = []
        self._emitted_expiry: list[tuple[int, str]] = []
        self._max_event_us: int | None = None
        self._source_watermark_us: int | None = None
        self._watermark_us: int | None = None

    @property
    def watermark_us(self) -> int | None:
        """The watermark of the last :meth:`advance` (None before the first)."""
        return self._watermark_us

    @property
    def pending(self) -> int:
        """Impressions waiting for their windows to close."""
        return len(self._pending)

    def event_watermark_us(self) -> int | None:
        """The watermark derived from the events: latest event time minus the allowed lateness, or
        the latest producer watermark if that is later."""
        derived = None if self._max_event_us is None else self._max_event_us - self.config.allowed_lateness_us
        candidates = [w for w in (derived, self._source_watermark_us) if w is not None]
        return max(candidates) if candidates else None

    def add(self, events: Iterable[Event]) -> list[ImpressionRef]:
        """Take impressions (single or batched) and labels in any order; nothing is emitted until
        :meth:`advance`.

        Returns:
            ``(source, row)`` of the impressions that are new (now waiting; resends excluded).
        """
        accepted: list[ImpressionRef] = []
        all_tasks = tuple(self.config.windows_us)
        for event in events:
            if isinstance(event, Watermark):
                self._source_watermark_us = max(event.time_us, self._source_watermark_us or event.time_us)
            elif isinstance(event, ImpressionBatch):
                accepted += self._add_batch(event, all_tasks)
            else:
                if self._max_event_us is None or event.time_us > self._max_event_us:
                    self._max_event_us = event.time_us
                if isinstance(event, Label):
                    self._add_label(event)
                elif self._add_impression(event.request_id, event.time_us, event.tasks or all_tasks, event, 0):
                    accepted.append((event, 0))
        return accepted

    def is_waiting(self, request_id: str) -> bool:
        """Whether events of this request are still needed: its impression waits, or labels wait for it."""
        return request_id in self._pending or request_id in self._early

    def advance(self, watermark_us: int | None = None) -> list[JoinedExample]:
        """Move the watermark and emit every impression whose windows have all closed.

        Args:
            watermark_us: every event with time ``<=`` this has arrived; None derives it from
                the events (:meth:`event_watermark_us`). A value below the current one is ignored.

        Returns:
            The newly closed examples, sorted by ``(time_us, request_id)``.
        """
        if watermark_us is None:
            watermark_us = self.event_watermark_us()
            if watermark_us is None:
                return []
        if self._watermark_us is not None and watermark_us < self._watermark_us:
            watermark_us = self._watermark_us
        self._watermark_us = watermark_us
        closed = []
        while self._closing and self._closing[0][0] <= watermark_us:
            closed.append(self._pending[heapq.heappop(self._closing)[1]])
        closed.sort(key=lambda p: (p.time_us, p.request_id))
        examples = []
        retention = self.config.emitted_retention_us
        negatives = self._all_negative
        for pending in closed:
            rid = pending.request_id
            del self._pending[rid]
            self._emitted[rid] = pending.close_us
            heapq.heappush(self._emitted_expiry, (pending.close_us + retention, rid))
            if pending.positive:
                labels = {task: int(task in pending.positive) for task in pending.tasks}
                for task in pending.positive:
                    self.counters[f"positives:{task}"] += 1
            else:  # most examples: one shared all-negative mapping (never mutated)
                labels = negatives.get(pending.tasks) or negatives.setdefault(
                    pending.tasks, dict.fromkeys(pending.tasks, 0)
                )
            examples.append(JoinedExample(rid, pending.time_us, labels, pending.close_us, pending.source, pending.row))
        self.counters["emitted"] += len(examples)
        self._expire(watermark_us)
        return examples

    # --- internals ------------------------------------------------------------------------------
    def _add_batch(self, batch: ImpressionBatch, tasks: tuple[str, ...]) -> list[ImpressionRef]:
        """:meth:`_add_impression` for every row of a batch (the hot path, kept lean)."""
        times = batch.times_us
        if not times:
            return []
        self._max_event_us = max(max(times), self._max_event_us or times[0])
        window = max(self.config.windows_us.values())
        pending, emitted, early, closing = self._pending, self._emitted, self._early, self._closing
        accepted = []
        for row, (rid, time_us) in enumerate(zip(batch.request_ids, times, strict=True)):
            if rid in pending or rid in emitted:
                self.counters["duplicate_impressions"] += 1
                continue
            waiting = pending[rid] = _Pending(rid, time_us, tasks, time_us + window, batch, row)
            heapq.heappush(closing, (time_us + window, rid))
            if rid in early:
                for label in early.pop(rid):
                    self._apply(waiting, label)
            accepted.append((batch, row))
        self.counters["impressions"] += len(accepted)
        return accepted

    def _add_impression(self, rid: str, time_us: int, tasks: tuple[str, ...], source: Source, row: int) -> bool:
        if rid in self._pending or rid in self._emitted:
            self.counters["duplicate_impressions"] += 1
            return False
        self.counters["impressions"] += 1
        windows = self.config.windows_us
        unknown = [t for t in tasks if t not in windows]
        if unknown:
            raise ValueError(f"impression {rid!r}: no label window for task(s) {unknown}")
        close = time_us + max(windows[t] for t in tasks)
        pending = _Pending(rid, time_us, tasks, close, source, row)
        self._pending[rid] = pending
        heapq.heappush(self._closing, (close, rid))
        for label in self._early.pop(rid, ()):
            self._apply(pending, label)
        return True

    def _add_label(self, label: Label) -> None:
        rid = label.request_id
        seen = self._seen_labels.setdefault(rid, set())
        if label in seen:
            self.counters["duplicate_labels"] += 1
            return
        seen.add(label)
        self.counters["labels"] += 1
        if rid in self._pending:
            self._apply(self._pending[rid], label)
        elif rid in self._emitted:
            self.counters["late_labels"] += 1
            self.counters["late_positive_labels"] += label.value
            self.late_labels_by_task[label.task] += 1
        else:
            self.counters["early_labels"] += 1
            self._early.setdefault(rid, set()).add(label)
            heapq.heappush(self._early_expiry, (label.time_us + self.config.early_label_horizon_us, rid))

    def _apply(self, pending: _Pending, label: Label) -> None:
        if label.task not in pending.tasks:
            self.counters["ignored_labels"] += 1
        elif label.time_us > pending.time_us + self.config.windows_us[label.task]:
            self.counters["labels_after_window"] += 1
        elif label.value:
            pending.positive.add(label.task)

    def _expire(self, watermark_us: int) -> None:
        """Drop orphan early labels and forget old emitted ids (bounded memory)."""
        while self._early_expiry and self._early_expiry[0][0] < watermark_us:
            rid = heapq.heappop(self._early_expiry)[1]
            labels = self._early.get(rid)
            if labels and all(lb.time_us + self.config.early_label_horizon_us < watermark_us for lb in labels):
                del self._early[rid]
                del self._seen_labels[rid]
                self.counters["orphan_labels"] += len(labels)
        while self._emitted_expiry and self._emitted_expiry[0][0] < watermark_us:
            rid = heapq.heappop(self._emitted_expiry)[1]
            del self._emitted[rid]
            self._seen_labels.pop(rid, None)
