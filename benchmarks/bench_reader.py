"""Reader throughput: rows/s decoded from day partitions into batch tensors, on one core.

Synthesises the default synthetic stream (8 categoricals, a 20-item behaviour sequence,
4 numerics with causal standardisation, 3 labels, a domain), then reads every day with batch
4096: inline (one thread decodes, the figure that counts) and with the prefetch thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_reader.py [--full]
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


def rows_per_second(dataset, prefetch: int, repeats: int = 2) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = sum(batch.size for batch in StreamReader(dataset, range(1, 9), 4096, prefetch=prefetch))
        best = max(best, rows / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="2M rows instead of 400k")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = 2_000_000 if args.full else 400_000
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        synthesize(data, rows=rows, days=8, seed=0, show_progress=False)
        dataset = open_dataset(data)
        inline = rows_per_second(dataset, prefetch=0)
        threaded = rows_per_second(dataset, prefetch=4)
    write_result(
        "reader",
        {
            "reader.rows_per_s": metric(inline, "rows/s", ">= 1,000,000"),
            "reader.rows_per_s_prefetch": metric(threaded, "rows/s"),
        },
        {"rows": rows, "batch_size": 4096, "schema": "synthetic (8 categorical, 1 sequence, 4 numeric, 3 labels)"},
    )


if __name__ == "__main__":
    main()
