"""``exfm demo``: the whole ExFM story on the synthetic stream, on one machine.

1. Synthesise the stream (8 days; reused if ``OUT/synthetic`` already holds the same one).
2. :mod:`exfm.experiments.reproduce` on it: the foundation model (DCNv2, every feature) trains
   one pass with a checkpoint per day; DAS (embedded backend) logs its day-(t-1) snapshot's
   predictions for each day t = 5..8; the vertical models (FM and DeepFM, without the teacher-only
   features) train on days 5–7 with each method (none, KD, AH, AH+SA) and are evaluated on the
   next day; the freshness (an FM frozen after day 4) and staleness studies ride along.
3. Print the Table-2-style result (NE gain % vs ``none``) and write the report
   (``OUT/run/report/report.html``, Markdown and PNG plots).

Everything is cached under ``OUT/run``: a second ``exfm demo`` only rewrites the table and report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from exfm.data.dataset import MANIFEST_NAME, atomic_write_text
from exfm.data.synth import synthesize
from exfm.experiments.report import main_table_text, write_report
from exfm.experiments.reproduce import ReproduceConfig, Reproduction, read_json

DEMO_STUDIES = ["main", "freshness", "staleness"]
DEMO_VMS = ["fm", "deepfm"]


def run_demo(
    out: Path, rows: int = 1_000_000, seed: int = 0, device: str = "cpu", vms: list[str] | None = None
) -> dict:
    """Run the demo in ``out``; returns the reproduction's results (``results.json``'s content)."""
    out.mkdir(parents=True, exist_ok=True)
    data, run, stream = out / "synthetic", out / "run", out / "stream.json"
    wanted = {"rows": rows, "seed": seed}
    if not (data / MANIFEST_NAME).exists() or read_json(stream) != wanted:
        print(f"[1/3] synthesising {rows:,} rows over 8 days -> {data}", flush=True)
        synthesize(data, rows=rows, days=8, seed=seed, overwrite=True)
        shutil.rmtree(run, ignore_errors=True)  # cached results of another stream
        atomic_write_text(stream, json.dumps(wanted))
    else:
        print(f"[1/3] reusing the synthetic stream in {data}", flush=True)
    print(f"[2/3] FM -> DAS -> VMs (every part cached in {run})", flush=True)
    config = ReproduceConfig(data=data, dataset="synthetic", vms=vms or DEMO_VMS, studies=DEMO_STUDIES, device=device)
    results = Reproduction(config, run).run()
    print("\n" + main_table_text(results))
    report = write_report(run)
    print(f"\n[3/3] report: {report.html} (Markdown: {report.markdown}; {len(report.plots)} plots)")
    return results
