"""The one-pass streaming trainer.

``train(config, run_dir)`` trains a model on days ``train_days`` exactly once, in time order:

1. the objective's hook runs first (``ah_sa``: the Student Adapter's own step, Algorithm 1);
2. each batch is scored by the current model (progressive evaluation: the serving heads' logits
   of the training forward, taken before the optimizer step, go to :class:`ProgressiveNE`);
3. the objective's loss (``config.distillation``: none, KD, AH or AH+SA,
   :mod:`exfm.distill.objectives`) is back-propagated and the sparse and dense optimizers step;
4. every ``checkpoint_every`` batches and at every day end, the model (training heads included),
   the optimizers, the objective's state (Student Adapter and its optimizer, supervision counts),
   the progressive metrics, the RNG state and the stream position are checkpointed atomically.

``train(..., resume=True)`` restarts from the last checkpoint: the reader continues at the
checkpointed position (no batch trained twice, none skipped), and ``metrics.jsonl`` is cut back
to what it held at that checkpoint. With one thread on the CPU, a killed-and-resumed run ends
with bit-identical parameters to an uninterrupted one (``tests/test_trainer.py``).

Afterwards every ``eval_days`` day is evaluated exactly (:func:`evaluate_day`).

With ``config.view`` (:class:`exfm.data.views.View`: a VM's slice of a shared store) both the
training stream and the evaluation days are read through the view: the model trains, is scored
progressively and is evaluated on the view's rows only, and batch positions, checkpoints and the
causal normaliser all refer to the filtered stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from exfm.data.dataset import Dataset, open_dataset
from exfm.data.reader import ReaderPosition, StreamReader
from exfm.data.views import View
from exfm.distill.objectives import build_objective
from exfm.models.base import RecModel
from exfm.models.registry import build_model
from exfm.train.config import TrainConfig
from exfm.train.metrics import MetricSet, ProgressiveNE, StreamingMetrics
from exfm.train.objective import Objective
from exfm.train.optim import Optimizers
from exfm.train.run_dir import RunDirectory, open_run


@dataclass
class TrainResult:
    """What a finished run produced (``checkpoint_seconds``: time spent writing checkpoints)."""

    run_dir: Path
    model: RecModel
    examples: int
    evaluations: dict[int, dict[str, dict[str, MetricSet]]]
    checkpoint_seconds: float = 0.0


def build_for_run(config: TrainConfig, dataset: Dataset) -> RecModel:
    """The run's model, seeded from ``config.seed`` and placed on ``config.device``."""
    torch.manual_seed(config.seed)
    return build_model(config.model, dataset.schema, config.tasks_for(dataset.schema)).to(config.device)


def stack_logits(logits: dict[str, torch.Tensor], tasks: list[str]) -> torch.Tensor:
    """``{task: [B]} -> [B, T]`` in ``tasks`` order."""
    return torch.stack([logits[t] for t in tasks], dim=1)


class _Checkpointer:
    """Saves and restores the whole training state of a run."""

    def __init__(
        self,
        run: RunDirectory,
        model: RecModel,
        optimizers: Optimizers,
        objective: Objective,
        progressive: ProgressiveNE,
    ):
        self.run, self.model, self.optimizers = run, model, optimizers
        self.objective, self.progressive = objective, progressive

    def save(self, position: ReaderPosition, examples: int, batches: int, name: str = "last") -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizers": self.optimizers.state_dict(),
            "objective": self.objective.state_dict(),
            "progressive": self.progressive.state_dict(),
            "rng": torch.get_rng_state(),
            "position": [position.day, position.batch],
            "examples": examples,
            "batches": batches,
            "metrics_offset": self.run.metrics_offset(),
        }
        self.run.save_checkpoint(state, name)

    def restore(self, device: str) -> tuple[ReaderPosition | None, int, int]:
        """Load ``last.pt`` if there is one: ``(position, examples, batches)``."""
        state = self.run.load_checkpoint("last", map_location=device)
        if state is None:
            self.run.truncate_metrics(0)
            return None, 0, 0
        self.model.load_state_dict(state["model"])
        self.optimizers.load_state_dict(state["optimizers"])
        self.objective.load_state_dict(state["objective"])
        self.progressive.load_state_dict(state["progressive"])
        torch.set_rng_state(state["rng"])
        self.run.truncate_metrics(state["metrics_offset"])
        return ReaderPosition(*state["position"]), state["examples"], state["batches"]


