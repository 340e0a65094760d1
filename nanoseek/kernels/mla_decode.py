"""Triton kernels for MLA decode steps of a few rows: the absorbed attention of `MLA.absorbed`, from
the query's nope part to the per-head values, in three launches (`attention`), or two from a query
already in latent space (`latent_attention`, after `rope_latent`).

Shapes: rows = B * S query tokens, H heads, N nope dim, P rope dim, V value dim, R kv_lora_rank,
T cached positions (the kv_len bucket); W = kv_b_proj.weight viewed (H, N + V, R) = [W_uk ; W_uv].

    q_lat[t, h]   = W_uk[h]^T q_nope[t, h]                                   (rows, H, R)
    scores[t,h,k] = scale * (q_lat[t, h] . c[k] + q_pe[t, h] . k_pe[k])      keys k <= position[t]
    o_lat[t, h]   = sum_k softmax(scores[t, h])_k c[k]                       (rows, H, R)
    out[t, h]     = W_uv[h] o_lat[t, h]                                      (rows, H * V)

1. `_q_latent_kernel`, program (head, block of R): the W_uk product for every row (16-64 at a time).
2. `_partials_kernel`, program (row, key chunk, group of 16 heads): scores, a softmax over its chunk
   and the weighted sum of the chunk's latents (split-key "flash decoding"): partial o (unnormalised),
   max m and sum l. Chunks that start past the row's position exit at once, so a CUDA graph
   captured for a kv_len bucket reads only the positions each row has (the matmul path reads the
   whole bucket, twice). The rows times the chunks aim at a program count (`Tiles.programs` of TILES,
   or of BATCH_TILES from BATCH_ROWS rows): a row alone splits its keys into many short chunks, a batch of 32 into a
   few long ones, since every chunk writes an fp32 partial o per head (H * R * 4 bytes, as much as
   14 keys of bf16 latent at bench-1b's shapes). A chunk is a fixed share of the bucket, or with
   balanced chunks (`Tiles.balanced`) an even share of the row's own visible keys, so no program of
   a batch's long rows sits idle past the row's position (`_chunk_span`). A batch's chunks take
   several steps each; with `Tiles.stages` they run as a software-pipelined loop (the next steps'
   keys load while one computes) after a first step whose keys load before the PDL wait: at batch
   32, 20.8 against 27.2 us a layer in the kernel bench (`bench/results/mla_decode_kernels-*.json`).
3. `_merge_kernel`, program (row, head, block of V): rescales the chunks' partials by exp(m - max),
   normalises, and applies W_uv. From BATCH_ROWS rows `_merge_rows_kernel` does the same for a
   block of rows (row block, head, block of V), W_uv as a tl.dot: each weight tile read once per block.
Before them, `rope_latent` (one program per token) does what a step does to the new token's q and
latent between the projections and the attention: kv_a_layernorm of c, RoPE of k_pe and of every
head's q_pe, and the cache entry [c ; k_pe] written into the cache at its position, in one launch
instead of four. More programs of the same launch do step 1, which needs only q_nope, so a decode
step runs `rope_latent` and `latent_attention` (steps 2 and 3).
The matmul path it replaces takes six launches (two einsums with W, two over the cache, a softmax,
a concatenation). References: `nanoseek.model.mla.MLA.absorbed` for the attention, the PyTorch path
of `MLA.forward` for `rope_latent`; tests in `tests/test_kernels.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanoseek.kernels.pdl import inputs_ready, pdl_enabled

# Batches of at most MAX_BATCH rows and MAX_QUERIES tokens per row (plain and speculative steps alike,
# so both take the same arithmetic); larger batches keep the matmuls.
MAX_BATCH = 64
MAX_QUERIES = 4
MAX_CHUNKS = 64  # beyond 64 steps of keys (`Tiles.block_keys` each) a chunk takes several steps
HEADS_PER_PROGRAM = 16  # tl.dot's minimum rows; fewer heads are masked


def _dot_dim(n: int) -> int:
    """A tile side for a dimension n: a power of two, at least tl.dot's 16 (the excess is masked)."""
    return max(16, triton.next_power_of_2(n))


