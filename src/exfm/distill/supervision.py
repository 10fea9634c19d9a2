"""Batch supervision logging: a teacher's predictions written next to a dataset's rows.

The offline precursor of the Data Augmentation Service (DESIGN.md §4): for the rows of the
chosen days, a teacher (the foundation model, or an oracle with a known bias) predicts every
task, and the predictions are logged as columns of a **new** dataset in the same format::

    fm:<task>              float32   the teacher's probability for the task (null = no supervision)
    fm_snapshot            string    id of the teacher snapshot that produced the row's predictions
    fm_trained_through_us  int64     the snapshot's train-through time (µs, UTC)

so that staleness is measurable per example: ``staleness = _time - fm_trained_through_us``.
Rows of the other days keep what they had (null columns where they had none). The reader decodes
``fm:<task>`` into ``batch.fm_predictions`` (NaN where null) with ``with_fm_predictions=True``.

Teachers (:class:`Teacher`):

* :class:`RunTeacher`: a trained exfm run at one checkpoint; ``p = σ(h_s(x))`` of its serving
  heads, NaN for the tasks it lacks.
* :class:`OracleTeacher`: the synthetic stream's stored true probabilities under a known bias,
  ``p_fm = σ(logit(p)/τ + s + s_d + σ_ε·ε)`` (temperature τ, shift s, per-domain shift s_d,
  Gaussian logit noise), for controlled experiments.
* :class:`StaleOracleTeacher`: the same, but the true probability function frozen at an earlier
  time t₀ (rebuilt from the synthetic world: the oracle of an FM that stopped learning at t₀).

Row alignment: predictions come from a :class:`~exfm.data.reader.StreamReader` over the
supervised days (the reader's order is the files' order), and every file's ``_time`` column is
checked against the reader's ``time_us`` before its columns are appended.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from exfm.data.batch import Batch
from exfm.data.dataset import (
    DOMAIN_COLUMN,
    TIME_COLUMN,
    US_PER_S,
    Dataset,
    DatasetError,
    Manifest,
    atomic_output_dir,
    build_manifest,
    open_dataset,
    trained_through_us,
    write_day,
    write_manifest,
)
from exfm.data.hashing import bucketize, stable_hash
from exfm.data.reader import StreamReader, fm_prediction_column
from exfm.data.synth import (
    ACTIVITY_LOG_MEAN,
    ACTIVITY_LOG_STD,
    CLICK_TREND,
    DOMAIN_INTEREST,
    DOMAIN_TREND,
    DOMAINS,
    LIKE_BIAS,
    LIKE_DOMAIN,
    N_CATEGORIES,
    N_CLUSTERS,
    SECONDS_PER_DAY,
    TASKS,
    _day_start_s,
    _World,
)
from exfm.train.run_dir import open_run

__all__ = [
    "FM_SNAPSHOT_COLUMN",
    "FM_TRAINED_THROUGH_COLUMN",
    "OracleTeacher",
    "RunTeacher",
    "StaleOracleTeacher",
    "Teacher",
    "log_supervision",
    "supervision_columns",
    "supervision_fields",
]

FM_SNAPSHOT_COLUMN = "fm_snapshot"
FM_TRAINED_THROUGH_COLUMN = "fm_trained_through_us"
_PROB_EPS = 1e-7


class Teacher(Protocol):
    """What :func:`log_supervision` needs from a teacher.

    Attributes:
        snapshot_id: identifies the model state that predicts (logged per row).
        trained_through_us: its train-through time (µs, UTC); None for a teacher that is current at
            every row (an oracle of the present): the row's own time is logged, i.e. staleness 0.
        passthrough: passthrough (or raw numeric) columns the teacher reads from
            ``batch.passthrough``.
    """

    snapshot_id: str
    trained_through_us: int | None
    passthrough: Sequence[str]

    def bind(self, dataset: Dataset) -> None:
        """Prepare for batches of ``dataset`` (its schema's tasks and features, its domain list)."""

    def predict(self, batch: Batch) -> torch.Tensor:
        """``[B, T_schema]`` float32 probabilities in the bound schema's task order, NaN = no prediction."""


def supervision_columns(tasks: Sequence[str]) -> list[str]:
    """The columns :func:`log_supervision` adds: ``fm:<task>`` per task, snapshot id, train-through time."""
    return [*(fm_prediction_column(t) for t in tasks), FM_SNAPSHOT_COLUMN, FM_TRAINED_THROUGH_COLUMN]


def _logit(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` with p clipped to ``[1e-7, 1 - 1e-7]`` (float64)."""
    p = np.clip(np.asarray(p, dtype=np.float64), _PROB_EPS, 1.0 - _PROB_EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# --- teachers ------------------------------------------------------------------------------------
class RunTeacher:
    """A trained exfm run as teacher: ``p_t = σ(h_t(backbone(x)))`` of its serving heads.

    Only the served part of the model is loaded (backbone and serving heads; training-only
    distillation heads in the checkpoint are ignored). Tasks of the bound dataset that the model
    has no serving head for are NaN.

    Args:
        run_dir: a run directory (``config.yaml`` + ``checkpoints/``).
        checkpoint: the checkpoint name (``day-04``, ``last``, ...).
        device: where the model runs.

    Attributes:
        snapshot_id: ``<run name>/<checkpoint>@<first 12 hex digits of the checkpoint's sha256>``.
        trained_through_us: the ``_time`` of the last example the checkpoint was trained on.
    """

    passthrough: Sequence[str] = ()

    def __init__(self, run_dir: str | Path, checkpoint: str = "day-04", device: str = "cpu"):
        saved = open_run(run_dir, checkpoint, device=device)
        self.model, _ = saved.served_model()
        self.tasks = saved.tasks
        self.schema = saved.dataset.schema
        self.device = device
        digest = hashlib.sha256(saved.path.read_bytes()).hexdigest()
        self.snapshot_id = f"{saved.run.root.resolve().name}/{checkpoint}@{digest[:12]}"
        day, batch = saved.state["position"]
        rows = batch * saved.config.batch_size
        self.trained_through_us: int | None = trained_through_us(saved.dataset, day, rows)
        self._columns: list[int | None] = []

    def bind(self, dataset: Dataset) -> None:
        """Check that the dataset has the run's features; map its tasks to the model's serving heads.

        Raises:
            DatasetError: the dataset's features (names, types, buckets, order) differ from the run's.
        """
        if dataset.schema.features != self.schema.features:
            raise DatasetError(f"{dataset.root}: its features differ from those the teacher {self.snapshot_id} uses")
        self._columns = [self.tasks.index(t) if t in self.tasks else None for t in dataset.schema.tasks]

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch.to(self.device), heads=self.tasks)
        probs = torch.sigmoid(torch.stack([logits[t] for t in self.tasks], dim=1)).float().cpu()
        nan = torch.full((batch.size,), math.nan)
        return torch.stack([nan if c is None else probs[:, c] for c in self._columns], dim=1)


class OracleTeacher:
    """The synthetic stream's true probabilities under a known bias, for controlled experiments.

    For each task t with a stored true probability ``p_t`` (passthrough column ``p_<task>``)::

        p_fm,t = σ( logit(p_t) / τ + s + s_d + σ_ε · ε ),    ε ~ N(0, 1) per row and task

    with temperature τ (``temperature``; τ > 1 flattens, τ < 1 sharpens), a global logit shift s
    (``shift``), a per-domain logit shift ``s_d`` (``domain_shift[d]``, 0 for unnamed domains) and
    logit noise σ_ε (``noise``). ε is drawn from ``default_rng([seed, day, batch index])``, so it is
    reproducible for a given batch size. τ = 1, s = s_d = σ_ε = 0 gives the truth itself. Tasks
    without a ``p_<task>`` column are NaN. The oracle is current at every row (no staleness).

    Args:
        shift: s.
        temperature: τ (> 0).
        domain_shift: ``{domain value: s_d}``.
        noise: σ_ε ≥ 0.
        seed: the noise seed.
    """

    def __init__(
        self,
        shift: float = 0.0,
        temperature: float = 1.0,
        domain_shift: Mapping[str, float] | None = None,
        noise: float = 0.0,
        seed: int = 0,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if noise < 0:
            raise ValueError(f"noise must be non-negative, got {noise}")
        self.shift, self.temperature, self.noise, self.seed = shift, temperature, noise, seed
        self.domain_shift = dict(domain_shift or {})
        parts = [f"shift={shift:g}", f"temperature={temperature:g}", f"noise={noise:g}"]
        parts += [f"{name}={value:g}" for name, value in sorted(self.domain_shift.items())]
        self.snapshot_id = f"{self._kind()}({', '.join(parts)}, seed={seed})"
        self.trained_through_us: int | None = None
        self.passthrough: list[str] = []
        self._tasks: list[str] = []
        self._domain_shift = np.zeros(0)

    def _kind(self) -> str:
        return "oracle"

    def bind(self, dataset: Dataset) -> None:
        """Find the ``p_<task>`` columns and index the domain shifts by the dataset's domain codes."""
        self._tasks = list(dataset.schema.tasks)
        self.passthrough = [f"p_{t}" for t in self._tasks if f"p_{t}" in dataset.schema.passthrough]
        if not self.passthrough:
            raise DatasetError(f"{dataset.root}: no passthrough column p_<task> holds a true probability")
        unknown = sorted(set(self.domain_shift) - set(dataset.manifest.domains))
        if unknown:
            raise DatasetError(f"{dataset.root}: domain_shift names unknown domains {unknown}")
        self._domain_shift = np.array([self.domain_shift.get(d, 0.0) for d in dataset.manifest.domains] + [0.0])

    def true_logits(self, batch: Batch) -> dict[str, np.ndarray]:
        """``{task: [B] float64}``: the logit of the true probability of each task that has one."""
        return {name[2:]: _logit(batch.passthrough[name].numpy()) for name in self.passthrough}

    def predict(self, batch: Batch) -> torch.Tensor:
        """``[B, T_schema]``: ``σ(logit(p)/τ + s + s_d + σ_ε·ε)`` per task, NaN without a true probability."""
        logits = self.true_logits(batch)
        offset = self.shift + self._domain_shift[batch.domain.numpy()]  # code -1 reads the trailing 0
        rng = np.random.default_rng([self.seed, batch.day, batch.index_in_day])
        out = np.full((batch.size, len(self._tasks)), np.nan, dtype=np.float32)
        for column, task in enumerate(self._tasks):
            if task in logits:
                z = logits[task] / self.temperature + offset
                if self.noise:
                    z = z + self.noise * rng.standard_normal(batch.size)
                out[:, column] = _sigmoid(z)
        return torch.from_numpy(out)


class StaleOracleTeacher(OracleTeacher):
    """An oracle frozen at time t₀: the synthetic stream's true probability function at t₀.

    The synthetic world (``exfm.data.synth._World``) is rebuilt from the dataset's synth
    parameters (rows, days, seed: read from the manifest's ``sources``). Only the click logit's
    time terms and the drifting interest ``A_t`` depend on time (docs/synthetic.md), so from the
    stored truth at the row's time t::

        η_click(t₀) = η_click(t) + (κ + κ_d)(t₀ - t) + 0.8(1 + α_d)(A_t₀[k, c] - A_t[k, c]) + P_t₀[c] - P_t[c]
        η_like(t₀)  = η_like(t)  + 0.4 (A_t₀[k, c] - A_t[k, c]),   η_like(t) = logit(p_like / p_click)
        η_follow(t₀) = η_follow(t) + 0.3 (A_t₀[k, c] - A_t[k, c])
        p_click(t₀) = σ(η_click(t₀)),  p_like(t₀) = p_click(t₀) σ(η_like(t₀)),  likewise follow

    (cluster k and category c from their collision-free buckets). The bias of
    :class:`OracleTeacher` is then applied to these logits. On binding, the rebuilt world is checked
    against the data: ``η_like(t)`` recomputed from the world and the raw ``item_quality`` and
    ``user_activity`` of the first rows must equal the stored one.

    Args:
        frozen_at_day: t₀ in days since the stream's start (e.g. 2.0 = the end of day 2).
        shift, temperature, domain_shift, noise, seed: the bias, as in :class:`OracleTeacher`.
    """

    def __init__(
        self,
        frozen_at_day: float,
        shift: float = 0.0,
        temperature: float = 1.0,
        domain_shift: Mapping[str, float] | None = None,
        noise: float = 0.0,
        seed: int = 0,
    ):
        self.frozen_at_day = float(frozen_at_day)
        super().__init__(shift, temperature, domain_shift, noise, seed)
        self.trained_through_us = round((_day_start_s(1) + self.frozen_at_day * SECONDS_PER_DAY) * US_PER_S)
        self._world: _World | None = None
        self._domain_codes = np.zeros(0, dtype=np.int64)
        self._cluster_of_bucket = self._category_of_bucket = np.zeros(0, dtype=np.int64)

    def _kind(self) -> str:
        return f"stale_oracle(t0={self.frozen_at_day:g}d)"

    def bind(self, dataset: Dataset) -> None:
        super().bind(dataset)
        if set(self.passthrough) != {"p_click", "p_like", "p_follow"}:
            raise DatasetError(f"{dataset.root}: not a synthetic stream (needs p_click, p_like, p_follow)")
        rows, days, seed = _synth_parameters(dataset.manifest, dataset.root)
        self._world = _World.draw(np.random.default_rng(np.random.SeedSequence(seed).spawn(days + 1)[0]), rows, days)
        self._domain_codes = np.array([DOMAINS.index(d) for d in dataset.manifest.domains], dtype=np.int64)
        schema = dataset.schema
        self._cluster_of_bucket = _inverse_buckets(N_CLUSTERS, schema.feature("user_cluster").buckets)
        self._category_of_bucket = _inverse_buckets(N_CATEGORIES, schema.feature("item_category").buckets)
        self._check_world(dataset)

    def true_logits(self, batch: Batch) -> dict[str, np.ndarray]:
        """``{task: [B]}``: the logits of the true probabilities at t₀ (see the class docstring)."""
        world = self._world
        if world is None:
            raise RuntimeError("StaleOracleTeacher.predict before bind(dataset)")
        ids = batch.sparse.single_ids()
        keys = batch.sparse.keys
        cluster = self._cluster_of_bucket[ids[:, keys.index("user_cluster")].numpy()]
        category = self._category_of_bucket[ids[:, keys.index("item_category")].numpy()]
        domain = self._domain_codes[batch.domain.numpy()]
        t = (batch.time_us.numpy() / US_PER_S - _day_start_s(1)) / SECONDS_PER_DAY
        p_click, p_like, p_follow = (batch.passthrough[f"p_{task}"].numpy().astype(np.float64) for task in TASKS)
        click, like, follow = _logit(p_click), _logit(p_like / p_click), _logit(p_follow / p_click)
        t0 = self.frozen_at_day
        interest_change = world.interest(cluster, t0, category) - world.interest(cluster, t, category)
        click = (
            click
            + (CLICK_TREND + DOMAIN_TREND[domain]) * (t0 - t)
            + 0.8 * (1.0 + DOMAIN_INTEREST[domain]) * interest_change
            + world.popularity(t0, category)
            - world.popularity(t, category)
        )
        stale_click = _sigmoid(click)
        like = stale_click * _sigmoid(like + 0.4 * interest_change)
        follow = stale_click * _sigmoid(follow + 0.3 * interest_change)
        return {"click": click, "like": _logit(like), "follow": _logit(follow)}

    def _check_world(self, dataset: Dataset) -> None:
        """Raise unless the rebuilt world reproduces the stored like logit of the first rows.

        ``η_like = -1.9 + γ_d + 0.6 q + 0.4 A_t[k, c] + 0.2 z(a)`` from the raw partition columns
        (a wrong world misses by O(1); float32 storage by < 1e-4).
        """
        world = self._world
        info = next(d for d in dataset.manifest.days if d.rows)
        columns = [TIME_COLUMN, DOMAIN_COLUMN, "user_cluster", "item_category", "item_quality", "user_activity"]
        table = pq.ParquetFile(dataset.day_files(info.day)[0]).read_row_group(
            0, columns=[*columns, "p_click", "p_like"]
        )
        cluster = _ids_of_hashes(table.column("user_cluster").to_numpy(), N_CLUSTERS)
        category = _ids_of_hashes(table.column("item_category").to_numpy(), N_CATEGORIES)
        domain = np.array([DOMAINS.index(d) for d in table.column(DOMAIN_COLUMN).to_pylist()])
        t = (table.column(TIME_COLUMN).to_numpy() / US_PER_S - _day_start_s(1)) / SECONDS_PER_DAY
        z_activity = (np.log1p(table.column("user_activity").to_numpy()) - ACTIVITY_LOG_MEAN) / ACTIVITY_LOG_STD
        expected = (
            LIKE_BIAS
            + LIKE_DOMAIN[domain]
            + 0.6 * table.column("item_quality").to_numpy().astype(np.float64)
            + 0.4 * world.interest(cluster, t, category)
            + 0.2 * z_activity
        )
        stored = _logit(table.column("p_like").to_numpy().astype(np.float64) / table.column("p_click").to_numpy())
        error = float(np.max(np.abs(expected - stored)))
        if error > 1e-3:
            raise DatasetError(
                f"{dataset.root}: the synthetic world rebuilt from its sources does not reproduce the data "
                f"(like logit off by {error:.3g})"
            )


def _ids_of_hashes(hashes: np.ndarray, size: int) -> np.ndarray:
    """The ids ``0..size-1`` whose stable hashes are ``hashes`` (each must be one of them)."""
    known = stable_hash(np.arange(size))
    order = np.argsort(known)
    position = np.searchsorted(known[order], hashes)
    ids = order[np.minimum(position, size - 1)]
    if not np.array_equal(known[ids], hashes):
        raise DatasetError(f"hashes that are not of ids 0..{size - 1}")
    return ids


def _inverse_buckets(size: int, buckets: int) -> np.ndarray:
    """``[buckets]``: the id ``0..size-1`` whose stored hash falls in each bucket (-1 for none)."""
    bucket = bucketize(torch.from_numpy(stable_hash(np.arange(size))), buckets).numpy()
    if len(np.unique(bucket)) != size:
        raise DatasetError(f"{size} ids share buckets among {buckets}: the id is not recoverable")
    inverse = np.full(buckets, -1, dtype=np.int64)
    inverse[bucket] = np.arange(size)
    return inverse


_SYNTH_SOURCE = re.compile(r"exfm synth --rows (\d+) --days (\d+) --seed (\d+)")


def _synth_parameters(manifest: Manifest, root: Path) -> tuple[int, int, int]:
    """``(rows, days, seed)`` of a synthetic stream, from its manifest's ``sources``."""
    for source in manifest.sources:
        match = _SYNTH_SOURCE.fullmatch(source)
        if match:
            rows, days, seed = (int(g) for g in match.groups())
            return rows, days, seed
    raise DatasetError(f"{root}: not written by exfm synth (no 'exfm synth --rows R --days D --seed S' source)")


# --- logging ---------------------------------------------------------------------------------------
def log_supervision(
    dataset_dir: str | Path,
    out_dir: str | Path,
    teacher: Teacher,
    days: Iterable[int],
    *,
    batch_size: int = 4096,
    overwrite: bool = False,
) -> Manifest:
    """Write a copy of a dataset whose rows of ``days`` carry the teacher's predictions.

    Every partition of the output has the columns of the input plus :func:`supervision_columns`
    for the schema's tasks. Rows of ``days`` get the teacher's probabilities (null where it
    predicts NaN), its ``snapshot_id`` and its ``trained_through_us`` (the row's ``_time`` for a
    teacher with None); any earlier supervision columns of those rows are replaced. Rows of other
    days keep their columns (null supervision columns where they had none). The output is written
    under a temporary name and renamed into place (:func:`~exfm.data.dataset.atomic_output_dir`).

    Args:
        dataset_dir: the input dataset.
        out_dir: the new dataset (must differ from the input).
        teacher: what predicts (:class:`Teacher`); bound to the input dataset first.
        days: the days to supervise.
        batch_size: rows per teacher call. The reader's causal normaliser updates per batch, so a
            model teacher sees the dense features a trainer with this batch size would see.
        overwrite: replace ``out_dir`` if it exists.

    Returns:
        The new dataset's manifest (the input's days, rows and statistics; a source line added).

    Raises:
        DatasetError: an unknown day, an input that is not a dataset, or rows that do not align.
        ValueError: ``out_dir`` is the input.
    """
    dataset = open_dataset(dataset_dir)
    if Path(out_dir).resolve() == dataset.root.resolve():
        raise ValueError(f"{out_dir}: the output must be a new directory, not the input dataset")
    supervised = sorted(set(days))
    for day in supervised:
        dataset.day(day)  # raises for an unknown day
    teacher.bind(dataset)
    tasks = dataset.schema.tasks
    reader = StreamReader(dataset, supervised, batch_size, passthrough=teacher.passthrough, prefetch=2)
    batches = iter(reader)
    entries = []
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        for info in dataset.manifest.days:
            day = _day_supervision(batches, info.rows, teacher, tasks) if info.day in supervised else None
            files, start = [], 0
            for part, path in enumerate(dataset.day_files(info.day)):
                table = pq.read_table(path)
                if day is None:
                    table = _with_null_supervision(table, tasks)
                else:
                    table = _with_supervision(table, day, start, tasks, path)
                start += table.num_rows
                files.append(write_day(staging, info.day, table, part))
            if day is not None and start != len(day.time_us):
                raise DatasetError(
                    f"{dataset.root}: day {info.day} has {start} rows, the reader gave {len(day.time_us)}"
                )
            summary = info.model_dump(include={"rows", "domains", "label_rates", "numeric_moments"})
            entries.append((info.day, info.start_us, info.end_us, files, summary))
        source = f"exfm supervise --days {','.join(map(str, supervised))} --teacher {teacher.snapshot_id}"
        manifest = build_manifest(
            dataset.schema,
            "log_supervision",
            entries,
            dropped_out_of_range=dataset.manifest.dropped_out_of_range,
            rejected_rows=dataset.manifest.rejected_rows,
            sources=[*dataset.manifest.sources, source],
        )
        write_manifest(staging, dataset.schema, manifest)
    return manifest


class _DaySupervision(NamedTuple):
    """A teacher's output for one day's rows, in the reader's order."""

    time_us: np.ndarray  # [N] int64, the rows' _time
    probs: np.ndarray  # [N, T] float32, NaN = no prediction
    trained_through_us: np.ndarray  # [N] int64
    snapshot_id: str


def _day_supervision(batches: Iterator[Batch], rows: int, teacher: Teacher, tasks: Sequence[str]) -> _DaySupervision:
    """Run the teacher on the next ``rows`` rows of the stream (one day: batches never span two)."""
    times, probs, through = [], [], []
    seen = 0
    while seen < rows:
        batch = next(batches)
        prediction = teacher.predict(batch)
        if prediction.shape != (batch.size, len(tasks)):
            raise ValueError(
                f"teacher {teacher.snapshot_id}: predicted {tuple(prediction.shape)}, "
                f"expected {(batch.size, len(tasks))}"
            )
        time_us = batch.time_us.cpu().numpy()
        times.append(time_us)
        probs.append(prediction.numpy().astype(np.float32, copy=False))
        through.append(
            time_us if teacher.trained_through_us is None else np.full(batch.size, teacher.trained_through_us)
        )
        seen += batch.size
    return _DaySupervision(
        np.concatenate(times), np.concatenate(probs), np.concatenate(through).astype(np.int64), teacher.snapshot_id
    )


def _with_null_supervision(table: pa.Table, tasks: Sequence[str]) -> pa.Table:
    """Add the supervision columns a partition lacks, all null."""
    for name, kind in supervision_fields(tasks):
        if name not in table.column_names:
            table = table.append_column(pa.field(name, kind), pa.nulls(table.num_rows, kind))
    return table


def _with_supervision(table: pa.Table, day: _DaySupervision, start: int, tasks: Sequence[str], path: Path) -> pa.Table:
    """Set the supervision columns of one file from rows ``[start, start + n)`` of its day's predictions.

    Raises:
        DatasetError: the file's ``_time`` column differs from the reader's times for those rows.
    """
    n = table.num_rows
    if not np.array_equal(table.column(TIME_COLUMN).to_numpy(), day.time_us[start : start + n]):
        raise DatasetError(f"{path}: rows do not align with the reader's (the _time columns differ)")
    table = table.drop_columns([c for c in supervision_columns(tasks) if c in table.column_names])
    probs = day.probs[start : start + n]
    values = [pa.array(probs[:, i], pa.float32(), mask=np.isnan(probs[:, i])) for i in range(len(tasks))]
    values.append(pa.repeat(pa.scalar(day.snapshot_id, pa.string()), n))
    values.append(pa.array(day.trained_through_us[start : start + n], pa.int64()))
    for (name, kind), array in zip(supervision_fields(tasks), values, strict=True):
        table = table.append_column(pa.field(name, kind), array)
    return table


def supervision_fields(tasks: Sequence[str]) -> list[tuple[str, pa.DataType]]:
    """``(name, Arrow type)`` of the supervision columns (:func:`supervision_columns`)."""
    kinds = [pa.float32()] * len(tasks) + [pa.string(), pa.int64()]
    return list(zip(supervision_columns(tasks), kinds, strict=True))
