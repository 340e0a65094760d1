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


def _probe_once(api: str, pad: int, dev: torch.device, nb: int) -> str | None:
    """Run candidate (api, pad) on operands of nb 128-blocks per dimension (K, N, and tokens for the wgrad);
    None if both products are right, else why not. Every value is a power of two times its block's
    amax / 448, so every e4m3 value is exact and a misread scale layout changes the product."""
    blocks = torch.arange(nb, device=dev)
    x = (2.0 ** (blocks % 3)).repeat_interleave(128)[None, :].repeat(128, 1)  # (128, 128 nb)
    c = 2.0 ** ((blocks[:, None] + 2 * blocks[None, :]) % 4)  # w's 128x128 block values
    w = c.repeat_interleave(128, 0).repeat_interleave(128, 1)  # (128 nb, 128 nb)
    tok = torch.arange(128 * nb, device=dev)
    g = (2.0 ** (tok % 4) * (1 + (tok // 128) % 3))[:, None] * x[:1]  # (tokens, outputs)
    xx = x[:1] * (4.0 ** ((tok // 128) % 2))[:, None]  # (tokens, inputs)
    qx, sx = K.quantize_act(x, with_t=False)
    _, _, qgt, sgt = K.quantize_act(g, with_t=True)  # (outputs, tokens), (tokens/128, outputs)
    _, _, qxt, sxt = K.quantize_act(xx, with_t=True)  # (inputs, tokens), (tokens/128, inputs)
    qw, _, sw, _ = K.quantize_weight(w, pad_rows_to=pad)
    try:
        y = _blockwise_mm(api, qx, qw.t(), sx.t(), _tile_scales(sw), True)
        dw = _blockwise_mm(api, qgt, qxt.t(), sgt.t(), sxt.t(), False)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    ok_y = torch.allclose(y.float(), x @ w.t(), rtol=1e-2)
    ok_dw = torch.allclose(dw.float(), g.t() @ xx, rtol=1e-2)
    return None if ok_y and ok_dw else f"ran but gave wrong numbers (forward ok: {ok_y}, wgrad ok: {ok_dw})"


@functools.cache
def _scaled_mm_route(device_index: int) -> tuple[str, int, bool] | None:
    """(api, scale row padding, any block count) of the first candidate whose forward (1x128 x 128x128) and
    weight-gradient (1x128 x 1x128) products are right on this device with 4 blocks per dimension; the last
    item says whether 3 blocks work too (else a linear whose K, N or token blocks are not multiples of 4
    takes the Triton GEMM). None if no candidate works (CUDA < 12.9, a GPU below SM 9.0, a torch without
    blockwise scaling). Probed once per device; PROBE_ERRORS keeps why each candidate was rejected."""
    dev = torch.device("cuda", device_index)
    for api, pad in _CANDIDATES:
        if api == "v2" and _recipes() is None:
            PROBE_ERRORS.append("v2: this torch has no torch.nn.functional.scaled_mm / ScalingType")
            continue
        why = _probe_once(api, pad, dev, 4)
        if why is None:
            odd = _probe_once(api, pad, dev, 3)
            if odd is not None:
                PROBE_ERRORS.append(f"{api} pad {pad} with 3 blocks (Triton GEMM for such shapes): {odd}")
            return api, pad, odd is None
        PROBE_ERRORS.append(f"{api} pad {pad}: {why}")
    return None


def dense_backend(device: torch.device, blocks: tuple[int, ...] = ()) -> tuple[str, int]:
    """("scaled_mm:v1" or "scaled_mm:v2", scale row padding) or ("triton", scale row padding) for a dense linear
    on `device` whose GEMMs have `blocks` 128-blocks along K, N and tokens (the Triton GEMM takes a shape
    this torch's blockwise GEMM refused in the probe)."""
    if DENSE_GEMM == "triton":
        return "triton", 1
    route = _scaled_mm_route(device.index if device.index is not None else torch.cuda.current_device())
    if route is not None:
        api, pad, any_blocks = route
        if any_blocks or all(b % 4 == 0 for b in blocks):
            return f"scaled_mm:{api}", pad
        return "triton", pad
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
        backend, pad = dense_backend(x.device, (x.shape[1] // K.BLOCK, w.shape[0] // K.BLOCK, K.cdiv(M, K.BLOCK)))
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
