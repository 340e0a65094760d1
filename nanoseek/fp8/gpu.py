"""The FP8 GPU path: autograd functions over the Triton quantization kernels, `torch._scaled_mm` with
blockwise scales for dense linears, and the Triton grouped GEMMs for the routed experts.

Dense y = x W^T, x (M, K) -> padded to Mp rows by the quantizer, W (N, K) fp32 master:
    forward  _scaled_mm(x_q (Mp, K), W_q^T, 1x128 x 128x128)              -> (Mp, N) bf16
    dgrad    _scaled_mm(dy_q (Mp, N), (W^T)_q^T, 1x128 x 128x128)          -> (Mp, K) bf16
    wgrad    _scaled_mm(dy^T_q (N, Mp), x^T_q^T, 1x128 x 1x128 over tokens) -> (N, K) bf16 -> fp32 grad
(_scaled_mm returns bf16 for blockwise scales; the weight gradient is rounded to bf16 once, then
accumulated into the fp32 .grad by autograd.) Where this torch's _scaled_mm takes no blockwise scales,
or with DENSE_GEMM = "triton", the same three products run through the experts' Triton kernels with
one group (the weight gradient then stays fp32). Saved for backward: x^T in e4m3 with its 128x1 scales and
the quantized weight; no bf16/fp32 copy of x.

Grouped (experts): the same three products per expert through `kernels.grouped_gemm` / `grouped_wgrad`;
the weight gradient is accumulated and returned in fp32.
"""

from __future__ import annotations

import functools
import warnings

import torch

from nanoseek.fp8 import kernels as K

DENSE_GEMM = "auto"  # "scaled_mm", "triton", or "auto": _scaled_mm where this torch takes blockwise scales


@functools.cache
def _scaled_mm_pad(device_index: int) -> int | None:
    """Row padding of 128x128 scale tensors this torch's `_scaled_mm` accepts: 1 (row stride = K/128, as
    in ATen's older check) or 4 (row stride rounded up to 4, the newer check); None if it takes neither
    (CUDA < 12.9, a GPU below SM 9.0). Probed once per device."""
    dev = torch.device("cuda", device_index)
    # two K blocks and two N blocks with different scales: a misread scale layout changes the product
    x = torch.ones(128, 256, device=dev)
    x[:, 128:] = 2
    c = torch.tensor([[1.0, 2.0], [4.0, 8.0]], device=dev)  # w's 128x128 block values
    w = c.repeat_interleave(128, 0).repeat_interleave(128, 1)  # (256, 256)
    want = (x @ w.t())  # (128, 256): 128 * (c[n, 0] + 2 c[n, 1]) per N block
    for pad in (1, 4):
        qx, sx = K.quantize_act(x, with_t=False)
        qw, _, sw, _ = K.quantize_weight(w, pad_rows_to=pad)
        try:
            y = torch._scaled_mm(qx, qw.t(), scale_a=sx.t(), scale_b=sw.t(), out_dtype=torch.bfloat16)
        except (RuntimeError, ValueError):
            continue
        if torch.allclose(y.float(), want, rtol=1e-2):
            return pad
    return None


def dense_backend(device: torch.device) -> tuple[str, int]:
    """("scaled_mm", scale row padding) or ("triton", 1) for the dense linears on `device`."""
    if DENSE_GEMM == "triton":
        return "triton", 1
    pad = _scaled_mm_pad(device.index if device.index is not None else torch.cuda.current_device())
    if pad is not None:
        return "scaled_mm", pad
    if DENSE_GEMM == "scaled_mm":
        raise RuntimeError("torch._scaled_mm on this build takes no 1x128 x 128x128 blockwise scaling (it needs "
                           "CUDA >= 12.9 and an SM 9.0 GPU); set nanoseek.fp8.gpu.DENSE_GEMM = 'triton'")
    if not getattr(dense_backend, "warned", False):
        dense_backend.warned = True
        warnings.warn("FP8: torch._scaled_mm takes no blockwise scales here; dense FP8 linears use the Triton "
                      "blockwise GEMM instead", stacklevel=2)
    return "triton", 1


def _mm(a, b, sa, sb) -> torch.Tensor:
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def _one_group(M: int, device: torch.device):
    ends = torch.full((1,), M, dtype=torch.int32, device=device)
    return ends, K.tile_table(ends, M)


@torch.compiler.disable
def quantize_dense_weight(w: torch.Tensor):
    """w (N, K) fp32 -> qw (N, K), qwt (K, N) e4m3, sw (N/128, K/128), swt (K/128, N/128): the 128x128-block
    forms `FP8LinearGPU` multiplies with (scale rows padded as this torch's _scaled_mm wants)."""
    return K.quantize_weight(w, pad_rows_to=dense_backend(w.device)[1])


