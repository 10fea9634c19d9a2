"""The model zoo on the synthetic stream: one pass over days 1-4, next-day metrics, throughput.

For every model of :func:`exfm.experiments.zoo.synthetic_zoo` (teachers see every feature,
students not the teacher-only ones), all three tasks: train with the exfm trainer on days 1-4
(examples/s without checkpoint writing), evaluate day 5 exactly (AUC / LogLoss / NE /
calibration per task), and time inference (forward, no grad, eval mode) over day 5's batches
(4096 rows) held in memory. One thread, embedding dim 16, each model's preset batch size and dense
learning rate (``ZooEntry.train_settings``).

    OMP_NUM_THREADS=1 python benchmarks/bench_models.py [--full] [--models fm,dcnv2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import metric, write_result

from exfm.data.dataset import open_dataset
from exfm.data.reader import StreamReader
from exfm.data.synth import synthesize
from exfm.experiments.zoo import synthetic_zoo
from exfm.models.registry import count_parameters
from exfm.train.config import parse_train_config
from exfm.train.trainer import train


@torch.no_grad()
def inference_rate(model, batches) -> float:
    model.eval()
    start = time.perf_counter()
    for batch in batches:
        model(batch, heads=model.serving_heads)
    return sum(b.size for b in batches) / (time.perf_counter() - start)


def _flatten(evaluation) -> dict[str, float]:
    """``{task: {"all": MetricSet}} -> {"click_auc": ..., "click_ne": ..., ...}``."""
    keys = ("auc", "logloss", "ne", "calibration")
    return {f"{task}_{key}": getattr(per["all"], key) for task, per in evaluation.items() for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="1M rows instead of 300k")
    parser.add_argument("--models", help="comma-separated subset of the zoo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = 1_000_000 if args.full else 300_000
    metrics, table = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        synthesize(data, rows=rows, days=8, seed=0, show_progress=False)
        dataset = open_dataset(data)
        eval_batches = list(StreamReader(dataset, [5], 4096, prefetch=0))
        zoo = synthetic_zoo(dataset.schema)
        names = args.models.split(",") if args.models else list(zoo)
        for name in names:
            entry = zoo[name]
            config = parse_train_config(
                {
                    "data": str(data),
                    **entry.train_settings(),
                    "train_days": [1, 4],
                    "eval_days": [5],
                    "checkpoint_every": 0,
                }
            )
            start = time.perf_counter()
            result = train(config, Path(tmp) / name, show_progress=False)
            train_rate = result.examples / (time.perf_counter() - start - result.checkpoint_seconds)
            infer_rate = inference_rate(result.model, eval_batches)
            click = result.evaluations[5]["click"]["all"]
            params = count_parameters(result.model)
            metrics[f"models.{name}.train_examples_per_s"] = metric(train_rate, "examples/s")
            metrics[f"models.{name}.infer_examples_per_s"] = metric(infer_rate, "examples/s")
            metrics[f"models.{name}.click_auc"] = metric(click.auc, "AUC")
            metrics[f"models.{name}.click_ne"] = metric(click.ne, "NE")
            table.append(
                {
                    "model": name,
                    "role": entry.role,
                    "sparse_params": params.sparse,
                    "dense_params": params.dense,
                    **_flatten(result.evaluations[5]),
                    "train_examples_per_s": train_rate,
                    "infer_examples_per_s": infer_rate,
                }
            )
            print(f"{name}: click AUC {click.auc:.4f} NE {click.ne:.4f}, train {train_rate:,.0f}/s", flush=True)
    write_result("models", metrics, {"rows": rows, "train_days": [1, 4], "eval_day": 5, "table": table})


if __name__ == "__main__":
    main()
