"""nanoseek: a compact, complete DeepSeek-V3 / R1 system in PyTorch.

    model = nanoseek.load_pretrained("path/to/checkpoint", dtype=torch.bfloat16, device="cuda")
    nanoseek.save_pretrained(model, "out/")
"""

from nanoseek.config import ModelConfig, preset
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.model import LatentCache, ModelOutput, Transformer

__all__ = ["LatentCache", "ModelConfig", "ModelOutput", "Transformer", "load_pretrained", "preset",
           "save_pretrained"]
__version__ = "0.1.0"
