"""Triton kernels that route a decode step's tokens to DeepSeekMoE experts (a few tokens, no host
syncs, no sort): the router's chain of small PyTorch kernels as one launch.

Shapes: T tokens, D hidden, E routed experts (a power of two), G expert groups, K experts per token.

`route` (one program per token) selects experts from given logits (T, E) fp32, replacing the chain
sigmoid or softmax, correction bias, group scores, group top-k, mask, top-k, gather, normalise:
    s = sigmoid(logits) | softmax(logits);  choice = s + bias       (the bias only selects)
    groups: keep the `topk_group` best by (sum of top-2 | max) choice, others -inf
    ids = the K largest choices (descending);  gates = s[ids] (/ sum) * scale
    -> gates (T, K) fp32, ids (T, K) int64
K is small, so the top-K is K arg-max reductions in one warp (ROUTE_WARPS). Prefills use it after
cuBLAS's fp32 matmul.

`router` (decode steps, at most ROUTER_MAX_TOKENS tokens) also does the fp32 matmul
logits = x W^T, W (E, D) fp32. Programs (token t, block of router rows) each store their block of
t's logits and count themselves in a per-token counter (`arrivals`); the one that arrives last
sees every block stored, routes t as `route` does, and resets the counter to zero for the next
call. One launch instead of cuBLAS's two plus `route` (bench-1b on the H200: 4.3 against 8.2 us
at batch 1, 4.7 against 12.3 at batch 32, `bench/moe_decode_kernels.py`). `normed_router` adds the
MoE's pre-norm: each program RMS-normalises x_t itself, and the token's first program stores
RMSNorm(x) (T, D) for the experts.

Reference: `nanoseek.model.moe.Router.forward`. The expert kernels that take gates and ids are in
`nanoseek.kernels.moe_experts`. All three are torch custom ops (`nanoseek::moe_route`,
`nanoseek::moe_router`, `nanoseek::moe_normed_router`), so `torch.compile` treats them as opaque
calls and CUDA graphs capture them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoseek.kernels import pow2_divisor
from nanoseek.kernels.pdl import inputs_ready, pdl_enabled
from nanoseek.kernels.skinny import _inverse_rms, _row_tile


@triton.jit
def _select(logits, bias_ptr, E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
            K_POW2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_TOP2: tl.constexpr,
            NORMALIZE: tl.constexpr):
    """logits (E,) fp32 -> (ids (K_POW2,) int32, unscaled gates (K_POW2,) fp32); slots >= K are padding."""
    offs = tl.arange(0, E)
    if SIGMOID:
        s = tl.sigmoid(logits)
    else:
        ex = tl.exp(logits - tl.max(logits, 0))
        s = ex / tl.sum(ex, 0)
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + offs).to(tl.float32)
    if G > 1:  # group-limited: keep TOPK_GROUP groups, mask the rest
        EG: tl.constexpr = E // G
        grouped = tl.reshape(choice, (G, EG))
        best = tl.max(grouped, 1)  # (G,)
        if GROUP_TOP2:  # noaux_tc: sum of the two best in each group
            col = tl.arange(0, EG)[None, :]
            first = tl.argmax(grouped, 1)
            best = best + tl.max(tl.where(col == first[:, None], float("-inf"), grouped), 1)
        gidx = tl.arange(0, G)
        keep = gidx < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.argmax(best, 0)
            keep = keep | (gidx == g)
            best = tl.where(gidx == g, float("-inf"), best)
        choice = tl.reshape(tl.where(keep[:, None], grouped, float("-inf")), (E,))
    kidx = tl.arange(0, K_POW2)
    ids = tl.zeros((K_POW2,), tl.int32)
    gates = tl.zeros((K_POW2,), tl.float32)
    for k in tl.static_range(K):  # top-K by repeated argmax: K is small
        i = tl.argmax(choice, 0)
        ids = tl.where(kidx == k, i, ids)
        gates = tl.where(kidx == k, tl.sum(tl.where(offs == i, s, 0.0), 0), gates)
        choice = tl.where(offs == i, float("-inf"), choice)
    if NORMALIZE:
        gates = gates / (tl.sum(gates, 0) + 1e-20)
    return ids, gates


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, gates_ptr, ids_ptr, scale,
                  E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
                  K_POW2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GROUP_TOP2: tl.constexpr, NORMALIZE: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    inputs_ready(PDL)
    logits = tl.load(logits_ptr + t * E + tl.arange(0, E)).to(tl.float32)  # (E,)
    ids, gates = _select(logits, bias_ptr, E, G, TOPK_GROUP, K, K_POW2, SIGMOID, HAS_BIAS, GROUP_TOP2, NORMALIZE)
    kidx = tl.arange(0, K_POW2)
    tl.store(ids_ptr + t * K + kidx, ids.to(tl.int64), mask=kidx < K)
    tl.store(gates_ptr + t * K + kidx, gates * scale, mask=kidx < K)


@triton.jit
def _router_input(x_ptr, g_ptr, xn_ptr, t, d, inv_rms, D: tl.constexpr, NORM: tl.constexpr):
    """x[t, d] (1, BD) in fp32; with NORM the RMS-normalised row, which the token's first program
    also stores in xn for the experts."""
    xt = _row_tile(x_ptr + t * D, d, inv_rms, g_ptr, NORM)
    if NORM:
        if tl.program_id(1) == 0:
            tl.store(xn_ptr + t * D + d[None, :], xt)
    return xt.to(tl.float32)


@triton.jit
def _router_kernel(x_ptr, w_ptr, bias_ptr, g_ptr, xn_ptr, eps, logits_ptr, arrived_ptr, gates_ptr, ids_ptr, scale,
                   D: tl.constexpr, E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
                   K_POW2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_TOP2: tl.constexpr,
                   NORMALIZE: tl.constexpr, NORM: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
                   PDL: tl.constexpr):
    """Program (token t, expert block): logits[t, block] = x_t W[block]^T in fp32 (a mat-vec over BE
    router rows); the last program of token t to finish (a counter per token, reset by it) routes t.
    NORM: x_t is RMS-normalised (weight g) first, and stored normalised in xn."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    d = tl.arange(0, BD)
    w_first = tl.load(w_ptr + e[:, None] * D + d[None, :])  # weights before the wait (nanoseek.kernels.pdl)
    inputs_ready(PDL)
    inv_rms = 1.0
    if NORM:
        row = t + tl.arange(0, 1)
        inv_rms = _inverse_rms(x_ptr, row, row >= 0, D, eps, D, 1, BD)[:, None]
    acc = w_first.to(tl.float32) * _router_input(x_ptr, g_ptr, xn_ptr, t, d, inv_rms, D, NORM)
    for d0 in tl.range(BD, D, BD):
        d = d0 + tl.arange(0, BD)
        xt = _router_input(x_ptr, g_ptr, xn_ptr, t, d, inv_rms, D, NORM)
        acc += tl.load(w_ptr + e[:, None] * D + d[None, :]).to(tl.float32) * xt
    tl.store(logits_ptr + t * E + e, tl.sum(acc, 1))
    arrived = tl.atomic_add(arrived_ptr + t, 1, sem="acq_rel")  # orders the store above before the count
    if arrived == tl.num_programs(1) - 1:  # every block of token t has stored its logits
        tl.store(arrived_ptr + t, 0)
        logits = tl.load(logits_ptr + t * E + tl.arange(0, E), cache_modifier=".cg")  # from L2
        ids, gates = _select(logits, bias_ptr, E, G, TOPK_GROUP, K, K_POW2, SIGMOID, HAS_BIAS, GROUP_TOP2,
                             NORMALIZE)
        kidx = tl.arange(0, K_POW2)
        tl.store(ids_ptr + t * K + kidx, ids.to(tl.int64), mask=kidx < K)
        tl.store(gates_ptr + t * K + kidx, gates * scale, mask=kidx < K)


