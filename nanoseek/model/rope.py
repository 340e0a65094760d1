"""Rotary position embedding (RoPE) with YaRN context extension.

RoPE rotates pairs of channels of the query/key by an angle `position * inv_freq[j]`. In MLA
only the last `qk_rope_head_dim` channels of each head are rotated (the "pe" part).

YaRN stretches the low frequencies by `factor` (interpolation) and keeps the high ones
(extrapolation), blending linearly between dimensions `low..high` found from the number of
rotations `beta_fast`/`beta_slow` a dimension makes over the original context. cos/sin carry
an attention factor mscale(factor, mscale) / mscale(factor, mscale_all_dim); the softmax scale
gets mscale(factor, mscale_all_dim)^2 (see `ModelConfig.softmax_scale`).

Layouts: DeepSeek-V3 checkpoints store rotary channels as interleaved pairs (x0, x1), (x2, x3)...
(`rope_interleave=True`, and always for V2). `apply_rope` reads pairs from either layout and
writes the rotated result in the half-split layout [x_even' ; x_odd']; queries and keys get the
same treatment, so their dot products equal the interleaved rotation exactly.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq (P/2,) fp32, attention_factor) for the config's RoPE/YaRN settings."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)  # (P/2,)
    y = cfg.yarn
    if y is None:
        return inv_freq, 1.0

    factor = float(y["factor"])
    original = y["original_max_position_embeddings"]
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1
    mscale, mscale_all_dim = y.get("mscale"), y.get("mscale_all_dim")
    if y.get("attention_factor") is not None:
        attention_factor = float(y["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if y.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate (low frequency)
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv_freq, attention_factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, S, P/2) for integer positions (B, S), computed in fp32, cast to dtype."""
    angles = positions[..., None].float() * inv_freq.float()  # (B, S, P/2)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, S, H, P) by cos/sin (B, S, P/2); output in the half-split layout."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
