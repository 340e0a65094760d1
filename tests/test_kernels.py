"""Triton fast paths against their PyTorch references.

Runs on a CUDA GPU, or on the CPU through Triton's interpreter when the environment sets
TRITON_INTERPRET=1 (before Triton is imported); skipped otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch

from nanoseek import preset
from nanoseek.kernels import HAVE_TRITON
from nanoseek.model.common import MLP
from nanoseek.model.moe import RoutedExperts, Router

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="needs CUDA")]),
           pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1"))]
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")

ROUTERS = {
    "v3 groups 8/4": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4),
    "v3 256 experts": dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4),
    "v3 one group": dict(n_routed_experts=32, num_experts_per_tok=4, n_group=1, topk_group=1),
    "v2 greedy": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1,
                      topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, n_routed_experts=64,
                      num_experts_per_tok=6),
    "v2 group-limited": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                             n_group=4, topk_group=2, norm_topk_prob=False, n_routed_experts=32,
                             num_experts_per_tok=3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_kernel_matches_router(device, name):
    """The selection kernel on given logits, and the decode router kernel (matmul and selection in
    one launch) on hidden states, against `Router.forward`."""
    from nanoseek.kernels.moe_routing import normed_router, route, router_ok
    from nanoseek.kernels.moe_routing import router as fused_router
    from nanoseek.model.common import RMSNorm

    cfg = preset("debug", **ROUTERS[name])
    router = Router(cfg).to(device)
    torch.manual_seed(0)
    router.weight.data.normal_(0, 0.5)
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(7, cfg.hidden_size, device=device)
    with torch.no_grad():
        gates_ref, ids_ref, _ = router(x)
        logits = torch.nn.functional.linear(x, router.weight)
        args = (router.e_score_correction_bias, cfg.num_experts_per_tok, router.groups, cfg.topk_group,
                cfg.scoring_func == "sigmoid", cfg.topk_method == "noaux_tc", cfg.norm_topk_prob,
                cfg.routed_scaling_factor)
        gates, ids = route(logits, *args)
        arrivals = torch.zeros(8, dtype=torch.int32, device=device)
        assert router_ok(x, router.weight)
        fused = [fused_router(x, router.weight, arrivals, *args) for _ in range(2)]  # counters reset each call
        # the MoE's pre-norm folded in: routes RMSNorm(x) and returns it
        norm = RMSNorm(cfg.hidden_size, 1e-5).to(device)
        norm.weight.data.uniform_(0.5, 1.5)
        h = x * 3 + 1
        gates_n, ids_n, x_n = normed_router(h, norm.weight, norm.eps, router.weight, arrivals, *args)
        torch.testing.assert_close(x_n, norm(h), rtol=1e-5, atol=1e-6)
    assert torch.equal(arrivals, torch.zeros_like(arrivals))
    gates_nr, ids_nr, _ = router(norm(h))
    assert torch.equal(ids_n.sort(-1).values, ids_nr.sort(-1).values)
    torch.testing.assert_close(gates_n.gather(1, ids_n.argsort(-1)), gates_nr.gather(1, ids_nr.argsort(-1)),
                               rtol=1e-5, atol=1e-6)
    order_ref = ids_ref.argsort(-1)
    for g, i in [(gates, ids), *fused]:
        assert torch.equal(i.sort(-1).values, ids_ref.sort(-1).values)
        torch.testing.assert_close(g.gather(1, i.argsort(-1)), gates_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)


def expert_weights(device: str, n_shared: int, seed: int) -> tuple[torch.dtype, object, RoutedExperts, MLP | None]:
    """(dtype, cfg, routed experts, shared MLP or None) for the expert kernel tests: 16 experts, 4 per
    token; D = 160 and I = 48 are not multiples of the default strips, so the divisor tiles are exercised."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = preset("debug", hidden_size=160, moe_intermediate_size=48, n_routed_experts=16, num_experts_per_tok=4)
    moe = RoutedExperts(cfg).to(device)
    torch.manual_seed(seed)
    moe.w13.data.normal_(0, 0.1)
    moe.w2.data.normal_(0, 0.1)
    moe.to(dtype)
    shared = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared).to(device, dtype) if n_shared else None
    return dtype, cfg, moe, shared


