"""Serving export: the served vertical model (backbone + serving heads) as a standalone artifact."""

from exfm.serving.export import (
    SERVING_FORMAT,
    ServingModel,
    export_model,
    export_run,
    numeric_moments,
    serving_inputs,
)

__all__ = [
    "SERVING_FORMAT",
    "ServingModel",
    "export_model",
    "export_run",
    "numeric_moments",
    "serving_inputs",
]
