"""MTP speculative decoding: the model's own multi-token-prediction module drafts, the main model verifies.

Shapes: B rows, K draft tokens per step, V vocabulary, D hidden. For a row, m is the position
of its pending token t_m (sampled, not yet in the cache); positions < m are cached.

One step (all rows at once, each at its own m):
 1. verify: the main model reads [t_m, d_1 .. d_K] at positions m .. m+K (one forward over the
    latent cache) -> target distributions p_0 .. p_K (B, K+1, V) and hidden states h_0.
 2. accept (`accept`): d_i is kept with probability min(1, p_{i-1}(d_i) / q_i(d_i)); at the first
    rejection the token is redrawn from normalize(max(0, p - q)); if all K are kept a bonus token
    is drawn from p_K. This leaves every emitted token distributed exactly as under p (Leviathan
    et al. 2023, Chen et al. 2023). Greedy rows have one-hot p and q, so the rule keeps the longest
    prefix on which the drafts equal the argmax and emits the argmax after it: the output equals
    plain greedy decoding token for token. a (B,) drafts are accepted, a + 1 tokens emitted.
 3. draft: MTP module 1 at position i reads the main hidden state h_0[i] and the embedding of
    token i+1 and predicts token i+2. It runs over positions m .. m+K with the now-known tokens
    (this rewrites its cache with true inputs up to m+a); at m+a it gives the first draft of the
    next step. Further drafts apply module 1 again one position on, feeding its own output as an
    approximation of the main hidden state (as vLLM and SGLang do with DeepSeek's single module).
    Those cache entries get rewritten by the next step's pass; deeper MTP modules (checkpoints
    with num_nextn_predict_layers > 1) are not used for drafting.

Rows that accept different numbers of drafts simply keep different lengths: cache entries
beyond a row's length are never read before they are overwritten. The draft steps write the
MTP cache up to position m + 2K - 1, so the cache needs 2K positions beyond the context.
"""

from __future__ import annotations

import torch

from nanoseek.infer.sampling import sample, sampling_probs
from nanoseek.model.cache import LatentCache
from nanoseek.model.transformer import Transformer

Settings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]  # temperature, top_k, top_p (B,), filters


def accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
           u_extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule.

    p (B, K+1, V) target distributions at the K+1 verified positions, q (B, K, V) the draft
    distributions, drafts (B, K) the drafted ids (drawn from q), u_accept (B, K) and u_extra (B,)
    uniforms in [0, 1). Returns a (B,) accepted drafts and tokens (B, K+1): the emitted tokens are
    tokens[:, :a+1] = d_1 .. d_a, then the resampled (or bonus) token.
    """
    B, K = drafts.shape
    p_d = p[:, :K].gather(-1, drafts[..., None])[..., 0]  # (B, K)
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    ok = u_accept * q_d < p_d  # probability min(1, p/q); exact for one-hot p and q
    a = ok.long().cumprod(dim=-1).sum(dim=-1)  # (B,) leading accepts
    q_pad = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)  # (B, K+1, V): no draft after the last
    index = a[:, None, None].expand(B, 1, p.shape[-1])
    p_a, q_a = p.gather(1, index)[:, 0], q_pad.gather(1, index)[:, 0]  # (B, V)
    residual = (p_a - q_a).clamp_min(0)
    # p == q makes rejection impossible; the fallback only guards against an all-zero residual.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
    tokens = torch.cat((drafts, torch.zeros_like(drafts[:, :1])), dim=1)
    tokens = tokens.scatter(1, a[:, None], sample(residual, u_extra)[:, None])
    return a, tokens


def draft(model: Transformer, cache: LatentCache, h: torch.Tensor, logits: torch.Tensor, position: torch.Tensor,
          k: int, settings: Settings, u: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K drafts from MTP module 1's output at `position` (B,).

    h (B, 1, D) and logits (B, V): module 1 at `position`, already run with true inputs. u (B, K)
    uniforms. Returns drafts (B, K) and their distributions q (B, K, V).
    """
    temperature, top_k, top_p, filters = settings
    drafts, qs = [], []
    for j in range(k):
        if j:
            pos = (position + j)[:, None]  # (B, 1)
            cos, sin = model.rope(pos, h.dtype)
            h, out = model.mtp_forward(1, h, drafts[-1][:, None], cos, sin, cache=cache, positions=pos,
                                       kv_len=kv_len)
            logits = out[:, 0]
        q = sampling_probs(logits, temperature, top_k, top_p, filters)
        drafts.append(sample(q, u[:, j]).clamp_min(0))  # a failed row (-1) drafts a harmless token
        qs.append(q)
    return torch.stack(drafts, dim=1), torch.stack(qs, dim=1)


