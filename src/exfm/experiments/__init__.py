"""Experiments on top of data, models and training: model-zoo presets, the paper's protocol."""
