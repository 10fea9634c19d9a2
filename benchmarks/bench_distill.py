"""Training cost of the distillation methods: none, KD, AH and AH+SA for the FM, DeepFM and DLRM students.

The students are the zoo presets of the synthetic stream (``exfm.experiments.zoo.synthetic_zoo``:
every feature but the teacher-only ones, embedding dim 16), one task (click), batch 4096, one
thread. The FM predictions are the stream's true ``p_click`` through a known bias
(``σ(logit(p) + 0.3)``, 10 % missing), put into ``batch.fm_predictions`` of in-memory batches.
One training step is the trainer's: the objective's hook (the SA's step for AH+SA), the forward
with every head the method needs, backward, the sparse and dense optimizer steps. ``ah_sa`` runs
the default Student Adapter (``hidden: [16]``, no context); ``ah_sa_context`` the same with two
categorical context features (``device``, ``hour``).

The variants of a student run side by side, interleaved step by step: for every batch each
method (its own model) takes one training step, in an order that rotates from batch to batch, so
a slow spell of the machine hits all methods alike. After a warm-up, ``rounds`` passes over the
batches give every method one step time per (round, batch); a method's throughput is
``B / median step time``, and its overhead is the median over the paired steps (same batch, same
moment) of ``t_method / t_none − 1``. ``distill.ah_sa_overhead`` = the worst over the students of
the AH+SA overhead.

    OMP_NUM_THREADS=1 python benchmarks/bench_distill.py [--full]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import metric, write_result

from exfm.data.batch import Batch
from exfm.data.dataset import open_dataset
from exfm.data.reader import StreamReader
from exfm.data.synth import synthesize
from exfm.distill.objectives import build_objective
from exfm.experiments.zoo import synthetic_zoo
from exfm.models.registry import build_model
from exfm.schema import Schema
from exfm.train.config import DenseOptimizerConfig, DistillationConfig, SparseOptimizerConfig
from exfm.train.optim import Optimizers

STUDENTS = ("fm", "deepfm", "dlrm")
VARIANTS: dict[str, dict] = {
    "none": {"method": "none"},
    "kd": {"method": "kd"},
    "ah": {"method": "ah"},
    "ah_sa": {"method": "ah_sa"},
    "ah_sa_context": {"method": "ah_sa", "adapter": {"context_features": ["device", "hour"]}},
}
BATCH = 4096


def fm_batches(data: Path, batches: int) -> tuple[Schema, list[Batch]]:
    """The first ``batches`` batches of day 1 with biased FM predictions for every task (10 % missing)."""
    dataset = open_dataset(data)
    tasks = dataset.schema.tasks
    reader = StreamReader(
        dataset, [1], BATCH, with_fm_predictions=True, passthrough=[f"p_{t}" for t in tasks], prefetch=0
    )
    generator = torch.Generator().manual_seed(0)
    out = []
    for batch in reader:
        if batch.size < BATCH or len(out) == batches:
            break
        p = torch.stack([batch.passthrough[f"p_{t}"] for t in tasks], dim=1)
        p_fm = torch.sigmoid(torch.logit(p, eps=1e-7) + 0.3)
        p_fm[torch.rand(p_fm.shape, generator=generator) < 0.1] = float("nan")
        batch.fm_predictions = p_fm
        out.append(batch)
    if len(out) < batches:
        raise RuntimeError(f"day 1 of {data} holds only {len(out)} full batches, {batches} wanted")
    return dataset.schema, out


class Run:
    """One student trained by one variant: model, objective and optimizers, as the trainer builds them."""

    def __init__(self, student: str, variant: str, schema: Schema) -> None:
        torch.manual_seed(0)
        self.model = build_model(synthetic_zoo(schema)[student].config, schema, ["click"])
        config = DistillationConfig(**VARIANTS[variant])
        self.objective = build_objective(config, self.model, schema, ["click"])
        self.optimizers = Optimizers(self.model, DenseOptimizerConfig(), SparseOptimizerConfig())

    def step(self, batch: Batch) -> float:
        """Seconds of one training step on ``batch``."""
        start = time.perf_counter()
        self.objective.before_step(batch)
        loss = self.objective.forward(self.model, batch).loss
        self.optimizers.zero_grad()
        loss.backward()
        self.optimizers.step()
        return time.perf_counter() - start


def interleaved(runs: dict[str, Run], batches: list[Batch], rounds: int) -> dict[str, list[float]]:
    """Step times per method: for each (round, batch) one step of every method, in a rotating order."""
    times: dict[str, list[float]] = {method: [] for method in runs}
    order = list(runs)
    for r in range(rounds):
        for i, batch in enumerate(batches):
            shift = (r * len(batches) + i) % len(order)
            for method in order[shift:] + order[:shift]:
                times[method].append(runs[method].step(batch))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="more batches and rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    num_batches, rounds = (24, 7) if args.full else (8, 5)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "data", rows=(num_batches + 1) * BATCH * 2, days=2, seed=0, show_progress=False)
        schema, batches = fm_batches(Path(tmp) / "data", num_batches)
    metrics, table = {}, {}
    overheads = []
    for student in STUDENTS:
        runs = {variant: Run(student, variant, schema) for variant in VARIANTS}
        interleaved(runs, batches[:3], 1)  # warm-up
        times = interleaved(runs, batches, rounds)
        for method in VARIANTS:
            rate = BATCH / statistics.median(times[method])
            overhead = statistics.median(t / t0 for t, t0 in zip(times[method], times["none"], strict=True)) - 1.0
            metrics[f"distill.{student}.{method}_examples_per_s"] = metric(rate, "examples/s")
            if method != "none":
                metrics[f"distill.{student}.{method}_overhead"] = metric(overhead, "ratio")
            table[f"{student}/{method}"] = {"examples_per_s": rate, "overhead_vs_none": overhead}
        overheads.append(table[f"{student}/ah_sa"]["overhead_vs_none"])
    metrics["distill.ah_sa_overhead"] = metric(max(overheads), "ratio", "<= 0.15")
    write_result(
        "distill",
        metrics,
        {
            "students": list(STUDENTS),
            "variants": VARIANTS,
            "batch_size": BATCH,
            "batches_per_round": num_batches,
            "rounds": rounds,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