def prefill_drafts(model: Transformer, cache: LatentCache, hidden: torch.Tensor, ids: torch.Tensor,
                   first: torch.Tensor, lengths: torch.Tensor, k: int, settings: Settings,
                   u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill MTP module 1's cache over right-padded prompts and draft after them.

    hidden (B, S, D) the main model's prefill output, ids (B, S) the prompts, first (B,) the token
    sampled after each prompt, lengths (B,) prompt lengths, u (B, K). The cache must hold
    S + K - 1 positions. Returns drafts (B, K) and q (B, K, V).
    """
    B, S = ids.shape
    rows = torch.arange(B, device=ids.device)
    next_ids = torch.cat((ids[:, 1:], torch.zeros_like(ids[:, :1])), dim=1)
    next_ids[rows, lengths - 1] = first  # (B, S): token i+1 at position i
    cos, sin = model.rope(torch.arange(S, device=ids.device).expand(B, S), hidden.dtype)
    h, logits = model.mtp_forward(1, hidden, next_ids, cos, sin, cache=cache)
    last = lengths - 1
    return draft(model, cache, h[rows, last][:, None], logits[rows, last], last, k, settings, u,
                 kv_len=S + k - 1)


def speculative_step(model: Transformer, cache: LatentCache, pending: torch.Tensor, drafts: torch.Tensor,
                     q: torch.Tensor, lengths: torch.Tensor, max_length: int, settings: Settings,
                     u: torch.Tensor, logprobs: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Verify K drafts for every row, accept, and draft the next K.

    pending (B,) the token at position lengths (B,), drafts (B, K) and q (B, K, V) from the last
    draft, max_length = max(lengths) (host int), u (B, 2K+1) uniforms. Returns a (B,) accepted
    drafts, tokens (B, K+1) (the first a+1 are emitted; tokens[a] is the new pending token), the
    next drafts (B, K) and q (B, K, V), and with `logprobs` log p(tokens) (B, K+1) under the main
    model's own distribution at each verified position (else None).
    """
    B, K = drafts.shape
    temperature, top_k, top_p, filters = settings
    pos = lengths[:, None] + torch.arange(K + 1, device=lengths.device)  # (B, K+1)
    out = model(torch.cat((pending[:, None], drafts), dim=1), positions=pos, cache=cache,
                kv_len=max_length + K + 1)
    p = sampling_probs(out.logits.flatten(0, 1), temperature.repeat_interleave(K + 1),
                       top_k.repeat_interleave(K + 1), top_p.repeat_interleave(K + 1), filters)
    a, tokens = accept(p.view(B, K + 1, -1), q, drafts, u[:, :K], u[:, K])
    # MTP module 1 over m .. m+K: hidden h_0 at i with token i+1 (true up to m+a)
    cos, sin = model.rope(pos, out.hidden.dtype)
    h, logits = model.mtp_forward(1, out.hidden, tokens.clamp_min(0), cos, sin, cache=cache, positions=pos,
                                  kv_len=max_length + K + 1)
    rows = torch.arange(B, device=a.device)
    next_drafts, next_q = draft(model, cache, h[rows, a][:, None], logits[rows, a], lengths + a, K, settings,
                                u[:, K + 1:], kv_len=max_length + 2 * K)
    lp = out.logits.float().log_softmax(dim=-1).gather(-1, tokens.clamp_min(0)[..., None])[..., 0] if logprobs else None
    return a, tokens, next_drafts, next_q, lp
