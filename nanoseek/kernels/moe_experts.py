"""Triton kernels for DeepSeekMoE's experts on decode-sized batches (at most 64 tokens): each used
expert's weights read once per step, no weight copies, no host syncs, no sort.

Shapes: T tokens, D hidden, E routed experts, K experts per token, I expert width, NS shared experts
(the shared MLP, of width NS * I, as NS slices of width I). Routed experts are SwiGLUs stored stacked,
w13 (E, 2I, D) = [gate ; up] and w2 (E, D, I); the shared ones as gate/up (NS * I, D), down (D, NS * I).
ids, gates (T, K) come from the router (`nanoseek.kernels.moe_routing`). A token has S = K + NS
slots, and pair p = t * S + s is token t's slot s: slot s < K is routed expert ids[t, s] with gate
gates[t, s], slot K + j the shared slice j with gate 1. Per pair, and per token:
    act[p] = silu(x_t W_gate^T) * (x_t W_up^T)                               (I,) in x's dtype
    y[p] = gate_p * (act[p] W_2^T)                                           (D,) fp32
    out[t] = [residual[t] +] (sum_s y[t * S + s] in x's dtype)               (D,) in x's dtype
Reference: `nanoseek.model.moe.RoutedExperts.forward_looped` plus the shared experts' SwiGLU
(`nanoseek.model.common.MLP`) and the residual. The caller picks one of two layouts by batch rows
(`DecodeMoE.forward`), so that a plain and a speculative step of one batch take the same arithmetic.

Pair-major (1-2 batch rows; at most PAIR_MAJOR_MAX_TOKENS tokens, `pair_major_ok`): mat-vecs whose
programs stream one pair's expert rows directly, no pair lists:
    up:    program (n-block, pair p): act[p, n]                    act (T * S, I)
    down:  program (n-block, pair p): y[p, n]                      `experts`: y (T, S, D) fp32
      or   program (n-block, token t): out[t, n]                   `experts_sum`: out (T, D)
so a batch-1 MoE layer, shared expert included, is two launches (bench-1b: 12.5 us against 23.2
with the shared expert apart, `bench/results/moe_decode_kernels-*.json`).

Expert-major (more rows; `experts_layer`): once tokens share experts, a program reads an expert's
weight tile once for up to 16 of its pairs (tl.dot's smallest tile), so a batch-32 step reads each
used expert once. The layer is one launch of work items:
    pairs: item e: slots[e, :counts[e]] = e's pairs, in pair order        slots (E, T), counts (E,)
    up:    item (e, n-block): act[p, n] for e's pairs p                    act (T * S, I)
    down:  item (e, n-block): y[p, n] for e's pairs p                      y (T * S, D) fp32
    sum:   item (t, SUM_STRIPS down blocks' columns d): out[t, d]          out (T, D)
The shared experts are experts E .. E + NS - 1 whose pairs are every token's slots K .. K + NS - 1.
A program takes its item by ticket (a counter), in the order programs start; an item that needs
others' results (up after e's pair list, down after e's up blocks, a sum after every expert's down
blocks of its columns) spins on their counters. It waits only for smaller tickets, items already
running, so every wait ends (the order a scan's decoupled look-back relies on). The same items as
four launches (pairs, up, down, sum) gave the same output bit for bit, slower: the one launch drops
the kernel boundaries and their drains (an expert's down blocks start as soon as its up blocks are
done). bench-1b on an H200: 57.8 against 62.9 us per 32-token layer
(`bench/results/moe_decode_kernels-2026-12-01-one-launch.json`), a batch-32 decode step 1,197
against 1,242 us with 145 kernels against 178 (`bench/results/decode_profile-2026-12-01-one-launch.json`
against `-one-launch-off.json`); so only the one launch is kept.

Torch custom ops `nanoseek::moe_experts`, `nanoseek::moe_experts_sum`, `nanoseek::moe_experts_layer`:
`torch.compile` treats them as opaque calls and CUDA graphs capture them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoseek.kernels import pow2_divisor
from nanoseek.kernels.pdl import inputs_ready, pdl_enabled
from nanoseek.kernels.skinny import _plus_residual

# ------------------------------------------------------------------------------- pair-major mat-vecs


@triton.jit
def _pair_up_kernel(x_ptr, ids_ptr, w13_ptr, sg_ptr, su_ptr, act_ptr, D: tl.constexpr, I: tl.constexpr,
                    K: tl.constexpr, NS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """Program (n-block, pair p): act[p, n] = silu(x_t . Wg[n]) * (x_t . Wu[n]) for pair p = (token t,
    slot); slots < K are routed expert ids[t, slot] (rows of w13), slot K + j is the j-th I-wide
    slice of the shared experts' gate/up weights (sg, su: (NS * I, D)). A mat-vec: each program
    streams BN rows of both weights with plain multiply-adds (no 16-row tl.dot tile)."""
    p = tl.program_id(1)
    t = p // (K + NS)
    slot = p % (K + NS)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    inputs_ready(PDL)  # ids come from the router, the kernel just before
    if slot < K:
        e = tl.load(ids_ptr + t * K + slot).to(tl.int64)
        gate_rows = w13_ptr + e * (2 * I * D) + n[:, None] * D  # (BN, 1) row starts
        up_rows = gate_rows + I * D
    else:
        rows = ((slot - K) * I + n[:, None]).to(tl.int64) * D
        gate_rows = sg_ptr + rows
        up_rows = su_ptr + rows
    acc_gate = tl.zeros((BN, BK), tl.float32)
    acc_up = tl.zeros((BN, BK), tl.float32)
    for d0 in tl.range(0, D, BK):
        d = d0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + t * D + d).to(tl.float32)[None, :]
        acc_gate += tl.load(gate_rows + d[None, :]).to(tl.float32) * xt
        acc_up += tl.load(up_rows + d[None, :]).to(tl.float32) * xt
    gate, up = tl.sum(acc_gate, 1), tl.sum(acc_up, 1)
    tl.store(act_ptr + p * I + n, (gate * tl.sigmoid(gate) * up).to(act_ptr.dtype.element_ty))


@triton.jit
def _pair_down_kernel(act_ptr, ids_ptr, w2_ptr, sd_ptr, gates_ptr, y_ptr, D: tl.constexpr, I: tl.constexpr,
                      K: tl.constexpr, NS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """Program (n-block, pair p): y[p, n] = gate_p * (act[p] . W2[n]); routed slots use expert
    ids[t, slot]'s w2 (D, I) and gates[t, slot], shared slice j the columns [j I, (j + 1) I) of the
    shared down weight sd (D, NS * I) and gate 1."""
    p = tl.program_id(1)
    t = p // (K + NS)
    slot = p % (K + NS)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    routed = tl.minimum(slot, K - 1)
    # ids and gates are the router's (two kernels back) and the weights are constant: all load before
    # the wait for act (nanoseek.kernels.pdl), through L2
    gate = tl.where(slot < K, tl.load(gates_ptr + t * K + routed, cache_modifier=".cg").to(tl.float32), 1.0)
    if slot < K:
        e = tl.load(ids_ptr + t * K + routed, cache_modifier=".cg").to(tl.int64)
        w_rows = w2_ptr + e * (D * I) + n[:, None] * I  # (BN, 1)
    else:
        w_rows = sd_ptr + n[:, None].to(tl.int64) * (NS * I) + (slot - K) * I
    k = tl.arange(0, BK)
    w_first = tl.load(w_rows + k[None, :])
    inputs_ready(PDL)
    acc = w_first.to(tl.float32) * tl.load(act_ptr + p * I + k).to(tl.float32)[None, :]
    for k0 in tl.range(BK, I, BK):
        k = k0 + tl.arange(0, BK)
        a = tl.load(act_ptr + p * I + k).to(tl.float32)[None, :]
        acc += tl.load(w_rows + k[None, :]).to(tl.float32) * a
    tl.store(y_ptr + p * D + n, tl.sum(acc, 1) * gate)


@triton.jit
def _slot_weights(w2_ptr, sd_ptr, routed_rows, shared_rows, k, is_routed, is_shared):
    """(S, BN, BK) fp32 weights of each slot: a routed expert's w2 rows or the shared down weight's
    columns (two masked loads, each lane reads one of them; padding slots read nothing, 0)."""
    return (tl.load(w2_ptr + routed_rows + k, mask=is_routed, other=0.0).to(tl.float32)
            + tl.load(sd_ptr + shared_rows + k, mask=is_shared, other=0.0).to(tl.float32))


@triton.jit
def _pair_down_sum_kernel(act_ptr, ids_ptr, w2_ptr, sd_ptr, gates_ptr, r_ptr, out_ptr, D: tl.constexpr,
                          I: tl.constexpr, K: tl.constexpr, NS: tl.constexpr, S_POW2: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """Program (n-block, token t): out[t, n] = [residual[t, n] +] sum over t's K + NS slots of
    gate_slot * (act[pair] . W2_slot[n]), `_pair_down_kernel`'s per-pair products (a (slot, BN, BK)
    tile, slots padded to S_POW2) added in fp32 and rounded once to out's dtype, the residual added
    after that rounding (as `y.sum(1).to(dtype)` and `residual + out` round)."""
    t = tl.program_id(1)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    slot = tl.arange(0, S_POW2)
    routed = slot < K
    used = slot < K + NS
    # ids and gates are the router's (two kernels back), the weights constant: all before the wait
    e = tl.load(ids_ptr + t * K + slot, mask=routed, other=0, cache_modifier=".cg").to(tl.int64)
    gate = tl.where(routed, tl.load(gates_ptr + t * K + slot, mask=routed, other=0.0, cache_modifier=".cg"), 1.0)
    routed_rows = (e[:, None] * (D * I) + n[None, :] * I)[:, :, None]  # (S, BN, 1) row starts in w2
    shared_rows = (n[None, :].to(tl.int64) * (NS * I) + tl.maximum(slot - K, 0)[:, None] * I)[:, :, None]  # in sd
    is_routed, is_shared = routed[:, None, None], (used & ~routed)[:, None, None]
    k = tl.arange(0, BK)[None, None, :]
    w_first = _slot_weights(w2_ptr, sd_ptr, routed_rows, shared_rows, k, is_routed, is_shared)
    inputs_ready(PDL)
    pair_act = act_ptr + (t * (K + NS) + slot)[:, None, None] * I  # (S, 1, 1)
    w_ok = used[:, None, None]
    acc = w_first * tl.load(pair_act + k, mask=w_ok, other=0.0).to(tl.float32)
    for k0 in tl.range(BK, I, BK):
        kk = k0 + k
        acc += (_slot_weights(w2_ptr, sd_ptr, routed_rows, shared_rows, kk, is_routed, is_shared)
                * tl.load(pair_act + kk, mask=w_ok, other=0.0).to(tl.float32))
    y = tl.sum(tl.sum(acc, 2) * gate[:, None], 0)  # (BN,)
    if RESIDUAL:
        y = _plus_residual(y, r_ptr, t * D + n, n >= 0)
    tl.store(out_ptr + t * D + n, y.to(out_ptr.dtype.element_ty))


PAIR_MAJOR_MAX_TOKENS = 8  # batch rows x tokens per row that may take the pair-major mat-vecs
PAIR_TILES = (4, 256, 4, 3)  # (BN, BK, warps, stages) of the pair-major mat-vecs; bench/moe_decode_kernels.py
PAIR_SUM_TILES = (4, 128, 4, 3)  # the summing down kernel's: one program holds a (slots, BN, BK) tile


def pair_major_ok(x: torch.Tensor, w13: torch.Tensor) -> bool:
    """The pair-major mat-vecs take at most PAIR_MAJOR_MAX_TOKENS tokens, D and I multiples of 16
    (no masked tails). Callers choose by batch rows, not tokens (`DecodeMoE.forward`), so that a plain and
    a speculative step of the same batch take the same path and arithmetic."""
    D, I = x.shape[1], w13.shape[1] // 2
    return x.shape[0] <= PAIR_MAJOR_MAX_TOKENS and D % 16 == 0 and I % 16 == 0


def _pair_major(x, ids, gates, w13, w2, shared, tiles, pdl, summed=False, residual=None):
    """Pair-major up and down launches -> y (T, K + NS, D) fp32, or with `summed` (T, D) of x's dtype:
    [residual +] the sum over each token's slots (`_pair_down_sum_kernel`)."""
    T, D = x.shape
    K = ids.shape[1]
    I = w13.shape[1] // 2
    NS = shared[0].shape[0] // I if shared is not None else 0
    sg, su, sd = shared if shared is not None else (w13, w13, w2)  # unused stand-ins when NS == 0
    P = T * (K + NS)
    bn, bk, warps, stages = tiles or PAIR_TILES
    flat_ids, flat_gates = ids.contiguous().view(-1), gates.contiguous().view(-1)
    act = torch.empty(P, I, dtype=x.dtype, device=x.device)
    _pair_up_kernel[(I // pow2_divisor(I, bn), P)](x, flat_ids, w13, sg, su, act, D, I, K, NS,
                                                    BN=pow2_divisor(I, bn), BK=pow2_divisor(D, bk), PDL=pdl,
                                                    num_warps=warps, num_stages=stages, launch_pdl=pdl)
    if summed:
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)
        bn, bk, warps, stages = PAIR_SUM_TILES
        _pair_down_sum_kernel[(D // pow2_divisor(D, bn), T)](
            act, flat_ids, w2, sd, flat_gates, residual if residual is not None else out, out, D, I, K, NS,
            S_POW2=triton.next_power_of_2(K + NS), BN=pow2_divisor(D, bn), BK=pow2_divisor(I, bk),
            RESIDUAL=residual is not None, PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl)
        return out
    y = torch.empty(P, D, dtype=torch.float32, device=x.device)
    _pair_down_kernel[(D // pow2_divisor(D, bn), P)](act, flat_ids, w2, sd, flat_gates, y, D, I, K, NS,
                                                      BN=pow2_divisor(D, bn), BK=pow2_divisor(I, bk), PDL=pdl,
                                                      num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return y.view(T, K + NS, D)



def _kernel_inputs(x, w13, w2, shared_gate, shared_up, shared_down):
    """x and the expert weights contiguous in x's dtype (the given tensors where they already are)
    -> (x, w13, w2, shared (gate, up, down) or None)."""
    shared = None
    if shared_gate is not None:
        shared = tuple(w.to(x.dtype).contiguous() for w in (shared_gate, shared_up, shared_down))
    return x.contiguous(), w13.to(x.dtype).contiguous(), w2.to(x.dtype).contiguous(), shared


def _experts(x, ids, gates, w13, w2, shared_gate=None, shared_up=None, shared_down=None, tiles=None, summed=False,
             residual=None):
    """`experts`, or with `summed` `experts_sum`; for the benchmark, tiles (BN, BK, warps, stages)
    overrides PAIR_TILES."""
    T, D = x.shape
    I = w13.shape[1] // 2
    given = (w13, w2, shared_gate, shared_up, shared_down)
    x, w13, w2, shared = _kernel_inputs(x, w13, w2, shared_gate, shared_up, shared_down)
    used = (w13, w2, *(shared or (None,) * 3))
    # weights load before a kernel's wait (nanoseek.kernels.pdl) unless they are converted copies made here
    pdl = pdl_enabled(x) and all(a is b for a, b in zip(given, used))
    if not pair_major_ok(x, w13):
        raise ValueError(f"moe_experts: {T} tokens of width {D}, experts of width {I} do not fit the pair-major "
                         "kernels (see pair_major_ok); use experts_layer")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"moe_experts_sum: the residual must be x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    return _pair_major(x, ids, gates, w13, w2, shared, tiles, pdl, summed,
                       residual.contiguous() if residual is not None else None)


@torch.library.custom_op("nanoseek::moe_experts", mutates_args=())
def experts(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            shared_gate: torch.Tensor | None = None, shared_up: torch.Tensor | None = None,
            shared_down: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, D), ids/gates (T, K), w13 (E, 2I, D), w2 (E, D, I) -> y (T, K, D) fp32, the gated output
    of each (token, expert) pair, by the pair-major mat-vecs (needs `pair_major_ok`); the caller sums
    over K (where torch.compile fuses the sum into the next additions). With the shared experts'
    SwiGLU weights (gate/up (NS*I, D), down (D, NS*I)) y is (T, K + NS, D): the shared experts ride
    along as NS more I-wide pairs of gate 1."""
    return _experts(x, ids, gates, w13, w2, shared_gate, shared_up, shared_down)


@experts.register_fake
def _(x, ids, gates, w13, w2, shared_gate=None, shared_up=None, shared_down=None):
    slots = ids.shape[1] + (shared_gate.shape[0] // (w13.shape[1] // 2) if shared_gate is not None else 0)
    return x.new_empty(x.shape[0], slots, x.shape[1], dtype=torch.float32)


@torch.library.custom_op("nanoseek::moe_experts_sum", mutates_args=())
def experts_sum(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                shared_gate: torch.Tensor | None = None, shared_up: torch.Tensor | None = None,
                shared_down: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`experts` summed over each token's slots in the down kernel: -> (T, D) of x's dtype,
    `experts(...).sum(1).to(x.dtype)` [+ residual (T, D) of x's dtype] without the (T, slots, D)
    fp32 intermediate and the launch that sums it."""
    return _experts(x, ids, gates, w13, w2, shared_gate, shared_up, shared_down, summed=True, residual=residual)


@experts_sum.register_fake
def _(x, ids, gates, w13, w2, shared_gate=None, shared_up=None, shared_down=None, residual=None):
    return torch.empty_like(x)


# ------------------------------------------------------------------ expert-major layer, one launch


@triton.jit
def _pairs_block(ids_ptr, slots_ptr, counts_ptr, e, P: tl.constexpr, T: tl.constexpr, K: tl.constexpr,
                 NS: tl.constexpr, BLOCK_P: tl.constexpr):
    """slots[e, :counts[e]] = the pairs routed to expert e, in pair order; routed slot k of token t
    is pair t * (K + NS) + k (the shared experts' NS slots follow each token's K)."""
    offs = tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
    hit = (ids == e).to(tl.int32)
    pos = tl.cumsum(hit, 0) - 1
    tl.store(slots_ptr + e * T + pos, (offs // K) * (K + NS) + offs % K, mask=hit > 0)
    tl.store(counts_ptr + e, tl.sum(hit, 0))


@triton.jit
def _expert_pairs(slots_ptr, e, m, count, T: tl.constexpr, K: tl.constexpr, NS: tl.constexpr, E: tl.constexpr):
    """Program e's pairs m (BM,) of its count -> (pair ids, valid). Routed experts (e < E) read their
    pair list; the shared expert j = e - E takes every token's slot K + j."""
    routed = (m * 0 + e) < E  # (BM,): the same for all
    m_ok = m < count
    listed = tl.load(slots_ptr + tl.minimum(e, E - 1) * T + m, mask=m_ok & routed, other=0, cache_modifier=".cg")
    return tl.where(routed, listed, m * (K + NS) + K + (e - E)), m_ok


@triton.jit
def _up_block(x_ptr, w13_ptr, sg_ptr, su_ptr, slots_ptr, counts_ptr, act_ptr, e, nb, T: tl.constexpr,
              D: tl.constexpr, I: tl.constexpr, K: tl.constexpr, NS: tl.constexpr, E: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """act[p, n] = silu(x_t . W_gate[e, n]) * (x_t . W_up[e, n]) for expert e's pairs p and the outputs
    n of block nb; experts e >= E are the shared ones (sg, su: (NS * I, D)), every token's pair."""
    n = nb * BN + tl.arange(0, BN)
    n_ok = n < I
    if e < E:
        gate_rows = w13_ptr + e.to(tl.int64) * 2 * I * D + n[None, :] * D  # (1, BN) row starts
        up_rows = gate_rows + I * D
    else:
        rows = ((e - E) * I + n[None, :]).to(tl.int64) * D
        gate_rows = sg_ptr + rows
        up_rows = su_ptr + rows
    count = tl.where(e < E, tl.load(counts_ptr + tl.minimum(e, E - 1), cache_modifier=".cg"), T)
    for m0 in tl.range(0, T, BM):  # an expert has at most T pairs; most have fewer
        if m0 < count:
            pair, m_ok = _expert_pairs(slots_ptr, e, m0 + tl.arange(0, BM), count, T, K, NS, E)
            token = pair // (K + NS)
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
def _down_block(act_ptr, w2_ptr, sd_ptr, gates_ptr, slots_ptr, counts_ptr, y_ptr, e, nb, T: tl.constexpr,
                D: tl.constexpr, I: tl.constexpr, K: tl.constexpr, NS: tl.constexpr, E: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """y[p, n] = gates[p] * (act[p] . W2[e, n]) for expert e's pairs p and the outputs n of block nb;
    experts e >= E use the shared experts' down weight sd (D, NS * I), columns [j I, (j + 1) I) for
    j = e - E, and gate 1."""
    n = nb * BN + tl.arange(0, BN)
    n_ok = n < D
    if e < E:
        w_rows = w2_ptr + e.to(tl.int64) * D * I + n[None, :] * I  # (1, BN)
    else:
        w_rows = sd_ptr + n[None, :].to(tl.int64) * (NS * I) + (e - E) * I
    count = tl.where(e < E, tl.load(counts_ptr + tl.minimum(e, E - 1), cache_modifier=".cg"), T)
    for m0 in tl.range(0, T, BM):  # an expert has at most T pairs; most have fewer
        if m0 < count:
            pair, m_ok = _expert_pairs(slots_ptr, e, m0 + tl.arange(0, BM), count, T, K, NS, E)
            acc = tl.zeros((BM, BN), tl.float32)
            for k0 in tl.range(0, I, BK):
                k = k0 + tl.arange(0, BK)
                k_ok = k < I
                a = tl.load(act_ptr + pair[:, None] * I + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0,
                            cache_modifier=".cg")
                w = tl.load(w_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            slot = pair % (K + NS)
            routed = m_ok & (slot < K)
            gate = tl.load(gates_ptr + (pair // (K + NS)) * K + slot, mask=routed, other=1.0).to(tl.float32)
            tl.store(y_ptr + pair[:, None] * D + n[None, :], acc * gate[:, None], mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _slots_sum(y_ptr, r, out_ptr, t, d, d_ok, S: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
               RESIDUAL: tl.constexpr):
    """out[t, d] = [r +] (sum_s y[t, s, d] in out's dtype), the sum in fp32, r (the residual's tile)
    added after the rounding (`_plus_residual`'s roundings)."""
    slot = tl.arange(0, BS)
    y = tl.load(y_ptr + (t * S + slot[:, None]) * D + d[None, :], mask=(slot[:, None] < S) & d_ok[None, :],
                other=0.0, cache_modifier=".cg")  # (BS, BD) fp32
    dt = out_ptr.dtype.element_ty
    total = tl.sum(y, 0).to(dt)
    if RESIDUAL:
        total = (r.to(tl.float32) + total.to(tl.float32)).to(dt)
    tl.store(out_ptr + t * D + d, total, mask=d_ok)


@triton.jit
def _wait_count(ptr, target):
    """Spin until the int32 counter at ptr reaches target. Acquire: what the counted items stored
    before counting themselves is visible after it (read it through L2, `.cg`)."""
    seen = tl.atomic_add(ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _count_done(ptr):
    """Count this item's work as done at ptr, after every thread's stores (barrier, then release)."""
    tl.debug_barrier()
    tl.atomic_add(ptr, 1, sem="release")


@triton.jit
def _finish_item(flags_ptr, TOTAL: tl.constexpr, N_FLAGS: tl.constexpr, FLAGS_POW2: tl.constexpr):
    """Count the item finished; the last of the launch's TOTAL items zeroes the counters."""
    tl.debug_barrier()
    finished = tl.atomic_add(flags_ptr + 1, 1, sem="acq_rel")
    if finished == TOTAL - 1:
        offs = tl.arange(0, FLAGS_POW2)
        tl.store(flags_ptr + offs, 0, mask=offs < N_FLAGS)


@triton.jit
def _experts_layer_kernel(x_ptr, ids_ptr, gates_ptr, w13_ptr, w2_ptr, sg_ptr, su_ptr, sd_ptr, r_ptr, out_ptr,
                          slots_ptr, counts_ptr, act_ptr, y_ptr, flags_ptr, T: tl.constexpr, D: tl.constexpr,
                          I: tl.constexpr, K: tl.constexpr, NS: tl.constexpr, E: tl.constexpr, BLOCK_P: tl.constexpr,
                          UP_BM: tl.constexpr, UP_BN: tl.constexpr, UP_BK: tl.constexpr, DN_BM: tl.constexpr,
                          DN_BN: tl.constexpr, DN_BK: tl.constexpr, SUM_STRIPS: tl.constexpr, BS: tl.constexpr,
                          FLAGS_POW2: tl.constexpr, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
                          PDL: tl.constexpr):
    """The expert-major MoE layer in one launch. Items, in ticket order:
        E pair lists (`_pairs_block`)                                  count flags[2 + e]
        (E + NS) x up blocks (`_up_block`), after e's pair list        count flags[2 + E + e]
        (E + NS) x down blocks (`_down_block`), after e's up blocks    count flags[2 + 2E + NS + strip]
        T x sums of SUM_STRIPS strips (`_slots_sum` + residual), after every expert's down block there
    The shared experts come first in the expert order: they have every token's pair, the most work."""
    UP_BLOCKS: tl.constexpr = (I + UP_BN - 1) // UP_BN
    DN_BLOCKS: tl.constexpr = (D + DN_BN - 1) // DN_BN
    SUM_BLOCKS: tl.constexpr = (DN_BLOCKS + SUM_STRIPS - 1) // SUM_STRIPS
    FIRST_UP: tl.constexpr = E
    FIRST_DN: tl.constexpr = FIRST_UP + (E + NS) * UP_BLOCKS
    FIRST_SUM: tl.constexpr = FIRST_DN + (E + NS) * DN_BLOCKS
    TOTAL: tl.constexpr = FIRST_SUM + T * SUM_BLOCKS
    PAIRS_DONE: tl.constexpr = 2
    UP_DONE: tl.constexpr = PAIRS_DONE + E
    DN_DONE: tl.constexpr = UP_DONE + E + NS
    inputs_ready(PDL)  # then an earlier launch on the same counters has finished and zeroed them
    item = tl.atomic_add(flags_ptr, 1, sem="relaxed")
    if item < FIRST_UP:
        _pairs_block(ids_ptr, slots_ptr, counts_ptr, item, T * K, T, K, NS, BLOCK_P)
        _count_done(flags_ptr + PAIRS_DONE + item)
    elif item < FIRST_DN:
        j = (item - FIRST_UP) // UP_BLOCKS
        e = tl.where(j < NS, E + j, j - NS)
        if e < E:
            _wait_count(flags_ptr + PAIRS_DONE + e, 1)
        _up_block(x_ptr, w13_ptr, sg_ptr, su_ptr, slots_ptr, counts_ptr, act_ptr, e, (item - FIRST_UP) % UP_BLOCKS,
                  T, D, I, K, NS, E, UP_BM, UP_BN, UP_BK, PRECISION)
        _count_done(flags_ptr + UP_DONE + e)
    elif item < FIRST_SUM:
        j = (item - FIRST_DN) // DN_BLOCKS
        nb = (item - FIRST_DN) % DN_BLOCKS
        e = tl.where(j < NS, E + j, j - NS)
        _wait_count(flags_ptr + UP_DONE + e, UP_BLOCKS)  # its up blocks waited for its pair list
        _down_block(act_ptr, w2_ptr, sd_ptr, gates_ptr, slots_ptr, counts_ptr, y_ptr, e, nb, T, D, I, K, NS, E,
                    DN_BM, DN_BN, DN_BK, PRECISION)
        _count_done(flags_ptr + DN_DONE + nb)
    else:
        t = (item - FIRST_SUM) // SUM_BLOCKS
        sb = (item - FIRST_SUM) % SUM_BLOCKS
        for i in tl.static_range(SUM_STRIPS):
            if sb * SUM_STRIPS + i < DN_BLOCKS:
                _wait_count(flags_ptr + DN_DONE + sb * SUM_STRIPS + i, E + NS)
        d = sb * (SUM_STRIPS * DN_BN) + tl.arange(0, SUM_STRIPS * DN_BN)
        d_ok = d < D
        r = 0.0
        if RESIDUAL:
            r = tl.load(r_ptr + t * D + d, mask=d_ok, other=0.0)
        _slots_sum(y_ptr, r, out_ptr, t, d, d_ok, K + NS, D, BS, RESIDUAL)
    _finish_item(flags_ptr, TOTAL, DN_DONE + DN_BLOCKS, FLAGS_POW2)


# (pairs, output columns, reduction, warps, stages) of the up and down items; 16 pairs is tl.dot's
# minimum. Chosen by bench/moe_decode_kernels.py --expert-major-sweep on the former separate launches
# (bench-1b, 32 tokens, 63 experts used, H200): pairs + up + down 55.5 us per layer (57.0 with the down
# kernel at the up kernel's tiles) against 46.1 us to read the used experts at 4.3 TB/s and 408 us for
# PyTorch's gathered batched mat-vecs.
EXPERT_UP_TILES = (16, 32, 128, 4, 3)
EXPERT_DOWN_TILES = (16, 64, 128, 2, 3)
SUM_STRIPS = 4  # down-block strips per sum item (4 x 64 = 256 outputs)


def moe_layer_flags_size(n_experts: int, n_shared: int, hidden: int) -> int:
    """int32 counters `experts_layer` needs for a MoE layer of n_experts routed experts, n_shared
    shared ones (in units of the expert width) and hidden width: tickets, finished items, pair
    lists, up blocks per expert, down strips (of >= 16 outputs)."""
    return 2 + 2 * n_experts + n_shared + -(-hidden // 16)


@torch.library.custom_op("nanoseek::moe_experts_layer", mutates_args=())
def experts_layer(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  flags: torch.Tensor, shared_gate: torch.Tensor | None = None, shared_up: torch.Tensor | None = None,
                  shared_down: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, D), ids/gates (T, K), w13 (E, 2I, D), w2 (E, D, I) [, the shared experts' gate/up (NS*I, D)
    and down (D, NS*I)] -> [residual +] the sum over each token's K (+ NS) gated expert outputs, (T, D)
    of x's dtype, in one launch (see the module docstring). flags: int32 counters, at least
    `moe_layer_flags_size` of them, all zero; the kernel counts in them and leaves them at zero.
    Launches on the same flags may follow each other directly: a launch takes its first ticket only
    after its predecessor has finished."""
    return _experts_layer(x, ids, gates, w13, w2, flags, shared_gate, shared_up, shared_down, residual)


@experts_layer.register_fake
def _(x, ids, gates, w13, w2, flags, shared_gate=None, shared_up=None, shared_down=None, residual=None):
    return torch.empty_like(x)


def _experts_layer(x, ids, gates, w13, w2, flags, shared_gate=None, shared_up=None, shared_down=None, residual=None,
                   up_tiles=None, down_tiles=None):
    """`experts_layer`; up_tiles/down_tiles (BM, BN, BK, warps, stages) override EXPERT_UP_TILES and
    EXPERT_DOWN_TILES (for the benchmark). Every item of a launch runs with the up tiles' warps and stages."""
    T, D = x.shape
    K = ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    dev = x.device
    x, w13, w2, shared = _kernel_inputs(x, w13, w2, shared_gate, shared_up, shared_down)
    NS = shared[0].shape[0] // I if shared is not None else 0
    sg, su, sd = shared if shared is not None else (w13, w13, w2)  # unused stand-ins when NS == 0
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"moe_experts_layer: the residual must be x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                             f"got {tuple(residual.shape)} {residual.dtype}")
        residual = residual.contiguous()
    up = up_tiles or EXPERT_UP_TILES
    down = down_tiles or EXPERT_DOWN_TILES
    strips = triton.cdiv(D, down[1])
    n_flags = 2 + 2 * E + NS + strips
    if flags.dtype != torch.int32 or flags.device != x.device or flags.numel() < n_flags:
        raise ValueError(f"moe_experts_layer: flags must hold >= {n_flags} int32 counters on {x.device} (size them "
                         f"with moe_layer_flags_size), got {tuple(flags.shape)} {flags.dtype} on "
                         f"{flags.device}")
    out = torch.empty_like(x)
    if T == 0:
        return out
    slots = torch.empty(E, T, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    act = torch.empty(T * (K + NS), I, dtype=x.dtype, device=dev)
    y = torch.empty(T * (K + NS), D, dtype=torch.float32, device=dev)
    items = E + (E + NS) * (triton.cdiv(I, up[1]) + strips) + T * triton.cdiv(strips, SUM_STRIPS)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is unused for bf16
    pdl = pdl_enabled(x)  # the kernel reads nothing before its wait
    _experts_layer_kernel[(items,)](x, ids.contiguous().view(-1), gates.contiguous().view(-1), w13, w2, sg, su, sd,
                                    residual if residual is not None else out, out, slots, counts, act, y, flags,
                                    T, D, I, K, NS, E, BLOCK_P=triton.next_power_of_2(max(T * K, 16)), UP_BM=up[0],
                                    UP_BN=up[1], UP_BK=up[2], DN_BM=down[0], DN_BN=down[1], DN_BK=down[2],
                                    SUM_STRIPS=SUM_STRIPS, BS=triton.next_power_of_2(K + NS),
                                    FLAGS_POW2=triton.next_power_of_2(n_flags), RESIDUAL=residual is not None,
                                    PRECISION=precision, PDL=pdl, num_warps=up[3], num_stages=up[4],
                                    launch_pdl=pdl)
    return out
