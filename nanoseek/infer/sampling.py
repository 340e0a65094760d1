"""Sampling: per-request settings and pure functions from logits to token ids.

Shapes: B rows (requests), V vocabulary. Every row of a batch has its own settings, passed as
(B,) tensors, so one call serves a mixed batch (greedy next to top-p) without host syncs:

    probs = sampling_probs(logits, temperature, top_k, top_p)   # (B, V) the distribution to draw from
    ids   = sample(probs, u)                                     # (B,) inverse CDF at uniforms u (B,)

Temperature 0 is greedy: the distribution is one-hot at argmax(logits), so `sample` returns the
argmax whatever u is, and speculative decoding's accept/reject rule reduces to exact matching.
Randomness enters only through `u`, drawn on the host from each request's own seeded
`torch.Generator`: a seeded request yields the same tokens alone or in any batch.
Filters apply in the order temperature, top-k, top-p (as in transformers and vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e4  # logits / temperature must stay finite in fp32
MIN_TOP_P = 1e-6  # smaller values (denormal or 0 in fp32) keep the most likely token, as 1e-6 does
MAX_TOP_K = 2**31 - 1  # larger k keep every token, as this one does (and would overflow int64 tensors)


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one request.

    temperature: 0 for greedy, else logits are divided by it. top_p: keep the smallest set of
    most likely tokens whose mass reaches top_p (1 = off). top_k: keep the k most likely tokens
    (0 = off). max_new_tokens: generated tokens at most (EOS included). stop: strings that end the
    generation; the text stops before the first one. seed: makes sampling reproducible.
    ignore_eos: keep generating after the tokenizer's EOS (benchmarks). logprobs: also return log p of
    each sampled token under the model's own distribution (temperature 1, no top-k/top-p), as RL needs.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):  # also NaN
            raise ValueError(f"temperature={self.temperature}: must be 0 (greedy) or lie in [{MIN_TEMPERATURE:g}, "
                             f"{MAX_TEMPERATURE:g}] (logits / temperature must stay finite in fp32)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must lie in (0, 1] (1 turns nucleus sampling off)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 turns top-k off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p removes tokens (then the logits must be sorted)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)

    def generator(self) -> torch.Generator:
        """A fresh CPU generator for this request: seeded, or from OS entropy when seed is None."""
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def settings_tensors(params: Sequence[SamplingParams],
                     device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """temperature (B,) fp32, top_k (B,) int64, top_p (B,) fp32 for a list of requests."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    # clamped where the clamp keeps the meaning: top-k beyond int range keeps every token, a top_p below
    # MIN_TOP_P (0 or denormal in fp32) keeps only the most likely one
    top_k = torch.tensor([min(p.top_k, MAX_TOP_K) for p in params], dtype=torch.int64)
    top_p = torch.tensor([max(p.top_p, MIN_TOP_P) for p in params], dtype=torch.float32)
    return temperature.to(device), top_k.to(device), top_p.to(device)


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   filters: bool = True) -> torch.Tensor:
    """logits (B, V) -> fp32 probabilities (B, V) after temperature, top-k and top-p, per row.

    Rows with temperature 0 get a one-hot at argmax(logits). `filters=False` skips the sort that
    top-k/top-p need (pass it when no row uses them: `any(p.filters for p in params)`).
    """
    logits = logits.float()
    V = logits.shape[-1]
    greedy = temperature <= 0  # (B,)
    probs = (logits / torch.where(greedy, 1.0, temperature)[:, None]).softmax(dim=-1)
    if filters:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        rank = torch.arange(V, device=logits.device)
        k = torch.where(top_k > 0, top_k, V)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        keep = (rank[None, :] < k[:, None]) & (mass_before < top_p[:, None])  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw from probs (..., V) (need not sum to 1) with uniforms u (...) in [0, 1) -> ids (...).

    Inverse CDF: the first token whose cumulative mass exceeds u * total. Tokens of zero mass are
    never returned; a one-hot row returns its hot index for every u. A row whose mass is not a
    positive finite number (NaN logits) returns -1, which the engine fails as that request's error
    (`Sequence.append`) without feeding it to the model.
    """
    cdf = probs.float().cumsum(dim=-1)  # (..., V)
    total = cdf[..., -1]
    x = torch.minimum(u.to(cdf.device, cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, x[..., None], right=True)[..., 0]
    return torch.where(torch.isfinite(total) & (total > 0), ids, -1)
