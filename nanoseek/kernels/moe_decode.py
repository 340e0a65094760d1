"""Triton kernels for DeepSeekMoE on decode-sized batches (a few tokens, every expert's weights
read at most once, no weight copies, no host syncs).

Shapes: T tokens, D hidden, E routed experts, K experts per token, I expert width, P = T * K
(token, expert) pairs; pair p is token p // K, slot p % K.

`route` (one program per token) replaces the router's chain of small kernels (sigmoid or
softmax, correction bias, group scores, group top-k, mask, top-k, gather, normalise):
    s = sigmoid(logits) | softmax(logits);  choice = s + bias
    groups: keep the `topk_group` best by (sum of top-2 | max) choice, others -inf
    ids = the K largest choices (descending);  gates = s[ids] (/ sum) * scale
Reference: `nanoseek.model.moe.Router.forward`.

`experts` computes sum_k gates[t, k] * expert_{ids[t, k]}(x[t]) with SwiGLU experts stored
stacked as w13 (E, 2I, D) = [gate ; up] and w2 (E, D, I), in three kernels:
    pairs:  for each expert, the list of pairs routed to it            slots (E, T), counts (E,)
    up:     program (e, n-block): act[p, n] = silu(x W_gate^T) * (x W_up^T) for e's pairs
    down:   program (e, n-block): y[p, n] = gates[p] * act[p] W2_e^T       y (P, D) fp32
    out[t] = sum_k y[t * K + k]                                          (by the caller)
Each program reads its expert's weight tile once per 16 pairs, so a batch-1 step reads only the
K selected experts and a batch-32 step reads each used expert once. For at most
PAIR_MAJOR_MAX_TOKENS tokens two kernels do without the pair lists and most programs of the
(E, n-block) grid exiting at once: programs (pair, n-block) read ids[p]'s weights directly.
Reference: `nanoseek.model.moe.RoutedExperts.forward_looped`.

Both are registered as torch custom ops (`nanoseek::moe_route`, `nanoseek::moe_experts`) so
`torch.compile` treats them as opaque calls and CUDA graphs capture them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------- routing


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, gates_ptr, ids_ptr, scale,
                  E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
                  K_POW2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GROUP_TOP2: tl.constexpr, NORMALIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E)
    logits = tl.load(logits_ptr + t * E + offs).to(tl.float32)  # (E,)
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
    tl.store(ids_ptr + t * K + kidx, ids.to(tl.int64), mask=kidx < K)
    tl.store(gates_ptr + t * K + kidx, gates * scale, mask=kidx < K)


@torch.library.custom_op("nanoseek::moe_route", mutates_args=())
def route(logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int, topk_group: int,
          sigmoid: bool, group_top2: bool, normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, E) fp32 -> gates (T, K) fp32, ids (T, K) int64 (see the module docstring)."""
    T, E = logits.shape
    gates = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if T:
        _route_kernel[(T,)](logits.contiguous(), bias if bias is not None else logits, gates, ids, scale,
                            E=E, G=n_group, TOPK_GROUP=topk_group, K=k, K_POW2=triton.next_power_of_2(k),
                            SIGMOID=sigmoid, HAS_BIAS=bias is not None, GROUP_TOP2=group_top2,
                            NORMALIZE=normalize)
    return gates, ids


@route.register_fake
def _(logits, bias, k, n_group, topk_group, sigmoid, group_top2, normalize, scale):
    T = logits.shape[0]
    return logits.new_empty(T, k), logits.new_empty(T, k, dtype=torch.int64)


# ---------------------------------------------------------------------------------------- experts


