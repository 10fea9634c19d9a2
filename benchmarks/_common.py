"""Shared plumbing of the benchmarks: the result JSON format, the machine line, the table."""

from __future__ import annotations

import json
import os
import platform
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
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s){gpu}"
    )


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
