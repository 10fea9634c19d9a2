"""Serving latency of an exported VM trained without ExFM (``none``) vs with AH + SA (``ah_sa``).

The paper's promise (DESIGN §1): the auxiliary and adapter heads exist at training time only, so
the served VM costs the same. For FM, DeepFM and DLRM (the synthetic zoo presets on the full
synthetic schema), the same model is exported twice with :func:`exfm.serving.export_model`: as
built (``none``), and after adding a distillation head ``distill:<task>`` and an adapter head
``adapter:<task>`` per task as the ``ah_sa`` method does (``ah_sa``; the export drops them). Both
programs are loaded with ``torch.export.load`` and timed on the same real batches of the synthetic
stream (1 and 512 examples), one thread, interleaved in alternating A/B blocks so that drift and
order effects cancel. ``serving.latency_ratio`` is the worst ah_sa / none ratio of medians over
the models and batch sizes (expected 1.0 within noise: the two programs have identical graphs).

    OMP_NUM_THREADS=1 python benchmarks/bench_serving.py [--full] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import metric, write_result

from exfm.data.dataset import open_dataset
from exfm.data.reader import StreamReader
from exfm.data.synth import synthesize
from exfm.experiments.zoo import synthetic_zoo
from exfm.models import MLP, build_model
from exfm.serving import export_model, serving_inputs

MODELS = ("fm", "deepfm", "dlrm")
BATCH_SIZES = (1, 512)


def interleaved_ms(a: Callable[[], object], b: Callable[[], object], rounds: int, calls: int) -> tuple[float, float]:
    """Median ms per call of ``a`` and of ``b``: ``rounds`` pairs of blocks of ``calls`` calls, order alternating."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(rounds):
        for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
            fn = a if name == "a" else b
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times["a"]), statistics.median(times["b"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, help="A/B block pairs per model and batch size (default 40, --full 120)")
    parser.add_argument("--full", action="store_true", help="more rounds: 120 instead of 40")
    args = parser.parse_args()
    args.rounds = args.rounds or (120 if args.full else 40)
    torch.set_num_threads(1)
    metrics: dict[str, dict] = {}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        synthesize(data, rows=8_000, days=2, seed=0, show_progress=False)
        dataset = open_dataset(data)
        batch = next(iter(StreamReader(dataset, [2], max(BATCH_SIZES), prefetch=0)))
        zoo = synthetic_zoo(dataset.schema)
        for name in MODELS:
            torch.manual_seed(0)
            model = build_model(zoo[name].config, dataset.schema, dataset.schema.tasks).eval()
            plain = export_model(model, Path(tmp) / f"{name}-none", dataset.schema, onnx=False)
            for task in model.serving_heads:  # the heads of the ah_sa method (head_hidden None: as serving)
                model.add_head(f"distill:{task}", MLP(model.representation_dim, [], 1))
                model.add_head(f"adapter:{task}", MLP(model.representation_dim, [], 1))
            distilled = export_model(model, Path(tmp) / f"{name}-ah_sa", dataset.schema, onnx=False)
            assert plain["parameter_count"] == distilled["parameter_count"]
            none = torch.export.load(Path(tmp) / f"{name}-none" / "model.pt2").module()
            ah_sa = torch.export.load(Path(tmp) / f"{name}-ah_sa" / "model.pt2").module()
            full = serving_inputs(model, batch)
            for size in BATCH_SIZES:
                inputs = tuple(t[:size] for t in full)
                with torch.no_grad():
                    assert torch.equal(none(*inputs), ah_sa(*inputs))
                    for _ in range(20):  # warm-up
                        none(*inputs), ah_sa(*inputs)
                    calls = 50 if size == 1 else 5
                    ms_none, ms_ah_sa = interleaved_ms(
                        lambda m=none, x=inputs: m(*x), lambda m=ah_sa, x=inputs: m(*x), args.rounds, calls
                    )
                ratios.append(ms_ah_sa / ms_none)
                metrics[f"serving.{name}.none_ms_b{size}"] = metric(ms_none, "ms/batch")
                metrics[f"serving.{name}.ah_sa_ms_b{size}"] = metric(ms_ah_sa, "ms/batch")
                metrics[f"serving.{name}.ratio_b{size}"] = metric(ms_ah_sa / ms_none, "ratio", "1.0 ± noise")
            metrics[f"serving.{name}.parameters"] = metric(plain["parameter_count"]["total"], "parameters")
    metrics = {"serving.latency_ratio": metric(max(ratios), "ratio", "≈ 1.0 (worst student)"), **metrics}
    write_result(
        "serving",
        metrics,
        {"models": list(MODELS), "batch_sizes": list(BATCH_SIZES), "rounds": args.rounds, "embedding_dim": 16},
    )


if __name__ == "__main__":
    main()
