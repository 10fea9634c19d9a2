"""``exfm demo``: the embedded end-to-end job on the synthetic stream.

1. Synthesise the stream (8 days; reused if ``OUT/synthetic`` already holds it).
2. Train the foundation model (DCNv2 on every feature, all tasks) one pass on days 1–4.
3. Train the vertical model (FM without the teacher-only features) one pass on days 1–4.
4. Evaluate both on day 5 and print AUC / LogLoss / NE / calibration per task, next to the true
   probabilities (the best any model can do).

The distillation and DAS issues extend this job to the full ExFM pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from exfm.data.dataset import MANIFEST_NAME, open_dataset
from exfm.data.reader import StreamReader
from exfm.data.synth import synthesize
from exfm.experiments.zoo import synthetic_zoo
from exfm.train.config import TrainConfig, parse_train_config
from exfm.train.metrics import ALL, PROB_EPS, MetricSet, StreamingMetrics
from exfm.train.report import format_eval_table
from exfm.train.trainer import train

TRAIN_DAYS = (1, 4)
EVAL_DAY = 5


def demo_configs(data: Path, device: str = "cpu") -> dict[str, TrainConfig]:
    """The teacher (FM) and student (VM) configs of the demo: the zoo's DCNv2 and FM presets."""
    zoo = synthetic_zoo(open_dataset(data).schema)
    common = {"data": str(data), "train_days": list(TRAIN_DAYS), "eval_days": [EVAL_DAY], "device": device}
    return {
        "teacher DCNv2 (FM)": parse_train_config({**common, **zoo["dcnv2"].train_settings()}),
        "student FM (VM)": parse_train_config({**common, **zoo["fm"].train_settings()}),
    }


def true_probability_metrics(data: Path, day: int) -> dict[str, dict[str, MetricSet]]:
    """Metrics of the stored true probabilities ``p_<task>`` on one day: the best achievable."""
    dataset = open_dataset(data)
    tasks = dataset.schema.tasks
    columns = [f"p_{t}" for t in tasks]
    metrics = StreamingMetrics(tasks, dataset.manifest.domains)
    for batch in StreamReader(dataset, [day], 65_536, passthrough=columns):
        probs = torch.stack([batch.passthrough[c] for c in columns], dim=1)
        metrics.update(torch.logit(probs, eps=PROB_EPS), batch.labels, batch.domain)
    return metrics.result()


def run_demo(out: Path, rows: int = 1_000_000, seed: int = 0, device: str = "cpu") -> dict:
    """Run the demo in ``out``; returns ``{row label: {task: {"all" | domain: MetricSet}}}``."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "synthetic"
    manifest = data / MANIFEST_NAME
    if not manifest.exists() or json.loads(manifest.read_text())["rows"] != rows:
        print(f"[1/3] synthesising {rows:,} rows over 8 days -> {data}")
        synthesize(data, rows=rows, days=8, seed=seed, overwrite=True)
    else:
        print(f"[1/3] reusing the synthetic stream in {data}")
    results = {}
    for step, (label, config) in enumerate(demo_configs(data, device).items(), start=2):
        run_dir = out / "runs" / label.split()[0]
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{step}/3] training the {label} on days {TRAIN_DAYS[0]}-{TRAIN_DAYS[1]} -> {run_dir}")
        results[label] = train(config, run_dir).evaluations[EVAL_DAY]
    results["true probabilities"] = true_probability_metrics(data, EVAL_DAY)
    print(f"\nNext-day metrics (trained on days {TRAIN_DAYS[0]}-{TRAIN_DAYS[1]}, evaluated on day {EVAL_DAY}):\n")
    print(format_eval_table(results))
    summary = {label: {t: per[ALL].to_dict() for t, per in r.items()} for label, r in results.items()}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results
