"""Decode fast paths as module swaps: `install(model)` puts the Triton kernels onto a model from outside.

The model's modules are the reference maths (`nanoseek.model`). Each class here subclasses one of
them, holds the same parameters (`nanoseek.model.swap.adopt`) and has one dispatch point: where its
kernels take the input (inference on a CUDA GPU with Triton, no autograd, decode-sized batches) it
runs them, else the reference forward. What each one runs:

    DecodeRMSNorm   a decode step's rows                      `nanoseek.kernels.norm`
    DecodeLinear    <= 64 rows: skinny matmul, [norm] and [+ residual] folded in   `skinny.linear`
    DecodeMLP       gate, up and SwiGLU in one launch          `skinny.swiglu`
    DecodeMLA       q_a/kv_a in one launch; RoPE, cache write and W_uk product in one; attention in two
                    (`skinny.pair`, `mla_decode`)
    DecodeMoE       router (norm, matmul, selection) in one launch; experts pair-major (<= 2 rows) or
                    as one expert-major launch (`moe_routing`, `moe_experts`)
    DecodeBlock     passes each pre-norm and residual into the module after it, so kernels fold them in:
                    h = attn(h, norm=input_layernorm, residual=h);  h = ffn(h, norm=post_norm, residual=h)

Every path computes the reference's result (tests/test_kernels.py, tests/test_infer_gpu.py). The
inference engine installs these onto its own `shared_copy` of a model, so the caller's modules are
never changed and an optimizer step on them is seen by the next decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.kernels import GEMV_MAX_BATCH, skinny_available, triton_available
from nanoseek.model.cache import LatentCache, check_layer_view
from nanoseek.model.common import MLP, RMSNorm
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE, autocast_input
from nanoseek.model.swap import adopt, replace_modules
from nanoseek.model.transformer import Block, MTPLayer

DECODE_KERNEL_MAX_TOKENS = 64  # above this the grouped GEMM path is faster (and the kernels' pair lists grow)
PAIR_MAJOR_MAX_BATCH = 2  # decode batches of at most this many rows run the pair-major expert mat-vecs


def foldable(norm: RMSNorm | None, x: torch.Tensor) -> bool:
    """Whether a decode kernel applies `norm` to x (B, ..., K) itself: no norm, or a weight of x's dtype
    and width and a mat-vec batch (B <= GEMV_MAX_BATCH: there the fold saves a launch of the chain;
    in larger batches every program's extra pass over its rows costs more, e.g. 309 against 228 us
    of skinny kernels per batch-32 step, and Inductor's fused norm stays). By batch rows, like the
    kernels' own choice, so that a plain and a speculative step take the same arithmetic."""
    return norm is None or (x.dim() >= 2 and x.shape[0] <= GEMV_MAX_BATCH and norm.weight.dtype == x.dtype
                            and norm.weight.shape == x.shape[-1:])


def norm_args(norm: RMSNorm | None) -> tuple[torch.Tensor | None, float]:
    """(weight, eps) of a norm for the kernels that fold it in; (None, 0.0) for none."""
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)


