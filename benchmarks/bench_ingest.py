"""Ingest throughput and peak memory on a generated CSV of a ~20-column ads schema.

Generates N rows (500,000 by default, 5,000,000 with ``--full``) of a TaobaoAd-like CSV in a
temporary directory (10 categoricals of very different cardinalities, 4 numerics with missing
values, a behaviour sequence, 2 labels, a domain, an unused column, unix-second times over 8 days
that arrive slightly out of order; the calendar split has no ``start``, so the time-range scan
runs too), then runs ``exfm.data.ingest.ingest`` in a child process and measures its time and peak
resident memory (``VmHWM`` of the child)::

    OMP_NUM_THREADS=1 python benchmarks/bench_ingest.py [--full] [--rows N]

Writes ``benchmarks/results/ingest.json`` with ``ingest.rows_per_s`` and ``ingest.peak_rss_mb``
(target < 1500 MB at any size: ingest streams and sorts out of core).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metric, run_child, write_result

START_S = 1_494_000_000  # 2017-05-05 16:00 UTC = 2017-05-06 00:00 Asia/Shanghai
DAY_S = 86_400

SCHEMA = {
    "name": "bench_ingest",
    "features": [
        {"name": "user", "type": "categorical", "buckets": 1_000_000},
        {"name": "adgroup_id", "type": "categorical", "buckets": 1_000_000},
        {"name": "cate_id", "type": "categorical", "buckets": 10_000},
        {"name": "brand", "type": "categorical", "buckets": 100_000},
        {"name": "campaign_id", "type": "categorical", "buckets": 100_000},
        {"name": "customer", "type": "categorical", "buckets": 100_000},
        {"name": "pid", "type": "categorical", "buckets": 16},
        {"name": "age_level", "type": "categorical", "buckets": 16},
        {"name": "gender", "type": "categorical", "buckets": 4},
        {"name": "city", "type": "categorical", "buckets": 1000},
        {"name": "price", "type": "numeric", "transform": "log1p"},
        {"name": "hist_ctr", "type": "numeric"},
        {"name": "n_views", "type": "numeric", "transform": "log1p_standardize"},
        {"name": "account_age", "type": "numeric", "transform": "standardize"},
        {"name": "hist_cate", "type": "sequence", "max_len": 20, "embedding": "cate_id"},
    ],
    "labels": [{"name": "clk"}, {"name": "conv"}],
    "time": {"column": "time_stamp", "unit": "s", "timezone": "Asia/Shanghai"},
    "domain": {"column": "new_user_class_level"},
    "split": {"mode": "calendar", "days": 8, "timezone": "Asia/Shanghai"},
}

CHILD = """
import json, sys, time
from exfm.data.ingest import ingest
from exfm.schema import parse_schema
schema = parse_schema(json.loads(sys.argv[1]))
start = time.perf_counter()
manifest = ingest(schema, sys.argv[2], sys.argv[3], memory_limit_mb=int(sys.argv[4]), show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "rows": manifest.rows}))
"""


def generate(path: Path, rows: int, seed: int = 0, chunk: int = 250_000) -> None:
    """Write a ``rows``-row CSV of the benchmark schema (plus an unused column) in chunks."""
    rng = np.random.default_rng(seed)
    cate_pool = rng.integers(1, 10_000, 5_000)
    options = pv.WriteOptions(quoting_style="needed")
    with pv.CSVWriter(path, _chunk(rng, 1, 0, rows, cate_pool).schema, write_options=options) as writer:
        for start in range(0, rows, chunk):
            writer.write_table(_chunk(rng, min(chunk, rows - start), start, rows, cate_pool))


def _chunk(rng: np.random.Generator, n: int, start: int, rows: int, cate_pool: np.ndarray) -> pa.Table:
    # time grows with the row index over 8 days, with a few minutes of jitter (late arrivals)
    t = START_S + (np.arange(start, start + n) * (8 * DAY_S) // rows) + rng.integers(-300, 300, n)
    t = np.clip(t, START_S, START_S + 8 * DAY_S - 1)
    price = np.round(rng.lognormal(4, 1.2, n), 2).astype(object)
    price[rng.random(n) < 0.05] = ""
    account_age = np.round(rng.gamma(2.0, 300.0, n), 1).astype(object)
    account_age[rng.random(n) < 0.2] = ""
    lengths = rng.integers(0, 40, n)
    items = pa.array(cate_pool[rng.integers(0, len(cate_pool), int(lengths.sum()))]).cast(pa.string())
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    hist = pc.binary_join(pa.ListArray.from_arrays(offsets, items), "|")
    clk = (rng.random(n) < 0.05).astype(np.int8)
    return pa.table(
        {
            "user": rng.integers(1, 1_000_000, n),
            "time_stamp": t,
            "adgroup_id": rng.zipf(1.3, n) % 800_000,
            "cate_id": rng.integers(1, 10_000, n),
            "brand": rng.integers(1, 100_000, n),
            "campaign_id": rng.integers(1, 400_000, n),
            "customer": rng.integers(1, 250_000, n),
            "pid": rng.choice(["430548_1007", "430539_1007"], n),
            "age_level": rng.integers(0, 7, n),
            "gender": rng.integers(1, 3, n),
            "city": rng.integers(1, 400, n),
            "price": pa.array(price.astype(str)),
            "hist_ctr": np.round(rng.beta(1, 20, n), 5),
            "n_views": rng.poisson(30, n),
            "account_age": pa.array(account_age.astype(str)),
            "hist_cate": hist,
            "clk": clk,
            "conv": (clk & (rng.random(n) < 0.1)).astype(np.int8),
            "new_user_class_level": rng.integers(1, 5, n),
            "comment": rng.choice(["", "promo", "organic"], n),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="5,000,000 rows instead of 500,000")
    parser.add_argument("--rows", type=int, help="explicit row count (overrides --full)")
    parser.add_argument("--memory-limit-mb", type=int, default=1024)
    args = parser.parse_args()
    rows = args.rows or (5_000_000 if args.full else 500_000)
    with tempfile.TemporaryDirectory(prefix="exfm-bench-ingest-") as tmp:
        csv = Path(tmp) / "events.csv"
        t0 = time.perf_counter()
        generate(csv, rows)
        size_mb = csv.stat().st_size / 2**20
        print(f"generated {rows:,} rows ({size_mb:,.0f} MB) in {time.perf_counter() - t0:.1f} s")
        # the ingest call's seconds (imports excluded), rows written, the child's peak memory
        report = run_child(CHILD, json.dumps(SCHEMA), str(csv), str(Path(tmp) / "dataset"), str(args.memory_limit_mb))
    if report["rows"] != rows:
        raise SystemExit(f"ingest wrote {report['rows']:,} rows, expected {rows:,}")
    write_result(
        "ingest",
        {
            "ingest.rows_per_s": metric(rows / report["seconds"], "rows/s"),
            "ingest.peak_rss_mb": metric(report["peak_rss_mb"], "MB", "< 1500"),
        },
        extra={
            "rows": rows,
            "csv_mb": size_mb,
            "memory_limit_mb": args.memory_limit_mb,
            "ingest_s": report["seconds"],
            "child_wall_s": report["wall_s"],
        },
    )


if __name__ == "__main__":
    main()
