"""A run directory: resolved config, metrics as JSON lines, checkpoints, summary.

::

    RUN/config.yaml          the resolved training config
    RUN/metrics.jsonl        one JSON object per line: progress, day_end and eval records
    RUN/checkpoints/last.pt  the latest checkpoint (every K batches and at each day end)
    RUN/checkpoints/day-04.pt  the model trained through day 4 (kept)
    RUN/summary.json         the final evaluation

Every file is written under a temporary name and renamed into place. A checkpoint records how
many bytes of ``metrics.jsonl`` belonged to the run at that moment; resuming truncates the file
there, so records of batches that are trained again are not duplicated.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from exfm.data.dataset import atomic_write_text

CHECKPOINT_FORMAT = "exfm-checkpoint/1"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunDirectory:
    """Files of one training run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"
        self.config_path = self.root / "config.yaml"

    def create(self, config_yaml: str, resume: bool) -> None:
        """Prepare the directory. A fresh run refuses a directory that already holds a run."""
        if not resume and self.config_path.exists():
            raise FileExistsError(f"{self.root}: already holds a run (use --resume, or another --run-dir)")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if resume:
            if not self.config_path.exists():
                raise FileNotFoundError(f"{self.root}: no run to resume (no config.yaml)")
            if self.config_path.read_text() != config_yaml:
                raise ValueError(f"{self.root}: the config differs from the run's config.yaml; cannot resume")
        else:
            atomic_write_text(self.config_path, config_yaml)
            self.metrics_path.write_text("")

    # --- metrics -----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append one JSON record (flushed, so a killed run keeps what it logged)."""
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")

    def metrics_offset(self) -> int:
        return self.metrics_path.stat().st_size if self.metrics_path.exists() else 0

    def truncate_metrics(self, offset: int) -> None:
        with open(self.metrics_path, "r+") as handle:
            handle.truncate(offset)

    def read_metrics(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.root / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict, name: str = "last") -> Path:
        """Write ``checkpoints/<name>.pt`` atomically (temporary file, fsync, rename)."""
        path = self.checkpoints / f"{name}.pt"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    def keep_checkpoint(self, name: str, source: str = "last") -> Path:
        """Keep ``checkpoints/<source>.pt`` also as ``<name>.pt`` (a hard link where possible: no copy)."""
        src, dst = self.checkpoints / f"{source}.pt", self.checkpoints / f"{name}.pt"
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return dst

    def load_checkpoint(self, name: str = "last", map_location: str | torch.device = "cpu") -> dict | None:
        """The checkpoint's content, or None if there is none yet."""
        path = self.checkpoints / f"{name}.pt"
        if not path.exists():
            return None
        state = torch.load(path, map_location=map_location, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not an exfm checkpoint (format {state.get('format')!r})")
        return state
