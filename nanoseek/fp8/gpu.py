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

# The ways of asking this torch for a blockwise-scaled GEMM, tried in order by the probe:
#   "v2": F.scaled_mm (aten._scaled_mm_v2, torch >= 2.10) with the scaling recipe named explicitly
#         (BlockWise1x128 / BlockWise128x128), the route torchao 0.18's Float8BlockwiseLinear takes;
#   "v1": torch._scaled_mm, which infers the recipe from the scale tensors' shapes.
# and the row padding of 128x128 scale tensors: cuBLASLt reads them K-major with the K-block count
# rounded up to 4 (16-byte aligned columns of fp32); 1 = unpadded, as older ATen checks wanted.
_CANDIDATES = (("v2", 4), ("v2", 1), ("v1", 4), ("v1", 1))
PROBE_ERRORS: list[str] = []  # what each rejected candidate raised or got wrong, for the warning and the bench


def _recipes():
    """(1x128, 128x128) scaling recipes of F.scaled_mm, or None where this torch has no such API."""
    import torch.nn.functional as F
    kinds = getattr(F, "ScalingType", None)
    if not hasattr(F, "scaled_mm") or kinds is None:
        return None
    return kinds.BlockWise1x128, kinds.BlockWise128x128


def _blockwise_mm(api: str, a, b, sa, sb, b_tiles: bool) -> torch.Tensor:
    """a (M, K) e4m3 row-major with 1x128 scales sa (M, K/128), strides (1, M); b (K, N) e4m3 column-major with
    128x128 scales sb (K/128, N/128) K-major (b_tiles) or 1x128-along-K scales sb (N, K/128), strides (1, N)
    -> (M, N) bf16."""
    if api == "v2":
        import torch.nn.functional as F
        one, tile = _recipes()
        return F.scaled_mm(a, b, scale_a=sa, scale_recipe_a=one, scale_b=sb, scale_recipe_b=tile if b_tiles else one,
                           output_dtype=torch.bfloat16)
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


