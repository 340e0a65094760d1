"""Triton kernels of the FP8 GPU path: fused blockwise quantization and the grouped blockwise-FP8 GEMMs.

Every kernel has a reference in `reference.py` (tests/test_fp8_gpu.py compares them). Layouts are the
ones `torch._scaled_mm` wants for blockwise scaling (checked in ATen's ScaledBlas.cpp):
    A (M, K) row-major with 1x128 scales: scale tensor (M, K/128) with strides (1, M), i.e. stored (K/128, M)
    B given as (K, N) column-major; B^T (N, K) with 128x128 scales: (N/128, K/128) row-major,
        or with 1x128 scales: (N, K/128) with strides (1, N), i.e. stored (K/128, N).
Rows (tokens) are padded up to a multiple of 128 with zeros; zero rows change no sum and no amax.
Transposed copies are written as their e4m3 bytes (uint8 views): a register transpose of 8-bit integers
is the plain case for every Triton backend.

Shapes: M rows (tokens, padded Mp), K/N features, E experts, R routed rows sorted by expert,
T tiles of 128 rows that never straddle two experts (`tile_table`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 128
FP8_MAX = 448.0
AMAX_FLOOR = tl.constexpr(2.0**-100)  # a nonzero block's max-abs is raised to this (reference.py says why)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the CPU interpreter: no autotuning (no benchmarker)
# NANOSEEK_FP8_ONE_CONFIG=1 skips every search (one config each), for correctness runs where compiling
# several variants per shape would dominate
_ONE = os.environ.get("NANOSEEK_FP8_ONE_CONFIG") == "1"
_QUANT_LAUNCH = {"num_warps": 8} if _INTERPRET else {}  # launch options where the quantizers are not autotuned


def _quant_tuned(key: list[str]):
    """Autotune a quantizer's warps (4, 8 or 16 per 128x128 tile) per `key` (row counts included: the probe's tiny
    operands must not pick the warps of a 16k-token layer). A tile's 128x128 fp32 values
    fill the registers of 8 warps, so few tiles are resident per SM and little memory traffic is in flight
    (1.0 TB/s of the H200's 4.1 TB/s copy rate at 8 warps, 2026-12-06); more warps spread the same tile
    thinner. The kernels are idempotent, so the search's repeated launches are harmless."""
    def wrap(kernel):
        if _INTERPRET:
            return kernel
        warps = (8,) if _ONE else (4, 8, 16)
        return triton.autotune(configs=[triton.Config({}, num_warps=w) for w in warps], key=key)(kernel)
    return wrap


# the strip heights the search tries: on an H100 the 32-row walk passed the GPU tests but ran 22-24% slower
# than whole 128-row tiles at 8 warps (bench/results/fp8_profile-2026-12-06-h100.json), so only 128
STRIPS = (128,)


def _strips_tuned(key: list[str]):
    """A quantizer's search over warps (4, 8, 16) x STRIP (rows per pass, see `_quant_act_kernel`; `STRIPS`), per
    `key`. NANOSEEK_FP8_ONE_CONFIG=1 takes 8 warps and 32-row strips, so the GPU tests run the strip walk (an
    explicit `strip=` runs either). The search holds the whole-tile walk: the 32-row walk is correct on an H100
    but slower there (`bench/fp8_profile.py`: quant_*_strip32 against _strip128)."""
    def wrap(kernel):
        if _INTERPRET:
            return kernel
        shapes = ((8, 32),) if _ONE else tuple((w, r) for w in (4, 8, 16) for r in STRIPS)
        return triton.autotune(configs=[triton.Config({"STRIP": r}, num_warps=w) for w, r in shapes], key=key)(kernel)
    return wrap


def _launch_strips(kernel, grid, args, strip: int | None, **meta) -> None:
    """Launch a `_strips_tuned` kernel: through its search, or with an explicit `strip` (and always under the
    interpreter, which has no search: 32-row strips by default) as the kernel itself at 8 warps."""
    if _INTERPRET or strip is not None:
        (kernel if _INTERPRET else kernel.fn)[grid](*args, **meta, STRIP=strip or 32, num_warps=8)
    else:
        kernel[grid](*args, **meta)


@triton.jit
def _div_rn(x, y):
    """x / y rounded to nearest (IEEE), after broadcasting both to one shape: `tl.div_rn` itself broadcasts
    nothing, and on Triton 3.6 (H200, 2026-12-06) a 128x128 tile divided by a scalar scale gave wrong e4m3
    values in a third of the elements (and NaN bytes) while tile / (128, 1) came out right."""
    x, y = tl.broadcast(x, y)
    return tl.div_rn(x, y)


@triton.jit
def _scale_of(amax):
    """Dequantization scale of a block from its max-abs: amax / 448, or 1 for an all-zero block. Triton's `/`
    on fp32 is the approximate division (off by an ulp in ~20% of the scales on the H100); `div_rn` is IEEE
    round-to-nearest, the division the emulation's torch `/` does, so scales match it bit for bit."""
    return tl.where(amax > 0, _div_rn(tl.maximum(amax, AMAX_FLOOR), tl.zeros_like(amax) + 448.0), 1.0)


@triton.jit
def _inv_of(amax):
    """Quantization multiplier of a block: 448 / amax (IEEE), or 1 for an all-zero block. One division per
    block; each value is then multiplied (IEEE, as the emulation does), not divided."""
    nonzero = amax > 0
    return tl.where(nonzero, _div_rn(tl.zeros_like(amax) + 448.0, tl.maximum(tl.where(nonzero, amax, 1.0), AMAX_FLOOR)),
                    1.0)


@triton.jit
def _to_e4m3(y):
    """y = x * (448 / amax), clamped to +-448 (rounding can overshoot by an ulp), rounded to the nearest e4m3
    value (ties to even) in fp32 and then cast, so the cast is exact.

    Casting fp32 to e4m3 directly is not round-to-nearest on every path: on an H100 with Triton 3.6
    (2026-12-06) 16 of 51,200 values near a tie came out one e4m3 step off (14.499999 -> 15, 0.65625006
    -> 0.625: rounded through a 16-bit type first), and the CPU interpreter mis-rounds values that carry
    into the next binade. Rounding here is plain fp32 arithmetic:
      normal range (|y| >= 2^-6): keep 3 mantissa bits of the fp32 pattern, adding half an e4m3 step
        (0x7FFFF plus the kept lowest bit, for ties to even) before masking; a carry into the exponent
        is the correct round-up;
      subnormal range (|y| < 2^-6): multiples of 2^-9, by adding and subtracting 1.5 * 2^14 (fp32's
        spacing there is 2^-9, so the addition rounds to nearest even)."""
    y = tl.clamp(y, -448.0, 448.0)
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # -1048576: 0xFFF00000
    subnormal = (y + 24576.0) - 24576.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal).to(tl.float8e4nv)