class FP8LinearGPU(torch.autograd.Function):
    """x (M, K) @ w (N, K)^T with all three GEMMs blockwise FP8 on the GPU (_scaled_mm or Triton); wq: w's
    `quantize_dense_weight` when the caller has it cached."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, wq=None) -> torch.Tensor:
        M = x.shape[0]
        backend, pad = dense_backend(x.device)
        qx, sx, qxt, sxt = K.quantize_act(x.contiguous(), with_t=True)  # (Mp, K) (K/128, Mp) (K, Mp) (Mp/128, K)
        # (N, K) (K, N) (N/128, K/128) (K/128, N/128)
        qw, qwt, sw, swt = wq if wq is not None else K.quantize_weight(w, pad_rows_to=pad)
        if backend == "scaled_mm":
            y = _mm(qx, qw.t(), sx.t(), sw.t())[:M]  # (M, N)
        else:  # the experts' kernel with one group
            ends, tiles = _one_group(M, x.device)
            y = K.grouped_gemm(qx, sx, qw[None], sw[None], tiles, ends, M)
        ctx.save_for_backward(qxt, sxt, qwt, swt)
        ctx.M, ctx.x_dtype, ctx.backend = M, x.dtype, backend
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qxt, sxt, qwt, swt = ctx.saved_tensors
        M = ctx.M
        qg, sg, qgt, sgt = K.quantize_act(dy.contiguous(), with_t=True)  # (Mp, N) (N/128, Mp) (N, Mp) (Mp/128, N)
        if ctx.backend == "scaled_mm":
            dx = _mm(qg, qwt.t(), sg.t(), swt.t())[:M]  # (M, K)
            dw = _mm(qgt, qxt.t(), sgt.t(), sxt).float()  # (N, K): A (N, Mp), B (Mp, K), 1x128 along tokens
        else:
            ends, tiles = _one_group(M, dy.device)
            dx = K.grouped_gemm(qg, sg, qwt[None], swt[None], tiles, ends, M)  # (M, K)
            dw = K.grouped_wgrad(qgt, sgt, qxt, sxt, tiles, 1)[0]  # (N, K) fp32
        return dx.to(ctx.x_dtype), dw, None, None


class FP8GroupedLinearGPU(torch.autograd.Function):
    """Rows of x (R, K) sorted by expert, ends (E,) end rows; w (E, N, K) fp32 -> (R, N); wq: w's
    `kernels.quantize_weight` when the caller has it cached."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, out_dtype: torch.dtype,
                wq=None) -> torch.Tensor:
        x = x.contiguous()
        R = x.shape[0]
        tiles = K.tile_table(ends, R)
        qx, sx = K.quantize_act(x, with_t=False)  # (Rp, K), (K/128, Rp)
        # (E, N, K) (E, K, N) (E, N/128, K/128) (E, K/128, N/128)
        qw, qwt, sw, swt = wq if wq is not None else K.quantize_weight(w)
        y = K.grouped_gemm(qx, sx, qw, sw, tiles, ends, R)  # (R, N)
        qxt, sxt = K.quantize_group_cols(x, tiles)  # (K, R), (T, K)
        ctx.save_for_backward(qxt, sxt, qwt, swt, ends, *tiles)
        ctx.x_dtype = x.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qxt, sxt, qwt, swt, ends, *tiles = ctx.saved_tensors
        dy = dy.contiguous()
        R = dy.shape[0]
        qg, sg = K.quantize_act(dy, with_t=False)  # (Rp, N), (N/128, Rp)
        dx = K.grouped_gemm(qg, sg, qwt, swt, tiles, ends, R)  # (R, K)
        qgt, sgt = K.quantize_group_cols(dy, tiles)  # (N, R), (T, N)
        dw = K.grouped_wgrad(qgt, sgt, qxt, sxt, tiles, qwt.shape[0])  # (E, N, K) fp32
        return dx.to(ctx.x_dtype), dw, None, None, None


@torch.compiler.disable  # Triton launches and the one-time probe stay out of torch.compile's graphs
def fp8_linear(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, wq=None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T -> (..., N) in out_dtype, through `FP8LinearGPU`."""
    y = FP8LinearGPU.apply(x.reshape(-1, x.shape[-1]), w, out_dtype, wq)
    return y.view(*x.shape[:-1], w.shape[0])


@torch.compiler.disable
def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, out_dtype: torch.dtype,
                       wq=None) -> torch.Tensor:
    """Rows x (R, K) sorted by expert, w (E, N, K), ends (E,) -> (R, N), through `FP8GroupedLinearGPU`."""
    return FP8GroupedLinearGPU.apply(x, w, ends, out_dtype, wq)


@torch.compiler.disable
def quantize_expert_weights(w: torch.Tensor):
    """w (E, N, K) fp32 -> the 128x128-block forms `FP8GroupedLinearGPU` multiplies with (for a cache)."""
    return K.quantize_weight(w)
