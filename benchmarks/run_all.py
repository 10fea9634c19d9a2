"""Run every benchmark of benchmarks/ in turn (one subprocess each, OMP_NUM_THREADS=1).

python benchmarks/run_all.py          # quick sizes, well under 10 minutes on 2 cores
python benchmarks/run_all.py --full   # real sizes
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    extra = sys.argv[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script), *extra], env=env, cwd=HERE).returncode
        print(f"-- {script.name}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
