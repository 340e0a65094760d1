"""Triton matmuls for skinny inputs: a decode step's projections, where x has a few rows.

Shapes: M rows of x (tokens), K input features, N output features; weights are nn.Linear's (N, K).

At batch 1 a projection is a matrix-vector product that must stream the weight once. cuBLAS picks
tiles 64 outputs wide for these shapes, so a 512 x 1024 weight is read by 8 thread blocks and the
call takes ~4.4 us on the H200 (`bench/results/decode_profile-*.json`). Here every program owns a
narrow strip of BN outputs (many programs, all SMs streaming) and the rows of x ride along in one
tl.dot tile (16 rows minimum, masked). Batches of one or two rows (`gemv_ok`) take a plain
mat-vec kernel instead: 4 outputs per program and fp32 multiply-adds, more programs with less
latency each (`bench/results/skinny_linear-*.json`).

Three forms, in each kernel:
    linear:  y = x W^T                                          (M, N)
    pair:    ya = x Wa^T, yb = x Wb^T in one launch              two projections of the same input
    swiglu:  y = silu(x Wg^T) * (x Wu^T)                         a SwiGLU's gate and up, fused
Each form may also take the RMSNorm before it (x -> norm(x), with the reference's roundings; every
program reduces its rows of x once more, which costs a few loads from L2 and saves the norm's own
launch), and the linear form a residual after it (y = residual + x W^T).
References: `torch.nn.functional.linear` (and `MLP.forward` for swiglu, `RMSNorm.forward` for the
norm); `tests/test_kernels.py`.
All are torch custom ops: opaque to `torch.compile`, captured by CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoseek.kernels import GEMV_MAX_BATCH, GEMV_MAX_ROWS, pow2_divisor
from nanoseek.kernels.pdl import inputs_ready, pdl_enabled

LINEAR, PAIR, SWIGLU = 0, 1, 2


@triton.jit
def _inverse_rms(x_ptr, rows, row_ok, stride_x, eps, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """rsqrt(mean(x[row]^2) + eps) in fp32 for the rows (BR,) of x -> (BR,)."""
    squares = tl.zeros((BR, BK), tl.float32)
    for k0 in tl.range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=row_ok[:, None] & (k[None, :] < K),
                     other=0.0).to(tl.float32)
        squares += xt * xt
    return tl.rsqrt(tl.sum(squares, 1) / K + eps)


@triton.jit
def _rms_normed(xt, inv_rms, g):
    """RMSNorm of a tile xt (rows, k) given each row's inverse RMS (rows, 1) and the weight g (1, k),
    rounded where `RMSNorm.forward` rounds: w * (x * inv_rms in x's dtype), in x's dtype."""
    dt = xt.dtype
    return (g.to(tl.float32) * (xt.to(tl.float32) * inv_rms).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _row_tile(row_ptr, k, inv_rms, g_ptr, NORM: tl.constexpr):
    """x[row, k] (1, BK) in x's dtype; RMS-normalised (weight g, the row's inv_rms) when NORM."""
    xt = tl.load(row_ptr + k)[None, :]
    if NORM:
        xt = _rms_normed(xt, inv_rms, tl.load(g_ptr + k)[None, :])
    return xt


@triton.jit
def _rows_tile(x_ptr, m, m_ok, stride_x, k, K: tl.constexpr, inv_rms, g_ptr, NORM: tl.constexpr):
    """x[m, k] (BM, BK) in x's dtype, zero outside the rows and K; RMS-normalised (weight g, the rows'
    inv_rms (BM, 1)) when NORM."""
    k_ok = k < K
    xt = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if NORM:
        xt = _rms_normed(xt, inv_rms, tl.load(g_ptr + k, mask=k_ok, other=0.0)[None, :])
    return xt


@triton.jit
def _plus_residual(y, r_ptr, offsets, mask):
    """residual + y with the reference's roundings: y is rounded to the output dtype first."""
    dt = r_ptr.dtype.element_ty
    return tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + y.to(dt).to(tl.float32)


