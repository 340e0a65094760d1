"""Optional Triton fast paths. Each has a plain-PyTorch reference in `nanoseek.model` and a test
that the two agree (`tests/test_kernels*.py`); callers check `triton_available(x)` first and
fall back to the reference where Triton or a GPU is missing."""

from __future__ import annotations

import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def triton_available(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on x's device (a CUDA GPU with Triton installed)."""
    return HAVE_TRITON and x.is_cuda


SKINNY_MAX_ROWS = 64  # `nanoseek.kernels.skinny`: above this many rows cuBLAS's own tiles win
SKINNY_MAX_K = 2048  # and for longer reductions (a 4096-wide input: 8.8 us at best against cuBLAS's 7.6)
# The mat-vec form (`skinny.gemv_ok`) for x (B, ..., K) with B <= 2 and <= 8 rows, up to 4,096-wide inputs
# (batch 1, 1024 x 4096: 5.2 us against cuBLAS's 7.6, bench/results/skinny_linear-2026-11-30-gemv.json)
GEMV_MAX_BATCH = 2
GEMV_MAX_ROWS = 8
GEMV_MAX_K = 4096


def skinny_available(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True when `nanoseek.kernels.skinny` takes x (..., K) @ weights (N, K)^T: inference (no
    autograd, no autocast) on a GPU with Triton, at most SKINNY_MAX_ROWS rows, K <= SKINNY_MAX_K
    (GEMV_MAX_K for the mat-vec batches), and contiguous weights of x's dtype."""
    if not triton_available(x) or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return False
    K = x.shape[-1]
    rows = x.numel() // max(K, 1)
    matvec = x.shape[0] <= GEMV_MAX_BATCH and rows <= GEMV_MAX_ROWS and K <= GEMV_MAX_K and K % 16 == 0
    return (0 < rows <= SKINNY_MAX_ROWS and (K <= SKINNY_MAX_K or matvec)
            and all(w.dim() == 2 and w.shape[1] == K and w.dtype == x.dtype and w.is_contiguous() for w in weights))


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (a tile size that leaves no masked tail)."""
    b = cap
    while n % b:
        b //= 2
    return b
