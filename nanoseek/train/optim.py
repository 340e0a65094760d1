"""AdamW (torch's, fused on CUDA; or ours, `train/master_weights.py`, for bf16 moments and master weights)
and the learning-rate schedules.

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


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    bf16_moments: bool = False, master_weights: bool = False) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (and stacked experts) only; norms get none. `master_weights`: the
    model's GEMM weights become bf16 with fp32 masters in the optimizer (`train/master_weights.py`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if master_weights or bf16_moments:  # one Triton kernel per parameter (train/master_weights.py)
        from nanoseek.train.master_weights import AdamWMasterWeights, gemm_weights
        return AdamWMasterWeights(groups, gemm_weights(model) if master_weights else [], lr=lr, betas=betas, eps=eps,
                                  moments_dtype=torch.bfloat16 if bf16_moments else torch.float32)
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)

