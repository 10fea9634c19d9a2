"""``exfm reproduce``: the paper's rolling protocol (DESIGN.md §2) with caching and resume.

For each teacher (FM) of ``fms``:

1. **FM**: one one-pass run over days ``1 .. N-1`` (N = the dataset's last day) that keeps a
   checkpoint at every day end. The FM never sees a VM, so this single run *is* the paper's
   "FM on days 1–4, then the FM trains on day t after the VM": its ``day-(t-1)`` checkpoint is
   exactly the FM trained through day t−1.
2. **DAS**: for t = F+1 .. N (F = ``fm_days``, default 4) the ``day-(t-1)`` checkpoint is published
   as a snapshot, day t is replayed into an embedded (SQLite) DAS deployment, and a worker joins it
   and logs the snapshot's predictions into the deployment's shared store. Before a day counts as
   done the store is checked: every row of the day is there, and every row's supervision came from
   a snapshot trained strictly before the day began (no look-ahead). ``fm_updates: frozen`` (the
   freshness study) publishes ``day-F`` for every day instead.
3. **VM**: each student × method × seed (× domain or task for the multi-domain and multi-task
   studies, × GS/LS/LW for the sweep) trains one pass over the store's days F+1 .. N-1 and its
   ``day-t`` checkpoint is evaluated on store day t+1 (AUC, LogLoss, NE, calibration; overall and
   per domain). Its progressive NE over the stream is kept as a curve.

Everything is cached under ``RUN`` by what determines it, so a unit shared by several studies runs
once, and an interrupted run resumes: finished units are skipped (their ``*.json`` is written last,
atomically), a training run that was cut off resumes from its last checkpoint (bit-identical
stream position), and a DAS day is replayed again into the same log, where exact resends are
no-ops and the store keeps each request id once::

    RUN/config.json                                  the settings (data path fixed for the RUN)
    RUN/fm/<fm>/run/                                 the FM's training run (day-NN checkpoints)
    RUN/fm/<fm>/staleness.json                       the FM's own next-day metrics (staleness study)
    RUN/das/<fm>-<daily|frozen>[-warmup]/{das.yaml,state,spd,shared,days.json}
    RUN/vm/<unit key>/run/ and rows.json             one student run (checkpoints deleted once evaluated,
                                                     unless keep_vm_checkpoints) and its evaluated rows
    RUN/results.json                                 rows + curves + supervision (exfm report reads it)

With ``vm_warmup`` (off by default, as in the paper) each VM first trains days 1..F on labels
alone: a second store per teacher also holds days 1..F, logged by DAS without an FM.

Decisions: seeds vary the VM's initialisation only (the FM and its logged supervision are shared
by all seeds); ``none`` trains on the same store (same rows, same order) as the methods it is
compared with; the DAS log has one partition, so the store's row order, and with it every result,
is the same in every run.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exfm.das.events import replay_into
from exfm.das.snapshots import SnapshotInfo, list_snapshots, publish_snapshot
from exfm.das.worker import DASConfig, Worker, open_backends
from exfm.data.dataset import US_PER_S, Dataset, atomic_write_text, open_dataset
from exfm.distill.supervision import FM_TRAINED_THROUGH_COLUMN
from exfm.experiments.report import FORMAT, METHODS, METRICS
from exfm.experiments.zoo import synthetic_zoo
from exfm.schema import format_validation_error
from exfm.train.config import ConfigError, parse_train_config
from exfm.train.metrics import ALL, MetricSet
from exfm.train.run_dir import RunDirectory
from exfm.train.trainer import evaluate_checkpoint, train

STUDIES = ("main", "multi_domain", "multi_task", "freshness", "staleness", "sweep")
Study = Literal["main", "multi_domain", "multi_task", "freshness", "staleness", "sweep"]
Method = Literal["none", "kd", "ah", "ah_sa"]
FmUpdates = Literal["daily", "frozen"]

LABEL_WINDOW_S = 6 * 3600.0
"""DAS label window of every task. Replayed labels arrive 1 s after their impression, so any window
joins them all; a long one lets replay batches span half of it (few, large log entries)."""


class SweepGrid(BaseModel):
    """The GS / LS / LW values of the sweep study (AH only; every combination is one VM run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gs: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    ls: list[float] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
    lw: list[float] = Field(default_factory=lambda: [1.0], min_length=1)


class ReproduceConfig(BaseModel):
    """What ``exfm reproduce`` runs. Model names are those of :func:`~exfm.experiments.zoo.synthetic_zoo`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path
    dataset: str = Field("", description="name in the result rows; default: the data directory's name")
    fms: list[str] = Field(default_factory=lambda: ["dcnv2"], min_length=1)
    vms: list[str] = Field(default_factory=lambda: ["fm"], min_length=1)
    methods: list[Method] = Field(default_factory=lambda: list(METHODS), min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    studies: list[Study] = Field(default_factory=lambda: ["main", "freshness", "staleness"], min_length=1)
    fm_days: int = Field(4, ge=1, description="F: the FM alone trains days 1..F; VMs train F+1..N-1")
    multitask_fm: str = Field("multitask(dcnv2)", description="the teacher of the multi-task study")
    vm_warmup: bool = Field(False, description="VMs first train days 1..F on labels alone (no FM); off in the paper")
    keep_vm_checkpoints: bool = Field(
        False, description="keep each VM run's checkpoints once it is evaluated (default: deleted, 0.1-0.4 GB per run)"
    )
    sweep: SweepGrid = SweepGrid()
    device: str = "cpu"

    @model_validator(mode="after")
    def _named(self) -> ReproduceConfig:
        if not self.dataset:
            object.__setattr__(self, "dataset", Path(self.data).name)
        return self


def parse_reproduce_config(data: object, origin: str = "exfm reproduce") -> ReproduceConfig:
    """Validate the settings; a bad one raises :class:`~exfm.train.config.ConfigError` naming the field."""
    try:
        return ReproduceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


@dataclass(frozen=True)
class VMUnit:
    """One student run: everything that determines it (and so its cache key)."""

    fm: str
    fm_updates: FmUpdates
    vm: str
    method: Method
    seed: int
    domain: str | None = None
    task: str | None = None
    gs: float = 1.0
    ls: float = 1.0
    lw: float = 1.0
    warmup: bool = False

    @property
    def key(self) -> str:
        """A readable, unique directory name under ``RUN/vm``."""
        parts = ["warmup"] if self.warmup else []
        parts += [slug(self.fm), self.fm_updates, slug(self.vm), self.method]
        if self.method in ("kd", "ah", "ah_sa"):
            parts.append(f"gs{self.gs:g}-ls{self.ls:g}-lw{self.lw:g}")
        parts += [f"domain-{slug(self.domain)}" if self.domain else "all-domains", self.task or "all-tasks"]
        return "/".join([*parts, f"seed{self.seed}"])


@dataclass(frozen=True)
class PlannedRun:
    """A unit as one study sees it: its rows are tagged ``study`` and ``variant``."""

    study: Study
    variant: str
    unit: VMUnit


def slug(name: str) -> str:
    """A file-name-safe form of a model or domain name (``multitask(dcnv2)`` -> ``multitask_dcnv2``)."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name).strip("_")


def plan(config: ReproduceConfig, dataset: Dataset) -> list[PlannedRun]:
    """Every (study, variant, unit) of the config, in run order (cheap studies first)."""
    fm0, vm0, schema = config.fms[0], config.vms[0], dataset.schema
    runs: list[PlannedRun] = []
    if "main" in config.studies:
        runs += [
            PlannedRun("main", "", VMUnit(fm, "daily", vm, method, seed))
            for fm in config.fms
            for vm in config.vms
            for seed in config.seeds
            for method in config.methods
        ]
    if "freshness" in config.studies:
        runs += [
            PlannedRun(
                "freshness",
                f"fm_updates={updates}",
                VMUnit(fm0, "daily" if method == "none" else updates, vm0, method, seed),
            )
            for updates in ("daily", "frozen")
            for seed in config.seeds
            for method in ("none", "ah", "ah_sa")
        ]
    if "multi_domain" in config.studies:
        runs += [
            PlannedRun("multi_domain", f"vm_domain={domain}", VMUnit(fm0, "daily", vm0, method, seed, domain=domain))
            for domain in dataset.manifest.domains
            for seed in config.seeds
            for method in config.methods
        ]
    if "multi_task" in config.studies:
        if len(schema.tasks) < 2:
            raise ValueError(f"study multi_task needs a dataset with several tasks; {config.data} has {schema.tasks}")
        runs += [
            PlannedRun(
                "multi_task", f"vm_task={task}", VMUnit(config.multitask_fm, "daily", vm0, method, seed, task=task)
            )
            for task in schema.tasks
            for seed in config.seeds
            for method in config.methods
        ]
    if "sweep" in config.studies:
        grid = config.sweep
        runs += [PlannedRun("sweep", "", VMUnit(fm0, "daily", vm0, "none", seed)) for seed in config.seeds]
        runs += [
            PlannedRun(
                "sweep", f"gs={gs:g},ls={ls:g},lw={lw:g}", VMUnit(fm0, "daily", vm0, "ah", seed, gs=gs, ls=ls, lw=lw)
            )
            for gs in grid.gs
            for ls in grid.ls
            for lw in grid.lw
            for seed in config.seeds
        ]
    if config.vm_warmup:
        runs = [PlannedRun(run.study, run.variant, replace(run.unit, warmup=True)) for run in runs]
    return runs


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_json(path: Path) -> object | None:
    """The JSON value in ``path``, or None if there is no such file."""
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


class Reproduction:
    """The runner over one ``RUN`` directory (see the module docstring)."""

    def __init__(self, config: ReproduceConfig, out: str | Path):
        self.config = config
        self.out = Path(out)
        self.data = Path(config.data).resolve()
        self.dataset = open_dataset(self.data)
        self.zoo = synthetic_zoo(self.dataset.schema)
        unknown = sorted({*config.fms, *config.vms, config.multitask_fm} - set(self.zoo))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; the zoo has {sorted(self.zoo)}")
        self.days = [info.day for info in self.dataset.manifest.days]
        self.vm_days = list(range(config.fm_days + 1, self.days[-1]))
        if not self.vm_days or self.days[0] != 1:
            raise ValueError(
                f"{self.data}: days {self.days}; the protocol needs days 1..N, N >= fm_days + 2 = {config.fm_days + 2}"
            )
        self._check_run_directory()

    def _check_run_directory(self) -> None:
        """A RUN belongs to one dataset; other settings may change between calls (units are cached by key)."""
        saved = read_json(self.out / "config.json")
        if saved is not None and Path(saved["data"]) != self.data:
            raise ValueError(f"{self.out}: holds a run on {saved['data']}, not {self.data}; use another --out")
        _write_json(self.out / "config.json", {**self.config.model_dump(mode="json"), "data": str(self.data)})

    # --- the FM ----------------------------------------------------------------------------------
    def fm_run(self, fm: str) -> Path:
        """Train (or resume, or reuse) the FM over days 1..N-1 with a checkpoint at every day end."""
        run_dir = self.out / "fm" / slug(fm) / "run"
        if (run_dir / "summary.json").exists():
            return run_dir
        settings = self.zoo[fm].train_settings()
        config = parse_train_config(
            {"data": str(self.data), **settings, "train_days": [1, self.days[-2]], "device": self.config.device}
        )
        _log(f"FM {fm}: one pass over days 1-{self.days[-2]} -> {run_dir}")
        train(config, run_dir, resume=RunDirectory(run_dir).config_path.exists(), show_progress=False)
        return run_dir

    def staleness_rows(self, fm: str) -> list[dict]:
        """The FM's own metrics on each day t > F: trained daily (through t-1) vs stopped after day F."""
        path = self.out / "fm" / slug(fm) / "staleness.json"
        cached = read_json(path)
        if cached is not None:
            return cached
        run_dir = self.fm_run(fm)
        rows = []
        for day in [*self.vm_days, self.days[-1]]:
            for variant, through in (("training=daily", day - 1), ("training=stopped", self.config.fm_days)):
                result = evaluate_checkpoint(run_dir, day, f"day-{through:02d}", self.config.device)
                rows += _metric_rows(result, train_day=through, eval_day=day, study="staleness", variant=variant)
        rows = [{**row, "fm": fm, "vm": "-", "method": "none", "seed": 0} for row in rows]
        _write_json(path, rows)
        return rows

    # --- DAS -------------------------------------------------------------------------------------
    def store(self, fm: str, updates: FmUpdates, warmup: bool = False) -> tuple[Path, list[dict]]:
        """The DAS shared store of ``fm``'s supervision for days F+1..N, built day by day (resumable).

        With ``warmup`` the store also holds days 1..F, logged without an FM (labels only): the VMs'
        warm-up. It is a store of its own, as a log cannot take days older than those it has joined.

        Returns:
            The store directory, and one summary per day (rows, supervised share, snapshot).
        """
        root = self.out / "das" / f"{slug(fm)}-{updates}{'-warmup' if warmup else ''}"
        with_fm = DASConfig.load(self._deployment(root, slug(fm)))
        labels_only = DASConfig.load(self._deployment(root, None)) if warmup else None
        days_path = root / "days.json"
        summaries: list[dict] = read_json(days_path) or []
        done = {s["day"] for s in summaries}
        first = 1 if warmup else self.vm_days[0]
        for day in range(first, self.days[-1] + 1):
            if day in done:
                continue
            started = time.perf_counter()
            if day in self.vm_days or day == self.days[-1]:
                checkpoint = f"day-{(day - 1 if updates == 'daily' else self.config.fm_days):02d}"
                snapshot = _serve_only(with_fm.spd, with_fm.fm, self.fm_run(fm), checkpoint)
                _log(f"DAS {fm} ({updates}): day {day} supervised by the FM's {checkpoint}")
                self._join_day(with_fm, day)
                summary = self._check_store_day(with_fm.store, day, snapshot.train_through_us)
                summary |= {"snapshot": snapshot.snapshot_id, "checkpoint": checkpoint}
            else:
                _log(f"DAS {fm} ({updates}): warm-up day {day}, labels only")
                self._join_day(labels_only, day)
                summary = self._check_store_day(labels_only.store, day, None) | {"snapshot": None, "checkpoint": None}
            summary |= {"fm": fm, "fm_updates": updates, "warmup": warmup}
            summary["seconds"] = round(time.perf_counter() - started, 2)
            summaries.append(summary)
            _write_json(days_path, summaries)
        return with_fm.store, summaries

    def _deployment(self, root: Path, fm: str | None) -> Path:
        """The DAS config (written once) of the deployment in ``root``, serving ``fm`` (None: no FM)."""
        path = root / ("das.yaml" if fm else "das-labels-only.yaml")
        if not path.exists():
            root.mkdir(parents=True, exist_ok=True)
            deployment = {
                "root": "state",
                "store": "shared",
                "spd": "spd",
                "schema": str(self.data / "schema.yaml"),
                "fm": fm,
                "windows_s": dict.fromkeys(self.dataset.schema.tasks, LABEL_WINDOW_S),
                "partitions": 1,  # one partition: the store keeps the order of closing windows (deterministic)
                "lease_s": 30.0,
                "renew_s": 0.5,
                "read_batch": 64,
                "fm_latency_budget_s": 600.0,  # offline: every example waits for its prediction
                "manifest_interval_s": 5.0,
            }
            atomic_write_text(path, yaml.safe_dump(deployment, sort_keys=False))
        return path

    def _join_day(self, config: DASConfig, day: int) -> None:
        """Replay one day into the deployment's log (closing every window after it) and join it with one worker."""
        backends = open_backends(config)
        replay_into(
            backends.log,
            self.data,
            [day],
            max_span_us=int(LABEL_WINDOW_S * US_PER_S) // 2,
            close_with_watermark_us=int(LABEL_WINDOW_S * US_PER_S) + 1,
        )
        Worker(config, f"reproduce-day{day}", backends).run(until_idle_s=0.5)

    def _check_store_day(self, store: Path, day: int, snapshot_through_us: int | None) -> dict:
        """Every row of ``day`` is in the store, and its supervision (if any) came from the snapshot trained
        through ``snapshot_through_us``, before the day began; None: no row is supervised."""
        expected = self.dataset.day(day).rows
        files = open_dataset(store).day_files(day)
        columns = [FM_TRAINED_THROUGH_COLUMN, *(f"fm:{t}" for t in self.dataset.schema.tasks)]
        table = pq.ParquetDataset(files).read(columns=columns) if files else None
        rows = 0 if table is None else table.num_rows
        if rows != expected:
            raise RuntimeError(f"DAS store {store}: day {day} has {rows:,} rows, the dataset {expected:,}")
        through = set(table.column(FM_TRAINED_THROUGH_COLUMN).drop_null().to_pylist())
        if through - {snapshot_through_us}:
            wanted = "none" if snapshot_through_us is None else f"only the day's snapshot's ({snapshot_through_us})"
            raise RuntimeError(
                f"DAS store {store}: day {day} holds supervision trained through {sorted(through)}; expected {wanted}"
            )
        if snapshot_through_us is not None and snapshot_through_us >= self.dataset.day(day).start_us:
            raise RuntimeError(f"{store}: the snapshot for day {day} has trained on the day itself (look-ahead)")
        supervised = rows - table.column(f"fm:{self.dataset.schema.tasks[0]}").null_count
        return {"day": day, "rows": rows, "supervised": supervised / rows, "trained_through_us": snapshot_through_us}

    # --- the VMs ---------------------------------------------------------------------------------
    def vm_result(self, unit: VMUnit) -> dict:
        """Train (or resume, or reuse) one student on its store and evaluate each day-t checkpoint on day t+1.

        Returns:
            ``{"rows": [metric row per eval day, task, domain], "curves": [progressive NE per task],
            "seconds": training and evaluation time}``.
        """
        path = self.out / "vm" / unit.key / "rows.json"
        cached = read_json(path)
        if cached is not None:
            return cached
        store, _ = self.store(unit.fm, unit.fm_updates, unit.warmup)
        first_day = 1 if unit.warmup else self.vm_days[0]
        run_dir = path.parent / "run"
        config = {
            "data": str(store),
            **self.zoo[unit.vm].train_settings(),
            "train_days": [first_day, self.vm_days[-1]],
            "distillation": {
                "method": unit.method,
                "gradient_scale": unit.gs,
                "label_scale": unit.ls,
                "loss_weight": unit.lw,
            },
            "seed": unit.seed,
            "device": self.config.device,
        }
        if unit.domain is not None:
            config["view"] = {"domains": [unit.domain]}
        if unit.task is not None:
            config["tasks"] = [unit.task]
        _log(f"VM {unit.key}: days {first_day}-{self.vm_days[-1]}")
        started = time.perf_counter()
        run = RunDirectory(run_dir)
        train(parse_train_config(config), run_dir, resume=run.config_path.exists(), show_progress=False)
        rows = []
        for day in self.vm_days:
            result = evaluate_checkpoint(run_dir, day + 1, f"day-{day:02d}", self.config.device)
            rows += _metric_rows(result, train_day=day, eval_day=day + 1)
        result = {
            "rows": rows,
            "curves": _curves(run.read_metrics()),
            "seconds": round(time.perf_counter() - started, 2),
        }
        _write_json(path, result)
        if not self.config.keep_vm_checkpoints:  # evaluated: its rows are what the unit is for
            shutil.rmtree(run.checkpoints)
        return result

    # --- everything ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run (or finish) every planned unit and write ``RUN/results.json``; returns its content."""
        started = time.perf_counter()
        rows: list[dict] = []
        curves: list[dict] = []
        for item in plan(self.config, self.dataset):
            unit = item.unit
            result = self.vm_result(unit)
            tags = {"study": item.study, "variant": item.variant, "fm": unit.fm, "vm": unit.vm, "method": unit.method}
            tags["seed"] = unit.seed
            if item.study == "sweep" and unit.method == "ah":
                tags |= {"gs": unit.gs, "ls": unit.ls, "lw": unit.lw}
            rows += [{"dataset": self.config.dataset, **tags, **row} for row in result["rows"]]
            curves += [{**tags, **curve} for curve in result["curves"]]
        if "staleness" in self.config.studies:
            for fm in self.config.fms:
                rows += [{"dataset": self.config.dataset, **row} for row in self.staleness_rows(fm)]
        supervision = [s for path in sorted((self.out / "das").glob("*/days.json")) for s in read_json(path)]
        results = {
            "format": FORMAT,
            "config": {**self.config.model_dump(mode="json"), "data": str(self.data), "vm_days": self.vm_days},
            "rows": rows,
            "curves": curves,
            "supervision": supervision,
        }
        _write_json(self.out / "results.json", results)
        _log(f"wrote {len(rows):,} rows to {self.out / 'results.json'} in {time.perf_counter() - started:.0f} s")
        return results


def _serve_only(spd: Path, fm: str, fm_run: Path, checkpoint: str) -> SnapshotInfo:
    """Publish the FM run's ``checkpoint`` (once) and withdraw every newer snapshot, so that a worker
    starting now serves exactly this one. Newer ones exist only when a resumed run redoes an earlier
    day; they are published again when their day comes."""
    published = [s for s in list_snapshots(spd, fm) if s.manifest["source"]["checkpoint"] == checkpoint]
    snapshot = published[-1] if published else publish_snapshot(spd, fm_run, checkpoint, fm=fm)
    for newer in list_snapshots(spd, fm):
        if newer.order_key > snapshot.order_key:
            hidden = newer.path.with_name(f".withdrawn-{newer.snapshot_id}")  # invisible to list_snapshots at once
            newer.path.rename(hidden)
            shutil.rmtree(hidden)
    return snapshot


def _metric_rows(
    result: dict[str, dict[str, MetricSet]], *, train_day: int, eval_day: int, **tags: object
) -> list[dict]:
    """One row per task and domain (``all`` first; domains without rows left out), NaN as None."""
    rows = []
    for task, per_domain in result.items():
        for domain, metrics in per_domain.items():
            if metrics.n == 0 and domain != ALL:
                continue
            values = metrics.to_dict()
            rows.append(
                {
                    **tags,
                    "train_day": train_day,
                    "eval_day": eval_day,
                    "task": task,
                    "domain": domain,
                    **{name: values[name] for name in METRICS},
                    "n_examples": metrics.n,
                }
            )
    return rows


def _curves(records: list[dict]) -> list[dict]:
    """Progressive NE per task from a run's ``metrics.jsonl``: cumulative and over the recent window."""
    progress = [r for r in records if r.get("event") in ("progress", "day_end")]
    tasks = progress[0]["progressive"]["tasks"] if progress else {}
    return [
        {
            "task": task,
            "points": [
                {
                    "examples": r["progressive"]["examples"],
                    "day": r["day"],
                    "ne": r["progressive"]["tasks"][task]["cumulative"][ALL]["ne"],
                    "window_ne": r["progressive"]["tasks"][task]["window"][ALL]["ne"],
                }
                for r in progress
            ],
        }
        for task in tasks
    ]


def iter_rows(results: dict, **match: object) -> Iterator[dict]:
    """The rows of a results dict whose fields equal every ``match`` value."""
    return (row for row in results["rows"] if all(row.get(k) == v for k, v in match.items()))