@triton.jit
def _pairs_kernel(ids_ptr, slots_ptr, counts_ptr, P: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program e: slots[e, :counts[e]] = the pairs routed to expert e, in pair order."""
    e = tl.program_id(0)
    offs = tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
    hit = (ids == e).to(tl.int32)
    pos = tl.cumsum(hit, 0) - 1
    tl.store(slots_ptr + e * T + pos, offs, mask=hit > 0)
    tl.store(counts_ptr + e, tl.sum(hit, 0))


@triton.jit
def _experts_up_kernel(x_ptr, w13_ptr, slots_ptr, counts_ptr, act_ptr, T: tl.constexpr, D: tl.constexpr,
                       I: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Program (e, n-block): act[p, n] = silu(x_t . W_gate[e, n]) * (x_t . W_up[e, n]) for e's pairs p."""
    e = tl.program_id(0)
    count = tl.load(counts_ptr + e)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < I
    gate_rows = w13_ptr + e.to(tl.int64) * 2 * I * D + n[None, :] * D  # (1, BN) row starts
    up_rows = gate_rows + I * D
    for m0 in tl.range(0, T, BM):  # an expert has at most T pairs; most have fewer
        if m0 < count:
            m = m0 + tl.arange(0, BM)
            m_ok = m < count
            pair = tl.load(slots_ptr + e * T + m, mask=m_ok, other=0)
            token = pair // K
            acc_gate = tl.zeros((BM, BN), tl.float32)
            acc_up = tl.zeros((BM, BN), tl.float32)
            for d0 in tl.range(0, D, BK):
                d = d0 + tl.arange(0, BK)
                d_ok = d < D
                xt = tl.load(x_ptr + token[:, None] * D + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                w_ok = d_ok[:, None] & n_ok[None, :]
                acc_gate = tl.dot(xt, tl.load(gate_rows + d[:, None], mask=w_ok, other=0.0), acc_gate,
                                      input_precision=PRECISION)
                acc_up = tl.dot(xt, tl.load(up_rows + d[:, None], mask=w_ok, other=0.0), acc_up,
                                input_precision=PRECISION)
            act = acc_gate * tl.sigmoid(acc_gate) * acc_up
            tl.store(act_ptr + pair[:, None] * I + n[None, :], act.to(act_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _experts_down_kernel(act_ptr, w2_ptr, gates_ptr, slots_ptr, counts_ptr, y_ptr, T: tl.constexpr,
                         D: tl.constexpr, I: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Program (e, n-block): y[p, n] = gates[p] * (act[p] . W2[e, n]) for e's pairs p."""
    e = tl.program_id(0)
    count = tl.load(counts_ptr + e)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < D
    w_rows = w2_ptr + e.to(tl.int64) * D * I + n[None, :] * I  # (1, BN)
    for m0 in tl.range(0, T, BM):  # an expert has at most T pairs; most have fewer
        if m0 < count:
            m = m0 + tl.arange(0, BM)
            m_ok = m < count
            pair = tl.load(slots_ptr + e * T + m, mask=m_ok, other=0)
            acc = tl.zeros((BM, BN), tl.float32)
            for k0 in tl.range(0, I, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < I
                a = tl.load(act_ptr + pair[:, None] * I + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            gate = tl.load(gates_ptr + pair, mask=m_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + pair[:, None] * D + n[None, :], acc * gate[:, None], mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _pair_up_kernel(x_ptr, ids_ptr, w13_ptr, act_ptr, D: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (n-block, pair p): act[p, n] = silu(x_t . W_gate[e, n]) * (x_t . W_up[e, n]), e = ids[p].
    x_t rides in row 0 of a 16-row tl.dot tile (the other rows are masked to zero)."""
    p = tl.program_id(1)
    e = tl.load(ids_ptr + p).to(tl.int64)
    row = tl.arange(0, 16)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = n < I
    gate_rows = w13_ptr + e * 2 * I * D + n[None, :] * D  # (1, BN) row starts
    up_rows = gate_rows + I * D
    acc_gate = tl.zeros((16, BN), tl.float32)
    acc_up = tl.zeros((16, BN), tl.float32)
    for d0 in tl.range(0, D, BK):
        d = d0 + tl.arange(0, BK)
        d_ok = d < D
        xt = tl.load(x_ptr + (p // K) * D + row[:, None] * 0 + d[None, :], mask=(row[:, None] == 0) & d_ok[None, :],
                     other=0.0)
        w_ok = d_ok[:, None] & n_ok[None, :]
        acc_gate = tl.dot(xt, tl.load(gate_rows + d[:, None], mask=w_ok, other=0.0), acc_gate,
                          input_precision=PRECISION)
        acc_up = tl.dot(xt, tl.load(up_rows + d[:, None], mask=w_ok, other=0.0), acc_up, input_precision=PRECISION)
    gate, up = tl.sum(acc_gate, 0), tl.sum(acc_up, 0)  # row 0 (the rest are zeros)
    tl.store(act_ptr + p * I + n, (gate * tl.sigmoid(gate) * up).to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _pair_down_kernel(act_ptr, ids_ptr, w2_ptr, gates_ptr, y_ptr, D: tl.constexpr, I: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (n-block, pair p): y[p, n] = gates[p] * (act[p] . W2[e, n]), e = ids[p]."""
    p = tl.program_id(1)
    e = tl.load(ids_ptr + p).to(tl.int64)
    row = tl.arange(0, 16)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = n < D
    w_rows = w2_ptr + e * D * I + n[None, :] * I  # (1, BN)
    acc = tl.zeros((16, BN), tl.float32)
    for k0 in tl.range(0, I, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < I
        a = tl.load(act_ptr + p * I + row[:, None] * 0 + k[None, :], mask=(row[:, None] == 0) & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, tl.load(w_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc,
                     input_precision=PRECISION)
    gate = tl.load(gates_ptr + p).to(tl.float32)
    tl.store(y_ptr + p * D + n, tl.sum(acc, 0) * gate, mask=n_ok)


PAIR_MAJOR_MAX_TOKENS = 2  # up to here each (token, expert) pair streams its expert's weights itself


def _tiles(tokens: int) -> tuple[int, int, int]:
    """(pairs, output columns, reduction) per tile. 16 pairs is tl.dot's minimum. On the H200,
    (16, 32, 128) streams the weights at ~4 TB/s at batch 32; at batch 1, (16, 16, 256) measured
    slower (11.6 vs 9.1 us per up-projection), so one size serves both."""
    return 16, 32, 128


@torch.library.custom_op("nanoseek::moe_experts", mutates_args=())
def experts(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, w13: torch.Tensor,
            w2: torch.Tensor) -> torch.Tensor:
    """x (T, D), ids/gates (T, K), w13 (E, 2I, D), w2 (E, D, I) -> y (T, K, D) fp32, the gated output
    of each (token, expert) pair; the caller sums over K (where torch.compile fuses the sum into the
    next additions)."""
    T, D = x.shape
    K = ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    P = T * K
    dev = x.device
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is unused for bf16
    x, w13, w2 = x.contiguous(), w13.to(x.dtype).contiguous(), w2.to(x.dtype).contiguous()
    if T <= PAIR_MAJOR_MAX_TOKENS:  # no pair lists: programs per (pair, strip of outputs)
        flat_ids = ids.contiguous().view(-1)
        act = torch.empty(P, I, dtype=x.dtype, device=dev)
        # tiles as `nanoseek.kernels.skinny` picks for a batch-1 SwiGLU and a 512-wide down projection
        _pair_up_kernel[(triton.cdiv(I, 16), P)](x, flat_ids, w13, act, D, I, K, BN=16, BK=256, PRECISION=precision,
                                                 num_warps=2)
        y = torch.empty(P, D, dtype=torch.float32, device=dev)
        _pair_down_kernel[(triton.cdiv(D, 16), P)](act, flat_ids, w2, gates.contiguous().view(-1), y, D, I, BN=16,
                                                   BK=256, PRECISION=precision, num_warps=2)
        return y.view(T, K, D)
    slots = torch.empty(E, max(T, 1), dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    _pairs_kernel[(E,)](ids.contiguous().view(-1), slots, counts, P, T, BLOCK_P=triton.next_power_of_2(max(P, 16)))
    act = torch.empty(P, I, dtype=x.dtype, device=dev)
    BM, BN, BK = _tiles(T)
    _experts_up_kernel[(E, triton.cdiv(I, BN))](x, w13, slots, counts, act, T, D, I, K=K, BM=BM, BN=BN, BK=BK,
                                                PRECISION=precision)
    y = torch.empty(P, D, dtype=torch.float32, device=dev)
    _experts_down_kernel[(E, triton.cdiv(D, BN))](act, w2, gates.contiguous().view(-1), slots, counts, y, T, D, I,
                                                  BM=BM, BN=BN, BK=BK, PRECISION=precision)
    return y.view(T, K, D)


@experts.register_fake
def _(x, ids, gates, w13, w2):
    return x.new_empty(x.shape[0], ids.shape[1], x.shape[1], dtype=torch.float32)