def plus(residual: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return y if residual is None else residual + y


class DecodeRMSNorm(RMSNorm):
    """The decode rows' RMSNorm as a PDL kernel (`nanoseek.kernels.norm`); reference elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_available(x) and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            from nanoseek.kernels import norm

            if norm.supported(x, self.weight):
                return norm.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class DecodeLinear(nn.Linear):
    """A few rows (a decode step) through `skinny.linear`, which streams the weight with many more thread
    blocks than cuBLAS picks for such shapes. `norm` (applied to x first) and `residual` (added to the
    output) ride inside that kernel instead of running as launches of their own."""

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        if (self.bias is None and skinny_available(x, self.weight)
                and (residual is None or residual.dtype == x.dtype)):
            from nanoseek.kernels import skinny

            if not foldable(norm, x):  # the norm runs first, on its own
                x, norm = norm(x), None
            return skinny.linear(x, self.weight, *norm_args(norm), residual)
        return plus(residual, super().forward(norm(x) if norm is not None else x))


class DecodeMLP(MLP):
    """[norm,] gate, up and SwiGLU in one skinny launch, then the down projection [+ residual]."""

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        w_gate, w_up = self.gate_proj.weight, self.up_proj.weight
        if skinny_available(x, w_gate, w_up):
            from nanoseek.kernels import skinny

            if not foldable(norm, x):
                x, norm = norm(x), None
            return self.down_proj(skinny.swiglu(x, w_gate, w_up, *norm_args(norm)), residual=residual)
        if norm is not None:
            x = norm(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x), residual=residual)


class DecodeMLA(MLA):
    """MLA with the decode kernels: the block's norm folds into the q_a/kv_a pair launch, the absorbed
    attention over the latent cache runs as `mla_decode`'s kernels, the residual folds into o_proj."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                positions: torch.Tensor | None = None, kv_len: int | None = None, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D) -> [residual +] attention(norm(x)) (B, S, D)."""
        B, S, _ = x.shape
        if hasattr(self, "q_proj"):
            x = norm(x) if norm is not None else x
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            q_lat, kv = self.down_projections(x, norm)
            q = self.q_b_proj(q_lat, norm=self.q_a_layernorm)
        q = q.view(B, S, self.n_heads, self.nope + self.rope)
        if cache is not None and positions is not None and self.decode_kernels_ok(q, cache):
            out = self.latent_decode(q, kv, cos, sin, cache, positions, kv_len)
        else:
            out = self.attention(q, kv, cos, sin, cache, positions, kv_len)
        return self.o_proj(out, residual=residual)

    def decode_kernels_ok(self, q: torch.Tensor, cache: LatentCache) -> bool:
        """No autograd, on a GPU with Triton, for the batches `nanoseek.kernels.mla_decode` takes."""
        if not triton_available(q) or torch.is_grad_enabled():
            return False
        from nanoseek.kernels import mla_decode

        return mla_decode.supported(q[..., : self.nope], cache.data.dtype, self.kv_rank, self.rope)

    def latent_decode(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache: LatentCache, positions: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        """The absorbed path in kernels: RoPE, the latent entry and its cache write, and the W_uk product in
        one launch, attention in two -> (B, S, H * V). Reference: `MLA.attention` with positions."""
        from nanoseek.kernels import mla_decode

        check_layer_view(cache)
        norm, w_kv_b = self.kv_a_layernorm, self.kv_b_proj.weight
        q_lat, q_pe = mla_decode.rope_latent(q, kv, norm.weight, norm.eps, cos, sin, self.interleaved, self.nope,
                                             w_kv_b, cache.data, 0, positions)  # this layer's view
        latent = cache.read(0, kv_len or cache.max_len)
        return mla_decode.latent_attention(q_lat, q_pe, latent, positions, w_kv_b, self.scale, self.v_dim)

    def down_projections(self, x: torch.Tensor, norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> (q_a(x') (B, S, Q), kv_a(x') (B, S, R + P)) with x' = norm(x); in decode one skinny
        launch does the norm and both projections."""
        w_q, w_kv = self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight
        if skinny_available(x, w_q, w_kv):
            from nanoseek.kernels import skinny

            if not foldable(norm, x):  # the norm runs first, then both projections in one launch
                x, norm = norm(x), None
            return skinny.pair(x, w_q, w_kv, *norm_args(norm))
        x = norm(x) if norm is not None else x
        return self.q_a_proj(x), self.kv_a_proj_with_mqa(x)


def route_shape_supported(n_experts: int, n_group: int) -> bool:
    """The routing kernel views scores as (groups, experts per group): both must be powers of two."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return pow2(n_experts) and pow2(n_group) and n_group <= n_experts


class DecodeMoE(MoE):
    """DeepSeekMoE with the decode kernels: routing in one launch (the block's norm folded in for mat-vec
    batches); for steps of at most DECODE_KERNEL_MAX_TOKENS tokens the routed experts, the shared experts
    riding along as more experts, the sum over slots and the residual in one or two launches. Larger
    steps (prefills) keep the grouped GEMMs."""

    @classmethod
    def from_module(cls, module: MoE) -> DecodeMoE:
        from nanoseek.kernels.moe_experts import moe_layer_flags_size

        new = adopt(cls, module)
        cfg, device = module.cfg, module.load_since_update.device
        # the router kernel's per-token counters and the one-launch experts' counters; zero between calls
        new.register_buffer("router_arrivals", torch.zeros(64, dtype=torch.int32, device=device), persistent=False)
        flags = moe_layer_flags_size(cfg.n_routed_experts, cfg.n_shared_experts or 0, cfg.hidden_size)
        new.register_buffer("experts_flags", torch.zeros(flags, dtype=torch.int32, device=device), persistent=False)
        return new

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D) -> [residual +] moe(norm(x)) (B, S, D)."""
        B, S, D = x.shape
        cfg = self.cfg
        if not (triton_available(x) and not torch.is_grad_enabled()
                and route_shape_supported(cfg.n_routed_experts, self.gate.groups)):
            return plus(residual, super().forward(norm(x) if norm is not None else x))
        if not foldable(norm, x):  # the router kernel normalises only mat-vec batches
            x, norm = norm(x), None
        gates, ids, flat = self.route(x.reshape(B * S, D), norm)
        x = flat.view(B, S, D)
        if flat.shape[0] > DECODE_KERNEL_MAX_TOKENS:  # a prefill: grouped GEMMs
            out = self.experts(flat, ids, gates).view(B, S, D)
            if self.shared_experts is not None:
                out = out + self.shared_experts(x)
            return plus(residual, out)
        from nanoseek.kernels import moe_experts

        x_in, w13, w2 = autocast_input(flat), self.experts.w13, self.experts.w2
        shared = self.shared_weights_for_kernel(x_in)  # riding along as more experts
        flat_residual = residual.reshape(B * S, D) if residual is not None else None
        # the kernel's output is the layer's: nothing else to add, and a residual it can add
        whole = ((shared or self.shared_experts is None)
                 and (flat_residual is None or flat_residual.dtype == x_in.dtype))
        # by batch rows (PAIR_MAJOR_MAX_BATCH), so a speculative step takes a plain step's path
        if B <= PAIR_MAJOR_MAX_BATCH and moe_experts.pair_major_ok(x_in, w13):
            if whole and shared:  # the mat-vec down kernel adds the slots and the residual
                return moe_experts.experts_sum(x_in, ids, gates, w13, w2, *shared, flat_residual).view(B, S, D)
            out = moe_experts.experts(x_in, ids, gates, w13, w2, *shared).sum(1).to(x_in.dtype)
        else:  # pair lists, experts, sum [and residual] in one launch
            out = moe_experts.experts_layer(x_in, ids, gates, w13, w2, self.experts_flags, *shared,
                                            residual=flat_residual if whole else None)
            if whole:
                return out.view(B, S, D)
        out = out.view(B, S, D)
        if self.shared_experts is not None and not shared:
            out = out + self.shared_experts(x)
        return plus(residual, out)

    def shared_weights_for_kernel(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The shared experts' (gate, up, down) weights when the experts kernels can run them as extra
        pairs (their width a multiple of the routed experts', weights of x's dtype); () otherwise, and
        the shared MLP runs on its own."""
        mlp = self.shared_experts
        if mlp is None:
            return ()
        weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        if mlp.gate_proj.weight.shape[0] % self.experts.width or any(w.dtype != x.dtype for w in weights):
            return ()
        return weights

    def route(self, flat: torch.Tensor, norm: RMSNorm | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flat (T, D) -> gates (T, K) fp32, ids (T, K), norm(flat): `Router.forward` of norm(flat) in
        Triton. Decode steps run norm, matmul and selection in one kernel (`moe_routing.normed_router`:
        programs over blocks of router rows, the last one of each token routes it). Prefills keep
        cuBLAS's fp32 matmul and select in one kernel (`moe_routing.route`), replacing torch.topk and
        sort kernels that took 4.9 ms over 11 layers of a batch-32, 512-token prefill."""
        from nanoseek.kernels import moe_routing

        cfg, gate = self.cfg, self.gate
        args = (gate.e_score_correction_bias, cfg.num_experts_per_tok, gate.groups, cfg.topk_group,
                cfg.scoring_func == "sigmoid", cfg.topk_method == "noaux_tc", cfg.norm_topk_prob,
                cfg.routed_scaling_factor)
        if moe_routing.router_ok(flat, gate.weight) and flat.shape[0] <= self.router_arrivals.numel():
            if norm is not None:
                return moe_routing.normed_router(flat, norm.weight, norm.eps, gate.weight, self.router_arrivals, *args)
            return (*moe_routing.router(flat, gate.weight, self.router_arrivals, *args), flat)
        flat = norm(flat) if norm is not None else flat
        with torch.autocast(flat.device.type, enabled=False):
            logits = F.linear(flat.float(), gate.weight.float())  # (T, E) fp32
        return (*moe_routing.route(logits, *args), flat)


class DecodeBlock(Block):
    """A block whose pre-norms and residual adds ride inside the kernels of the module after them."""

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                positions: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        h = self.self_attn(h, cos, sin, cache, positions, kv_len, norm=self.input_layernorm, residual=h)
        return self.mlp(h, norm=self.post_attention_layernorm, residual=h)


class DecodeMTPLayer(MTPLayer):
    forward = DecodeBlock.forward


DECODE = {RMSNorm: DecodeRMSNorm, nn.Linear: DecodeLinear, MLP: DecodeMLP, MLA: DecodeMLA, MoE: DecodeMoE,
          Block: DecodeBlock, MTPLayer: DecodeMTPLayer}


def install(model: nn.Module, mode: str = "decode") -> nn.Module:
    """Swap the decode fast paths into `model` in place (every module whose exact class has one) and
    return it. To keep a model unchanged, install onto `nanoseek.model.swap.shared_copy(model)`, as
    the inference engine does. The swapped modules run their kernels only where those take the input
    (a CUDA GPU with Triton, no autograd); elsewhere they compute the reference."""
    if mode != "decode":
        raise ValueError(f"mode={mode!r}: the kernels have one mode, 'decode'")

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        cls = DECODE.get(type(module))
        if cls is None:
            return None
        return cls.from_module(module) if hasattr(cls, "from_module") else adopt(cls, module)

    replace_modules(model, swap)
    return model
