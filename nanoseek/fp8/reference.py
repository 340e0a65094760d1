"""Blockwise FP8 (e4m3) training, emulated in plain PyTorch: the reference the GPU kernels are tested against.

The DeepSeek-V3 recipe (DeepSeek-V3 report, arXiv:2412.19437, section 3.3). A tensor is cut into blocks;
each block gets its own
scale s = amax(|block|) / 448 (448 = largest e4m3 value), is stored as q = e4m3(x * (448 / amax)) and read back
as q * s. A partial last block is simply a smaller block; an all-zero block gets s = 1 (q = 0). A nonzero amax
is raised to at least 2^-100 (`AMAX_FLOOR`): below 448 / FLT_MAX ~ 1.3e-36 the multiplier 448 / amax overflows
to inf and the block's zeros become inf * 0 = NaN (a gradient block of subnormals did that in a GPU run of the
emulation, 2026-12-06); a block whose values all lie under 2^-100 reads back as (near) zero.

Which blocks, for y = x W^T with x (M, K) tokens x features and W (N, K):
    forward   y  = x  W^T      x: 1x128 tiles (per token, 128 features)   W: 128x128 blocks
    dgrad     dx = dy W        dy: 1x128 tiles (per token, 128 outputs)    W: the same 128x128 blocks
    wgrad     dW = dy^T x      dy and x: 128x1 tiles (128 tokens, one feature): the reduction runs over
                               tokens, so each operand is scaled along the token axis.
Only the 128x1 form of x is needed after the forward, so that is what is saved for backward (1 byte
per element + a scale per 128 elements, instead of 2 or 4 bytes).

The emulation dequantizes to fp32 and multiplies in fp32: FP32 accumulation with promotion every 128
elements of K (the kernels' recipe) is, up to fp32 rounding order, the same sum.

Grouped (routed experts): rows sorted by expert, `ends` (E,) the end row of each expert's group.
Per-row tiles do not care about groups; the 128x1 wgrad tiles restart at each group's first row.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 2.0**-100  # the smallest max-abs a nonzero block is scaled by (module docstring)


def quantize(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) -> q (R, C) e4m3, scales (ceil(R/br), ceil(C/bc)) fp32 with x ~= q * scale per block."""
    if x.dim() != 2:
        raise ValueError(f"quantize takes a 2-D tensor, got shape {tuple(x.shape)}; flatten leading dims first")
    br, bc = block
    R, C = x.shape
    Rb, Cb = -(-R // br), -(-C // bc)
    xp = torch.nn.functional.pad(x.float(), (0, Cb * bc - C, 0, Rb * br - R))  # zeros never raise an amax
    blocks = xp.view(Rb, br, Cb, bc)
    amax = blocks.abs().amax(dim=(1, 3))  # (Rb, Cb)
    amax = torch.where(amax > 0, amax.clamp_min(AMAX_FLOOR), amax)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # values are multiplied by 448 / amax (one division per block, as the GPU kernels do; a per-value
    # division would cost the kernels ~10 instructions a value for the same e4m3 numbers up to an ulp)
    # (a tensor divided by a tensor: torch computes `448.0 / amax` as 448 * (1 / amax), rounded twice, which
    # differs from the correctly rounded quotient the GPU kernels compute in ~27% of blocks)
    inv = torch.where(amax > 0, torch.full_like(amax, FP8_MAX) / amax, torch.ones_like(amax))
    q = (blocks * inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(Rb * br, Cb * bc)[:R, :C], scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Inverse of `quantize`: q (R, C) e4m3, scale (Rb, Cb) -> (R, C) fp32."""
    br, bc = block
    R, C = q.shape
    full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C]  # (R, C)
    return q.float() * full


def fake_quantize(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x rounded through blockwise e4m3 (fp32 result)."""
    return dequantize(*quantize(x, block), block)


ROW = (1, BLOCK)  # activations and activation gradients, per token
COL = (BLOCK, 1)  # the wgrad operands, along tokens
TILE = (BLOCK, BLOCK)  # weights


class EmulatedFP8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs on blockwise-e4m3 operands (fp32 maths). x (M, K), w (N, K) fp32;
    wq: w's `quantize_linear_weight`, when the caller has it cached (None: quantized here)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, wq=None) -> torch.Tensor:
        qw, sw = wq if wq is not None else quantize_linear_weight(w)
        y = fake_quantize(x, ROW) @ dequantize(qw, sw, TILE).t()  # (M, N)
        ctx.save_for_backward(*quantize(x, COL), qw, sw)  # x kept in FP8, 128x1 tiles
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qx, sx, qw, sw = ctx.saved_tensors
        dx = fake_quantize(dy, ROW) @ dequantize(qw, sw, TILE)  # (M, K)
        dw = fake_quantize(dy, COL).t() @ dequantize(qx, sx, COL)  # (N, K)
        return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None, None


@torch.compiler.disable  # see fp8_linear_emulated
def quantize_linear_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> its 128x128-block e4m3 form (q, scales): what `EmulatedFP8Linear` multiplies with."""
    return quantize(w, TILE)


def group_bounds(ends: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) row of each group from the end rows (E,) (a host sync: emulation only)."""
    e = [0, *ends.tolist()]
    return list(zip(e[:-1], e[1:]))


def quantize_grouped_cols(x: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x (R, C) -> q (R, C) e4m3 with 128x1 tiles restarting at each group; one scale tensor per group."""
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = []
    for s, e in group_bounds(ends):
        qg, sg = quantize(x[s:e], COL)
        q[s:e] = qg
        scales.append(sg)
    return q, scales


def dequantize_grouped_cols(q: torch.Tensor, scales: list[torch.Tensor], ends: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for (s, e), sg in zip(group_bounds(ends), scales):
        out[s:e] = dequantize(q[s:e], sg, COL)
    return out


@torch.compiler.disable
def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (E, N, K) -> q (E, N, K) e4m3, scales (E, ceil(N/128), ceil(K/128)): 128x128 blocks per expert."""
    qs = [quantize(we, TILE) for we in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


class EmulatedFP8GroupedLinear(torch.autograd.Function):
    """y[rows of group e] = x[rows of e] W_e^T for rows sorted by expert, all three GEMMs on e4m3 operands.

    x (R, K), w (E, N, K) fp32 master weights, ends (E,) int end row of each group -> y (R, N);
    wq: `quantize_experts(w)` when the caller has it cached."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, out_dtype: torch.dtype,
                wq=None) -> torch.Tensor:
        qw, sw = wq if wq is not None else quantize_experts(w)
        xf = fake_quantize(x, ROW)  # (R, K)
        y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
        for e, (s, t) in enumerate(group_bounds(ends)):
            if t > s:
                y[s:t] = xf[s:t] @ dequantize(qw[e], sw[e], TILE).t()
        qx, sx = quantize_grouped_cols(x, ends)
        ctx.save_for_backward(qx, ends, qw, sw, *sx)
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qx, ends, qw, sw, *sx = ctx.saved_tensors
        xc = dequantize_grouped_cols(qx, sx, ends)  # (R, K)
        dyr = fake_quantize(dy, ROW)  # (R, N)
        dyc = dequantize_grouped_cols(*quantize_grouped_cols(dy, ends), ends)  # (R, N)
        dx = torch.zeros(dy.shape[0], qw.shape[2], dtype=torch.float32, device=dy.device)
        dw = torch.zeros(qw.shape, dtype=torch.float32, device=dy.device)
        for e, (s, t) in enumerate(group_bounds(ends)):
            if t > s:
                dx[s:t] = dyr[s:t] @ dequantize(qw[e], sw[e], TILE)
                dw[e] = dyc[s:t].t() @ xc[s:t]
        return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None, None, None


# The emulation stays out of torch.compile's graphs, as the GPU kernels do: inductor's C++ backend cannot
# fuse arithmetic on float8 tensors ("Promotion for Float8 Types is not supported", torch 2.13), which made
# `--train.dtype fp8 --train.compile true` fail on the CPU; the grouped one reads group bounds on the host.
@torch.compiler.disable
def fp8_linear_emulated(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, wq=None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T through `EmulatedFP8Linear` -> (..., N) in out_dtype."""
    y = EmulatedFP8Linear.apply(x.reshape(-1, x.shape[-1]), w, out_dtype, wq)
    return y.view(*x.shape[:-1], w.shape[0])


@torch.compiler.disable
def fp8_grouped_emulated(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, out_dtype: torch.dtype,
                         wq=None) -> torch.Tensor:
    return EmulatedFP8GroupedLinear.apply(x, w, ends, out_dtype, wq)