ROUTE_WARPS = 1  # one warp: the chain of arg-max reductions stays in warp shuffles (bench/moe_decode_kernels.py)


@torch.library.custom_op("nanoseek::moe_route", mutates_args=())
def route(logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int, topk_group: int,
          sigmoid: bool, group_top2: bool, normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, E) fp32 -> gates (T, K) fp32, ids (T, K) int64 (see the module docstring)."""
    T, E = logits.shape
    gates = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    pdl = pdl_enabled(logits)
    if T:
        _route_kernel[(T,)](logits.contiguous(), bias if bias is not None else logits, gates, ids, scale,
                            E=E, G=n_group, TOPK_GROUP=topk_group, K=k, K_POW2=triton.next_power_of_2(k),
                            SIGMOID=sigmoid, HAS_BIAS=bias is not None, GROUP_TOP2=group_top2,
                            NORMALIZE=normalize, PDL=pdl, num_warps=ROUTE_WARPS, launch_pdl=pdl)
    return gates, ids


@route.register_fake
def _(logits, bias, k, n_group, topk_group, sigmoid, group_top2, normalize, scale):
    T = logits.shape[0]
    return logits.new_empty(T, k), logits.new_empty(T, k, dtype=torch.int64)


# (router rows per program, reduction step, warps) for 1-2 tokens and for more; bench/moe_decode_kernels.py.
# The reduction step is the same for both: each logit's arithmetic does not depend on the batch.
ROUTER_TILES = (1, 256, 1)
ROUTER_TILES_BATCHED = (4, 256, 1)
ROUTER_MAX_TOKENS = 64  # a decode step; prefills keep cuBLAS's matmul (each program re-reads its router rows)


def router_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`router` takes decode-sized x (T, D) with D a multiple of 16 (no masked tail)."""
    return 0 < x.shape[0] <= ROUTER_MAX_TOKENS and x.shape[1] % 16 == 0 and weight.shape[0] % 4 == 0