@functools.cache
def _scaled_mm_route(device_index: int) -> tuple[str, int] | None:
    """(api, scale row padding) of the first candidate whose forward (1x128 x 128x128) and weight-gradient
    (1x128 x 1x128) products are right on this device; None if none is (CUDA < 12.9, a GPU below SM 9.0, a
    torch without blockwise scaling). Probed once per device; PROBE_ERRORS keeps why each one was rejected."""
    dev = torch.device("cuda", device_index)
    # two K blocks and two N blocks with different scales: a misread scale layout changes the product
    x = torch.ones(128, 256, device=dev)
    x[:, 128:] = 2
    c = torch.tensor([[1.0, 2.0], [4.0, 8.0]], device=dev)  # w's 128x128 block values
    w = c.repeat_interleave(128, 0).repeat_interleave(128, 1)  # (256, 256)
    want = x @ w.t()  # (128, 256): 128 * (c[n, 0] + 2 c[n, 1]) per N block
    # weight gradient over 256 tokens (two 128x1 tiles with different scales); powers of two times the
    # tiles' amax / 448, so every e4m3 value is exact and a misread scale layout shows
    tok = torch.arange(256, device=dev)
    g = (2.0 ** (tok % 4) * (1 + tok // 128))[:, None].repeat(1, 256)  # (256 tokens, 256 outputs)
    g[:, 128:] *= 2
    xx = x.repeat(2, 1)  # (256 tokens, 256 inputs)
    xx[128:] *= 4
    want_dw = g.t() @ xx  # (256, 256)
    qx, sx = K.quantize_act(x, with_t=False)
    _, _, qgt, sgt = K.quantize_act(g, with_t=True)  # qgt (256 outputs, 256 tokens), sgt (2, 256)
    _, _, qxt, sxt = K.quantize_act(xx, with_t=True)  # qxt (256 inputs, 256 tokens), sxt (2, 256)
    for api, pad in _CANDIDATES:
        if api == "v2" and _recipes() is None:
            PROBE_ERRORS.append("v2: this torch has no torch.nn.functional.scaled_mm / ScalingType")
            continue
        qw, _, sw, _ = K.quantize_weight(w, pad_rows_to=pad)
        try:
            y = _blockwise_mm(api, qx, qw.t(), sx.t(), _tile_scales(sw), True)
            dw = _blockwise_mm(api, qgt, qxt.t(), sgt.t(), sxt.t(), False)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            PROBE_ERRORS.append(f"{api} pad {pad}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
            continue
        ok_y = torch.allclose(y.float(), want, rtol=1e-2)
        ok_dw = torch.allclose(dw.float(), want_dw, rtol=1e-2)
        if ok_y and ok_dw:
            return api, pad
        PROBE_ERRORS.append(f"{api} pad {pad}: ran but gave wrong numbers (forward ok: {ok_y}, wgrad ok: {ok_dw})")
    return None


def dense_backend(device: torch.device) -> tuple[str, int]:
    """("scaled_mm:v1" or "scaled_mm:v2", scale row padding) or ("triton", 1) for the dense linears on `device`."""
    if DENSE_GEMM == "triton":
        return "triton", 1
    route = _scaled_mm_route(device.index if device.index is not None else torch.cuda.current_device())
    if route is not None:
        return f"scaled_mm:{route[0]}", route[1]
    errors = "; ".join(PROBE_ERRORS)
    if DENSE_GEMM == "scaled_mm":
        raise RuntimeError("torch._scaled_mm / F.scaled_mm on this build takes no 1x128 x 128x128 blockwise scaling "
                           "(it needs CUDA >= 12.9 and an SM 9.0 GPU); set nanoseek.fp8.gpu.DENSE_GEMM = 'triton'. "
                           f"What each layout raised: {errors}")
    if not getattr(dense_backend, "warned", False):
        dense_backend.warned = True
        warnings.warn("FP8: torch._scaled_mm takes no blockwise scales here; dense FP8 linears use the Triton "
                      f"blockwise GEMM instead. What each layout raised: {errors}", stacklevel=2)
    return "triton", 1


def _mm(backend: str, a, b, sa, sb, b_tiles: bool = True) -> torch.Tensor:
    return _blockwise_mm(backend.split(":")[1], a, b, sa, sb, b_tiles)


def _tile_scales(s: torch.Tensor) -> torch.Tensor:
    """128x128 scales s (N/128, K/128) of W (N, K), rows padded in memory (`quantize_weight`) -> the
    (padded K/128, N/128) K-major tensor the blockwise GEMM takes for B = W^T: cuBLASLt reads whole
    padded columns, and ATen checks the padded shape ("scale_b must have shape 4 x 2", torch 2.11 on
    the H200, for K/128 = 2). The padding holds ones and is never multiplied."""
    return s.as_strided((s.shape[0], s.stride(0)), (s.stride(0), 1)).t()


@functools.lru_cache(maxsize=64)
def _one_group(M: int, device: torch.device):
    """ends (1,) and the tile table of M rows in one group, for the Triton route of a dense linear. Cached per
    (M, device): building a tile table is ~a dozen small launches (0.26 ms on the H200 at 98k rows), paid on
    every forward and backward otherwise. The tensors are never written."""
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
        if backend.startswith("scaled_mm"):
            y = _mm(backend, qx, qw.t(), sx.t(), _tile_scales(sw))[:M]  # (M, N)
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
        if ctx.backend.startswith("scaled_mm"):
            dx = _mm(ctx.backend, qg, qwt.t(), sg.t(), _tile_scales(swt))[:M]  # (M, K)
            # (N, K): A = dy^T (N, Mp) with scales (N, Mp/128); B = x (Mp, K) column-major, scales (K, Mp/128)
            dw = _mm(ctx.backend, qgt, qxt.t(), sgt.t(), sxt.t(), b_tiles=False).float()
        else:
            ends, tiles = _one_group(M, dy.device)
            dx = K.grouped_gemm(qg, sg, qwt[None], swt[None], tiles, ends, M)  # (M, K)
            dw = K.grouped_wgrad(qgt, sgt, qxt, sxt, tiles, 1)[0]  # (N, K) fp32
        return dx.to(ctx.x_dtype), dw, None, None


class FP8GroupedLinearGPU(torch.autograd.Function):
    """Rows of x (R, K) sorted by expert, ends (E,) end rows; w (E, N, K) fp32 -> (R, N); wq: w's
    `kernels.quantize_weight` when the caller has it cached; tiles: `kernels.tile_table(ends, R)` when the
    caller shares one table between the experts' two GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, out_dtype: torch.dtype,
                wq=None, tiles=None) -> torch.Tensor:
        x = x.contiguous()
        R = x.shape[0]
        tiles = tiles if tiles is not None else K.tile_table(ends, R)
        # one read of x: rows (Rp, K), (K/128, Rp) and the experts' 128x1 tile columns (K, T*128), (T, K)
        qx, sx, qxt, sxt = K.quantize_group_cols(x, tiles, with_rows=True)
        # (E, N, K) (E, K, N) (E, N/128, K/128) (E, K/128, N/128)
        qw, qwt, sw, swt = wq if wq is not None else K.quantize_weight(w)
        y = K.grouped_gemm(qx, sx, qw, sw, tiles, ends, R)  # (R, N)
        ctx.save_for_backward(qxt, sxt, qwt, swt, ends, *tiles)
        ctx.x_dtype = x.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qxt, sxt, qwt, swt, ends, *tiles = ctx.saved_tensors
        dy = dy.contiguous()
        R = dy.shape[0]
        qg, sg, qgt, sgt = K.quantize_group_cols(dy, tiles, with_rows=True)  # (Rp, N) (N/128, Rp) (N, T*128) (T, N)
        dx = K.grouped_gemm(qg, sg, qwt, swt, tiles, ends, R)  # (R, K)
        dw = K.grouped_wgrad(qgt, sgt, qxt, sxt, tiles, qwt.shape[0])  # (E, N, K) fp32
        return dx.to(ctx.x_dtype), dw, None, None, None, None


@torch.compiler.disable  # Triton launches and the one-time probe stay out of torch.compile's graphs
def fp8_linear(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, wq=None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T -> (..., N) in out_dtype, through `FP8LinearGPU`."""
    y = FP8LinearGPU.apply(x.reshape(-1, x.shape[-1]), w, out_dtype, wq)
    return y.view(*x.shape[:-1], w.shape[0])


@torch.compiler.disable
def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, out_dtype: torch.dtype,
                       wq=None, tiles=None) -> torch.Tensor:
    """Rows x (R, K) sorted by expert, w (E, N, K), ends (E,) -> (R, N), through `FP8GroupedLinearGPU`;
    tiles: `expert_tiles(ends, R)`, built once for both GEMMs of an expert layer (or here when None)."""
    return FP8GroupedLinearGPU.apply(x, w, ends, out_dtype, wq, tiles)


@torch.compiler.disable
def expert_tiles(ends: torch.Tensor, R: int):
    """The 128-row tile table of R rows sorted by expert (`kernels.tile_table`)."""
    return K.tile_table(ends, R)


@torch.compiler.disable
def quantize_expert_weights(w: torch.Tensor):
    """w (E, N, K) fp32 -> the 128x128-block forms `FP8GroupedLinearGPU` multiplies with (for a cache)."""
    return K.quantize_weight(w)