def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train ``config.model`` one pass over ``config.train_days``, then evaluate ``config.eval_days``."""
    dataset = open_dataset(config.data)
    tasks = config.tasks_for(dataset.schema)
    if config.view is not None:  # before the run directory is made: a bad view leaves nothing behind
        last = max([*config.train_day_list, *config.eval_days])
        config.view.check(dataset, [info.day for info in dataset.manifest.days if info.day <= last])
    model = build_for_run(config, dataset)
    objective = build_objective(config.distillation, model, dataset.schema, tasks)  # adds training heads
    optimizers = Optimizers(model, config.dense_optimizer, config.sparse_optimizer)
    progressive = ProgressiveNE(tasks, dataset.manifest.domains, config.progressive_window)
    run = RunDirectory(run_dir)
    run.create(config.to_yaml(), resume)
    checkpointer = _Checkpointer(run, model, optimizers, objective, progressive)
    position, examples, batches = checkpointer.restore(config.device) if resume else (None, 0, 0)

    reader = StreamReader(
        dataset,
        config.train_day_list,
        config.batch_size,
        start=position,
        with_fm_predictions=objective.reads_fm_predictions,
        prefetch=config.prefetch,
        device=config.device,
        row_filter=config.view,
    )
    batches_per_day = {d: reader.batches_in_day(d) for d in config.train_day_list}
    bar = tqdm(total=reader.total_rows, unit="ex", unit_scale=True, disable=not show_progress, desc="train")
    interval_start, interval_examples = time.perf_counter(), 0
    checkpoint_seconds = 0.0
    model.train()
    for batch in reader:
        objective.before_step(batch)
        output = objective.forward(model, batch)
        loss = output.loss
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
        progressive.update(output.logits.detach(), objective.labels(batch), batch.domain)

        examples += batch.size
        batches += 1
        interval_examples += batch.size
        bar.update(batch.size)
        position = ReaderPosition(batch.day, batch.index_in_day + 1)
        day_end = position.batch == batches_per_day[batch.day]
        if batches % config.log_every == 0 or day_end:
            elapsed = time.perf_counter() - interval_start
            record = {
                "event": "day_end" if day_end else "progress",
                "day": batch.day,
                "batch": batch.index_in_day,
                "examples": examples,
                "loss": loss.item(),
                "examples_per_s": interval_examples / max(elapsed, 1e-9),
                "progressive": progressive.snapshot(),
                **objective.log_record(),
            }
            run.log(record)
            bar.set_postfix(day=batch.day, ne=_cumulative_ne(record, tasks[0]))
            interval_start, interval_examples = time.perf_counter(), 0
        if day_end or (config.checkpoint_every and batches % config.checkpoint_every == 0):
            saving = time.perf_counter()
            checkpointer.save(position, examples, batches)
            if day_end:
                run.keep_checkpoint(f"day-{batch.day:02d}")
                if config.publish is not None:
                    _publish(config, run.root, batch.day)
            checkpoint_seconds += time.perf_counter() - saving
    bar.close()

    evaluations = {}
    for day in config.eval_days:
        evaluations[day] = evaluate_day(model, dataset, day, tasks, config.batch_size, config.device, view=config.view)
        run.log(
            {
                "event": "eval",
                "day": day,
                "trained_through": config.train_days[1],
                **_as_dicts(evaluations[day]),
            }
        )
    run.write_summary(
        {
            "examples": examples,
            "trained_through": config.train_days[1],
            "eval": {str(day): _as_dicts(result)["metrics"] for day, result in evaluations.items()},
        }
    )
    return TrainResult(run.root, model, examples, evaluations, checkpoint_seconds)


@torch.no_grad()
def evaluate_day(
    model: RecModel,
    dataset: Dataset,
    day: int,
    tasks: list[str],
    batch_size: int = 4096,
    device: str = "cpu",
    *,
    view: View | None = None,
) -> dict[str, dict[str, MetricSet]]:
    """Exact metrics of the model's serving heads on one day (only the rows of ``view``, if given):
    ``result[task]["all" | domain]`` (every domain of the dataset listed; those outside the view empty)."""
    label_index = torch.tensor([dataset.schema.tasks.index(t) for t in tasks])
    metrics = StreamingMetrics(tasks, dataset.manifest.domains)
    was_training = model.training
    model.eval()
    for batch in StreamReader(dataset, [day], batch_size, device=device, row_filter=view):
        logits = stack_logits(model(batch, heads=tasks), tasks)
        metrics.update(logits, batch.labels.index_select(1, label_index.to(batch.labels.device)), batch.domain)
    model.train(was_training)
    return metrics.result()


def evaluate_checkpoint(
    run_dir: str | Path, day: int, checkpoint: str = "last", device: str = "cpu"
) -> dict[str, dict[str, MetricSet]]:
    """Evaluate the served model of a run's checkpoint (``last``, ``day-04``, ...) on one day
    (through the run's view, if it has one)."""
    saved = open_run(run_dir, checkpoint, device=device)
    model, _ = saved.served_model()
    return evaluate_day(model, saved.dataset, day, saved.tasks, saved.config.batch_size, device, view=saved.config.view)


def _as_dicts(result: dict[str, dict[str, MetricSet]]) -> dict:
    return {"metrics": {task: {k: m.to_dict() for k, m in per.items()} for task, per in result.items()}}


def _cumulative_ne(record: dict, task: str) -> str:
    ne = record["progressive"]["tasks"][task]["cumulative"]["all"]["ne"]
    return "n/a" if ne is None else f"{ne:.4f}"


def _publish(config: TrainConfig, run_root: Path, day: int) -> None:
    """Publish the day-end checkpoint's served model to the SPD (a DAS snapshot).

    A run killed between the day-end checkpoint and this call skips that day's snapshot on
    resume; ``exfm das publish --checkpoint day-NN`` publishes it by hand.
    """
    from exfm.das.snapshots import publish_snapshot  # DAS is optional for training

    publish_snapshot(config.publish.spd, run_root, f"day-{day:02d}", fm=config.publish.fm)