@torch.library.custom_op("nanoseek::moe_router", mutates_args=())
def router(x: torch.Tensor, weight: torch.Tensor, arrivals: torch.Tensor, bias: torch.Tensor | None, k: int,
           n_group: int, topk_group: int, sigmoid: bool, group_top2: bool, normalize: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` with the router's fp32 matmul in the same kernel: x (T, D), weight (E, D) fp32 ->
    gates (T, K) fp32, ids (T, K) int64; see `router_ok` for the shapes it takes. arrivals: int32
    counters, at least T, all zero; the kernel counts in them and leaves them at zero again."""
    return _router(x, weight, arrivals, bias, k, n_group, topk_group, sigmoid, group_top2, normalize, scale)[:2]


@router.register_fake
def _(x, weight, arrivals, bias, k, n_group, topk_group, sigmoid, group_top2, normalize, scale):
    T = x.shape[0]
    return x.new_empty(T, k, dtype=torch.float32), x.new_empty(T, k, dtype=torch.int64)


@torch.library.custom_op("nanoseek::moe_normed_router", mutates_args=())
def normed_router(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  arrivals: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int, topk_group: int,
                  sigmoid: bool, group_top2: bool, normalize: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`router` of RMSNorm(x) (norm_weight (D,) of x's dtype, eps) -> (gates, ids, RMSNorm(x) (T, D)):
    the MoE's pre-norm in the same launch, its output kept for the experts."""
    return _router(x, weight, arrivals, bias, k, n_group, topk_group, sigmoid, group_top2, normalize, scale,
                   norm_weight=norm_weight, eps=eps)


@normed_router.register_fake
def _(x, norm_weight, eps, weight, arrivals, bias, k, n_group, topk_group, sigmoid, group_top2, normalize, scale):
    T = x.shape[0]
    return x.new_empty(T, k, dtype=torch.float32), x.new_empty(T, k, dtype=torch.int64), torch.empty_like(x)


def _router(x, weight, arrivals, bias, k, n_group, topk_group, sigmoid, group_top2, normalize, scale, tiles=None,
            norm_weight=None, eps=0.0):
    """`router` (`normed_router` with norm_weight) -> (gates, ids, normalised x or None)."""
    T, D = x.shape
    if norm_weight is not None and (norm_weight.shape != (D,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"moe_normed_router: the norm weight must be ({D},) of x's dtype {x.dtype}, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    if arrivals.numel() < T or arrivals.dtype != torch.int32:
        raise ValueError(f"moe_router: arrivals must hold >= {T} int32 counters, got {tuple(arrivals.shape)} "
                         f"{arrivals.dtype}")
    E = weight.shape[0]
    gates = torch.empty(T, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=x.device)
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
    be, bd, warps = tiles or (ROUTER_TILES if T <= 2 else ROUTER_TILES_BATCHED)
    w = weight.float().contiguous()
    pdl = pdl_enabled(x) and w is weight  # a converted copy is the predecessor's output: not before the wait
    x = x.contiguous()
    normed = torch.empty_like(x) if norm_weight is not None else None
    _router_kernel[(T, E // be)](x, w, bias if bias is not None else w,
                                 norm_weight.contiguous() if norm_weight is not None else w,
                                 normed if normed is not None else x, eps, logits,
                                 arrivals, gates, ids, scale, D=D, E=E, G=n_group,
                                 TOPK_GROUP=topk_group, K=k, K_POW2=triton.next_power_of_2(k), SIGMOID=sigmoid,
                                 HAS_BIAS=bias is not None, GROUP_TOP2=group_top2, NORMALIZE=normalize,
                                 NORM=normed is not None, BE=be, BD=pow2_divisor(D, bd), PDL=pdl, num_warps=warps,
                                 launch_pdl=pdl)
    return gates, ids, normed
