"""RankMixer, its ablations and baselines (pure PyTorch; no torch.distributed)."""

from model.config import ModelConfig, MoEConfig
from model.moe import PerTokenExperts, PerTokenMoE, moe_layers
from model.output import ModelOutput, task_loss
from model.rankmixer import RankMixer
from model.tokenizer import Tokenizer
from model.zoo import MODELS, build_model

__all__ = [
    "MODELS",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "PerTokenExperts",
    "PerTokenMoE",
    "RankMixer",
    "Tokenizer",
    "build_model",
    "moe_layers",
    "task_loss",
]
