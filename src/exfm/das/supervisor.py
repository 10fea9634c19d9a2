"""FM supervision inside the label window: one batched FM inference per impression, under a budget.

While an impression waits for its labels, the worker hands it to the :class:`Supervisor`, which
runs the FM snapshot the worker serves on batches of impressions in a background thread. When the
joiner emits the example, :meth:`Supervisor.attach` adds the FM's probabilities, the snapshot id
and its train-through time. The rule that keeps a slow FM from holding back the label window:

* a closed example waits for its impression's inference at most until ``submitted +
  latency_budget_s`` (wall clock); past that it is emitted **without** supervision and counted
  as ``unsupervised_timeout`` (the inference keeps running; its result is discarded). Waiting
  does not block the worker (:meth:`Supervisor.take_ready`): it keeps reading and joining, so
  FM inference and joining overlap;
* a queued inference whose deadline passed before the FM got to it is skipped (so an FM slower
  than the stream drains its queue instead of falling ever further behind);
* an FM that raises: the batch's examples are emitted without supervision, ``unsupervised_error``;
* no snapshot loaded yet: ``unsupervised_no_snapshot``.

One inference serves every VM: the shared store holds one row per impression, and each VM reads
its own view of it, so ``fm_rows / emitted`` is 1 however many VMs read the impression.

:class:`SnapshotFM` is what the worker's :class:`~exfm.das.loader.SnapshotLoader` builds from a
snapshot: the served model plus what is needed to turn impressions into its input (schema,
domain list, and the numeric moments frozen at the snapshot's train-through point).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

import numpy as np
import torch

from exfm.das.joiner import ImpressionRef, JoinedExample, Supervision, ref_request_id
from exfm.das.snapshots import SnapshotInfo, build_served_model
from exfm.das.store import examples_table
from exfm.data.dataset import partition_arrow_schema
from exfm.data.reader import CausalNormalizer, decode_table
from exfm.models.base import RecModel
from exfm.schema import Schema, parse_schema


@dataclass(frozen=True)
class SnapshotFM:
    """A loaded FM snapshot, ready to predict impressions."""

    info: SnapshotInfo
    model: RecModel
    schema: Schema
    tasks: tuple[str, ...]
    domains: tuple[str, ...]
    normalizer: CausalNormalizer

    @classmethod
    def build(cls, info: SnapshotInfo, state: dict[str, torch.Tensor]) -> SnapshotFM:
        """The loader's ``build``: the served model and its input transform, from the manifest."""
        schema = parse_schema(info.manifest["schema"], str(info.path))
        moments = info.manifest.get("numeric_moments", {})
        return cls(
            info,
            build_served_model(info, state),
            schema,
            tuple(info.manifest["tasks"]),
            tuple(info.manifest.get("domains", [])),
            CausalNormalizer.frozen(schema.numeric, moments),
        )

    @torch.no_grad()
    def predict(self, impressions: Sequence[ImpressionRef]) -> dict[str, np.ndarray]:
        """``{task: [B] probability}`` for the impressions (``(source, row)``, features in the partition format)."""
        rows = [JoinedExample(ref_request_id(ref), 0, {}, 0, *ref) for ref in impressions]
        table = examples_table(rows, self.schema, partition_arrow_schema(self.schema))
        batch = decode_table(table, self.schema, self.domains, self.normalizer)
        logits = self.model(batch, heads=list(self.tasks))
        return {task: torch.sigmoid(logits[task]).float().numpy() for task in self.tasks}


@dataclass(frozen=True)
class _Predictions:
    """One FM call's output, kept as an array: an example's :class:`Supervision` is made when it is emitted
    (on the worker's thread), so the FM thread spends its time on the model alone."""

    rows: dict[str, int]  # request id -> row of ``probabilities``
    tasks: tuple[str, ...]
    probabilities: np.ndarray  # [B, T]
    snapshot_id: str
    trained_through_us: int

    def supervision(self, request_id: str) -> Supervision:
        values = self.probabilities[self.rows[request_id]].tolist()
        return Supervision(dict(zip(self.tasks, values, strict=True)), self.snapshot_id, self.trained_through_us)


@dataclass
class _Job:
    """One batch of impressions sent to the FM, and when emission stops waiting for it."""

    future: Future
    deadline: float


