"""nanoseek: a compact, complete DeepSeek-V3 / R1 system in PyTorch."""

from nanoseek.config import ModelConfig, preset
from nanoseek.model import LatentCache, ModelOutput, Transformer

__all__ = ["LatentCache", "ModelConfig", "ModelOutput", "Transformer", "preset"]
__version__ = "0.1.0"
