"""Serving export: the served vertical model (backbone + serving heads) as a standalone artifact."""

from exfm.serving.export import (
    SERVING_FORMAT,
    ExportError,
    ServingModel,
    export_model,
    export_run,
    load_serving_state,
    numeric_moments,
    serving_inputs,
)

__all__ = [
    "SERVING_FORMAT",
    "ExportError",
    "ServingModel",
    "export_model",
    "export_run",
    "load_serving_state",
    "numeric_moments",
    "serving_inputs",
]