class Supervisor:
    """Batches new impressions to the FM in a background thread; see the module docstring.

    Args:
        current_fm: returns the snapshot to use now (the loader's current one), or None.
        latency_budget_s: how long after submission an example's emission may wait for its inference.
        max_batch: impressions per FM call.
        max_queued_rows: flow control (:meth:`has_capacity`); default two batches, the one running
            and the next, so that a queued batch does not wait past the budget behind a long queue.
        clock: wall-clock seconds (injectable for tests).
    """

    def __init__(
        self,
        current_fm: Callable[[], SnapshotFM | None],
        latency_budget_s: float = 1.0,
        max_batch: int = 4096,
        max_queued_rows: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.current_fm = current_fm
        self.latency_budget_s = latency_budget_s
        self.max_batch = max_batch
        self.max_queued_rows = 2 * max_batch if max_queued_rows is None else max_queued_rows
        self._queued_rows = 0  # sent to the FM, not finished
        self._buffer: list[tuple[ImpressionRef, float]] = []  # (impression, submitted at), not sent yet
        self._buffered: set[str] = set()
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._jobs: dict[str, _Job] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="das-fm")
        self._lock = threading.Lock()

    def submit(self, impressions: Sequence[ImpressionRef]) -> None:
        """Queue new impressions (``(source, row)``, as the joiner accepted them) for inference.

        Dynamic batching: they are sent to the FM in batches of ``max_batch``, or at once while the
        FM is idle, or when one of their examples closes (:meth:`take_ready`).
        """
        now = self.clock()
        for ref in impressions:
            self._buffer.append((ref, now))
            self._buffered.add(ref_request_id(ref))
        self.dispatch()

    def dispatch(self, force: bool = False) -> None:
        """Send buffered impressions to the FM: full batches, or everything if the FM is idle or ``force``."""
        while self._buffer and (force or len(self._buffer) >= self.max_batch or self._queued_rows == 0):
            chunk = self._buffer[: self.max_batch]
            del self._buffer[: self.max_batch]
            refs = [ref for ref, _ in chunk]
            deadline = chunk[0][1] + self.latency_budget_s  # the oldest impression's
            with self._lock:
                self._queued_rows += len(refs)
            job = _Job(self._pool.submit(self._infer, refs, deadline), deadline)
            for ref in refs:
                request_id = ref_request_id(ref)
                self._jobs[request_id] = job
                self._buffered.discard(request_id)

    def attach(self, examples: Sequence[JoinedExample]) -> list[JoinedExample]:
        """All examples, each with its supervision, waiting for each inference at most to its deadline."""
        ready, waiting = self.take_ready(examples)
        while waiting:
            self.wait(waiting)
            more, waiting = self.take_ready(waiting)
            ready += more
        return ready

    def take_ready(self, examples: Sequence[JoinedExample]) -> tuple[list[JoinedExample], list[JoinedExample]]:
        """Split closed examples without blocking: ``(ready, waiting)``.

        Ready: with supervision (its inference finished), or without (no inference was asked, it
        failed, no snapshot, or its deadline passed). Waiting: its inference runs, within budget.
        """
        if any(example.request_id in self._buffered for example in examples):
            self.dispatch(force=True)  # a closed example's impression is still buffered: send it now
        now = self.clock()
        outcomes: dict[int, _Predictions | str | None] = {}  # per job; None = still running
        ready, waiting = [], []
        for example in examples:
            job = self._jobs.get(example.request_id)
            if job is None:
                ready.append(example)
                continue
            if id(job) not in outcomes:
                outcomes[id(job)] = self._outcome(job, now)
            outcome = outcomes[id(job)]
            if outcome is None:
                waiting.append(example)
                continue
            del self._jobs[example.request_id]
            if isinstance(outcome, str):
                self.counters[outcome] += 1
                ready.append(example)
            else:
                self.counters["supervised"] += 1
                ready.append(
                    JoinedExample(
                        example.request_id,
                        example.time_us,
                        example.labels,
                        example.close_us,
                        example.source,
                        example.row,
                        outcome.supervision(example.request_id),
                    )
                )
        self.counters["emitted"] += len(ready)
        return ready, waiting

    def wait(self, examples: Sequence[JoinedExample], timeout_s: float | None = None) -> None:
        """Block until an inference of these examples finishes or the first deadline passes."""
        jobs = {id(job): job for job in (self._jobs.get(e.request_id) for e in examples) if job is not None}
        if not jobs:
            return
        deadline = min(job.deadline for job in jobs.values()) - self.clock()
        timeout = max(deadline, 0.0) if timeout_s is None else min(max(deadline, 0.0), timeout_s)
        wait_for([job.future for job in jobs.values()], timeout=timeout, return_when=FIRST_COMPLETED)

    def forget(self, request_ids: Sequence[str]) -> None:
        """Stop waiting for requests whose examples will not be emitted by this worker."""
        forgotten = set(request_ids)
        for request_id in forgotten:
            self._jobs.pop(request_id, None)
        self._buffer = [(ref, at) for ref, at in self._buffer if ref_request_id(ref) not in forgotten]
        self._buffered -= forgotten

    def close(self) -> None:
        """Stop the inference thread without waiting for a running FM call."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _outcome(job: _Job, now: float) -> _Predictions | str | None:
        """The job's predictions, the counter of why there are none, or None if it runs within budget."""
        if not job.future.done():
            return "unsupervised_timeout" if now >= job.deadline else None
        if job.future.exception() is not None:
            return "unsupervised_error"
        return job.future.result() or "unsupervised_no_snapshot"  # predictions, a counter name, or None

    def has_capacity(self) -> bool:
        """Whether fewer than ``max_queued_rows`` impressions wait for (buffered or sent) or are in inference.

        The worker reads no new log entries while this is False (flow control: a replay as fast
        as possible then runs at the FM's speed instead of outrunning it); what it has read
        still closes and is emitted on time.
        """
        return self._queued_rows + len(self._buffer) < self.max_queued_rows

    def _infer(self, impressions: list[ImpressionRef], deadline: float) -> _Predictions | str | None:
        try:
            if self.clock() >= deadline:  # its examples are emitted without it: do not spend the FM on it
                return "unsupervised_timeout"
            fm = self.current_fm()
            if fm is None:
                return None
            with self._lock:
                self.counters["fm_calls"] += 1
                self.counters["fm_rows"] += len(impressions)
            started = time.perf_counter()
            try:
                return self._predict(fm, impressions)
            finally:
                with self._lock:  # the FM's busy time: fm_rows / fm_seconds is its speed inside the worker
                    self.counters["fm_seconds"] += time.perf_counter() - started
        finally:
            with self._lock:
                self._queued_rows -= len(impressions)

    @staticmethod
    def _predict(fm: SnapshotFM, impressions: list[ImpressionRef]) -> _Predictions:
        probabilities = fm.predict(impressions)
        tasks = tuple(probabilities)
        return _Predictions(
            {ref_request_id(ref): row for row, ref in enumerate(impressions)},
            tasks,
            np.stack([probabilities[task] for task in tasks], axis=1),
            fm.info.snapshot_id,
            fm.info.train_through_us,
        )