@triton.jit
def _skinny_kernel(x_ptr, wa_ptr, wb_ptr, ya_ptr, yb_ptr, g_ptr, r_ptr, eps, M, stride_x, NA, NB, K: tl.constexpr,
                   MODE: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (n-block, m-block). PAIR: the first cdiv(NA, BN) n-blocks are Wa's, the rest Wb's.
    NORM: x is RMS-normalised with weight g first; RESIDUAL: y = r + x W^T."""
    pid = tl.program_id(0)
    w_ptr, y_ptr, N = wa_ptr, ya_ptr, NA
    if MODE == 1:
        blocks_a = tl.cdiv(NA, BN)
        if pid >= blocks_a:
            w_ptr, y_ptr, N = wb_ptr, yb_ptr, NB
            pid = pid - blocks_a
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    m_ok = m < M
    n = pid * BN + tl.arange(0, BN)
    n_ok = n < N
    w_rows = n[None, :].to(tl.int64) * K  # (1, BN)
    k = tl.arange(0, BK)  # the first step's weights load before the wait for x (nanoseek.kernels.pdl)
    w_ok = (k[:, None] < K) & n_ok[None, :]
    w_first = tl.load(w_ptr + w_rows + k[:, None], mask=w_ok, other=0.0)
    w_up_first = w_first
    if MODE == 2:
        w_up_first = tl.load(wb_ptr + w_rows + k[:, None], mask=w_ok, other=0.0)
    inputs_ready(PDL)
    inv_rms = tl.full((BM, 1), 1.0, tl.float32)
    if NORM:
        inv_rms = _inverse_rms(x_ptr, m, m_ok, stride_x, eps, K, BM, BK)[:, None]
    xt = _rows_tile(x_ptr, m, m_ok, stride_x, k, K, inv_rms, g_ptr, NORM)
    acc = tl.dot(xt, w_first, tl.zeros((BM, BN), tl.float32), input_precision=PRECISION)
    acc_up = tl.zeros((BM, BN), tl.float32)
    if MODE == 2:
        acc_up = tl.dot(xt, w_up_first, acc_up, input_precision=PRECISION)
    for k0 in tl.range(BK, K, BK):
        k = k0 + tl.arange(0, BK)
        xt = _rows_tile(x_ptr, m, m_ok, stride_x, k, K, inv_rms, g_ptr, NORM)
        w_ok = (k[:, None] < K) & n_ok[None, :]
        acc = tl.dot(xt, tl.load(w_ptr + w_rows + k[:, None], mask=w_ok, other=0.0), acc,
                     input_precision=PRECISION)
        if MODE == 2:
            acc_up = tl.dot(xt, tl.load(wb_ptr + w_rows + k[:, None], mask=w_ok, other=0.0), acc_up,
                            input_precision=PRECISION)
    if MODE == 2:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = m[:, None] * N + n[None, :]
    if RESIDUAL:
        acc = _plus_residual(acc, r_ptr, out, m_ok[:, None] & n_ok[None, :])
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv_kernel(x_ptr, wa_ptr, wb_ptr, ya_ptr, yb_ptr, g_ptr, r_ptr, eps, stride_x, NA, NB, K: tl.constexpr,
                 MODE: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PDL: tl.constexpr):
    """Program (n-block, row m): the same forms as plain mat-vecs, BN weight rows per program and
    multiply-adds in fp32 (no 16-row tl.dot tile). Needs BN | NA, NB and BK | K (no masks)."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    w_ptr, y_ptr, N = wa_ptr, ya_ptr, NA
    if MODE == 1:
        blocks_a = NA // BN
        if pid >= blocks_a:
            w_ptr, y_ptr, N = wb_ptr, yb_ptr, NB
            pid = pid - blocks_a
    n = pid * BN + tl.arange(0, BN)
    w_rows = n[:, None].to(tl.int64) * K  # (BN, 1)
    k = tl.arange(0, BK)  # the first step's weights load before the wait for x (nanoseek.kernels.pdl)
    w_first = tl.load(w_ptr + w_rows + k[None, :])
    if MODE == 2:
        w_up_first = tl.load(wb_ptr + w_rows + k[None, :])
    inputs_ready(PDL)
    inv_rms = 1.0
    if NORM:
        row = m + tl.arange(0, 1)
        inv_rms = _inverse_rms(x_ptr, row, row >= 0, stride_x, eps, K, 1, BK)[:, None]  # (1, 1)
    xv = _row_tile(x_ptr + m * stride_x, k, inv_rms, g_ptr, NORM).to(tl.float32)
    acc = w_first.to(tl.float32) * xv
    acc_up = tl.zeros((BN, BK), tl.float32)
    if MODE == 2:
        acc_up = w_up_first.to(tl.float32) * xv
    for k0 in tl.range(BK, K, BK):
        k = k0 + tl.arange(0, BK)
        xv = _row_tile(x_ptr + m * stride_x, k, inv_rms, g_ptr, NORM).to(tl.float32)
        acc += tl.load(w_ptr + w_rows + k[None, :]).to(tl.float32) * xv
        if MODE == 2:
            acc_up += tl.load(wb_ptr + w_rows + k[None, :]).to(tl.float32) * xv
    y = tl.sum(acc, 1)
    if MODE == 2:
        y = y * tl.sigmoid(y) * tl.sum(acc_up, 1)
    if RESIDUAL:
        y = _plus_residual(y, r_ptr, m * N + n, n >= 0)
    tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty))


