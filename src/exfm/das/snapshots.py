"""The Snapshot Publishing Database (SPD): FM snapshots published atomically as directories.

::

    SPD/<snapshot_id>/weights.safetensors  the served model's state dict (safetensors: no pickle)
    SPD/<snapshot_id>/manifest.json        id, FM name, run config, schema, tasks, sha256 of the
                                           weights, train-through time, creation time
    SPD/<snapshot_id>/DONE                 written last: its presence marks a complete snapshot

Each file is written under a temporary name, fsynced and renamed into place, and ``DONE`` comes
after both others, so a reader that sees ``DONE`` sees the whole snapshot. Names starting with a
dot (temporary files, snapshots being deleted) are never listed. DAS only reads the SPD; the one
exception is :func:`exfm.das.loader.collect_garbage`, which deletes snapshots no task pins.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from exfm.data.dataset import atomic_write_bytes, atomic_write_text, trained_through_us
from exfm.models.base import RecModel
from exfm.models.registry import build_model
from exfm.schema import parse_schema
from exfm.serving.export import numeric_moments
from exfm.train.config import parse_train_config
from exfm.train.run_dir import open_run

SNAPSHOT_FORMAT = "exfm-snapshot/1"
WEIGHTS_NAME = "weights.safetensors"
MANIFEST_NAME = "manifest.json"
DONE_NAME = "DONE"


class SnapshotError(ValueError):
    """A snapshot is incomplete, corrupt (checksum mismatch) or unreadable."""


@dataclass(frozen=True)
class SnapshotInfo:
    """A complete snapshot of the SPD, as its manifest describes it.

    Attributes:
        snapshot_id: the directory name, unique within the SPD.
        fm: the foundation model's name (the Zeus pointer key).
        path: the snapshot directory.
        sha256: hex digest of ``weights.safetensors``.
        train_through_us: time (µs, UTC) of the last example the weights were trained on.
        created_at_us: publication time (µs, UTC).
        manifest: the whole manifest (config, schema, tasks, source).
    """

    snapshot_id: str
    fm: str
    path: Path
    sha256: str
    train_through_us: int
    created_at_us: int
    manifest: dict[str, Any]

    @property
    def order_key(self) -> tuple[int, int, str]:
        """Snapshots of one FM are ordered by train-through time, then publication time, then id."""
        return (self.train_through_us, self.created_at_us, self.snapshot_id)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME


def write_snapshot(
    spd_dir: str | Path,
    fm: str,
    state: dict[str, torch.Tensor],
    *,
    config: dict[str, Any],
    schema: dict[str, Any],
    tasks: list[str],
    train_through_us: int,
    numeric_moments: dict[str, tuple[float, float]] | None = None,
    domains: list[str] | None = None,
    source: dict[str, Any] | None = None,
) -> SnapshotInfo:
    """Publish a served model's state dict as a new snapshot (the FM trainer's API).

    Args:
        spd_dir: the SPD root (created if missing).
        fm: the foundation model's name.
        state: the served model's state dict; tensors are copied to the CPU.
        config: the run's resolved training config (``TrainConfig.model_dump(mode="json")``).
        schema: the dataset schema (``Schema.model_dump(mode="json")``), to rebuild the model.
        tasks: the model's serving heads, in order.
        train_through_us: time (µs, UTC) of the last example trained on.
        numeric_moments: ``{feature: (μ, σ)}`` the model's standardised numeric inputs had at the
            train-through point (DAS normalises with them); None if no feature is standardised.
        domains: the training dataset's sorted domain values (domain codes are indices into it).
        source: where the weights came from (run directory, checkpoint), kept in the manifest.

    Returns:
        The complete snapshot.
    """
    created_at_us = time.time_ns() // 1000
    # clone: safetensors refuses tensors that share storage (tied weights)
    blob = save_safetensors({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})
    sha256 = hashlib.sha256(blob).hexdigest()
    snapshot_id = f"{fm}-{created_at_us:017d}-{sha256[:8]}"
    root = Path(spd_dir)
    staging = root / f".{snapshot_id}.staging-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    manifest = {
        "format": SNAPSHOT_FORMAT,
        "snapshot_id": snapshot_id,
        "fm": fm,
        "sha256": sha256,
        "weights_bytes": len(blob),
        "train_through_us": int(train_through_us),
        "created_at_us": created_at_us,
        "created_at": datetime.fromtimestamp(created_at_us / 1e6, UTC).isoformat(),
        "tasks": list(tasks),
        "numeric_moments": {k: list(v) for k, v in (numeric_moments or {}).items()},
        "domains": list(domains or []),
        "config": config,
        "schema": schema,
        "source": source or {},
    }
    atomic_write_bytes(staging / WEIGHTS_NAME, blob)
    atomic_write_text(staging / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    final = root / snapshot_id
    os.replace(staging, final)
    atomic_write_text(final / DONE_NAME, sha256 + "\n")
    return _info(final, manifest)


def publish_snapshot(spd_dir: str | Path, run_dir: str | Path, checkpoint: str = "last", *, fm: str) -> SnapshotInfo:
    """Publish the served model of a run's checkpoint (``last``, ``day-04``, ...) to the SPD.

    The train-through time is the largest event time among the rows the checkpoint has trained
    on (its stream position), so staleness can be measured per example.

    Raises:
        FileNotFoundError: not a run directory, or no such checkpoint.
        exfm.train.run_dir.RunError: a corrupt checkpoint, or one that does not fit the run's model.
    """
    saved = open_run(run_dir, checkpoint)
    model, _ = saved.served_model()
    day, batch = saved.state["position"]
    dataset = saved.dataset
    return write_snapshot(
        spd_dir,
        fm,
        model.state_dict(),
        config=saved.config.model_dump(mode="json"),
        schema=saved.dataset.schema.model_dump(mode="json"),
        tasks=saved.tasks,
        train_through_us=trained_through_us(dataset, day, batch * saved.config.batch_size),
        numeric_moments=numeric_moments(dataset, (day, batch), saved.config.batch_size),
        domains=dataset.manifest.domains,
        source={"run_dir": str(Path(run_dir).resolve()), "checkpoint": checkpoint, "position": [day, batch]},
    )


def _info(path: Path, manifest: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        snapshot_id=manifest["snapshot_id"],
        fm=manifest["fm"],
        path=path,
        sha256=manifest["sha256"],
        train_through_us=manifest["train_through_us"],
        created_at_us=manifest["created_at_us"],
        manifest=manifest,
    )


def read_snapshot(path: str | Path) -> SnapshotInfo:
    """The snapshot in directory ``path``.

    Raises:
        SnapshotError: no ``DONE`` marker (incomplete), or an unreadable manifest.
    """
    path = Path(path)
    if not (path / DONE_NAME).exists():
        raise SnapshotError(f"{path}: incomplete snapshot (no {DONE_NAME} marker)")
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        if manifest.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(
                f"{path / MANIFEST_NAME}: format {manifest.get('format')!r}, expected {SNAPSHOT_FORMAT}"
            )
        return _info(path, manifest)
    except (OSError, ValueError, KeyError) as exc:
        raise SnapshotError(f"{path / MANIFEST_NAME}: unreadable manifest ({type(exc).__name__}: {exc})") from exc


def list_snapshots(spd_dir: str | Path, fm: str | None = None) -> list[SnapshotInfo]:
    """The complete snapshots of the SPD (of FM ``fm`` if given), oldest first (``order_key``).

    Directories without ``DONE`` (being written) or with an unreadable manifest are skipped.
    """
    root = Path(spd_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            info = read_snapshot(path)
        except SnapshotError:
            continue
        if fm is None or info.fm == fm:
            found.append(info)
    return sorted(found, key=lambda s: s.order_key)


def load_weights(snapshot: SnapshotInfo) -> dict[str, torch.Tensor]:
    """Read the weights once, check their sha256 against the manifest, and decode them.

    Raises:
        SnapshotError: missing or unreadable weights, a checksum mismatch, or an undecodable file.
    """
    try:
        blob = snapshot.weights_path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{snapshot.weights_path}: unreadable ({type(exc).__name__}: {exc})") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != snapshot.sha256:
        raise SnapshotError(f"{snapshot.weights_path}: checksum mismatch (sha256 {digest}, manifest {snapshot.sha256})")
    try:
        return load_safetensors(blob)
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise SnapshotError(f"{snapshot.weights_path}: not a safetensors file ({type(exc).__name__}: {exc})") from exc


def verify(snapshot: SnapshotInfo) -> None:
    """Check that the snapshot's weights match the checksum of its manifest.

    Raises:
        SnapshotError: missing weights or a checksum mismatch.
    """
    digest = hashlib.sha256()
    try:
        with open(snapshot.weights_path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise SnapshotError(f"{snapshot.weights_path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if digest.hexdigest() != snapshot.sha256:
        raise SnapshotError(
            f"{snapshot.weights_path}: checksum mismatch (sha256 {digest.hexdigest()}, manifest {snapshot.sha256})"
        )


def build_served_model(snapshot: SnapshotInfo, state: dict[str, torch.Tensor]) -> RecModel:
    """The served model of a snapshot: built from its manifest's config and schema, in eval mode.

    Raises:
        SnapshotError: the weights do not fit the model the manifest describes.
    """
    manifest = snapshot.manifest
    config = parse_train_config(manifest["config"], str(snapshot.path / MANIFEST_NAME))
    schema = parse_schema(manifest["schema"], str(snapshot.path / MANIFEST_NAME))
    model = build_model(config.model, schema, manifest["tasks"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SnapshotError(f"{snapshot.weights_path}: weights do not fit the manifest's model: {exc}") from exc
    return model.eval()
