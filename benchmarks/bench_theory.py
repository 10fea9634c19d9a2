"""Theorems 3.1 and 3.2 on the synthetic stream (exfm.experiments.theory), as benchmark metrics.

Quick mode (default): 3 seeds of 200 000 rows, about 1.5 minutes on 2 cores; ``--full``: 3 seeds
of 1 000 000 rows. Means over seeds:

* ``theory.kd_calibration_error`` / ``theory.ah_calibration_error`` / ``theory.none_calibration_error``:
  ``|Σp/Σy - 1|`` of the VMs trained with a teacher over-predicting by a +1 logit shift (3.1);
* ``theory.ah_ne_gain_vs_none``: the AH VM's next-day NE gain over no FM, % (3.1);
* ``theory.ah_sa_ne_gain_vs_ah``: the Student Adapter's paired NE gain with a stale teacher, % (3.2);
* ``theory.verdicts_held``: how many of the four predictions held.

    OMP_NUM_THREADS=1 python benchmarks/bench_theory.py [--full] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import metric, write_result

from exfm.experiments.theory import format_theory_table, run_theory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="1M rows per seed instead of 200k")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        result = run_theory(Path(tmp), seeds=seeds, quick=not args.full)
    print("\n" + format_theory_table(result))
    a, b = result["aggregate"]["thm3_1"], result["aggregate"]["thm3_2"]
    metrics = {
        f"theory.{m}_calibration_error": metric(abs(a[m]["calibration"]["mean"] - 1), "|Σp/Σy - 1|")
        for m in ("none", "kd", "ah")
    }
    metrics["theory.ah_ne_gain_vs_none"] = metric(a["ah"]["ne_gain_vs_none"]["mean"], "%")
    metrics["theory.ah_sa_ne_gain_vs_ah"] = metric(b["ah_sa"]["ne_gain_vs_ah"]["mean"], "%", "> 0 (Theorem 3.2)")
    metrics["theory.verdicts_held"] = metric(sum(v["held"] for v in result["verdicts"]), "of 4", "4")
    metrics["theory.elapsed_s"] = metric(result["elapsed_s"], "s")
    write_result(
        "theory",
        metrics,
        {
            "rows": result["setup"]["rows"],
            "seeds": list(seeds),
            "verdicts": result["verdicts"],
            "aggregate": result["aggregate"],
        },
    )


if __name__ == "__main__":
    main()
