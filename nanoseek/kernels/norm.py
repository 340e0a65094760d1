"""RMSNorm for the rows of a decode step, as a Triton kernel that takes part in PDL.

Inside a compiled block, Inductor fuses an RMSNorm into one kernel of its own. In a decode step that
kernel sits in a chain of kernels launched with programmatic dependent launch (`nanoseek.kernels.pdl`),
but it is launched without it: the GPU drains the chain before the norm starts and again before the
kernel after it may start, so the next projection cannot load its weights while the norm runs. This
kernel does the same arithmetic with the chain's rule: the norm weight loads before the wait.

    y[t] = w * (x[t] * rsqrt(mean(x[t]^2) + eps) in x's dtype)       program t: one row of x (T, K)

Roundings are those of `nanoseek.model.common.RMSNorm.forward` (fp32 statistics, the normalised row
rounded to x's dtype, then the weight product in x's dtype). Reference: `RMSNorm.forward`;
`tests/test_kernels.py`. Where a norm can ride inside the kernel after it (`foldable`), it does, and
this kernel is not used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoseek.kernels.pdl import inputs_ready, pdl_enabled
from nanoseek.kernels.skinny import _rms_normed

MAX_ROWS = 64  # a decode step's rows; prefills keep Inductor's norm (many rows per program there)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, eps, stride_x, K: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """Program t: y[t] = RMSNorm(x[t]) with weight w, in one (BK,) tile."""
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BK)
    ok = k < K
    g = tl.load(w_ptr + k, mask=ok, other=0.0)  # a weight: before the wait (nanoseek.kernels.pdl)
    inputs_ready(PDL)
    x = tl.load(x_ptr + t * stride_x + k, mask=ok, other=0.0)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, 0) / K + eps)
    tl.store(y_ptr + t * K + k, _rms_normed(x, inv_rms, g), mask=ok)


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x (..., K) with at most MAX_ROWS rows and a weight (K,) of x's dtype (K up to 16,384: one tile)."""
    K = x.shape[-1]
    rows = x.numel() // max(K, 1)
    return 0 < rows <= MAX_ROWS and weight.shape == (K,) and weight.dtype == x.dtype and K <= 16384


@torch.library.custom_op("nanoseek::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., K), weight (K,) of x's dtype -> RMSNorm(x) (..., K) (see `supported` for the sizes)."""
    K = x.shape[-1]
    if not supported(x, weight):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype} with weight {tuple(weight.shape)} {weight.dtype}: "
                         f"needs at most {MAX_ROWS} rows and a ({K},) weight of x's dtype")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    w = weight.contiguous()
    pdl = pdl_enabled(x) and w is weight  # a copy made here is the predecessor: not read before the wait
    block = triton.next_power_of_2(K)
    _rms_norm_kernel[(x2.shape[0],)](x2, w, y, eps, x2.stride(0), K=K, BK=block, PDL=pdl,
                                     num_warps=4 if block >= 1024 else 1, launch_pdl=pdl)
    return y.view(x.shape)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)
