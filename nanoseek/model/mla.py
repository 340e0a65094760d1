"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Shapes: B batch, S query tokens, T key tokens, D hidden, H heads, N qk_nope_head_dim,
P qk_rope_head_dim, V v_head_dim, R kv_lora_rank, Q q_lora_rank.

    q      = q_b(norm(q_a(x)))            (B, S, H, N + P)   [or q_proj(x) when Q is None]
    c, k_pe = split(kv_a(x), [R, P])      c: (B, S, R) -> kv_a_layernorm; k_pe: (B, S, P), one head
    k_nope, v = split(kv_b(c), [N, V])    per head
    q_pe, k_pe <- RoPE; k = [k_nope ; k_pe] (k_pe shared by all heads), q = [q_nope ; q_pe]
    out    = o_proj(softmax(q k^T * scale) v)

Two ways to compute the same attention:
- expanded (training, prefill): materialise per-head K and V and call SDPA (causal);
- absorbed (decode over the latent cache): W_kv_b = [W_uk ; W_uv] per head, so
  q_nope . (W_uk c) = (W_uk^T q_nope) . c and the value projection moves after the softmax:
  out_h = W_uv (sum_t p_t c_t). Only c and k_pe (R + P numbers per token) are ever read.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanoseek.config import ModelConfig
from nanoseek.model.cache import LatentCache, check_layer_view
from nanoseek.model.common import Linear, RMSNorm
from nanoseek.model.rope import apply_rope


def _sdpa_backends(device: torch.device):
    """On CUDA prefer cuDNN attention: the flash kernel refuses q/k head dim != v head dim (192 vs 128)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                         cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.kv_rank, self.interleaved, self.scale = cfg.kv_lora_rank, cfg.rope_interleave, cfg.softmax_scale
        qk_dim, D, H = cfg.qk_head_dim, cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(H * cfg.v_head_dim, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, positions: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """x (B, S, D) -> attention output (B, S, D).

        Without a cache: causal attention over x (expanded path). With a cache: the new latents
        are written at `positions` (B, S); if `positions` is None the call is a prefill from
        position 0 (expanded path), else the queries attend over the cache's first `kv_len`
        positions through the absorbed path.
        """
        q, kv = self.project(x)
        return self.o_proj(self.attention(q, kv, cos, sin, cache, positions, kv_len))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> queries q (B, S, H, N + P) and kv_a(x) = [c_kv ; k_pe] (B, S, R + P), unnormed."""
        B, S, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(B, S, self.n_heads, self.nope + self.rope), self.kv_a_proj_with_mqa(x)

    def attention(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: LatentCache | None = None, positions: torch.Tensor | None = None,
                  kv_len: int | None = None) -> torch.Tensor:
        """q (B, S, H, N + P) and kv (B, S, R + P) from `project` -> per-head outputs (B, S, H * V), before o_proj."""
        B, S = q.shape[:2]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # (B, S, H, N), (B, S, H, P)
        c_kv, k_pe = kv.split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, S, R)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.interleaved)[:, :, 0]  # (B, S, P)
        if cache is None:
            return self.expanded(q_nope, q_pe, c_kv, k_pe)
        check_layer_view(cache)  # this layer's view (`LatentCache.layer`): its entries are layer 0 of it
        if positions is None:  # prefill from position 0
            cache.write(0, torch.arange(S, device=q.device).expand(B, S), c_kv, k_pe)
            return self.expanded(q_nope, q_pe, c_kv, k_pe)
        cache.write(0, positions, c_kv, k_pe)
        return self.absorbed(q_nope, q_pe, cache.read(0, kv_len or cache.max_len).to(q.dtype), positions)

    def expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        """Causal attention with per-head K/V materialised from the latent (SDPA) -> (B, S, H * V)."""
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, S, N + P)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope)), dim=-1).transpose(1, 2)
        with _sdpa_backends(q.device):
            out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.scale)
        return out.transpose(1, 2).reshape(B, S, H * self.v_dim)

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """Attention over cached latents [c_kv ; k_pe] (B, T, R + P) for queries at positions (B, S)
        -> (B, S, H * V)."""
        B, S, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # (H, N, R), (H, V, R)
        q_lat = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)  # query in latent space
        q_all = torch.cat((q_lat, q_pe), dim=-1)  # (B, S, H, R + P): one product scores both parts
        o_lat = latent_attention(q_all, latent, positions, self.scale, self.kv_rank)  # (B, S, H, R)
        out = torch.einsum("bshr,hvr->bshv", o_lat, w_uv)  # (B, S, H, V)
        return out.reshape(B, S, H * self.v_dim)


def latent_attention(q_all: torch.Tensor, latent: torch.Tensor, positions: torch.Tensor, scale: float,
                     rank: int) -> torch.Tensor:
    """Softmax attention of q_all (B, S, H, R + P) over cached [c_kv ; k_pe] latent (B, T, R + P), keys
    at or before each query's position (B, S) -> o_lat = sum_t p_t c_t (B, S, H, R)."""
    T = latent.shape[1]
    scores = torch.einsum("bshd,btd->bsht", q_all, latent) * scale  # (B, S, H, T)
    visible = torch.arange(T, device=latent.device)[None, None, :] <= positions[:, :, None]  # (B, S, T)
    scores = scores.float().masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(latent.dtype)
    return torch.einsum("bsht,btr->bshr", probs, latent[..., :rank])
