"""Single-device model maths: MLA, DeepSeekMoE, MTP and the decoder."""

from nanoseek.model.cache import LatentCache
from nanoseek.model.transformer import ModelOutput, Transformer

__all__ = ["LatentCache", "ModelOutput", "Transformer"]
