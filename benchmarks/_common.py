"""Shared plumbing of the benchmarks: the result JSON format, the machine line, the table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line naming the machine: CPU model, cores, threads used, torch build."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s){gpu}"


def metric(value: float, unit: str, target: str | None = None) -> dict:
    return {"value": value, "unit": unit, "target": target}


def write_result(benchmark: str, metrics: dict[str, dict], extra: dict | None = None) -> Path:
    """Print a table and write ``benchmarks/results/<benchmark>.json`` atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": benchmark, "machine": machine(), "metrics": metrics, **(extra or {})}
    width = max(len(name) for name in metrics)
    print(f"\n{benchmark}  ({record['machine']})")
    print(f"{'metric'.ljust(width)}  {'value':>14}  unit          target")
    for name, m in metrics.items():
        print(f"{name.ljust(width)}  {m['value']:>14,.3f}  {m['unit']:<12}  {m['target'] or ''}")
    path = RESULTS / f"{benchmark}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


_CHILD_WRAPPER = """
import json, resource, sys
code = sys.argv[1]
sys.argv = [sys.argv[0], *sys.argv[2:]]
exec(compile(code, "<benchmark child>", "exec"), {"__name__": "__main__"})
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print(json.dumps({"peak_rss_kb": peak_kb}))
"""


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` with arguments ``args`` (``sys.argv[1:]``) in a fresh Python process, which
    prints one JSON object as its last line of output, and measure it.

    Returns:
        That object plus ``wall_s`` (the whole child, interpreter start and imports included) and
        ``peak_rss_mb``: the child's own peak resident memory, read at its end (``VmHWM`` of
        ``/proc/self/status``). Not ``ru_maxrss``: on Linux a child's ``ru_maxrss`` includes the
        peak of the parent it was forked from (the parent here generates the input files).
    """
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD_WRAPPER, code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"the child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    *_, report_line, peak_line = proc.stdout.strip().splitlines()
    report = json.loads(report_line)
    report["wall_s"] = wall
    report["peak_rss_mb"] = json.loads(peak_line)["peak_rss_kb"] / 1024
    return report


def write_random_dataset(out: Path, rows: int, days: int = 4, categorical: int = 20, numeric: int = 0, seed: int = 0):
    """A dataset of ``categorical`` Zipf-ish id fields (and ``numeric`` floats), one label, in exfm's format.

    Used where a benchmark needs a fixed field count (e.g. FM with 20 sparse fields).
    """
    import numpy as np
    import pyarrow as pa

    from exfm.data.dataset import DatasetWriter, atomic_output_dir, partition_arrow_schema
    from exfm.schema import parse_schema

    schema = parse_schema(
        {
            "name": f"random{categorical}",
            "features": [{"name": f"c{i}", "type": "categorical", "buckets": 100_000} for i in range(categorical)]
            + [{"name": f"n{i}", "type": "numeric", "transform": "standardize"} for i in range(numeric)],
            "labels": [{"name": "click"}],
            "time": {"column": "ts"},
            "split": {"days": days, "start": "2026-01-01"},
        }
    )
    rng = np.random.default_rng(seed)
    per_day = rows // days
    with atomic_output_dir(out, overwrite=True) as staging:
        writer = DatasetWriter(staging, schema)
        for day in range(1, days + 1):
            columns = {"_time": np.sort(rng.integers(*writer.day_span(day), per_day))}
            for i in range(categorical):
                ids = np.minimum(rng.zipf(1.3, per_day), 1 << 40).astype(np.int64)
                columns[f"c{i}"] = (ids * 2_654_435_761 + i) % (1 << 62) + 1  # distinct nonzero hashes
            for i in range(numeric):
                columns[f"n{i}"] = rng.normal(size=per_day).astype(np.float32)
            logit = -2.0 + 0.5 * (columns["c0"] % 3 == 0) - 0.5 * (columns["c1"] % 5 == 0)
            columns["click"] = (rng.random(per_day) < 1 / (1 + np.exp(-logit))).astype(np.int8)
            table = pa.table(columns, schema=partition_arrow_schema(schema))
            writer.add_day(day, table)
        writer.finish("benchmark")
    return out
