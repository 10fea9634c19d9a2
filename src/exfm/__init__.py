"""exfm: External Large Foundation Model (ExFM) distillation for streaming recommendation models."""

__version__ = "0.1.0"
