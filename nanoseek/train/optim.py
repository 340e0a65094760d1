"""AdamW (torch's, fused on CUDA; or one with bf16 moments) and the learning-rate schedules.

Schedules return the lr multiplier for an optimizer step (0-based), all with linear warmup:
    v3      warmup -> constant -> cosine decay to min_lr_ratio over the last decay_frac (DeepSeek-V3's shape)
    wsd     warmup -> stable -> linear decay to min_lr_ratio over the last decay_frac
    cosine  warmup -> cosine decay to min_lr_ratio over all remaining steps
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("v3", "wsd", "cosine")


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, decay_frac: float, min_ratio: float) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; use one of {SCHEDULES}")
    if step < warmup:
        return (step + 1) / warmup
    decay_start = warmup if schedule == "cosine" else max(warmup, int(total * (1 - decay_frac)))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    if schedule == "wsd":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def continued_multiplier(step: int, total: int, warmup: int, schedule: str, decay_frac: float, min_ratio: float,
                         anchor: tuple[int, float] | None) -> float:
    """`lr_multiplier`, continued from an anchor (s0, m0) set when a resumed run changed max_steps.

    Without an anchor, or before s0, it is `lr_multiplier`. From s0 on it decays from m0 (the value the
    run had reached) to min_ratio at the new `total`, with the schedule's shape (cosine for v3 and
    cosine, linear for wsd), so the learning rate never jumps at a resume.
    """
    if anchor is None or step < anchor[0]:
        return lr_multiplier(step, total, warmup, schedule, decay_frac, min_ratio)
    s0, m0 = anchor
    progress = min(1.0, (step - s0) / max(1, total - s0))
    if schedule == "wsd":
        return m0 - (m0 - min_ratio) * progress
    return min_ratio + (m0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_anchor(step: int, old: dict, new: dict, anchor: tuple[int, float] | None) -> tuple[int, float] | None:
    """The anchor that keeps the multiplier continuous at `step` when a resume changes the schedule's
    settings from `old` to `new` (dicts of continued_multiplier's keyword arguments but step and anchor).

    Unchanged value at `step` (same settings, or a change that leaves it, e.g. longer in the constant
    phase): the old anchor stays. Otherwise the schedule continues from the old value."""
    before = continued_multiplier(step, anchor=anchor, **old)
    after = continued_multiplier(step, anchor=anchor, **new)
    return anchor if abs(before - after) <= 1e-12 else (step, before)


class AdamWBf16Moments(torch.optim.Optimizer):
    """AdamW whose first and second moments are stored in bf16 (fp32 maths, fp32 weights).

    Halves optimizer-state memory, as DeepSeek-V3 did; the update equals torch's AdamW up to the
    rounding of the stored moments. On the GPU each parameter is one Triton kernel
    (`nanoseek/train/fused_adamw.py`); `fused=False` (or a tensor the kernel does not take: distributed,
    non-contiguous, no Triton) runs the reference, a dozen torch ops per parameter. The step count stays
    on the host (a CPU tensor per parameter, as torch's non-capturable AdamW keeps it).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused  # None: the kernel for CUDA tensors; True: also elsewhere (Triton's CPU interpreter)
        self.register_load_state_dict_post_hook(AdamWBf16Moments._moments_to_bf16)

    @staticmethod
    def _moments_to_bf16(optimizer: AdamWBf16Moments) -> None:
        """After `load_state_dict`: torch casts every floating state tensor to its parameter's dtype (fp32), which
        would keep the moments in fp32 from then on (twice the memory, and no longer rounded to bf16 each step:
        a resumed run would not continue the same numbers). The saved values are bf16, so casting back is exact."""
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        from nanoseek.train.fused_adamw import adamw_bf16_moments_step, fused_ok

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = int(state["step"].item())  # a CPU tensor: no device sync
                m, v = state["exp_avg"], state["exp_avg_sq"]
                use_kernel = self.fused if self.fused is not None else p.is_cuda
                if use_kernel and fused_ok(p, p.grad, m, v):
                    adamw_bf16_moments_step(p, p.grad, m, v, step=t, lr=group["lr"], beta1=beta1, beta2=beta2,
                                            eps=group["eps"], weight_decay=group["weight_decay"])
                else:
                    self._reference_step(p, m, v, t, group)

    @staticmethod
    def _reference_step(p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, t: int, group) -> None:
        """The update in torch ops (fp32 maths, moments rounded to bf16 when stored)."""
        beta1, beta2 = group["betas"]
        g = p.grad.float()
        m = exp_avg.float().lerp_(g, 1 - beta1)
        v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    bf16_moments: bool = False, master_weights: bool = False) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (and stacked experts) only; norms get none. `master_weights`: the
    model's GEMM weights become bf16 with fp32 masters in the optimizer (`train/master_weights.py`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if master_weights:
        from nanoseek.train.master_weights import AdamWMasterWeights, gemm_weights
        return AdamWMasterWeights(groups, gemm_weights(model), lr=lr, betas=betas, eps=eps,
                                  moments_dtype=torch.bfloat16 if bf16_moments else torch.float32)
    if bf16_moments:
        return AdamWBf16Moments(groups, lr=lr, betas=betas, eps=eps)
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)

