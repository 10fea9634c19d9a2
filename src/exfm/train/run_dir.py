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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exfm.data.dataset import Dataset, atomic_write_text, open_dataset
from exfm.models.base import RecModel
from exfm.models.registry import build_model
from exfm.train.config import TrainConfig, load_train_config

CHECKPOINT_FORMAT = "exfm-checkpoint/1"


class RunError(ValueError):
    """A checkpoint is corrupt, incomplete, or does not fit the run's model."""


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


@dataclass
class SavedRun:
    """A finished or interrupted run as saved on disk: its config, dataset and one checkpoint."""

    run: RunDirectory
    checkpoint: str
    config: TrainConfig
    dataset: Dataset
    state: dict

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.run.checkpoints / f"{self.checkpoint}.pt"

    @property
    def tasks(self) -> list[str]:
        return self.config.tasks_for(self.dataset.schema)

    def served_model(self) -> tuple[RecModel, list[str]]:
        """The plain model (backbone + serving heads) with the checkpoint's weights, in eval mode,
        and the checkpoint keys it ignored (training-only heads)."""
        model = build_model(self.config.model, self.dataset.schema, self.tasks).to(self.config.device)
        ignored = load_serving_state(model, self.state["model"], str(self.path))
        return model.eval(), ignored


def open_run(
    run_dir: str | Path, checkpoint: str = "last", *, device: str = "cpu", data: str | Path | None = None
) -> SavedRun:
    """Open a run directory's config, dataset (``data`` if it moved) and checkpoint.

    Raises:
        FileNotFoundError: not a run directory, or no such checkpoint (the message lists those there are).
        RunError: a corrupt or unreadable checkpoint, or one without a model state and stream position.
    """
    run = RunDirectory(run_dir)
    if not run.config_path.exists():
        raise FileNotFoundError(f"{run.root}: not a run directory (no config.yaml)")
    config = load_train_config(run.config_path, {"device": device, "data": str(data) if data is not None else None})
    path = run.checkpoints / f"{checkpoint}.pt"
    try:
        state = run.load_checkpoint(checkpoint, map_location=device)
    except Exception as exc:  # torch.load raises many types for a truncated or garbled file
        raise RunError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if state is None:
        available = sorted(p.stem for p in run.checkpoints.glob("*.pt"))
        raise FileNotFoundError(f"{path}: no checkpoint named {checkpoint!r} (available: {available})")
    if not isinstance(state.get("model"), Mapping) or "position" not in state:
        raise RunError(f"{path}: not a training checkpoint (no model state or stream position)")
    return SavedRun(run, checkpoint, config, open_dataset(config.data), state)


def load_serving_state(model: RecModel, state: Mapping[str, torch.Tensor], origin: str = "checkpoint") -> list[str]:
    """Load the backbone and serving-head weights of a training state into a plain model.

    Keys the plain model does not have (training-only heads, anything else a distillation method
    registered on the model) are ignored and returned.

    Raises:
        RunError: a parameter or buffer of the plain model is missing, or has another shape.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        raise RunError(f"{origin}: the checkpoint lacks serving parameter(s) {missing}")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise RunError(f"{origin}: the checkpoint's shapes differ from the run's model: {wrong}")
    model.load_state_dict({key: state[key] for key in expected})
    return sorted(set(state) - set(expected))
