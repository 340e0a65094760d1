"""The GRPO objective, written out, with its published variants as explicit arguments.

Shapes: P prompts, G samples per prompt (a group), N = P * G responses in a (mini-)batch, T response
positions (padded; `mask` (N, T) marks real response tokens).

Advantages (per group of G rewards r):
    A_i = (r_i - mean(r)) / (std(r) + eps)      GRPO            (scale_std=True)
    A_i =  r_i - mean(r)                        Dr. GRPO        (scale_std=False)
  A group whose rewards are all equal gives A = 0: no signal (dynamic sampling drops such groups).

Per token t of response i, with ratio rho = exp(logp - logp_old):
    surrogate  s = min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)      (PPO; DAPO: eps_high > eps_low)
    k3 KL      k = exp(logp_ref - logp) - (logp_ref - logp) - 1  >= 0              (beta = 0: not computed)
    per-token  l = -w * s + beta * k
  w: truncated importance sampling weight min(exp(logp_old - logp_engine), tis_cap) correcting for the
  rollout engine's numerics (1 when off).

Aggregation over a batch (n_seqs responses, n_tokens response tokens in it; `normaliser` may pass the
counts of a whole mini-batch when this is one micro-batch of it):
    "sequence"  sum_i (sum_t l_it / |o_i|) / n_seqs        GRPO: mean over tokens, then over responses
    "token"     sum_it l_it / n_tokens                     DAPO: every token weighs the same
    "constant"  sum_it l_it / (n_seqs * max_tokens)        Dr. GRPO: a constant length normaliser
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("sequence", "token", "constant")


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): centred per group, divided by the group's std (unbiased) when
    `scale_std`. Groups with G = 1 have no baseline: refuse them."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, group) shaped, got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError("group size G=1: GRPO's baseline is the group mean, which needs G >= 2 samples per "
                         "prompt; set --rl.group_size 2 or more")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def weight_negatives(advantages: torch.Tensor, neg_weight: float) -> torch.Tensor:
    """Advantages (any shape) with the negative ones scaled by `neg_weight` in [0, 1].

    1 is GRPO. 0 keeps only the push towards better-than-average responses (rejection-sampling
    fine-tuning weighted by the advantage): when most samples fail, the many pushes down on wrong
    responses also lower the shared tokens (numbers, steps) of right answers elsewhere."""
    if not 0.0 <= neg_weight <= 1.0:
        raise ValueError(f"neg_weight {neg_weight} must lie in [0, 1] (1: GRPO, 0: positive advantages only)")
    return torch.where(advantages < 0, advantages * neg_weight, advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) from samples of pi: exp(d) - d - 1 with d = ref - logp.
    Non-negative (e^d >= 1 + d), zero where the two log-probs agree, unbiased for the KL in expectation."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
              aggregation: str = "sequence", max_tokens: int | None = None,
              engine_logp: torch.Tensor | None = None, tis_cap: float = 0.0,
              normaliser: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped-surrogate loss (to minimise) and detached statistics.

    logp, old_logp, ref_logp, engine_logp, mask: (N, T); advantages: (N,). `engine_logp` with `tis_cap` > 0
    turns on truncated importance sampling. `normaliser` = (n_seqs, n_tokens) of the whole mini-batch
    (default: this batch's). `max_tokens` is the constant length of the "constant" aggregation.
    Statistics (means over response tokens): ratio, clip_low (A < 0 and rho < 1 - eps_low), clip_high
    (A > 0 and rho > 1 + eps_high), kl (k3; 0 when beta = 0), tis_weight.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is unknown; use one of {AGGREGATIONS}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
    mask = mask.to(logp.dtype)
    n_seqs, n_tokens = normaliser or (logp.shape[0], int(mask.sum().item()))
    A = advantages[:, None].to(logp.dtype)  # (N, 1)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(ratio * A, clipped * A)  # (N, T)
    weight = torch.ones_like(logp)
    if engine_logp is not None and tis_cap > 0:
        weight = torch.exp(old_logp - engine_logp).clamp(max=tis_cap).detach()
    per_token = -weight * surrogate
    kl = torch.zeros_like(logp)
    if beta > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if aggregation == "sequence":
        loss = (per_token.sum(1) / mask.sum(1).clamp_min(1)).sum() / max(n_seqs, 1)
    elif aggregation == "token":
        loss = per_token.sum() / max(n_tokens, 1)
    else:
        if not max_tokens:
            raise ValueError("the 'constant' aggregation (Dr. GRPO) needs max_tokens, the constant normaliser")
        loss = per_token.sum() / (max(n_seqs, 1) * max_tokens)
    with torch.no_grad():
        tokens = mask.sum().clamp_min(1)
        mean = lambda x: (x * mask).sum() / tokens  # noqa: E731
        stats = {"ratio": mean(ratio), "clip_low": mean(((A < 0) & (ratio < 1 - eps_low)).to(logp.dtype)),
                 "clip_high": mean(((A > 0) & (ratio > 1 + eps_high)).to(logp.dtype)), "kl": mean(kl),
                 "tis_weight": mean(weight)}
    return loss, stats