GEMV_TILES = (4, 512, 8, 3)  # (BN, BK, warps, stages); bench/skinny_linear.py --sweep-gemv


def gemv_ok(x: torch.Tensor, n_outputs: tuple[int, ...]) -> bool:
    """Mat-vecs for batch-1/2 decode steps: x (B, ..., K) with B <= GEMV_MAX_BATCH, at most GEMV_MAX_ROWS
    rows, K and every output count multiples of 16. The choice goes by the batch (leading) dimension,
    not rows, so a plain step (B, 1, K) and a speculative one (B, S, K) take the same arithmetic."""
    K = x.shape[-1]
    rows = x.numel() // max(K, 1)
    return (x.shape[0] <= GEMV_MAX_BATCH and rows <= GEMV_MAX_ROWS and K % 16 == 0
            and all(n % 16 == 0 for n in n_outputs))


def tiles(mode: int, rows: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages). All rows in one tile (16 is tl.dot's minimum); strips of 16
    outputs (at least 32 programs for bench-1b's smallest weights), 64 for a vocabulary-sized head;
    K in 256-wide steps. Picked from `bench/skinny_linear.py --sweep` on the H200
    (`bench/results/skinny_linear-*.json`): e.g. a 512 x 1024 weight at batch 1, 3.5 us against
    cuBLAS's 4.2 us; fused pair 3.9 against 8.5 us; fused SwiGLU 4.2 against 11.9 us."""
    bm = max(16, triton.next_power_of_2(rows))
    if n >= 16384:
        return bm, 64, min(128, triton.next_power_of_2(k)), 2, 3
    warps = 2 if mode == SWIGLU or k <= 512 else 4
    return bm, 16, min(256, triton.next_power_of_2(k)), warps, 3


def _launch(mode: int, x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor | None,
            config: tuple[int, ...] | None = None, gemv: bool | None = None, norm_weight: torch.Tensor | None = None,
            eps: float = 0.0, residual: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run one form; returns [y] ([ya, yb] for PAIR) shaped (..., N). gemv: the mat-vec kernel (None:
    `gemv_ok` decides). config overrides the tiles: (BN, BK, warps, stages) for the mat-vec kernel,
    (BM, BN, BK, warps, stages) for the tl.dot one (for `bench/skinny_linear.py`). norm_weight (K,):
    RMS-normalise x first (eps); residual (..., N), LINEAR only: add it to the output."""
    K = x.shape[-1]
    NA = wa.shape[0]
    NB = wb.shape[0] if wb is not None else 0
    if gemv is None:
        gemv = gemv_ok(x, (NA, NB))
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    ya = torch.empty(M, NA, dtype=x.dtype, device=x.device)
    yb = torch.empty(M, NB, dtype=x.dtype, device=x.device) if mode == PAIR else ya  # ya: an unused stand-in
    wb_arg = wb if wb is not None else wa
    if norm_weight is not None and (norm_weight.shape != (K,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"skinny: the norm weight must be ({K},) of x's dtype {x.dtype}, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    if residual is not None:
        if mode != LINEAR or residual.shape != (*x.shape[:-1], NA) or residual.dtype != x.dtype:
            raise ValueError(f"skinny: a residual must be the linear form's output shape {(*x.shape[:-1], NA)} and "
                             f"x's dtype, got {tuple(residual.shape)} {residual.dtype}")
        residual = residual.reshape(M, NA).contiguous()
    norm_args = (norm_weight.contiguous() if norm_weight is not None else wa, residual if residual is not None else wa,
                 eps)
    flags = dict(NORM=norm_weight is not None, RESIDUAL=residual is not None)
    pdl = pdl_enabled(x)
    if gemv:
        bn, bk, warps, stages = config or GEMV_TILES
        bn = pow2_divisor(NA, bn) if mode != PAIR else pow2_divisor(NA, pow2_divisor(NB, bn))
        blocks = NA // bn + (NB // bn if mode == PAIR else 0)
        _gemv_kernel[(blocks, M)](x2, wa, wb_arg, ya, yb, *norm_args, x2.stride(0), NA, NB, K, MODE=mode, **flags,
                                  BN=bn, BK=pow2_divisor(K, bk), PDL=pdl, num_warps=warps, num_stages=stages,
                                  launch_pdl=pdl)
    else:
        bm, bn, bk, warps, stages = config or tiles(mode, M, max(NA, NB), K)
        blocks = triton.cdiv(NA, bn) + (triton.cdiv(NB, bn) if mode == PAIR else 0)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is unused for bf16
        _skinny_kernel[(blocks, triton.cdiv(M, bm))](x2, wa, wb_arg, ya, yb, *norm_args, M, x2.stride(0), NA, NB, K,
                                                     MODE=mode, **flags, BM=bm, BN=bn, BK=bk, PRECISION=precision,
                                                     PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl)
    outs = [ya, yb] if mode == PAIR else [ya]
    return [y.view(*x.shape[:-1], y.shape[1]) for y in outs]


@torch.library.custom_op("nanoseek::skinny_linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K), w (N, K) -> [residual +] [rmsnorm](x) W^T (..., N); norm_weight (K,) and eps: the
    RMSNorm to apply to x first, residual (..., N): added to the output."""
    return _launch(LINEAR, x, w, None, norm_weight=norm_weight, eps=eps, residual=residual)[0]


@linear.register_fake
def _(x, w, norm_weight=None, eps=0.0, residual=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("nanoseek::skinny_pair", mutates_args=())
def pair(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K), wa (NA, K), wb (NB, K) -> (x Wa^T (..., NA), x Wb^T (..., NB)) in one launch, x
    RMS-normalised first with norm_weight (K,) and eps if given."""
    ya, yb = _launch(PAIR, x, wa, wb, norm_weight=norm_weight, eps=eps)
    return ya, yb


@pair.register_fake
def _(x, wa, wb, norm_weight=None, eps=0.0):
    return x.new_empty(*x.shape[:-1], wa.shape[0]), x.new_empty(*x.shape[:-1], wb.shape[0])


@torch.library.custom_op("nanoseek::skinny_swiglu", mutates_args=())
def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, norm_weight: torch.Tensor | None = None,
           eps: float = 0.0) -> torch.Tensor:
    """x (..., K), w_gate/w_up (N, K) -> silu(x Wg^T) * (x Wu^T) (..., N), computed in fp32; x
    RMS-normalised first with norm_weight (K,) and eps if given."""
    return _launch(SWIGLU, x, w_gate, w_up, norm_weight=norm_weight, eps=eps)[0]


@swiglu.register_fake
def _(x, w_gate, w_up, norm_weight=None, eps=0.0):
    return x.new_empty(*x.shape[:-1], w_gate.shape[0])
