"""Dataset adapters: the raw files of public datasets -> the generic exfm dataset format.

``exfm ingest --source NAME --raw DIR --out DIR`` runs :func:`adapt`. Each adapter is a module of
this package with a function ``adapt(raw_dir, out, *, overwrite, show_progress, memory_limit_mb,
on_bad_row) -> Manifest`` that reads the original files with bounded memory (out-of-core joins
and sorts in DuckDB, streamed writing) and documents its decisions in docs/datasets.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

from exfm.data.dataset import Manifest

SOURCES = {
    "taobao": "exfm.data.sources.taobao",
    "amazon": "exfm.data.sources.amazon",
    "kuaivideo": "exfm.data.sources.kuaivideo",
    "kuairand": "exfm.data.sources.kuairand",
    "obd": "exfm.data.sources.obd",
}


def adapt(
    source: str,
    raw_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    memory_limit_mb: int = 2048,
    on_bad_row: Literal["error", "skip"] = "skip",
) -> Manifest:
    """Turn the raw files of ``source`` (one of :data:`SOURCES`) in ``raw_dir`` into a dataset at ``out``."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
    module = importlib.import_module(SOURCES[source])
    return module.adapt(
        Path(raw_dir),
        Path(out),
        overwrite=overwrite,
        show_progress=show_progress,
        memory_limit_mb=memory_limit_mb,
        on_bad_row=on_bad_row,
    )
