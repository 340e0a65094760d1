"""Triton attention for MLA decode steps over the latent cache (absorbed form), split over keys.

Shapes: B rows, S query tokens per row, H heads, R kv_lora_rank, P rope dim, T cached positions
(kv_len); q_all (B, S, H, R + P) = [W_uk^T q_nope ; q_pe], latent (B, T, R + P) = [c_kv ; k_pe].

    scores[h, t] = scale * q_all[h] . latent[t]           for t <= position (others masked)
    o_lat[h]     = sum_t softmax(scores[h])_t c_kv[t]      (B, S, H, R)

Program (query token, key chunk, head group of 16) reads its chunk of the cache once for all
heads of the group (scores and values share the latent rows), keeps an online softmax, and
writes a partial (o, running max m, sum l); `attention` merges the chunks (flash-decoding).
Chunks past a row's position exit at once, so a CUDA graph captured for a kv_len bucket reads only
the positions each row has. The matmul path it replaces (`MLA.absorbed`) reads the whole bucket
twice: once for the scores and once for the values. Reference: `MLA.absorbed`; tests in
`tests/test_kernels.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HEADS_PER_PROGRAM = 16  # tl.dot's minimum rows; fewer heads are masked
BLOCK_T = 32  # keys per inner step


@triton.jit
def _mla_decode_kernel(q_ptr, lat_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, scale, T, CHUNK, stride_lb, stride_lt,
                       S: tl.constexpr, H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, HG: tl.constexpr,
                       BT: tl.constexpr, PRECISION: tl.constexpr):
    token = tl.program_id(0)  # b * S + s
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    h = tl.program_id(2) * HG + tl.arange(0, HG)
    h_ok = h < H
    b = token // S
    q_row = q_ptr + token.to(tl.int64) * H * (R + P) + h[:, None] * (R + P)  # (HG, 1)
    r = tl.arange(0, R)
    p = tl.arange(0, P)
    q_c = tl.load(q_row + r[None, :], mask=h_ok[:, None], other=0.0)  # (HG, R)
    q_p = tl.load(q_row + R + p[None, :], mask=h_ok[:, None], other=0.0)  # (HG, P)
    start = split * CHUNK
    end = tl.minimum(tl.minimum(start + CHUNK, T), tl.load(pos_ptr + token) + 1)  # keys [start, end)
    m = tl.full((HG,), float("-inf"), tl.float32)
    l_sum = tl.zeros((HG,), tl.float32)
    acc = tl.zeros((HG, R), tl.float32)
    lat = lat_ptr + b.to(tl.int64) * stride_lb
    t0 = start
    while t0 < end:  # steps of BT keys
        t = t0 + tl.arange(0, BT)
        t_ok = t < end
        rows = lat + t[:, None].to(tl.int64) * stride_lt
        c = tl.load(rows + r[None, :], mask=t_ok[:, None], other=0.0)  # (BT, R)
        pe = tl.load(rows + R + p[None, :], mask=t_ok[:, None], other=0.0)  # (BT, P)
        s = tl.dot(q_c, tl.trans(c), input_precision=PRECISION)
        s = tl.dot(q_p, tl.trans(pe), s, input_precision=PRECISION) * scale  # (HG, BT)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every step has at least one key
        alpha = tl.exp(m - m_new)
        weights = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(weights, 1)
        acc = tl.dot(weights.to(c.dtype), c, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
        t0 += BT
    part = (token * splits + split) * H + h  # (HG,) row of the (B*S, splits, H) partials
    tl.store(o_ptr + part[:, None].to(tl.int64) * R + r[None, :], acc, mask=h_ok[:, None])
    tl.store(m_ptr + part, m, mask=h_ok)
    tl.store(l_ptr + part, l_sum, mask=h_ok)


@torch.library.custom_op("nanoseek::mla_decode_partials", mutates_args=())
def partials(q_all: torch.Tensor, latent: torch.Tensor, positions: torch.Tensor, scale: float, rank: int,
             splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_all (B, S, H, R + P), latent (B, T, R + P), positions (B, S) -> per key chunk: o (B*S, splits,
    H, R) fp32 (unnormalised), m (B*S, splits, H) running max (-inf: chunk empty), l (B*S, splits, H)."""
    B, S, H, width = q_all.shape
    T = latent.shape[1]
    q_all = q_all.contiguous()
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    chunk = triton.cdiv(triton.cdiv(T, splits), BLOCK_T) * BLOCK_T
    dev = q_all.device
    o = torch.empty(B * S, splits, H, rank, dtype=torch.float32, device=dev)
    m = torch.empty(B * S, splits, H, dtype=torch.float32, device=dev)
    l_sum = torch.empty(B * S, splits, H, dtype=torch.float32, device=dev)
    precision = "ieee" if q_all.dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is unused for bf16
    grid = (B * S, splits, triton.cdiv(H, HEADS_PER_PROGRAM))
    _mla_decode_kernel[grid](q_all, latent, positions.contiguous(), o, m, l_sum, scale, T, chunk, latent.stride(0),
                             latent.stride(1), S=S, H=H, R=rank, P=width - rank, HG=HEADS_PER_PROGRAM, BT=BLOCK_T,
                             PRECISION=precision)
    return o, m, l_sum


@partials.register_fake
def _(q_all, latent, positions, scale, rank, splits):
    B, S, H, _ = q_all.shape
    f32 = dict(dtype=torch.float32)
    return (q_all.new_empty(B * S, splits, H, rank, **f32), q_all.new_empty(B * S, splits, H, **f32),
            q_all.new_empty(B * S, splits, H, **f32))


def attention(q_all: torch.Tensor, latent: torch.Tensor, positions: torch.Tensor, scale: float,
              rank: int) -> torch.Tensor:
    """Absorbed MLA attention -> o_lat (B, S, H, R) in q_all's dtype (see the module docstring).
    Key chunks: enough programs to fill the GPU (~256 per head group) but at least BLOCK_T keys each."""
    B, S, H, _ = q_all.shape
    T = latent.shape[1]
    splits = max(1, min(triton.cdiv(T, BLOCK_T), triton.cdiv(256, B * S)))
    o, m, l_sum = partials(q_all, latent, positions, scale, rank, splits)
    weight = torch.exp(m - m.amax(dim=1, keepdim=True))  # (B*S, splits, H); 0 for empty chunks
    o_lat = (o * weight[..., None]).sum(1) / (l_sum * weight).sum(1)[..., None]  # (B*S, H, R)
    return o_lat.view(B, S, H, rank).to(q_all.dtype)
