"""Models: the embedding collection, shared blocks, the model interface and the model zoo."""

from exfm.models.base import RecModel
from exfm.models.blocks import MLP, CrossLayerV2, CrossNetV2, FMInteraction, LowRankMixtureCrossLayer
from exfm.models.dcnv2 import DCNv2Model
from exfm.models.embedding import EmbeddedFeatures, EmbeddingCollection, SequenceEmbedding
from exfm.models.fm import FMModel
from exfm.models.registry import (
    MODEL_CONFIGS,
    ComputeCost,
    DCNv2Config,
    FMConfig,
    ModelConfig,
    ParameterCount,
    build_model,
    count_parameters,
    flops_per_example,
    parse_model_config,
)

__all__ = [
    "MLP",
    "MODEL_CONFIGS",
    "ComputeCost",
    "CrossLayerV2",
    "CrossNetV2",
    "DCNv2Config",
    "DCNv2Model",
    "EmbeddedFeatures",
    "EmbeddingCollection",
    "FMConfig",
    "FMInteraction",
    "FMModel",
    "LowRankMixtureCrossLayer",
    "ModelConfig",
    "ParameterCount",
    "RecModel",
    "SequenceEmbedding",
    "build_model",
    "count_parameters",
    "flops_per_example",
    "parse_model_config",
]
