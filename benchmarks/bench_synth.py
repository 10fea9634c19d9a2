"""The synthetic stream: generation speed, and its base rates and best achievable NE per day.

Generates the default stream (8 days, seed 0) and reports rows/s, then per day and task the base
rate and the NE of the stored true probabilities against the drawn labels (the best NE any model
can reach), plus distinct users and items.

    OMP_NUM_THREADS=1 python benchmarks/bench_synth.py [--full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from _common import metric, write_result

from exfm.data.dataset import open_dataset
from exfm.data.synth import synthesize
from exfm.train.metrics import PROB_EPS, compute_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="1M rows instead of 200k")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = 1_000_000 if args.full else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = synthesize(Path(tmp) / "synthetic", rows=rows, days=8, seed=0, show_progress=False)
        seconds = time.perf_counter() - start
        dataset = open_dataset(Path(tmp) / "synthetic")
        tasks = dataset.schema.tasks
        metrics = {
            "synth.seconds": metric(seconds, "s", "well under 60 for 1M rows"),
            "synth.rows_per_s": metric(rows / seconds, "rows/s"),
        }
        table, users, items, labels, probs = [], set(), set(), [], []
        for info in manifest.days:
            day = pq.read_table(dataset.day_files(info.day))
            users |= set(pc.unique(day["user_id"]).to_pylist())
            items |= set(pc.unique(day["item_id"]).to_pylist())
            y = np.stack([day[t].to_numpy() for t in tasks], axis=1).astype(np.float64)
            p = np.stack([day[f"p_{t}"].to_numpy() for t in tasks], axis=1).astype(np.float64)
            labels.append(y)
            probs.append(p)
            row = {"day": info.day, "rows": info.rows}
            for i, task in enumerate(tasks):
                truth = compute_metrics(y[:, i], torch.logit(torch.from_numpy(p[:, i]), eps=PROB_EPS))
                row[f"{task}_rate"] = truth.base_rate
                row[f"{task}_ne_truth"] = truth.ne
            table.append(row)
        y, p = np.concatenate(labels), np.concatenate(probs)
        for i, task in enumerate(tasks):
            truth = compute_metrics(y[:, i], torch.logit(torch.from_numpy(p[:, i]), eps=PROB_EPS))
            metrics[f"synth.{task}_rate"] = metric(truth.base_rate, "fraction")
            metrics[f"synth.{task}_ne_truth"] = metric(truth.ne, "NE", "best achievable")
        metrics["synth.distinct_users"] = metric(len(users), "ids")
        metrics["synth.distinct_items"] = metric(len(items), "ids")
    write_result("synth", metrics, {"rows": rows, "days": 8, "seed": 0, "table": table})


if __name__ == "__main__":
    main()
