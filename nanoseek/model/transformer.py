"""The DeepSeek-V3 decoder: pre-norm blocks (MLA + dense MLP or DeepSeekMoE) and MTP modules.

Shapes: B batch, S sequence, D hidden, V vocabulary.

    h = embed(ids)
    for each block:  h = h + attn(norm(h));  h = h + ffn(norm(h))
    hidden = norm(h);  logits = lm_head(hidden)

Multi-token prediction module k (1..num_nextn_predict_layers) predicts token i+k+1 at position i:
    h_k = block_k(eh_proj([enorm(embed(t_{i+k})) ; hnorm(h_{k-1})]))     (embedding first)
    logits_k = lm_head(shared_head.norm(h_k)),   h_0 = hidden (the main model's normed output)
Embedding and output head are shared with the main model.

Parameter names mirror the Hugging Face layout (`layers.{i}.self_attn.q_a_proj`, ...), so the
checkpoint mapping in `nanoseek/hf.py` (`nanoseek.load_pretrained`, `nanoseek.save_pretrained`) is a
rename of the `model.` prefix, the stacked experts and
the MTP layers (`mtp.{k}` <-> `model.layers.{num_hidden_layers + k}`). Layers live in a
`ModuleDict` so a pipeline stage is cut by deleting entries; the model holds no distributed code,
no kernels and no checkpoint format: fast paths are swapped in from outside (`nanoseek.kernels.modules.install`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.cache import LatentCache
from nanoseek.model.common import MLP, Linear, RMSNorm
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE, RoutedExperts, Router
from nanoseek.model.rope import rope_cos_sin, rope_frequencies


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, V) main head (None when the forward ran without heads)
    hidden: torch.Tensor  # (B, S, D) after the final norm (the MTP modules' h_0)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, S, V), predicts i+k+1
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # without heads: depth k's normed (B, S, D)


class Block(nn.Module):
    """Pre-norm decoder layer: MLA then a dense SwiGLU MLP or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                positions: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, positions, kv_len)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """The MTP module's output norm (its own weights); the head matrix is the main lm_head unless a
    checkpoint stores a different one (then `head` holds it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head: Linear | None = None


class MTPLayer(Block):
    """One multi-token-prediction module: a Block preceded by the embedding/hidden merge."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)
        self.embed_tokens: nn.Embedding | None = None  # set only when a checkpoint unties it

    def merge(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """(B, S, D) previous-depth hidden and (B, S, D) embedding of the next token -> (B, S, D)."""
        return self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))


