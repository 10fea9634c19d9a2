"""The serving export: the served vertical model as a standalone artifact that loads without exfm.

The served VM is the backbone plus the serving heads only (DESIGN §1): the auxiliary and adapter
heads of distillation (``distill:<task>``, ``adapter:<task>``) and the Student Adapter exist at
training time alone, so they are dropped here, and a VM trained with ExFM exports to exactly the
graph, parameters and outputs of the same VM trained without it.

Command line (``exfm export``)::

    exfm export runs/fm_ah --out exports/fm_ah [--checkpoint last | day-04] [--data DIR] [--overwrite]

Artifact (written to a temporary directory, then renamed into place)::

    DIR/model.pt2       torch.export program: (ids, sequences, dense) -> logits [B, T]
    DIR/model.onnx      the same graph as ONNX, when the ONNX exporter handles the model
    DIR/manifest.json   inputs, outputs, hashing and numeric rules, provenance

Load it with PyTorch alone::

    program = torch.export.load("DIR/model.pt2").module()
    logits = program(ids, sequences, dense)         # [B, T]; torch.sigmoid(logits) = probabilities

The three inputs (:class:`~exfm.models.embedding.FeatureLayout` of the model's features, in
schema order; the manifest lists the columns):

* ``ids``: ``[B, F]`` int64 bucket ids of the categorical features (0 = missing);
* ``sequences``: ``[B, Σ_s L_s]`` int64, each sequence feature's bucket ids, oldest first,
  right-padded with 0 to its ``max_len``, side by side;
* ``dense``: ``[B, N]`` float32 numeric features, transformed as the reader does (the manifest
  holds each feature's fill, transform, clip and the standardisation moments at the checkpoint).

A feature the model does not read (e.g. a teacher-only feature) is not an input.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import platform
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import exfm
from exfm.data.batch import Batch
from exfm.data.dataset import Dataset, atomic_output_dir, atomic_write_text
from exfm.data.reader import ReaderPosition, StreamReader
from exfm.data.views import View
from exfm.models.base import RecModel
from exfm.models.registry import count_parameters
from exfm.schema import Schema
from exfm.train.run_dir import open_run

SERVING_FORMAT = "exfm-serving/1"
PROGRAM_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"

HASHING_RULE = {
    "reference": "exfm.data.hashing (hash_text, bucketize)",
    "hash": (
        "h(v) = signed int64 read little-endian from blake2b(utf8(text(v)), digest_size=8); an integer id hashes "
        "as its decimal text; a missing value (null or empty string) has h = 0; a real hash of 0 becomes 1"
    ),
    "bucket": "bucket(h) = 0 if h == 0 else 1 + (h mod (buckets - 1)), floor modulo (result in [1, buckets - 1])",
    "sequences": "each item is hashed and bucketed with the buckets of the categorical feature the sequence shares",
}
NUMERIC_RULE = (
    "x = fill if missing; x = sign(x) * log1p(|x|) for log1p transforms; x = (x - mean) / std for standardize "
    "transforms; x = clip(x, -clip, clip) if clip is set"
)


class ServingModel(nn.Module):
    """The served VM: a snapshot of a model's backbone and serving heads on plain tensors.

    A copy of the model (later training does not change it; no gradients; eval mode) without any
    head but the serving heads, whose embedding collections read the model's own features
    (:attr:`RecModel.input_layout`): the same ``encode`` as training, on
    :class:`~exfm.models.embedding.FeatureTensors` unpacked from three tensors.

    Args:
        model: the trained model; training-only heads (``distill:*``, ``adapter:*``) are dropped.

    Attributes:
        tasks: the serving heads, in output column order.
        layout: the input features (:class:`~exfm.models.embedding.FeatureLayout`).
        source: the layout of the dataset batches the model was trained on (for :meth:`inputs`).

    Shapes: ``ids [B, F]`` int64, ``sequences [B, Σ L_s]`` int64, ``dense [B, N]`` float32
    ``→ logits [B, T]`` float32.
    """

    def __init__(self, model: RecModel) -> None:
        super().__init__()
        self.tasks = tuple(model.serving_heads)
        self.layout = model.input_layout
        self.source = model.embedding_collections()[0].source
        served = copy.deepcopy(model)
        served.heads = nn.ModuleDict({task: served.heads[task] for task in self.tasks})
        for collection in served.embedding_collections():
            collection.read_from(self.layout)
        self.model = served.requires_grad_(False)
        self.eval()

    def inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, sequences, dense)`` of a dataset batch (as the reader yields it)."""
        return self.layout.pack(self.layout.read(batch, self.source))

    def example_inputs(self, batch_size: int = 2) -> tuple[Tensor, Tensor, Tensor]:
        """Valid CPU inputs for tracing: id 1 everywhere, full-length sequences, zero dense values."""
        return (
            torch.ones(batch_size, len(self.layout.categorical), dtype=torch.long),
            torch.ones(batch_size, self.layout.sequence_width, dtype=torch.long),
            torch.zeros(batch_size, len(self.layout.numeric)),
        )

    def forward(self, ids: Tensor, sequences: Tensor, dense: Tensor) -> Tensor:
        x = self.model.backbone(self.layout.unpack(ids, sequences, dense))
        logits = self.model.apply_heads(x, self.tasks)
        return torch.stack([logits[task] for task in self.tasks], dim=1)


