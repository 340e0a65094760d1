"""Small building blocks shared by attention, MoE and MTP: RMSNorm, Linear and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.kernels import GEMV_MAX_BATCH, skinny_available, triton_available


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back to the input dtype.

    In inference on a GPU, the few rows of a decode step take `nanoseek.kernels.norm` (the same
    arithmetic in a kernel that keeps the step's chain of PDL launches going); this is the reference."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training and triton_available(x) and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type)):
            from nanoseek.kernels import norm

            if norm.supported(x, self.weight):
                return norm.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def foldable(norm: RMSNorm | None, x: torch.Tensor) -> bool:
    """Whether a decode kernel applies `norm` to x (B, ..., K) itself: no norm, or a weight of x's dtype
    and width and a mat-vec batch (B <= GEMV_MAX_BATCH: there the fold saves a launch of the chain;
    in larger batches every program's extra pass over its rows costs more, e.g. 309 against 228 us
    of skinny kernels per batch-32 step, and Inductor's fused norm stays). By batch rows, like the
    kernels' own choice, so that a plain and a speculative step take the same arithmetic."""
    return norm is None or (x.dim() >= 2 and x.shape[0] <= GEMV_MAX_BATCH and norm.weight.dtype == x.dtype
                            and norm.weight.shape == x.shape[-1:])


def norm_args(norm: RMSNorm | None) -> tuple[torch.Tensor | None, float]:
    """(weight, eps) of a norm for the kernels that fold it in; (None, 0.0) for none."""
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)


class Linear(nn.Linear):
    """nn.Linear whose inference on a few rows (a decode step) runs `nanoseek.kernels.skinny`, a
    Triton matmul that streams the weight with many more thread blocks than cuBLAS picks for such
    shapes. Reference: F.linear, the path everywhere else (training, prefill, CPU).

    `norm` (an RMSNorm to apply to x first) and `residual` (added to the output) let a pre-norm
    block's norm and residual add run inside that kernel instead of as launches of their own."""

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        if (self.bias is None and not self.training and skinny_available(x, self.weight)
                and (residual is None or residual.dtype == x.dtype)):
            from nanoseek.kernels import skinny

            if not foldable(norm, x):  # the norm runs first, on its own
                x, norm = norm(x), None
            return skinny.linear(x, self.weight, *norm_args(norm), residual)
        y = F.linear(norm(x) if norm is not None else x, self.weight, self.bias)
        return y if residual is None else residual + y


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., D) -> [residual +] mlp(norm(x)) (..., D); norm: an RMSNorm to apply to x first, folded
        into the decode kernel like the residual (`Linear.forward`)."""
        w_gate, w_up = self.gate_proj.weight, self.up_proj.weight
        if not self.training and skinny_available(x, w_gate, w_up):
            from nanoseek.kernels import skinny  # decode: [norm,] gate, up and SwiGLU in one kernel

            if not foldable(norm, x):
                x, norm = norm(x), None
            return self.down_proj(skinny.swiglu(x, w_gate, w_up, *norm_args(norm)), residual=residual)
        if norm is not None:
            x = norm(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x), residual=residual)
