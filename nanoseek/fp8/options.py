"""Two options of the FP8 modules (`install_fp8(..., cache_weights=..., recompute_swiglu=...)`).

Weight cache. A weight changes only at the optimizer step, but with gradient accumulation every micro-batch's
forward would quantize it again (a read of the fp32 master and a write of its e4m3 copies). `WeightCache`
keeps the quantized copy and reuses it while the weight is unchanged. "Unchanged" is PyTorch's version
counter: every in-place write to the tensor (the optimizer step, `copy_` when a checkpoint loads) bumps
`w._version`, so the next forward quantizes afresh. torch's fused AdamW (the trainer's optimizer on CUDA)
writes the parameters without bumping it (torch 2.11 and 2.13), so a cache that trusted the counter alone
would keep the first step's weights for the whole run; `WeightCache` therefore installs, once, a global
optimizer step hook that bumps the version of every parameter an optimizer has just stepped. Writes
through `w.data` are not counted by autograd; after such a write call `clear_weight_caches(model)`.
Cost: the cached copy lives between steps (about 1 byte per weight for the emulation, 2 on the GPU,
which keeps the transposed copy too).

SwiGLU recompute. a = silu(g) * u feeds the down projection. Autograd would keep g, u (views of the
up-projection's output) and silu(g) for the backward of silu and the product; the down projection already
keeps its input in FP8. `swiglu` keeps g and u only and recomputes silu(g) in backward (V3 does the same),
so silu(g) (I values per row) is never stored. Its gradients are bitwise those of the stored path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_VERSION_HOOK: list = []  # the handle of the global optimizer step hook, once installed


def bump_stepped_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer step post-hook: count the step as an in-place write of each parameter it updated."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                torch.autograd.graph.increment_version(p)


class WeightCache:
    """The quantized form of one weight, reused while the weight's storage and version are unchanged."""

    def __init__(self) -> None:
        if not _VERSION_HOOK:  # fused optimizers do not bump versions themselves (module docstring)
            _VERSION_HOOK.append(register_optimizer_step_post_hook(bump_stepped_versions))
        self.key: tuple | None = None
        self.value: Any = None
        self.quantizations = 0  # how many times the weight was quantized (tests, statistics)

    def get(self, w: torch.Tensor, quantize: Callable[[torch.Tensor], Any]) -> Any:
        """quantize(w), computed again only when w was written in place (or is another tensor) since."""
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape), w.device)
        if key != self.key:
            self.value = None  # free the old copy before making the new one
            with torch.no_grad():
                self.value = quantize(w)
            self.key = key
            self.quantizations += 1
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


def clear_weight_caches(model: nn.Module) -> int:
    """Drop every FP8 module's cached quantized weight (after writing weights through `.data`); returns the
    number of caches cleared."""
    n = 0
    for m in model.modules():
        for cache in vars(m).values():  # FP8Linear.weight_cache, FP8RoutedExperts.w13_cache / w2_cache
            if isinstance(cache, WeightCache):
                cache.clear()
                n += 1
    return n


class SwiGLU(torch.autograd.Function):
    """a = silu(g) * u that saves g and u only: silu(g) is recomputed in backward. g, u (..., I)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, da: torch.Tensor):
        g, u = ctx.saved_tensors
        s = F.silu(g)  # recomputed
        dg = torch.ops.aten.silu_backward(da * u, g)  # the kernel autograd's SiLU backward runs
        return dg, da * s


def swiglu(g: torch.Tensor, u: torch.Tensor, recompute: bool) -> torch.Tensor:
    """silu(g) * u; with `recompute` through `SwiGLU` (silu(g) not kept for backward)."""
    if recompute and torch.is_grad_enabled():
        return SwiGLU.apply(g, u)
    return F.silu(g) * u
