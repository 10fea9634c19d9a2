"""Models: the embedding collection, shared blocks, the model interface and the model zoo."""

from exfm.models.attention import MultiHeadSelfAttention, SelfAttentionHeads, TargetAttention, masked_softmax
from exfm.models.base import RecModel
from exfm.models.blocks import (
    MLP,
    CrossLayerV1,
    CrossLayerV2,
    CrossNetV1,
    CrossNetV2,
    FMInteraction,
    LowRankMixtureCrossLayer,
)
from exfm.models.dcn import DCNModel
from exfm.models.dcnv2 import DCNv2Model
from exfm.models.deepfm import DeepFMInteraction, DeepFMModel
from exfm.models.dlrm import DLRMModel, DotInteraction
from exfm.models.dmin import DMINModel, MultiInterestArch
from exfm.models.embedding import (
    EmbeddedFeatures,
    EmbeddingCollection,
    FeatureLayout,
    FeatureTensors,
    SequenceEmbedding,
)
from exfm.models.fm import FMModel
from exfm.models.fmfm import FieldPairInteraction, FmFMModel
from exfm.models.multitask import MultiTaskModel
from exfm.models.registry import (
    MODEL_CONFIGS,
    BackboneConfig,
    ComputeCost,
    DCNConfig,
    DCNv2Config,
    DeepFMConfig,
    DLRMConfig,
    DMINConfig,
    FMConfig,
    FmFMConfig,
    ModelConfig,
    MultiTaskConfig,
    ParameterCount,
    TwoTowerConfig,
    build_model,
    count_parameters,
    flops_per_example,
    parse_model_config,
)
from exfm.models.two_tower import ExportedTower, TowerArch, TwoTowerModel

__all__ = [
    "MLP",
    "MODEL_CONFIGS",
    "BackboneConfig",
    "ComputeCost",
    "CrossLayerV1",
    "CrossLayerV2",
    "CrossNetV1",
    "CrossNetV2",
    "DCNConfig",
    "DCNModel",
    "DCNv2Config",
    "DCNv2Model",
    "DLRMConfig",
    "DLRMModel",
    "DMINConfig",
    "DMINModel",
    "DeepFMConfig",
    "DeepFMInteraction",
    "DeepFMModel",
    "DotInteraction",
    "EmbeddedFeatures",
    "EmbeddingCollection",
    "ExportedTower",
    "FMConfig",
    "FMInteraction",
    "FMModel",
    "FeatureLayout",
    "FeatureTensors",
    "FieldPairInteraction",
    "FmFMConfig",
    "FmFMModel",
    "LowRankMixtureCrossLayer",
    "ModelConfig",
    "MultiHeadSelfAttention",
    "MultiInterestArch",
    "MultiTaskConfig",
    "MultiTaskModel",
    "ParameterCount",
    "RecModel",
    "SelfAttentionHeads",
    "SequenceEmbedding",
    "TargetAttention",
    "TowerArch",
    "TwoTowerConfig",
    "TwoTowerModel",
    "build_model",
    "count_parameters",
    "flops_per_example",
    "masked_softmax",
    "parse_model_config",
]