def _row_block(rows: int) -> int:
    """Rows per step of the W_uk product: all of them up to 64 (tl.dot's 16 at least)."""
    return min(_dot_dim(rows), 64)


def _precision(x: torch.Tensor) -> str:
    """tl.dot's input precision: fp32 stays exact ("ieee"); "tf32" is unused for bf16."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def _q_latent_block(q_ptr, w_ptr, out_ptr, rows, stride_qt, stride_qh, h, r_block, H: tl.constexpr,
                    N: tl.constexpr, NV: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BR: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """q_lat[t, h, r] = sum_n q_nope[t, h, n] W[h, n, r] for one head, one block of R and every row t
    (BM at a time): the weight tile is read once."""
    r = r_block * BR + tl.arange(0, BR)
    n = tl.arange(0, BN)
    w = tl.load(w_ptr + (h * NV + n[:, None]).to(tl.int64) * R + r[None, :], mask=n[:, None] < N, other=0.0)
    inputs_ready(PDL)  # the weight tile above loads before the wait (nanoseek.kernels.pdl)
    for m0 in tl.range(0, rows, BM):
        t = m0 + tl.arange(0, BM)
        q = tl.load(q_ptr + t[:, None] * stride_qt + h * stride_qh + n[None, :],
                    mask=(t[:, None] < rows) & (n[None, :] < N), other=0.0)  # (BM, BN)
        acc = tl.dot(q, w, input_precision=PRECISION)  # (BM, BR)
        tl.store(out_ptr + (t[:, None] * H + h) * R + r[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=t[:, None] < rows)


@triton.jit
def _q_latent_kernel(q_ptr, w_ptr, out_ptr, rows, stride_qt, stride_qh, H: tl.constexpr, N: tl.constexpr,
                     NV: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                     PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (h, r-block): `_q_latent_block`."""
    _q_latent_block(q_ptr, w_ptr, out_ptr, rows, stride_qt, stride_qh, tl.program_id(0), tl.program_id(1), H, N, NV,
                    R, BM, BN, BR, PRECISION, PDL)


@triton.jit
def _chunk_span(position, chunks, BT: tl.constexpr, STEPS: tl.constexpr, BALANCED: tl.constexpr):
    """Keys per chunk of a row at `position`: STEPS * BT fixed, or with BALANCED the row's visible keys
    split evenly over the chunks (at least BT each), so that every chunk of a long row works."""
    if BALANCED:
        return tl.maximum(tl.cdiv(position + 1, chunks), BT)
    return position * 0 + STEPS * BT


@triton.jit
def _chunk_keys(lat, t, end, stride_lt, R: tl.constexpr, P: tl.constexpr, BP: tl.constexpr):
    """Cached entries t (BT,) of a row, zero from `end` on -> (c (BT, R), k_pe (BT, BP)), through L2."""
    t_ok = t < end
    keys = lat + t[:, None].to(tl.int64) * stride_lt
    c = tl.load(keys + tl.arange(0, R)[None, :], mask=t_ok[:, None], other=0.0, cache_modifier=".cg")
    p = tl.arange(0, BP)
    pe = tl.load(keys + R + p[None, :], mask=t_ok[:, None] & (p[None, :] < P), other=0.0, cache_modifier=".cg")
    return c, pe