def serving_inputs(model: RecModel, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """The exported model's inputs ``(ids, sequences, dense)`` for a dataset batch of ``model``."""
    layout = model.input_layout
    return layout.pack(layout.read(batch, model.embedding_collections()[0].source))


def export_model(
    model: RecModel,
    out_dir: str | Path,
    schema: Schema,
    *,
    numeric_moments: Mapping[str, tuple[float, float]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    onnx: bool = True,
    overwrite: bool = False,
) -> dict:
    """Export the served part of ``model`` (backbone + serving heads) to ``out_dir``.

    The program is exported on the CPU (the original model stays where it is).

    Args:
        model: the model, built for ``schema``; its training-only heads are dropped.
        out_dir: the artifact directory (written atomically).
        schema: the dataset schema the model was built from (inputs, hashing, numerics).
        numeric_moments: ``{feature: (mean, std)}`` of the standardised numeric features at the
            checkpoint (:func:`numeric_moments`); None leaves them out of the manifest.
        metadata: extra manifest entries (provenance: run, checkpoint, training method, ...).
        onnx: also try the ONNX export (its failure is recorded in the manifest, not raised).
        overwrite: replace an existing ``out_dir``.

    Returns:
        The manifest (also written as ``manifest.json``).
    """
    served = ServingModel(model).cpu()
    example = served.example_inputs()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(served, example, dynamic_shapes=tuple({0: batch} for _ in example))
    counts = count_parameters(served.model)
    manifest = {
        "format": SERVING_FORMAT,
        "files": {"program": PROGRAM_FILE, "onnx": None},
        "tasks": list(served.tasks),
        "inputs": _input_spec(served, schema, numeric_moments),
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": ["batch", len(served.tasks)],
                "columns": list(served.tasks),
                "note": "logits; sigmoid gives the probability",
            }
        ],
        "schema_fingerprint": schema.fingerprint(),
        "schema": schema.model_dump(mode="json"),
        "hashing": HASHING_RULE,
        "numeric_rule": NUMERIC_RULE,
        "parameter_count": {"sparse": counts.sparse, "dense": counts.dense, "total": counts.total},
        **(metadata or {}),
        "exfm_version": exfm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        torch.export.save(program, staging / PROGRAM_FILE)
        manifest["onnx"] = _export_onnx(program, example, staging / ONNX_FILE) if onnx else {"status": "skipped"}
        if manifest["onnx"]["status"] == "ok":
            manifest["files"]["onnx"] = ONNX_FILE
        atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    checkpoint: str = "last",
    *,
    data: str | Path | None = None,
    onnx: bool = True,
    overwrite: bool = False,
) -> dict:
    """Export the served VM of a training run's checkpoint (the ``exfm export`` command).

    Reads ``RUN/config.yaml`` and ``RUN/checkpoints/<checkpoint>.pt``, builds the run's plain
    model (serving heads only), loads its weights from the checkpoint (training-only heads and
    other state are ignored and listed in the manifest), computes the numeric standardisation
    moments at the checkpoint's stream position, and writes the artifact (:func:`export_model`).

    Args:
        run_dir: the run directory.
        out_dir: the artifact directory.
        checkpoint: the checkpoint name (``last``, ``day-04``, ...).
        data: the dataset directory, if it moved since training (default: the config's ``data``).
        onnx: also try the ONNX export.
        overwrite: replace an existing ``out_dir``.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: not a run directory, or no such checkpoint.
        RunError: a corrupt checkpoint, or one without every serving parameter.
    """
    saved = open_run(run_dir, checkpoint, data=data)
    config, dataset, state, run = saved.config, saved.dataset, saved.state, saved.run
    model, ignored = saved.served_model()
    position = tuple(state["position"])
    metadata = {
        "training_method": config.distillation.method,
        "model": config.model.model_dump(mode="json"),
        "checkpoint": {
            "run": str(run.root.resolve()),
            "name": checkpoint,
            "position": {"day": position[0], "batch": position[1]},
            "examples": state.get("examples"),
            "train_days": list(config.train_days),
            **({"view": config.view.model_dump(mode="json")} if config.view is not None else {}),
        },
        "ignored_state": ignored,
    }
    moments = numeric_moments(dataset, position, config.batch_size, view=config.view)
    return export_model(
        model, out_dir, dataset.schema, numeric_moments=moments, metadata=metadata, onnx=onnx, overwrite=overwrite
    )