class Transformer(nn.Module):
    """DeepSeek-V2/V3 causal LM with optional MTP modules. Single-device maths only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Initialise every weight in place (also after `to_empty` from the meta device)."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.w13, 0.0, std)
                nn.init.normal_(module.w2, 0.0, std)
            elif isinstance(module, MoE):
                module.load_since_update.zero_()
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, _ = rope_frequencies(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    seed: int | None = None) -> Transformer:
        """Build on the meta device, materialise on `device`, initialise (deterministic with `seed`)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
        if dtype is not None:
            model.to_dtype(dtype)
        return model

    def to_dtype(self, dtype: torch.dtype) -> Transformer:
        """Cast weights to dtype, keeping the router weights and biases fp32 as checkpoints do."""
        for name, p in self.named_parameters():
            if not name.endswith("gate.weight"):
                p.data = p.data.to(dtype)
        return self

    @property
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        """A latent cache for the main layers and the MTP layers."""
        cfg, w = self.config, self.embed_tokens.weight
        return LatentCache(cfg.num_hidden_layers + cfg.num_nextn_predict_layers, batch_size, max_len,
                           cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype or w.dtype, w.device)

    # ------------------------------------------------------------------ forward
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, positions, self.attention_factor, dtype)

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, kv_len: int | None = None,
                mtp_tokens: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                logits_from: int = 0, heads: bool = True) -> ModelOutput:
        """input_ids (B, S) -> ModelOutput.

        positions (B, S): token positions (default 0..S-1). With `cache`: positions None is a
        prefill from 0; given positions, the tokens are decoded against the cache's first
        `kv_len` positions (absorbed MLA). `mtp_tokens` (B, S), the tokens that follow each input
        position (the training targets), switches on the MTP modules: depth k embeds
        mtp_tokens[:, i + k - 1] at position i; its last k - 1 positions see padding.
        `logits_at` (B,): the one position per row whose logits are wanted (a prefill needs only
        each prompt's last); the output head then runs on those rows only and logits is (B, 1, V).
        `logits_from`: the head runs on positions logits_from.. only, logits (B, S - logits_from, V) (an RL
        update scores only the responses, which start after the prompts). `hidden` is always (B, S, D).
        `heads=False` skips the output heads: logits is None and the MTP modules leave their normed outputs
        in `mtp_hidden`, for a loss that applies each head itself (`head_weight`, `train.fused_head`).
        """
        B, S = input_ids.shape
        pos = positions if positions is not None else torch.arange(S, device=input_ids.device).expand(B, S)
        h = self.embed_tokens(input_ids)  # (B, S, D)
        cos, sin = self.rope(pos, h.dtype)
        for i, block in enumerate(self.layers.values()):  # each block gets its own layer's cache view
            h = block(h, cos, sin, None if cache is None else cache.layer(i), positions, kv_len)
        hidden = self.norm(h)
        if not heads:
            logits = None
        elif logits_at is not None:
            logits = self.lm_head(hidden[torch.arange(B, device=hidden.device), logits_at][:, None])  # (B, 1, V)
        else:
            logits = self.lm_head(hidden[:, logits_from:] if logits_from else hidden)
        out = ModelOutput(logits=logits, hidden=hidden)
        if mtp_tokens is not None:
            h_prev = hidden
            for k in range(1, len(self.mtp) + 1):
                shifted = torch.nn.functional.pad(mtp_tokens[:, k - 1:], (0, k - 1))  # (B, S)
                h_prev, logits = self.mtp_forward(k, h_prev, shifted, cos, sin, with_head=heads)
                (out.mtp_logits if heads else out.mtp_hidden).append(logits)
        return out

    def head_weight(self, depth: int = 0) -> torch.Tensor:
        """The output head's weight (V, D) of the main model (depth 0) or of MTP module `depth`."""
        own = self.mtp[depth - 1].shared_head.head if depth else None  # an MTP module's own head, if any
        return (self.lm_head if own is None else own).weight

    def mtp_forward(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, cache: LatentCache | None = None, positions: torch.Tensor | None = None,
                    kv_len: int | None = None, with_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` (1-based): h_prev (B, S, D), next_ids (B, S) -> (h (B, S, D), logits), or with
        with_head=False (h, the head's normed input (B, S, D))."""
        layer = self.mtp[depth - 1]
        embed = self.embed_tokens if layer.embed_tokens is None else layer.embed_tokens
        head = self.lm_head if layer.shared_head.head is None else layer.shared_head.head
        if cache is not None:  # the MTP layers' entries follow the main layers'
            cache = cache.layer(self.config.num_hidden_layers + depth - 1)
        h = layer(layer.merge(h_prev, embed(next_ids)), cos, sin, cache, positions, kv_len)
        normed = layer.shared_head.norm(h)
        return h, head(normed) if with_head else normed

    # ------------------------------------------------------------------ training statistics
    @torch.no_grad()
    def record_load(self) -> None:
        """Add each MoE layer's tokens-per-expert of the last forward to its `load_since_update`."""
        counted = [m for m in self.moe_layers if m.last_load is not None]
        if counted:  # one foreach kernel for all layers
            torch._foreach_add_([m.load_since_update for m in counted], [m.last_load for m in counted])
        for m in counted:
            m.last_load = None

    def balance_loss(self) -> torch.Tensor:
        """Sum over MoE layers of the last training forward's sequence-wise balance loss (unscaled)."""
        terms = [m.balance_loss for m in self.moe_layers if m.balance_loss is not None]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.inv_freq.device)