@_strips_tuned(["M", "K", "WITH_T"])
@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, Mp, K,
                      BLOCK: tl.constexpr, WITH_T: tl.constexpr, STRIP: tl.constexpr):
    """One 128x128 tile of x (M, K): 1x128 row quantization -> q (Mp, K), s (K/128, Mp); with WITH_T also
    the 128x1 column quantization written transposed -> qt (K, Mp), st (Mp/128, K).

    STRIP = 128: the tile is loaded once and both quantizations come from registers (128x128 fp32 values per
    program: few programs fit an SM, so little memory traffic is in flight). STRIP < 128: the tile is
    walked in strips of STRIP rows, each quantized by rows as it is loaded while the column max-abs
    accumulates; then, with WITH_T, walked again (the tile's 32 KB are in L2 by then) to quantize by
    columns. A quarter of the registers per program at 32-row strips, for a second read from L2."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rk = pid_k * BLOCK + tl.arange(0, BLOCK)
    a_col = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(BLOCK // STRIP):
        rm = pid_m * BLOCK + i * STRIP + tl.arange(0, STRIP)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=rm[:, None] < M,
                    other=0.0).to(tl.float32)
        ax = tl.abs(x)
        a_row = tl.max(ax, axis=1)  # (STRIP,) one per row
        tl.store(q_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], _to_e4m3(x * _inv_of(a_row)[:, None]))
        tl.store(s_ptr + pid_k * Mp + rm, _scale_of(a_row))
        if WITH_T:
            a_col = tl.maximum(a_col, tl.max(ax, axis=0))  # (BLOCK,) one per column over the rows so far
            if STRIP == BLOCK:  # the whole tile is in registers: quantize the columns from them
                qt = _to_e4m3(x * _inv_of(a_col)[None, :])
                tl.store(qt_ptr + rk[:, None].to(tl.int64) * Mp + rm[None, :], tl.trans(qt.to(tl.uint8, bitcast=True)))
    if WITH_T:
        inv_col = _inv_of(a_col)
        if STRIP < BLOCK:
            for i in tl.static_range(BLOCK // STRIP):
                rm = pid_m * BLOCK + i * STRIP + tl.arange(0, STRIP)
                x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=rm[:, None] < M,
                            other=0.0).to(tl.float32)
                qt = _to_e4m3(x * inv_col[None, :])  # (STRIP, BLOCK)
                tl.store(qt_ptr + rk[:, None].to(tl.int64) * Mp + rm[None, :], tl.trans(qt.to(tl.uint8, bitcast=True)))
        tl.store(st_ptr + pid_m * K + rk, _scale_of(a_col))


def quantize_act(x: torch.Tensor, with_t: bool, strip: int | None = None):
    """x (M, K) -> q (Mp, K) e4m3, s (K/128, Mp) fp32 [, qt (K, Mp) e4m3, st (Mp/128, K) fp32]; Mp = 128-multiple.
    strip: rows per pass (`_quant_act_kernel`); None = the autotuned choice (32 under the interpreter)."""
    assert x.is_contiguous() and x.shape[1] % BLOCK == 0
    M, K = x.shape
    Mp = cdiv(M, BLOCK) * BLOCK
    q = torch.empty(Mp, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(K // BLOCK, Mp, dtype=torch.float32, device=x.device)
    qt = torch.empty(K, Mp, dtype=torch.float8_e4m3fn, device=x.device) if with_t else q
    st = torch.empty(Mp // BLOCK, K, dtype=torch.float32, device=x.device) if with_t else s
    args = (x, q, s, qt.view(torch.uint8), st, M, Mp, K)
    _launch_strips(_quant_act_kernel, (Mp // BLOCK, K // BLOCK), args, strip, BLOCK=BLOCK, WITH_T=with_t)
    return (q, s, qt, st) if with_t else (q, s)


@_quant_tuned(["N", "K"])
@triton.jit
def _quant_weight_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, N, K, s_row, st_row,
                         BLOCK: tl.constexpr):
    """One 128x128 block of expert e's w (E, N, K): q (E, N, K), qt (E, K, N), scale into s[e, n, k] (row
    stride s_row) and st[e, k, n] (row stride st_row). The transposed copy quantizes the block read a second
    time in transposed order (an L2 hit) rather than `tl.trans` of q: on Triton 3.6 (H200, 2026-12-06) the
    register transpose of the same q that was just stored put wrong bytes in a third of qt."""
    e, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nb, kb = tl.cdiv(N, BLOCK), tl.cdiv(K, BLOCK)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    rk = pid_k * BLOCK + tl.arange(0, BLOCK)
    base = e.to(tl.int64) * N * K
    w = tl.load(w_ptr + base + rn[:, None] * K + rk[None, :]).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    scale, inv = _scale_of(amax), _inv_of(amax)
    q = _to_e4m3(w * inv)
    tl.store(q_ptr + base + rn[:, None] * K + rk[None, :], q)
    wt = tl.load(w_ptr + base + rn[None, :] * K + rk[:, None]).to(tl.float32)  # (BK, BN) the same block
    tl.store(qt_ptr + base + rk[:, None] * N + rn[None, :], _to_e4m3(wt * inv))
    tl.store(s_ptr + e * nb * s_row + pid_n * s_row + pid_k, scale)
    tl.store(st_ptr + e * kb * st_row + pid_k * st_row + pid_n, scale)


def quantize_weight(w: torch.Tensor, pad_rows_to: int = 1):
    """w (E, N, K) or (N, K) fp32 -> q (.., N, K), qt (.., K, N) e4m3 and 128x128 scales s (.., N/128, K/128),
    st (.., K/128, N/128): views whose row stride is padded to a multiple of `pad_rows_to`."""
    squeeze = w.dim() == 2
    w3 = w.contiguous().unsqueeze(0) if squeeze else w.contiguous()
    E, N, K = w3.shape
    assert N % BLOCK == 0 and K % BLOCK == 0
    nb, kb = N // BLOCK, K // BLOCK
    s_row, st_row = cdiv(kb, pad_rows_to) * pad_rows_to, cdiv(nb, pad_rows_to) * pad_rows_to
    q = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=w.device)
    qt = torch.empty(E, K, N, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.ones(E, nb, s_row, dtype=torch.float32, device=w.device)
    st = torch.ones(E, kb, st_row, dtype=torch.float32, device=w.device)
    _quant_weight_kernel[(E, nb, kb)](w3, q, qt, s, st, N, K, s_row, st_row, BLOCK=BLOCK, **_QUANT_LAUNCH)
    out = (q, qt, s[..., :kb], st[..., :nb])
    return tuple(t[0] for t in out) if squeeze else out


# ---- grouped (routed experts): rows sorted by expert, ends (E,) end row of each expert's group

def tile_table(ends: torch.Tensor, R: int):
    """128-row tiles that stay inside one expert's group, built on the device (no host sync).

    Returns tile_start, tile_end (T,) int32 row bounds (empty tiles past the last: start = end = 0),
    expert_first_tile, expert_tiles (E,) int32. T = R/128 + E bounds the tile count."""
    E = ends.numel()
    ends = ends.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    n_tiles = (ends - starts + BLOCK - 1) // BLOCK  # (E,)
    cum = n_tiles.cumsum(0)
    first = cum - n_tiles
    T = cdiv(R, BLOCK) + E
    t = torch.arange(T, device=ends.device)
    expert = torch.searchsorted(cum, t, right=True)  # (T,) E for tiles past the last
    valid = expert < E
    ec = expert.clamp(max=E - 1)
    tile_start = torch.where(valid, starts[ec] + (t - first[ec]) * BLOCK, 0)
    tile_end = torch.where(valid, torch.minimum(tile_start + BLOCK, ends[ec]), 0)
    i32 = torch.int32
    return tile_start.to(i32), tile_end.to(i32), first.to(i32), n_tiles.to(i32)


@_strips_tuned(["TC", "C", "WITH_ROWS"])
@triton.jit
def _quant_group_cols_kernel(x_ptr, qt_ptr, st_ptr, q_ptr, s_ptr, tile_start, tile_end, C, TC, Rp,
                             BLOCK: tl.constexpr, WITH_ROWS: tl.constexpr, STRIP: tl.constexpr):
    """Tile t (<= 128 rows of one expert) x 128 columns of x (R, C): scales per column over the tile's
    rows -> st (T, C); values written transposed into the tile's own 128 columns of qt (C, T*128), rows
    past the tile's end as zeros (aligned, unmasked loads for the wgrad kernel). With WITH_ROWS, the same
    pass also writes the rows' 1x128 quantization q (Rp, C) and scales s (C/128, Rp) (the tiles cover every
    row once; rows past R stay unwritten, the grouped GEMM never reads them). STRIP: rows per pass, as in
    `_quant_act_kernel` (128: one load; less: a walk for the rows and the column max-abs, then one from L2
    for the columns)."""
    t, pid_c = tl.program_id(0), tl.program_id(1)
    r0, r1 = tl.load(tile_start + t), tl.load(tile_end + t)
    if r1 <= r0:
        return
    rc = pid_c * BLOCK + tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(BLOCK // STRIP):
        rr = r0 + i * STRIP + tl.arange(0, STRIP)
        live = rr < r1
        x = tl.load(x_ptr + rr[:, None].to(tl.int64) * C + rc[None, :], mask=live[:, None], other=0.0)
        x = x.to(tl.float32)
        ax = tl.abs(x)
        if WITH_ROWS:
            a_row = tl.max(ax, axis=1)  # (STRIP,) one per row
            tl.store(q_ptr + rr[:, None].to(tl.int64) * C + rc[None, :], _to_e4m3(x * _inv_of(a_row)[:, None]),
                     mask=live[:, None])
            tl.store(s_ptr + pid_c * Rp + rr, _scale_of(a_row), mask=live)
        amax = tl.maximum(amax, tl.max(ax, axis=0))  # (BLOCK,) one per column over the tile's rows so far
        if STRIP == BLOCK:  # the whole tile is in registers
            q = _to_e4m3(x * _inv_of(amax)[None, :])
            cols = t * BLOCK + tl.arange(0, BLOCK)
            tl.store(qt_ptr + rc[:, None].to(tl.int64) * TC + cols[None, :], tl.trans(q.to(tl.uint8, bitcast=True)))
    if STRIP < BLOCK:
        inv = _inv_of(amax)
        for i in tl.static_range(BLOCK // STRIP):
            rr = r0 + i * STRIP + tl.arange(0, STRIP)
            x = tl.load(x_ptr + rr[:, None].to(tl.int64) * C + rc[None, :], mask=(rr < r1)[:, None], other=0.0)
            q = _to_e4m3(x.to(tl.float32) * inv[None, :])  # (STRIP, BLOCK), zeros past the tile's end
            cols = t * BLOCK + i * STRIP + tl.arange(0, STRIP)
            tl.store(qt_ptr + rc[:, None].to(tl.int64) * TC + cols[None, :], tl.trans(q.to(tl.uint8, bitcast=True)))
    tl.store(st_ptr + t * C + rc, _scale_of(amax))


def quantize_group_cols(x: torch.Tensor, tiles, with_rows: bool = False, strip: int | None = None):
    """x (R, C) -> qt (C, T*128) e4m3, tile t's 128x1 quantized rows in columns [128 t, 128 t + 128) (zeros
    past its last row; tiles restart at each expert's group), and st (T, C) fp32 scales. with_rows: also
    q (Rp, C) e4m3 / s (C/128, Rp), the rows' 1x128 quantization (`quantize_act`'s, rows past R unwritten),
    from the same read of x; returns (q, s, qt, st) then. strip: rows per pass (None: the autotuned one)."""
    assert x.is_contiguous() and x.shape[1] % BLOCK == 0
    R, C = x.shape
    tile_start, tile_end = tiles[0], tiles[1]
    T = tile_start.numel()
    Rp = cdiv(R, BLOCK) * BLOCK
    qt = torch.empty(C, T * BLOCK, dtype=torch.float8_e4m3fn, device=x.device)  # unused tiles stay unwritten
    st = torch.ones(T, C, dtype=torch.float32, device=x.device)
    q = torch.empty(Rp, C, dtype=torch.float8_e4m3fn, device=x.device) if with_rows else qt
    s = torch.empty(C // BLOCK, Rp, dtype=torch.float32, device=x.device) if with_rows else st
    args = (x, qt.view(torch.uint8), st, q, s, tile_start, tile_end, C, T * BLOCK, Rp)
    _launch_strips(_quant_group_cols_kernel, (T, C // BLOCK), args, strip, BLOCK=BLOCK, WITH_ROWS=with_rows)
    return (q, s, qt, st) if with_rows else (qt, st)


# The GEMMs' search sets are small on purpose: on the H200
# (2026-12-06, Triton 3.6) 8 warps with 3 (or 4) stages won at every shape measured, over 4 warps and over
# 2 or 5 stages, and 256-wide tiles never won, so each autotuned shape compiles three variants.
_CONFIGS = ([triton.Config({}, num_warps=8, num_stages=3)] if _ONE else
            [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((8, 3), (8, 4), (4, 4))])
# the grouped GEMM's tile width (BLOCK_N: 128 or 256 output columns; a 256-wide tile takes two weight blocks'
# scales per K step) stays a parameter (`grouped_gemm(block_n=256)`, tested) outside the search
_GEMM_CONFIGS = [triton.Config({"BLOCK_N": 128}, num_warps=c.num_warps, num_stages=c.num_stages) for c in _CONFIGS]


def _autotuned(kernel, configs=None):
    """Autotune the launch config per (N, K) on the GPU; the CPU interpreter has no benchmarker."""
    if _INTERPRET:
        return kernel
    return triton.autotune(configs=configs or _CONFIGS, key=["N", "K"])(kernel)


@triton.jit
def _grouped_gemm_kernel_body(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, tile_start, tile_end, ends, E, Mp, N, K,
                              sb_e, sb_n, sb_k, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """C[rows of tile t, BLOCK_N columns] = sum_k-blocks (A_q B_q) * sa[row] * sb[e, n-block of the column,
    k-block].

    A (Mp, K) e4m3 row-major with 1x128 scales sa (K/128, Mp); B of expert e as (N, K) e4m3 K-contiguous at
    b_ptr + e*N*K; its 128x128 block scales at sb_ptr + e*sb_e + n*sb_n + k*sb_k. FP32 accumulation,
    promoted (scaled and added) once per 128 of K. Columns past N (a 256-wide tile over N = 128 * odd)
    are masked."""
    t, pid_n = tl.program_id(0), tl.program_id(1)
    r0, r1 = tl.load(tile_start + t), tl.load(tile_end + t)
    if r1 <= r0:
        return
    # the expert of this tile: the number of groups ending at or before r0
    offs_e = tl.arange(0, 256)
    e = tl.sum((tl.load(ends + offs_e, mask=offs_e < E, other=2**30) <= r0).to(tl.int32))
    rm = r0 + tl.arange(0, BLOCK)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK)
    live = rm < r1  # a tile starts at its group's first row, so it may run past the padded rows
    col = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * N * K + rn[None, :].to(tl.int64) * K + rk[:, None]  # (BK, BN)
    sb_ptrs = sb_ptr + e * sb_e + (rn // BLOCK) * sb_n  # (BN,) each column's weight-block scale
    acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK)):
        a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        if BLOCK_N == BLOCK:
            b = tl.load(b_ptrs)
            sb = tl.load(sb_ptr + e * sb_e + pid_n * sb_n + kb * sb_k)
            scale = tl.load(sa_ptr + kb * Mp + rm, mask=live, other=0.0)[:, None] * sb  # (BM, 1)
        else:
            b = tl.load(b_ptrs, mask=col[None, :], other=0.0)
            sb = tl.load(sb_ptrs + kb * sb_k, mask=col, other=0.0)  # (BN,)
            scale = tl.load(sa_ptr + kb * Mp + rm, mask=live, other=0.0)[:, None] * sb[None, :]  # (BM, BN)
        acc += tl.dot(a, b) * scale
        a_ptrs += BLOCK
        b_ptrs += BLOCK
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=live[:, None] & col[None, :])


_grouped_gemm_kernel = _autotuned(_grouped_gemm_kernel_body, _GEMM_CONFIGS)


def grouped_gemm(qa, sa, qb, sb, tiles, ends, R: int, block_n: int | None = None) -> torch.Tensor:
    """qa (Mp, K) / sa (K/128, Mp) row-quantized rows; qb (E, N, K) e4m3; sb (E, N/128, K/128) (any strides)
    -> (R, N) bf16, each row times its expert's B^T. block_n (128 or 256) pins the tile width (tests);
    None lets the autotuner choose."""
    E, N, K = qb.shape
    assert E <= 256, "the grouped kernel finds a tile's expert among at most 256 groups"
    c = torch.empty(R, N, dtype=torch.bfloat16, device=qa.device)
    T = tiles[0].numel()
    kernel, extra = _grouped_gemm_kernel, {}
    if block_n is not None or os.environ.get("TRITON_INTERPRET") == "1":
        kernel, extra = _grouped_gemm_kernel_body, {"BLOCK_N": block_n or BLOCK, "num_warps": 8, "num_stages": 3}
    kernel[lambda meta: (T, cdiv(N, meta["BLOCK_N"]))](
        qa, sa, qb, sb, c, tiles[0], tiles[1], ends, E, qa.shape[0], N, K, sb.stride(0), sb.stride(1), sb.stride(2),
        BLOCK=BLOCK, **extra)
    return c


@_autotuned
@triton.jit
def _grouped_wgrad_kernel(gt_ptr, sg_ptr, xt_ptr, sx_ptr, dw_ptr, first_tile, n_tiles, TC, N, K,
                          BLOCK: tl.constexpr):
    """dW[e, n-block, k-block] = sum over expert e's tiles t of (G_t^T X_t) * sg[t, n] * sx[t, k] in fp32.

    gt (N, TC) and xt (K, TC) e4m3, tile t in columns [128 t, 128 t + 128) (token-contiguous, zero past
    the tile's rows); sg (T, N), sx (T, K): the tiles' 128x1 scales."""
    e, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    rk = pid_k * BLOCK + tl.arange(0, BLOCK)
    t0 = tl.load(first_tile + e)
    nt = tl.load(n_tiles + e)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for i in range(0, nt):
        t = t0 + i
        cols = tl.multiple_of(t * BLOCK, BLOCK) + tl.arange(0, BLOCK)
        g = tl.load(gt_ptr + rn[:, None].to(tl.int64) * TC + cols[None, :])  # (BN, 128 tokens)
        x = tl.load(xt_ptr + rk[None, :].to(tl.int64) * TC + cols[:, None])  # (128 tokens, BK)
        sg = tl.load(sg_ptr + t * N + rn)
        sx = tl.load(sx_ptr + t * K + rk)
        acc += tl.dot(g, x) * (sg[:, None] * sx[None, :])
    tl.store(dw_ptr + e.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :], acc)


def grouped_wgrad(gt, sg, xt, sx, tiles, E: int) -> torch.Tensor:
    """gt (N, TC), xt (K, TC) e4m3 in tile columns (`quantize_group_cols`, or `quantize_act`'s transposed
    copy for one group) with per-tile scales sg (T, N), sx (T, K) -> dW (E, N, K) fp32."""
    N, TC = gt.shape
    K = xt.shape[0]
    assert xt.shape[1] == TC
    dw = torch.empty(E, N, K, dtype=torch.float32, device=gt.device)
    _grouped_wgrad_kernel[(E, N // BLOCK, K // BLOCK)](gt, sg, xt, sx, dw, tiles[2], tiles[3], TC, N, K,
                                                       BLOCK=BLOCK)
    return dw