def numeric_moments(
    dataset: Dataset, position: tuple[int, int], batch_size: int, *, view: View | None = None
) -> dict[str, tuple[float, float]]:
    """``{feature: (mean, std)}`` of the standardised numeric features, as the reader has them at ``position``.

    ``position = (day, batch)`` is a stream position (the next batch to read); the moments are
    those of every row before it (:meth:`~exfm.data.reader.StreamReader.start_normalizer`), i.e.
    the transform the reader applies to the batch at ``position``. A run trained through a
    ``view`` saw only the view's rows: pass it, so that the moments (and the position) are those
    of the filtered stream.
    """
    day, batch = position
    reader = StreamReader(dataset, [day], batch_size, start=ReaderPosition(day, batch), prefetch=0, row_filter=view)
    normalizer = reader.start_normalizer()
    mean, std = normalizer.moments()
    numeric = dataset.schema.numeric
    return {f.name: (float(mean[i]), float(std[i])) for i, f in enumerate(numeric) if normalizer.standardize[i]}


def _input_spec(served: ServingModel, schema: Schema, moments: Mapping[str, tuple[float, float]] | None) -> list[dict]:
    """The manifest's description of the three inputs, column by column."""
    layout = served.layout
    categorical = [
        {"feature": name, "column": schema.feature(name).source, "buckets": schema.feature(name).buckets}
        for name in layout.categorical
    ]
    segments, offset = [], 0
    for name, max_len in layout.sequences:
        spec = schema.feature(name)
        table = schema.feature(spec.embedding)
        segments.append(
            {
                "feature": name,
                "column": spec.source,
                "separator": spec.separator,
                "offset": offset,
                "max_len": max_len,
                "table": table.name,
                "buckets": table.buckets,
            }
        )
        offset += max_len
    numeric = []
    for name in layout.numeric:
        spec = schema.feature(name)
        entry = {"feature": name, "column": spec.source, "transform": str(spec.transform), "fill": spec.fill}
        entry["clip"] = spec.clip
        if spec.transform.standardizes:
            mean, std = (moments or {}).get(name, (None, None))
            entry.update(mean=mean, std=std)
        numeric.append(entry)
    return [
        {
            "name": "ids",
            "dtype": "int64",
            "shape": ["batch", len(categorical)],
            "columns": categorical,
            "note": "bucket ids (hashing rule); 0 = missing",
        },
        {
            "name": "sequences",
            "dtype": "int64",
            "shape": ["batch", layout.sequence_width],
            "segments": segments,
            "note": "per segment: item bucket ids, oldest first, right-padded with 0 to max_len; 0 = padding",
        },
        {
            "name": "dense",
            "dtype": "float32",
            "shape": ["batch", len(numeric)],
            "columns": numeric,
            "note": "numeric_rule applied to the raw values",
        },
    ]


def _export_onnx(program: torch.export.ExportedProgram, example: tuple[Tensor, ...], path: Path) -> dict:
    """Write the program as ONNX; ``{"status": "ok" | "failed" | "unavailable", ...}`` (never raises)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        return {"status": "unavailable", "error": f"{exc} (pip install 'exfm[onnx]')"}
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its progress lines and optional-dependency notices
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch's exporter
            torch.onnx.export(
                program,
                example,
                str(path),
                dynamo=True,
                input_names=["ids", "sequences", "dense"],
                output_names=["logits"],
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the reason goes to the manifest
        path.unlink(missing_ok=True)
        return {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    finally:
        exporter_log.setLevel(level)
    import onnx as onnx_module

    return {"status": "ok", "opset": next(o.version for o in onnx_module.load(path).opset_import if o.domain == "")}
