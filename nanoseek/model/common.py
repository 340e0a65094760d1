"""Small building blocks shared by attention, MoE and MTP: RMSNorm, Linear and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.kernels import skinny_available


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose inference on a few rows (a decode step) runs `nanoseek.kernels.skinny`, a
    Triton matmul that streams the weight with many more thread blocks than cuBLAS picks for such
    shapes. Reference: F.linear, the path everywhere else (training, prefill, CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and not self.training and skinny_available(x, self.weight):
            from nanoseek.kernels import skinny

            return skinny.linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = self.gate_proj.weight, self.up_proj.weight
        if not self.training and skinny_available(x, w_gate, w_up):  # decode: gate, up and SwiGLU in one kernel
            from nanoseek.kernels import skinny

            return self.down_proj(skinny.swiglu(x, w_gate, w_up))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