def expert_route(tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (tokens, 4) of 4 distinct experts of 16 and gates (tokens, 4); from 17 tokens on expert 0 is
    in every token, more pairs than one 16-pair block of the expert-major kernel."""
    ids = torch.stack([torch.randperm(16, device=device)[:4] for _ in range(tokens)])
    if tokens > 16:
        others = torch.stack([torch.randperm(15, device=device)[:3] + 1 for _ in range(tokens)])
        ids = torch.cat((torch.zeros(tokens, 1, dtype=torch.long, device=device), others), dim=1)
    return ids, torch.rand(tokens, 4, device=device)


def looped_reference(moe: RoutedExperts, shared: MLP | None, x: torch.Tensor, ids: torch.Tensor,
                     gates: torch.Tensor) -> torch.Tensor:
    """The routed experts by `RoutedExperts.forward_looped`, plus the shared experts' SwiGLU, in x's dtype."""
    ref = moe.forward_looped(x, ids, gates)
    return ref if shared is None else (ref.float() + shared(x).float()).to(x.dtype)


def shared_weights(shared: MLP | None) -> tuple[torch.Tensor, ...]:
    return (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight) if shared is not None else ()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,n_shared", [(1, 0), (2, 0), (1, 1), (2, 2), (5, 1)])
def test_pair_major_experts_match_looped(device, tokens, n_shared):
    """The pair-major mat-vecs (routed experts, the shared experts riding along as more pairs) against
    the looped reference plus the shared MLP; `experts_sum` adds the slots (and a residual) in the down
    kernel."""
    from nanoseek.kernels.moe_experts import experts, experts_sum

    dtype, cfg, moe, shared = expert_weights(device, n_shared, seed=1)
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)
    ids, gates = expert_route(tokens, device)
    weights = shared_weights(shared)
    residual = torch.randn_like(x)
    with torch.no_grad():
        ref = looped_reference(moe, shared, x, ids, gates)
        y = experts(x, ids, gates, moe.w13, moe.w2, *weights)
        assert y.shape == (tokens, 4 + n_shared, cfg.hidden_size)
        out = y.sum(1).to(dtype)
        summed = experts_sum(x, ids, gates, moe.w13, moe.w2, *weights)
        with_residual = experts_sum(x, ids, gates, moe.w13, moe.w2, *weights, residual=residual)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(summed, ref, **tol)
    torch.testing.assert_close(with_residual, residual + ref, **tol)
    # one rounding of the same fp32 sum: at most one unit in the last place from the summed-then-cast y
    torch.testing.assert_close(summed, out, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_pair_major_experts_refuse_large_batches(device):
    """More than PAIR_MAJOR_MAX_TOKENS tokens is the expert-major layer's work: a clear error, no launch."""
    from nanoseek.kernels.moe_experts import PAIR_MAJOR_MAX_TOKENS, experts, pair_major_ok

    dtype, cfg, moe, _ = expert_weights(device, 0, seed=1)
    x = torch.randn(PAIR_MAJOR_MAX_TOKENS + 1, cfg.hidden_size, device=device, dtype=dtype)
    ids, gates = expert_route(x.shape[0], device)
    assert pair_major_ok(x[:PAIR_MAJOR_MAX_TOKENS], moe.w13) and not pair_major_ok(x, moe.w13)
    with pytest.raises(ValueError, match="experts_layer"):
        experts(x, ids, gates, moe.w13, moe.w2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,width", [(1, 160), (3, 1024), (33, 512)])
def test_rms_norm_kernel_matches_rmsnorm(device, rows, width):
    """The decode RMSNorm kernel against `RMSNorm.forward` (its training-mode path is the reference's
    arithmetic on every device); bf16 agrees to one unit in the last place (another reduction order)."""
    from nanoseek.kernels import norm as norm_kernel
    from nanoseek.model.common import RMSNorm

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(5)
    x = torch.randn(2, rows, width, device=device, dtype=dtype)[1] * 3  # a view with a row stride
    norm = RMSNorm(width, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width) + 0.5)
        ref = norm.train()(x)
        y = norm_kernel.rms_norm(x, norm.weight, norm.eps)
        assert y.shape == x.shape
        torch.testing.assert_close(y, ref, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
        if device == "cuda":  # inference on a GPU: RMSNorm.forward itself takes the kernel
            torch.testing.assert_close(norm.eval()(x), y, rtol=0, atol=0)
        with pytest.raises(ValueError, match="weight"):
            norm_kernel.rms_norm(x, norm.weight[:-1], norm.eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,n_shared", [(1, 1), (3, 0), (5, 1), (33, 2)])
def test_experts_layer_matches_looped(device, tokens, n_shared):
    """The expert-major MoE layer in one launch (work items in ticket order, counters between them)
    against the looped reference plus the shared MLP, with and without the residual; 33 tokens give
    expert 0 more pairs than one 16-pair block. The counters are back at zero after every launch. On a
    GPU the items run concurrently: 20 launches with fresh routes each, where a missing wait would
    show as a race (wrong sums, or counters left set)."""
    from nanoseek.kernels.moe_experts import experts_layer, moe_layer_flags_size

    dtype, cfg, moe, shared = expert_weights(device, n_shared, seed=2)
    weights = shared_weights(shared)
    flags = torch.zeros(moe_layer_flags_size(16, n_shared, cfg.hidden_size), dtype=torch.int32, device=device)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for _ in range(20 if device == "cuda" else 1):
        x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)
        residual = torch.randn_like(x)
        ids, gates = expert_route(tokens, device)
        with torch.no_grad():
            ref = looped_reference(moe, shared, x, ids, gates)
            with_residual = experts_layer(x, ids, gates, moe.w13, moe.w2, flags, *weights, residual=residual)
            assert not flags.any(), "the counters must be zero again after a launch"
            alone = experts_layer(x, ids, gates, moe.w13, moe.w2, flags, *weights)
            assert not flags.any(), "the counters must be zero again after a launch"
        torch.testing.assert_close(alone, ref, **tol)
        # the residual is added after the sum's rounding, and rounded once more (up to 2^-8 of |residual + sum|)
        torch.testing.assert_close(with_residual, residual + ref, rtol=tol["rtol"], atol=2 * tol["atol"])
        assert torch.equal(with_residual, residual + alone)
    with pytest.raises(ValueError, match="flags"):
        experts_layer(x, ids, gates, moe.w13, moe.w2, flags[:4], *weights)
    with pytest.raises(ValueError, match="residual"):
        experts_layer(x, ids, gates, moe.w13, moe.w2, flags, *weights, residual=residual[:, :-1])


def skinny_inputs(device: str, rows: int, seed: int) -> tuple[torch.dtype, dict, int, torch.Tensor]:
    """(dtype, tolerances, K, x (rows, K)) for the skinny kernel tests: K = 160 is not a multiple of the
    256-wide K step (the masked tail is exercised), x is a view with a row stride."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.manual_seed(seed)
    K = 160
    return dtype, tol, K, torch.randn(2, rows, K, device=device, dtype=dtype)[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_skinny_kernels_match_linear(device, rows):
    from nanoseek.kernels import skinny

    dtype, tol, K, x = skinny_inputs(device, rows, seed=2)
    w_a = (torch.randn(100, K, device=device) * 0.1).to(dtype)  # 100: not a multiple of the 16-wide strips
    w_b = (torch.randn(37, K, device=device) * 0.1).to(dtype)
    w_up = (torch.randn(100, K, device=device) * 0.1).to(dtype)
    F = torch.nn.functional
    with torch.no_grad():
        for gemv in (False, True):  # both kernels, whatever `gemv_ok` would pick
            w_n = (torch.randn(48, K, device=device) * 0.1).to(dtype)  # the mat-vec kernel takes multiples of 16
            ya, yb = skinny._launch(skinny.PAIR, x, w_n, w_b[:32], gemv=gemv)
            torch.testing.assert_close(ya, F.linear(x, w_n), **tol)
            torch.testing.assert_close(yb, F.linear(x, w_b[:32]), **tol)
            ref = F.silu(F.linear(x.float(), w_n.float())) * F.linear(x.float(), w_a[:48].float())
            y = skinny._launch(skinny.SWIGLU, x, w_n, w_a[:48].contiguous(), gemv=gemv)[0]
            torch.testing.assert_close(y.float(), ref, **tol)
            torch.testing.assert_close(skinny._launch(skinny.LINEAR, x, w_n, None, gemv=gemv)[0], F.linear(x, w_n),
                                       **tol)
        torch.testing.assert_close(skinny.linear(x, w_a), F.linear(x, w_a), **tol)
        y_a, y_b = skinny.pair(x, w_a, w_b)
        torch.testing.assert_close(y_a, F.linear(x, w_a), **tol)
        torch.testing.assert_close(y_b, F.linear(x, w_b), **tol)
        ref = F.silu(F.linear(x.float(), w_a.float())) * F.linear(x.float(), w_up.float())
        torch.testing.assert_close(skinny.swiglu(x, w_a, w_up).float(), ref, **tol)
        x3 = x[None].expand(3, rows, K)  # leading dims are kept
        assert skinny.linear(x3, w_a).shape == (3, rows, 100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_skinny_kernels_fold_norm_and_residual(device, rows):
    """norm_weight: RMSNorm(x) feeds the product; residual: added after it. Both kernels, every form."""
    from nanoseek.kernels import skinny
    from nanoseek.model.common import RMSNorm

    dtype, tol, K, x = skinny_inputs(device, rows, seed=3)
    x = x * 3
    norm = RMSNorm(K, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K) + 0.5)
    wa, wb = ((torch.randn(n, K, device=device) * 0.1).to(dtype) for n in (48, 32))
    residual = torch.randn(rows, 48, device=device, dtype=dtype)
    F = torch.nn.functional
    with torch.no_grad():
        xn = norm(x)
        for gemv in (False, True):
            args = dict(gemv=gemv, norm_weight=norm.weight, eps=norm.eps)
            y = skinny._launch(skinny.LINEAR, x, wa, None, residual=residual, **args)[0]
            torch.testing.assert_close(y, residual + F.linear(xn, wa), **tol)
            ya, yb = skinny._launch(skinny.PAIR, x, wa, wb, **args)
            torch.testing.assert_close(ya, F.linear(xn, wa), **tol)
            torch.testing.assert_close(yb, F.linear(xn, wb), **tol)
            y = skinny._launch(skinny.SWIGLU, x, wa, wb[:32].repeat(2, 1)[:48].contiguous(), **args)[0]
            ref = F.silu(F.linear(xn.float(), wa.float())) * F.linear(xn.float(), wb.repeat(2, 1)[:48].float())
            torch.testing.assert_close(y.float(), ref, **tol)
        torch.testing.assert_close(skinny.linear(x, wa, norm.weight, norm.eps, residual),
                                   residual + F.linear(xn, wa), **tol)
        with pytest.raises(ValueError, match="norm weight"):
            skinny.linear(x, wa, norm.weight[:-1], norm.eps)
        with pytest.raises(ValueError, match="residual"):
            skinny.linear(x, wa, None, 0.0, residual[:, :-1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_decode_step_with_kernels_matches_the_plain_model():
    """A bf16 decode step through the installed decode kernels (skinny pair, SwiGLU, linear, MLA, MoE)
    against the same step of the plain model: same logits up to bf16 rounding."""
    from nanoseek import Transformer
    from nanoseek.kernels.modules import install
    from nanoseek.model.swap import shared_copy

    cfg = preset("debug", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    model = Transformer.from_config(cfg, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), device="cuda")

    def step(model):
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            model(ids[:, :8], cache=cache)
            return model(ids[:, 8:], positions=torch.full((2, 1), 8, device="cuda"), cache=cache, kv_len=9).logits

    fast = step(install(shared_copy(model)))
    slow = step(model)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_len,positions,programs,balanced,stages", [
    (4, 16, [[9]], None, False, 0),  # one row, one chunk
    (4, 64, [[5, 6], [40, 63]], None, False, 0),  # a 2-token step on 2 rows: chunks past a row's position skipped
    (4, 64, [[5, 6], [40, 63]], None, True, 0),  # the same with each row's keys split evenly over its chunks
    (20, 4096, [[3000]], None, False, 0),  # two head groups; 64 chunks of two 32-key steps each
    (4, 256, [[200], [17], [255], [90], [3], [128]], 12, False, 0),  # a batch: 2 chunks of four 32-key steps a row
    (4, 256, [[200], [17], [255], [90], [3], [128]], 12, True, 0),  # balanced: chunks of 32-128 keys, partial steps
    (4, 256, [[200], [17], [255], [90], [3], [128]], 12, True, 2),  # the same steps as pipelined loops
    (4, 128, [[(7 * b) % 128] for b in range(17)], 34, False, 0),  # the row-blocked merge: a block of 16, then 1
    (4, 128, [[(7 * b) % 128] for b in range(17)], 34, True, 0),
    (4, 128, [[(7 * b) % 128] for b in range(17)], 34, True, 3),
])
def test_mla_decode_kernels_match_absorbed(device, heads, kv_len, positions, programs, balanced, stages,
                                           monkeypatch):
    """The absorbed attention kernels (W_uk product, split-key partials, merge with W_uv), and
    `latent_attention` from a given q_lat, against `MLA.absorbed`'s matmul path. `programs` sets
    the partials' program target (`Tiles.programs`), so a batch's rows take few, multi-step chunks;
    `balanced` splits each row's visible keys evenly over its chunks instead of fixed-length chunks;
    `stages` runs the partials' steps after the first as a pipelined loop."""
    from nanoseek.kernels import mla_decode
    from nanoseek.model import mla as mla_module

    for name in ("TILES", "BATCH_TILES"):
        tiles = getattr(mla_decode, name)
        monkeypatch.setattr(mla_decode, name, tiles._replace(programs=programs or tiles.programs, balanced=balanced,
                                                             stages=stages))

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = preset("debug", num_attention_heads=heads, num_key_value_heads=heads)
    torch.manual_seed(3)
    attn = mla_module.MLA(cfg, 0).to(device, dtype).eval()
    for p in attn.parameters():
        p.data.normal_(0, 0.2)
    pos = torch.tensor(positions, device=device)
    B, S = pos.shape
    q_nope = torch.randn(B, S, heads, cfg.qk_nope_head_dim, device=device, dtype=dtype)
    q_pe = torch.randn(B, S, heads, cfg.qk_rope_head_dim, device=device, dtype=dtype)
    cache = torch.randn(B, kv_len + 5, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=device, dtype=dtype)
    latent = cache[:, :kv_len]  # a view with the cache's row stride, as `LatentCache.read` gives
    assert mla_decode.supported(q_nope, latent.dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    with torch.no_grad():
        out = attn.o_proj(mla_decode.attention(q_nope, q_pe, latent, pos, attn.kv_b_proj.weight, attn.scale,
                                               cfg.v_head_dim))
        ref = attn.o_proj(attn.absorbed(q_nope, q_pe, latent, pos))  # the matmul path
        w_uk = attn.kv_b_proj.weight.view(heads, -1, cfg.kv_lora_rank)[:, : cfg.qk_nope_head_dim]
        q_lat = torch.einsum("bshn,hnr->bshr", q_nope, w_uk).reshape(B * S, heads, -1)
        out_lat = attn.o_proj(mla_decode.latent_attention(q_lat, q_pe, latent, pos, attn.kv_b_proj.weight,
                                                          attn.scale, cfg.v_head_dim))
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out_lat, ref, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_mla_decode_step_with_kernels_matches_reference(device, interleaved):
    """A whole MLA decode call (2 rows x 2 tokens) through `DecodeMLA.latent_decode` (RoPE and latent
    entry in one kernel, cache write, attention kernels) against the reference MLA: same output,
    same cache."""
    from nanoseek.kernels.modules import DecodeMLA, install
    from nanoseek.model import mla as mla_module
    from nanoseek.model.cache import LatentCache
    from nanoseek.model.rope import rope_cos_sin, rope_frequencies
    from nanoseek.model.swap import shared_copy

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = preset("debug", rope_interleave=interleaved, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 64})
    torch.manual_seed(4)
    attn = mla_module.MLA(cfg, 1).to(device, dtype).eval()
    for name, p in attn.named_parameters():
        p.data.normal_(1.0 if "layernorm" in name else 0.0, 0.2)
    caches = [LatentCache(2, 2, 80, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=dtype, device=device)
              for _ in range(2)]
    history = torch.randn(caches[0].data.shape, device=device).to(dtype)  # earlier positions' latents
    for cache in caches:
        cache.data.copy_(history)
    positions = torch.tensor([[7, 8], [50, 51]], device=device)
    inv_freq, factor = rope_frequencies(cfg)
    cos, sin = rope_cos_sin(inv_freq.to(device), positions, factor, dtype)
    x = torch.randn(2, 2, cfg.hidden_size, device=device, dtype=dtype)
    norm = mla_module.RMSNorm(cfg.hidden_size).to(device, dtype)  # a block's pre-norm and residual, passed in
    norm.weight.data.uniform_(0.5, 1.5)
    residual = torch.randn_like(x)
    fast = install(torch.nn.ModuleList([shared_copy(attn)]))[0]  # attn itself stays the reference
    assert isinstance(fast, DecodeMLA)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        ref = attn(norm(x), cos, sin, caches[0].layer(1), positions, kv_len=64) + residual  # layer 1's view
        mp.setattr(DecodeMLA, "decode_kernels_ok", lambda self, q, cache: True)  # also under the interpreter
        out = fast(x, cos, sin, caches[1].layer(1), positions, kv_len=64, norm=norm, residual=residual)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(caches[1].data, caches[0].data, **tol)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_pdl_only_on_hopper_class_gpus():
    """Programmatic dependent launch: off on the CPU; on for an NVIDIA GPU of compute capability 9.0 or
    later."""
    from nanoseek.kernels.pdl import pdl_enabled

    assert not pdl_enabled(torch.zeros(1))
    if torch.cuda.is_available():
        hopper = torch.cuda.get_device_capability()[0] >= 9 and torch.version.hip is None
        assert pdl_enabled(torch.zeros(1, device="cuda")) == hopper