@triton.jit
def _attend(q_c, q_p, c, pe, t_ok, m, l_sum, acc, scale, PRECISION: tl.constexpr):
    """One step of online softmax over BT keys: scores of the head group's queries (q_c, q_p) against
    the keys (c, pe), the running max m, sum l_sum and unnormalised output acc (HG, R) updated."""
    s = tl.dot(q_c, tl.trans(c), input_precision=PRECISION)
    s = tl.dot(q_p, tl.trans(pe), s, input_precision=PRECISION) * scale  # (HG, BT)
    s = tl.where(t_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))  # finite: every step holds a visible key
    alpha = tl.exp(m - m_new)
    weights = tl.exp(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(weights, 1)
    acc = tl.dot(weights.to(c.dtype), c, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def _partials_kernel(q_lat_ptr, q_pe_ptr, lat_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, scale, T, stride_pt, stride_ph,
                     stride_lb, stride_lt, S: tl.constexpr, H: tl.constexpr, R: tl.constexpr, P: tl.constexpr,
                     BP: tl.constexpr, HG: tl.constexpr, BT: tl.constexpr, STEPS: tl.constexpr,
                     BALANCED: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (row, chunk, head group): keys [chunk * span, (chunk + 1) * span) up to the row's
    position (`_chunk_span`), in steps of BT keys. Positions and the chunk's first cached keys load
    before the wait for q_lat (nanoseek.kernels.pdl), through L2, unless the chunk holds one of the
    step's new keys, which the kernel just before (`rope_latent`) writes. The steps after the first
    run unrolled (STAGES 0: at most STEPS of them, each waiting for its own loads) or as a software-
    pipelined loop (STAGES >= 2: the next steps' keys load while this one computes)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    position = tl.load(pos_ptr + row, cache_modifier=".cg")
    span = _chunk_span(position, chunks, BT, STEPS, BALANCED)
    start = chunk * span
    first_new = tl.load(pos_ptr + (row // S) * S, cache_modifier=".cg")  # the step's first new key in this row
    if start <= position:  # later chunks hold no visible key: the merge never reads them
        if start + span > first_new:  # new keys in this chunk: wait before reading them
            inputs_ready(PDL)
        h = tl.program_id(2) * HG + tl.arange(0, HG)
        h_ok = h < H
        r = tl.arange(0, R)
        p = tl.arange(0, BP)
        lat = lat_ptr + (row // S).to(tl.int64) * stride_lb
        end = tl.minimum(tl.minimum(position + 1, T), start + span)  # keys [start, end) are this chunk's
        t = start + tl.arange(0, BT)
        c, pe = _chunk_keys(lat, t, end, stride_lt, R, P, BP)  # the first step's keys (it holds key `start`)
        inputs_ready(PDL)
        q_c = tl.load(q_lat_ptr + (row * H + h[:, None]) * R + r[None, :], mask=h_ok[:, None], other=0.0)
        q_p = tl.load(q_pe_ptr + row * stride_pt + h[:, None] * stride_ph + p[None, :],
                      mask=h_ok[:, None] & (p[None, :] < P), other=0.0)
        m, l_sum, acc = _attend(q_c, q_p, c, pe, t < end, tl.full((HG,), float("-inf"), tl.float32),
                                tl.zeros((HG,), tl.float32), tl.zeros((HG, R), tl.float32), scale, PRECISION)
        if STAGES > 0:
            for t0 in tl.range(start + BT, end, BT, num_stages=STAGES):
                t = t0 + tl.arange(0, BT)
                c, pe = _chunk_keys(lat, t, end, stride_lt, R, P, BP)
                m, l_sum, acc = _attend(q_c, q_p, c, pe, t < end, m, l_sum, acc, scale, PRECISION)
        else:
            for step in tl.static_range(1, STEPS):
                if start + step * BT < end:  # a balanced chunk may take fewer than STEPS steps
                    t = start + step * BT + tl.arange(0, BT)
                    c, pe = _chunk_keys(lat, t, end, stride_lt, R, P, BP)
                    m, l_sum, acc = _attend(q_c, q_p, c, pe, t < end, m, l_sum, acc, scale, PRECISION)
        part = (row * chunks + chunk) * H + h  # (HG,) into the (rows, chunks, H) partials
        tl.store(o_ptr + part[:, None].to(tl.int64) * R + r[None, :], acc, mask=h_ok[:, None])
        tl.store(m_ptr + part, m, mask=h_ok)
        tl.store(l_ptr + part, l_sum, mask=h_ok)


@triton.jit
def _merge_kernel(o_ptr, m_ptr, l_ptr, pos_ptr, w_ptr, out_ptr, BT: tl.constexpr, STEPS: tl.constexpr,
                  BALANCED: tl.constexpr, CHUNKS: tl.constexpr, H: tl.constexpr, N: tl.constexpr, V: tl.constexpr,
                  R: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr):
    """Program (row, h, v-block): o_lat = sum_c exp(m_c - max) o_c / sum_c exp(m_c - max) l_c over the
    row's visible chunks (BC at a time, rescaled online), then out[row, h, v] = W_uv[h, v] . o_lat."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, R)
    v = tl.program_id(2) * BV + tl.arange(0, BV)
    # the weight tile and the position load before the wait for the partials (nanoseek.kernels.pdl)
    w = tl.load(w_ptr + (h * (N + V) + N + v[:, None]).to(tl.int64) * R + r[None, :], mask=v[:, None] < V, other=0.0)
    position = tl.load(pos_ptr + row, cache_modifier=".cg")
    visible = position // _chunk_span(position, CHUNKS, BT, STEPS, BALANCED) + 1  # chunks with a visible key
    inputs_ready(PDL)
    c = tl.arange(0, BC)
    base = row * CHUNKS * H + h
    m_run = tl.max(tl.full((BC,), float("-inf"), tl.float32), 0)
    denom = tl.sum(tl.zeros((BC,), tl.float32), 0)
    o_lat = tl.zeros((R,), tl.float32)
    for c0 in tl.range(0, CHUNKS, BC):  # one step unless the context is long
        ok = c0 + c < visible
        m_c = tl.load(m_ptr + base + (c0 + c) * H, mask=ok, other=float("-inf"))  # (BC,)
        l_c = tl.load(l_ptr + base + (c0 + c) * H, mask=ok, other=0.0)
        o_c = tl.load(o_ptr + (base + (c0 + c)[:, None] * H).to(tl.int64) * R + r[None, :], mask=ok[:, None],
                      other=0.0)  # (BC, R)
        m_new = tl.maximum(m_run, tl.max(m_c, 0))  # finite: chunk 0 is always visible
        alpha = tl.exp(m_run - m_new)
        weight = tl.exp(m_c - m_new)
        denom = denom * alpha + tl.sum(weight * l_c, 0)
        o_lat = o_lat * alpha + tl.sum(o_c * weight[:, None], 0)
        m_run = m_new
    out = tl.sum(w.to(tl.float32) * (o_lat / denom)[None, :], 1)  # (BV,)
    tl.store(out_ptr + (row * H + h) * V + v, out.to(out_ptr.dtype.element_ty), mask=v < V)


@triton.jit
def _merge_rows_kernel(o_ptr, m_ptr, l_ptr, pos_ptr, w_ptr, out_ptr, rows, BT: tl.constexpr, STEPS: tl.constexpr,
                       BALANCED: tl.constexpr, CHUNKS: tl.constexpr, H: tl.constexpr, N: tl.constexpr,
                       V: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr,
                       BC: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """`_merge_kernel` for batches, program (block of BM rows, h, v-block): the rows' chunk weights
    exp(m_c - max) / sum_c exp(m_c - max) l_c first, then BR latent columns at a time o_lat (BM, BR),
    rounded to the weight's dtype as the matmul path rounds it, times W_uv's tile with tl.dot. Each
    weight tile is read once for BM rows, where `_merge_kernel` reads it once per row."""
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    t_ok = t < rows
    h = tl.program_id(1)
    v = tl.program_id(2) * BV + tl.arange(0, BV)
    v_ok = v < V
    position = tl.load(pos_ptr + t, mask=t_ok, other=0, cache_modifier=".cg")  # (BM,)
    visible = position // _chunk_span(position, CHUNKS, BT, STEPS, BALANCED) + 1
    inputs_ready(PDL)
    c = tl.arange(0, BC)
    ok = t_ok[:, None] & (c[None, :] < visible[:, None]) & (c[None, :] < CHUNKS)  # (BM, BC)
    part = (t[:, None] * CHUNKS + c[None, :]) * H + h  # (BM, BC) into the (rows, chunks, H) partials
    m_c = tl.load(m_ptr + part, mask=ok, other=float("-inf"))
    l_c = tl.load(l_ptr + part, mask=ok, other=0.0)
    m_max = tl.where(t_ok, tl.max(m_c, 1), 0.0)  # finite for real rows: chunk 0 is always visible
    weight = tl.exp(m_c - m_max[:, None])  # 0 where masked
    weight = weight / tl.where(t_ok, tl.sum(weight * l_c, 1), 1.0)[:, None]
    acc = tl.zeros((BM, BV), tl.float32)
    w_rows = w_ptr + (h * (N + V) + N + v[None, :]).to(tl.int64) * R  # (1, BV)
    for r0 in tl.static_range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        o_c = tl.load(o_ptr + part[:, :, None].to(tl.int64) * R + r[None, None, :], mask=ok[:, :, None],
                      other=0.0)  # (BM, BC, BR)
        o_lat = tl.sum(o_c * weight[:, :, None], 1)  # (BM, BR)
        w = tl.load(w_rows + r[:, None], mask=v_ok[None, :], other=0.0)  # (BR, BV)
        acc = tl.dot(o_lat.to(w.dtype), w, acc, input_precision=PRECISION)
    tl.store(out_ptr + (t[:, None] * H + h) * V + v[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


def supported(q_nope: torch.Tensor, latent_dtype: torch.dtype, rank: int, rope_dim: int) -> bool:
    """The kernels take q_nope (B, S, H, N) with B <= MAX_BATCH and S <= MAX_QUERIES, a power-of-two
    kv_lora_rank (>= 16) and rope dim (>= 2), and latents of the query's dtype."""
    B, S = q_nope.shape[:2]
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return (0 < B <= MAX_BATCH and 0 < S <= MAX_QUERIES and rank >= 16 and pow2(rank) and rope_dim >= 2
            and pow2(rope_dim) and latent_dtype == q_nope.dtype)


@triton.jit
def _rope_latent_token(q_ptr, kv_ptr, norm_ptr, cos_ptr, sin_ptr, q_pe_ptr, entry_ptr, eps, stride_qt, stride_kvt, t,
                       H: tl.constexpr, HB: tl.constexpr, N: tl.constexpr, P: tl.constexpr, R: tl.constexpr,
                       INTERLEAVED: tl.constexpr, PDL: tl.constexpr):
    """Token t: entry = [w * norm(c_t) ; rope(k_pe_t)] (entry_ptr: where it goes, the token's cache
    slot), q_pe_out[t, h] = rope(q_pe[t, h]). Products are rounded to the input dtype where the
    PyTorch reference rounds them (eager bf16)."""
    dt = entry_ptr.dtype.element_ty
    HALF: tl.constexpr = P // 2
    r = tl.arange(0, R)
    norm_w = tl.load(norm_ptr + r).to(tl.float32)  # a weight: before the wait (nanoseek.kernels.pdl)
    inputs_ready(PDL)
    c = tl.load(kv_ptr + t * stride_kvt + r).to(tl.float32)
    normed = (c * tl.rsqrt(tl.sum(c * c, 0) / R + eps)).to(dt).to(tl.float32)
    tl.store(entry_ptr + r, (normed * norm_w).to(dt))
    j = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + t * HALF + j).to(tl.float32)
    sin = tl.load(sin_ptr + t * HALF + j).to(tl.float32)
    if INTERLEAVED:  # pairs (2j, 2j + 1)
        first, second = 2 * j, 2 * j + 1
    else:  # halves
        first, second = j, j + HALF
    k1 = tl.load(kv_ptr + t * stride_kvt + R + first).to(tl.float32)
    k2 = tl.load(kv_ptr + t * stride_kvt + R + second).to(tl.float32)
    out = entry_ptr + R
    tl.store(out + j, ((k1 * cos).to(dt).to(tl.float32) - (k2 * sin).to(dt).to(tl.float32)).to(dt))
    tl.store(out + HALF + j, ((k2 * cos).to(dt).to(tl.float32) + (k1 * sin).to(dt).to(tl.float32)).to(dt))
    h = tl.arange(0, HB)[:, None]
    h_ok = h < H
    q_rows = q_ptr + t * stride_qt + h * (N + P) + N
    q1 = tl.load(q_rows + first[None, :], mask=h_ok, other=0.0).to(tl.float32)  # (HB, HALF)
    q2 = tl.load(q_rows + second[None, :], mask=h_ok, other=0.0).to(tl.float32)
    cos, sin = cos[None, :], sin[None, :]
    q_out = q_pe_ptr + (t * H + h) * P + j[None, :]
    tl.store(q_out, ((q1 * cos).to(dt).to(tl.float32) - (q2 * sin).to(dt).to(tl.float32)).to(dt), mask=h_ok)
    tl.store(q_out + HALF, ((q2 * cos).to(dt).to(tl.float32) + (q1 * sin).to(dt).to(tl.float32)).to(dt),
             mask=h_ok)


@triton.jit
def _rope_latent_kernel(q_ptr, kv_ptr, norm_ptr, cos_ptr, sin_ptr, q_pe_ptr, cache_ptr, pos_ptr, w_ptr, q_lat_ptr, eps,
                        tokens, stride_qt, stride_kvt, stride_cb, stride_ct, S: tl.constexpr, H: tl.constexpr,
                        HB: tl.constexpr, N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, NV: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, INTERLEAVED: tl.constexpr,
                        PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Programs [0, tokens): `_rope_latent_token`, one token each, writing its entry into the layer's
    cache (cache_ptr: the layer, rows b at stride_cb, positions at stride_ct) at its position; the
    H * R / BR programs after them: the W_uk product (`_q_latent_block`), which needs only q_nope.
    One launch for all of it."""
    pid = tl.program_id(0)
    if pid < tokens:
        t = pid.to(tl.int64)
        slot = cache_ptr + (t // S) * stride_cb + tl.load(pos_ptr + t) * stride_ct
        _rope_latent_token(q_ptr, kv_ptr, norm_ptr, cos_ptr, sin_ptr, q_pe_ptr, slot, eps, stride_qt, stride_kvt,
                           t, H, HB, N, P, R, INTERLEAVED, PDL)
    else:
        block = pid - tokens
        _q_latent_block(q_ptr, w_ptr, q_lat_ptr, tokens, stride_qt, N + P, block // (R // BR), block % (R // BR), H,
                        N, NV, R, BM, BN, BR, PRECISION, PDL)


@torch.library.custom_op("nanoseek::mla_rope_latent", mutates_args=("cache",))
def rope_latent(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                sin: torch.Tensor, interleaved: bool, nope_dim: int, w_kv_b: torch.Tensor, cache: torch.Tensor,
                layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, S, H, N + P) from q_b, kv (B, S, R + P) from kv_a, cos/sin (B, S, P / 2), w_kv_b =
    kv_b_proj.weight (H * (N + V), R), cache (L, B, T_max, R + P) (`LatentCache.data`), positions
    (B, S) -> (q_lat = W_uk^T q_nope (B * S, H, R), roped q_pe (B, S, H, P)) in q's dtype; the entries
    [kv_a_layernorm(c) ; roped k_pe] go to cache[layer, b, positions[b, s]] (`LatentCache.write_entry`).
    RoPE output in the half-split layout, as `nanoseek.model.rope.apply_rope` gives. q_lat feeds
    `latent_attention`."""
    B, S, H, width = q.shape
    P = width - nope_dim
    R = kv.shape[-1] - P
    q2, kv2 = q.reshape(B * S, H * width), kv.reshape(B * S, R + P)
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    if kv2.stride(-1) != 1:
        kv2 = kv2.contiguous()
    if cache.dtype != q.dtype or cache.shape[-1] != R + P or cache.stride(-1) != 1 or cache.shape[1] < B:
        raise ValueError(f"mla_rope_latent: the cache must be (L, >= {B}, T, {R + P}) of q's dtype {q.dtype} with "
                         f"contiguous entries, got {tuple(cache.shape)} {cache.dtype}")
    q_pe = torch.empty(B, S, H, P, dtype=q.dtype, device=q.device)
    q_lat = torch.empty(B * S, H, R, dtype=q.dtype, device=q.device)
    norm, w = norm_weight.contiguous(), w_kv_b.contiguous()
    pdl = pdl_enabled(q) and norm is norm_weight and w is w_kv_b  # copies made here are not read before the wait
    block_r = min(R, 64)
    _rope_latent_kernel[(B * S + H * (R // block_r),)](
        q2, kv2, norm, cos.contiguous(), sin.contiguous(), q_pe, cache[layer], positions.reshape(B * S).contiguous(),
        w, q_lat, eps, B * S, q2.stride(0), kv2.stride(0), cache.stride(1), cache.stride(2), S=S, H=H,
        HB=triton.next_power_of_2(H), N=nope_dim, P=P, R=R, NV=w.shape[0] // H, BM=_row_block(B * S),
        BN=_dot_dim(nope_dim), BR=block_r, INTERLEAVED=interleaved, PRECISION=_precision(q), PDL=pdl, launch_pdl=pdl)
    return q_lat, q_pe


@rope_latent.register_fake
def _(q, kv, norm_weight, eps, cos, sin, interleaved, nope_dim, w_kv_b, cache, layer, positions):
    B, S, H, width = q.shape
    P = width - nope_dim
    R = w_kv_b.shape[1]
    return q.new_empty(B * S, H, R), q.new_empty(B, S, H, P)


@torch.library.custom_op("nanoseek::mla_decode", mutates_args=())
def attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, positions: torch.Tensor,
              w_kv_b: torch.Tensor, scale: float, v_dim: int) -> torch.Tensor:
    """q_nope (B, S, H, N), q_pe (B, S, H, P), latent [c_kv ; k_pe] (B, T, R + P), positions (B, S),
    w_kv_b = kv_b_proj.weight (H * (N + V), R) -> per-head values (B, S, H * V) in q's dtype."""
    return _attention(q_nope, q_pe, latent, positions, w_kv_b, scale, v_dim)


@torch.library.custom_op("nanoseek::mla_latent_decode", mutates_args=())
def latent_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, positions: torch.Tensor,
                     w_kv_b: torch.Tensor, scale: float, v_dim: int) -> torch.Tensor:
    """`attention` from the query already in latent space, q_lat (B * S, H, R) as `rope_latent` gives
    it: the partials and merge launches only."""
    return _attention(None, q_pe, latent, positions, w_kv_b, scale, v_dim, q_lat=q_lat)


@latent_attention.register_fake
def _(q_lat, q_pe, latent, positions, w_kv_b, scale, v_dim):
    B, S, H, _ = q_pe.shape
    return q_pe.new_empty(B, S, H * v_dim)


class Tiles(NamedTuple):
    """Launch settings of the attention kernels (bench/mla_decode_kernels.py sweeps them)."""

    block_keys: int  # BT, keys per step of the partials
    partial_warps: int
    block_v: int  # BV, values per merge program
    merge_warps: int
    programs: int  # partials programs aimed at: sets how many chunks a row's keys take
    balanced: bool  # each row's visible keys split evenly over its chunks (else fixed shares of the bucket)
    stages: int = 0  # partials: 0 unrolled steps, >= 2 a software-pipelined loop of that many stages


# Batches of BATCH_ROWS query rows or more take BATCH_TILES and the row-blocked merge (`_merge_rows_kernel`).
# Balanced chunks matter only where a row's keys outnumber its chunks' BT-key steps (batches): a 1,024-position
# bucket in 8 fixed chunks of 128 keys leaves 3 idle for rows at 600.
TILES = Tiles(32, 4, 16, 8, 512, False)
# Pipelining the merge's latent blocks as well was slower in every config tried (30-33 against 25-27 us).
BATCH_TILES = Tiles(32, 4, 32, 8, 128, True, 3)
BATCH_ROWS = 16  # tl.dot's minimum rows: the row-blocked merge's block


def _attention(q_nope, q_pe, latent, positions, w_kv_b, scale, v_dim, tiles=None, q_lat=None):
    """`attention` (`latent_attention` with q_lat instead of q_nope); tiles overrides TILES (for the benchmark)."""
    B, S, H, P = q_pe.shape
    T, R = latent.shape[1], w_kv_b.shape[1]
    N = w_kv_b.shape[0] // H - v_dim
    rows, dev = B * S, q_pe.device
    batched = rows >= BATCH_ROWS
    block_keys, partial_warps, block_v, merge_warps, programs, balanced, stages = Tiles(
        *(tiles or (BATCH_TILES if batched else TILES)))
    precision = _precision(q_pe)
    q_pe = q_pe.reshape(rows, H, P)
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    w = w_kv_b.contiguous()
    positions = positions.reshape(rows).contiguous()
    # the W_uk product reads w before its wait (nanoseek.kernels.pdl): not if w is a copy made just before it
    pdl = pdl_enabled(q_pe) and w is w_kv_b

    if q_lat is not None:
        q_lat = q_lat.reshape(rows, H, R).contiguous()
    else:
        q_nope = q_nope.reshape(rows, H, N)
        q_lat = torch.empty(rows, H, R, dtype=q_nope.dtype, device=dev)
        block_r = min(R, 64)
        _q_latent_kernel[(H, R // block_r)](q_nope, w, q_lat, rows, q_nope.stride(0), q_nope.stride(1), H=H, N=N,
                                            NV=N + v_dim, R=R, BM=_row_block(rows), BN=_dot_dim(N), BR=block_r,
                                            PRECISION=precision, PDL=pdl, launch_pdl=pdl)

    chunks = min(triton.cdiv(T, block_keys), MAX_CHUNKS, triton.cdiv(programs, rows))
    steps = triton.cdiv(T, chunks * block_keys)
    o = torch.empty(rows, chunks, H, R, dtype=torch.float32, device=dev)
    m = torch.empty(rows, chunks, H, dtype=torch.float32, device=dev)
    l_sum = torch.empty(rows, chunks, H, dtype=torch.float32, device=dev)
    _partials_kernel[(rows, chunks, triton.cdiv(H, HEADS_PER_PROGRAM))](
        q_lat, q_pe, latent, positions, o, m, l_sum, scale, T, q_pe.stride(0), q_pe.stride(1), latent.stride(0),
        latent.stride(1), S=S, H=H, R=R, P=P, BP=_dot_dim(P), HG=HEADS_PER_PROGRAM, BT=block_keys, STEPS=steps,
        BALANCED=balanced, STAGES=stages, PRECISION=precision, PDL=pdl, num_warps=partial_warps, launch_pdl=pdl)

    out = torch.empty(rows, H, v_dim, dtype=q_pe.dtype, device=dev)
    block_v = min(triton.next_power_of_2(v_dim), block_v)
    if batched:
        block_c = triton.next_power_of_2(chunks)
        _merge_rows_kernel[(triton.cdiv(rows, BATCH_ROWS), H, triton.cdiv(v_dim, block_v))](
            o, m, l_sum, positions, w, out, rows, BT=block_keys, STEPS=steps, BALANCED=balanced, CHUNKS=chunks, H=H,
            N=N, V=v_dim, R=R, BM=BATCH_ROWS, BV=max(block_v, 16), BR=min(R, max(16, 512 // block_c)), BC=block_c,
            PRECISION=precision, PDL=pdl, num_warps=merge_warps, launch_pdl=pdl)
        return out.view(B, S, H * v_dim)
    _merge_kernel[(rows, H, triton.cdiv(v_dim, block_v))](
        o, m, l_sum, positions, w, out, BT=block_keys, STEPS=steps, BALANCED=balanced, CHUNKS=chunks, H=H, N=N,
        V=v_dim, R=R, BV=block_v, BC=min(32, triton.next_power_of_2(chunks)), PDL=pdl, num_warps=merge_warps,
        launch_pdl=pdl)
    return out.view(B, S, H * v_dim)


@attention.register_fake
def _(q_nope, q_pe, latent, positions, w_kv_b, scale, v_dim):
    B, S, H, _ = q_nope.shape
    return q_nope.new_empty(B, S, H * v_dim)
