"""Training throughput of FM in the exfm trainer vs a bare PyTorch loop, on one core.

FM with embedding dim 16 on 20 sparse fields, batch 4096, sparse Adagrad on the embedding
tables and Adam on the rest. The bare loop runs the same model and optimizers over the same
batches already decoded in memory (no reader, no metrics, no checkpoints), so
``train.fm_ratio_vs_bare`` = (exfm examples/s) / (bare examples/s) is the framework's overhead:
reading, decoding, progressive metrics and logging. The time spent writing the day-end
checkpoints (model + optimizer state, fsynced) is excluded there and reported on its own
(``train.checkpoint_s_per_day``, ``train.fm_examples_per_s_with_checkpoints``): it scales with the
table size, not with the examples, so on real days of millions of rows it is amortised.
The bare loop is also run with PyTorch's sparse optimizers (``torch.optim.Adagrad`` on sparse
gradients, ``torch.optim.SparseAdam``) in place of exfm's default row-wise Adagrad
(``train.fm_bare_examples_per_s_sparse_*``).

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import metric, write_random_dataset, write_result

from exfm.data.dataset import open_dataset
from exfm.data.reader import StreamReader
from exfm.train.config import SparseOptimizerConfig, parse_train_config
from exfm.train.objective import SupervisedObjective
from exfm.train.optim import Optimizers
from exfm.train.trainer import build_for_run, train


def bare_loop(config, dataset, batches) -> float:
    """Examples/s of forward, loss, backward and both optimizer steps over in-memory batches."""
    model = build_for_run(config, dataset)
    optimizers = Optimizers(model, config.dense_optimizer, config.sparse_optimizer)
    objective = SupervisedObjective(["click"], [0])
    start = time.perf_counter()
    for batch in batches:
        loss = objective(model(batch), batch)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
    return sum(b.size for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="1.6M rows instead of 400k")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = 1_600_000 if args.full else 400_000
    with tempfile.TemporaryDirectory() as tmp:
        data = write_random_dataset(Path(tmp) / "data", rows=rows, days=4, categorical=20)
        dataset = open_dataset(data)
        config = parse_train_config(
            {
                "data": str(data),
                "model": {"name": "fm", "embedding_dim": 16},
                "train_days": [1, 4],
                "batch_size": 4096,
                "checkpoint_every": 0,
                "prefetch": 4,
            }
        )
        batches = list(StreamReader(dataset, range(1, 5), 4096, prefetch=0))
        bare = bare_loop(config, dataset, batches)
        start = time.perf_counter()
        result = train(config, Path(tmp) / "run", show_progress=False)
        wall = time.perf_counter() - start
        framework = result.examples / (wall - result.checkpoint_seconds)
        with_checkpoints = result.examples / wall
        checkpoint_mb = (Path(tmp) / "run" / "checkpoints" / "last.pt").stat().st_size / 2**20
        bare_again = bare_loop(config, dataset, batches)  # bracket the exfm run against drift
        # The embedding optimizer sets a step's cost: PyTorch's sparse optimizers against row-wise Adagrad.
        other_optimizers = {
            name: bare_loop(
                config.model_copy(update={"sparse_optimizer": SparseOptimizerConfig(name=name)}), dataset, batches
            )
            for name in ("adagrad", "adam")
        }
    bare = max(bare, bare_again)
    write_result(
        "train",
        {
            **{
                f"train.fm_bare_examples_per_s_sparse_{name}": metric(rate, "examples/s")
                for name, rate in other_optimizers.items()
            },
            "train.fm_examples_per_s": metric(framework, "examples/s", ">= 100,000"),
            "train.fm_bare_examples_per_s": metric(bare, "examples/s"),
            "train.fm_ratio_vs_bare": metric(framework / bare, "ratio", ">= 0.8"),
            "train.fm_examples_per_s_with_checkpoints": metric(with_checkpoints, "examples/s"),
            "train.checkpoint_s_per_day": metric(result.checkpoint_seconds / 4, "s"),
            "train.checkpoint_mb": metric(checkpoint_mb, "MB"),
        },
        {"rows": rows, "model": "fm", "embedding_dim": 16, "sparse_fields": 20, "batch_size": 4096},
    )


if __name__ == "__main__":
    main()
