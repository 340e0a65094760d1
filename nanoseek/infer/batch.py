"""A decode batch: B rows over one latent cache, each row running one request (`Sequence`) at its own position.

Shapes: B batch rows, S prompt tokens (padded), V vocabulary, K draft tokens (speculative).

Admitting requests prefills their right-padded prompts together (expanded MLA) into a small cache
whose rows are then copied into free rows of the big one; a prompt shared by several requests (n
samples of one prompt) is prefilled once and copied into each of their rows. Decoding feeds every
row's pending token at its own position (absorbed MLA over the cache). Rows join and leave between
steps, which is all continuous batching needs (`turn`, the one admit/step loop of the engine and the
server's scheduler):

    admit:  logits = model(prompts (n, S), cache=small, logits_at=len-1);  first token per row
            big.data[:, rows, :S] = small.data   (`LatentCache.write_rows`)
    step:   logits = model(pending (B, 1), positions=length (B, 1), cache=big, kv_len=max(length)+1)
            pending = sample(logits); length += 1   (speculative: `nanoseek.infer.speculative`)

Host syncs: one per step, to read the new tokens (needed for streaming, EOS and stop strings).
Lengths live on the host (they follow from the tokens), sampling settings and uniforms are (B,)
tensors, so the device work never syncs; on CUDA it can be replayed as CUDA graphs
(`nanoseek.infer.graphs`), and plain steps are pipelined: step n is launched before the host handles
step n-1's tokens. Log-probabilities of the sampled tokens (log_softmax of the raw logits) are
computed in the same device work when a running request asks for them.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F

from nanoseek.infer import speculative as spec
from nanoseek.infer.graphs import CudaGraphs
from nanoseek.infer.sampling import SamplingParams, sample, sampling_probs, settings_tensors
from nanoseek.infer.sequence import GenerationStats, Sequence
from nanoseek.model.cache import LatentCache

Events = list[tuple[Sequence, str]]  # (request, new text) in the order they happened


def padded(prompts: list[list[int]], length: int) -> torch.Tensor:
    """Token ids (n, length) on the host, each prompt right-padded with 0."""
    return torch.tensor([list(prompt) + [0] * (length - len(prompt)) for prompt in prompts], dtype=torch.long)


GREEDY_CHUNK = 256


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits (n, V) -> (n,) ids, argmax(logits): what `sample` returns for temperature 0, without the
    softmax and CDF. In two stages, the best of each GREEDY_CHUNK-wide chunk of the vocabulary, then
    the best chunk, so that compiled it runs as many programs instead of one per row (bench-1b on the
    H200: a 32,000-wide row took 7.2 us in one). The first maximum wins in both stages, as in argmax."""
    n, V = logits.shape
    if V <= 4 * GREEDY_CHUNK:
        return logits.float().argmax(dim=-1)
    pad = -V % GREEDY_CHUNK
    chunks = F.pad(logits.float(), (0, pad), value=float("-inf")).view(n, -1, GREEDY_CHUNK)
    best, where = chunks.max(dim=-1)  # (n, V / chunk): each chunk's maximum and its first position
    chunk = best.argmax(dim=-1, keepdim=True)  # (n, 1)
    return (chunk * GREEDY_CHUNK + where.gather(-1, chunk))[:, 0]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits (..., V)) at tokens (...) in fp32: the model's own distribution, before
    temperature and filters."""
    return logits.float().log_softmax(dim=-1).gather(-1, tokens[..., None])[..., 0]


def kv_bucket(length: int, max_len: int, least: int) -> int:
    """A graph's padded length: the power of two >= length, at least `least`, at most max_len."""
    return min(max(least, 1 << (length - 1).bit_length()), max_len)


class Batch:
    """B decode rows over one latent cache; row r runs seqs[r] or is free.

    Per row: length[r] (host) tokens are cached at positions 0 .. length-1 and pending[r]
    (device) is the sampled token the next step feeds at position length[r]. Free rows decode a
    dummy token at position 0 (harmless: the row is prefilled afresh when reused).
    """

    def __init__(self, engine, rows: int):
        self.engine, self.model, self.k = engine, engine.decoder, engine.speculative
        self.cache = self.model.new_cache(rows, engine.max_len + 2 * self.k)
        dev = self.device = self.cache.data.device
        self.seqs: list[Sequence | None] = [None] * rows
        self.length = [0] * rows
        self.pending = torch.zeros(rows, dtype=torch.long, device=dev)  # (B,)
        self.temperature, self.top_k, self.top_p = settings_tensors([SamplingParams()] * rows, dev)
        V = self.model.config.vocab_size
        self.drafts = torch.zeros(rows, self.k, dtype=torch.long, device=dev)  # (B, K)
        self.draft_probs = torch.zeros(rows, self.k, V, device=dev)  # (B, K, V)
        self._zeros: torch.Tensor | None = None  # the uniforms of an all-greedy step
        self._in_flight: tuple | None = None  # a launched plain step: ([(row, seq)], host ids, host logprobs, event)
        self.graphs = CudaGraphs() if engine.cuda_graph and dev.type == "cuda" else None

    # ------------------------------------------------------------------ rows
    @property
    def rows(self) -> int:
        return len(self.seqs)

    @property
    def busy(self) -> bool:
        return any(s is not None for s in self.seqs)

    def free_rows(self) -> list[int]:
        return [r for r, s in enumerate(self.seqs) if s is None]

    def running(self) -> list[Sequence]:
        return [s for s in self.seqs if s is not None]

    def release(self, row: int) -> None:
        self.seqs[row], self.length[row] = None, 0

    def release_cancelled(self) -> Events:
        """Free the rows of cancelled requests; returns their (seq, "") events."""
        events = []
        for r, s in enumerate(self.seqs):
            if s is not None and s.cancelled:
                s.finish("cancelled")
                self.release(r)
                events.append((s, ""))
        return events

    def turn(self, take: Callable[[int], list[Sequence]], stats: GenerationStats) -> Events:
        """One round of the admit/step loop: free cancelled rows, admit what `take(free rows)` hands over,
        decode one step. The engine's `run` and the server's scheduler both loop on this."""
        events = self.release_cancelled()
        admit = take(len(self.free_rows()))
        with self.engine.compute():
            if admit:
                events += self.admit(admit, stats)
            if self.busy:
                events += self.step(stats)
        return events

    # ------------------------------------------------------------------ per-row settings
    def sampling_mode(self, seqs: Seq[Sequence | None] | None = None) -> str:
        """"greedy" when every request is greedy (the step takes an argmax), "filters" when one uses
        top-k/top-p (the step sorts), else "sample". Default: the running requests."""
        params = [s.params for s in (self.seqs if seqs is None else seqs) if s is not None]
        if all(p.greedy for p in params):
            return "greedy"
        return "filters" if any(p.filters for p in params) else "sample"

    def wants_logprobs(self, seqs: Seq[Sequence | None] | None = None) -> bool:
        return any(s is not None and s.params.logprobs for s in (self.seqs if seqs is None else seqs))

    def _settings(self, rows: slice, filters: bool | None = None) -> spec.Settings:
        """Sampling settings of rows; filters None: sort only if a running request uses top-k/top-p."""
        if filters is None:
            filters = any(s.params.filters for s in self.seqs if s is not None)
        return self.temperature[rows], self.top_k[rows], self.top_p[rows], filters

    def _uniforms(self, seqs: Seq[Sequence | None], n: int) -> torch.Tensor:
        """(len(seqs), n) uniforms, one row per sequence (zeros for free rows)."""
        if all(s is None or s.generator is None for s in seqs):  # greedy rows draw nothing
            if self._zeros is None or self._zeros.shape != (len(seqs), n):
                self._zeros = torch.zeros(len(seqs), n, device=self.device)
            return self._zeros
        return self._to_device(torch.stack([s.uniforms(n) if s is not None else torch.zeros(n) for s in seqs]))

    def _to_device(self, values: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the batch's device without waiting for the GPU (pinned, non-blocking)."""
        if self.device.type != "cuda":
            return values.to(self.device)
        return values.pin_memory().to(self.device, non_blocking=True)

    def _emit(self, rows: list[int], tokens: list[list[int]], stats: GenerationStats,
              logprobs: list[list[float]] | None = None) -> Events:
        """Hand each row's new tokens (and their log-probabilities) to its sequence; free finished rows."""
        events = []
        for i, (r, toks) in enumerate(zip(rows, tokens)):
            seq = self.seqs[r]
            before = len(seq.token_ids)
            delta = seq.append(toks, None if logprobs is None else logprobs[i])
            stats.new_tokens += len(seq.token_ids) - before
            events.append((seq, delta))
            if seq.finished:
                self.release(r)
        return events

    # ------------------------------------------------------------------ admission (prefill)
    @torch.no_grad()
    def admit(self, seqs: list[Sequence], stats: GenerationStats) -> Events:
        """Prefill `seqs` (at most as many as free rows) and sample their first tokens. Identical
        prompts are prefilled once."""
        rows = self.free_rows()[: len(seqs)]
        assert len(rows) == len(seqs), "admit() got more sequences than free rows"
        for r, s in zip(rows, seqs):
            self.seqs[r], self.length[r] = s, len(s.prompt_ids)
        unique: dict[tuple[int, ...], int] = {}
        source = [unique.setdefault(tuple(s.prompt_ids), len(unique)) for s in seqs]  # seq -> its prompt
        prompts = [list(p) for p in unique]
        lens = [len(p) for p in prompts]
        mode, want_lp = self.sampling_mode(seqs), self.wants_logprobs(seqs)
        settings = settings_tensors([s.params for s in seqs], self.device)
        u = self._uniforms(seqs, 1)[:, 0]
        draft_u = self._uniforms(seqs, self.k) if self.k else None
        # a speculative prefill's small cache holds K - 1 positions beyond the padded prompts
        width = max(lens) if self.graphs is None else kv_bucket(max(lens), self.cache.max_len - max(self.k - 1, 0), 16)
        inputs = (self._to_device(padded(prompts, width)), self._to_device(torch.tensor(lens)),
                  self._to_device(torch.tensor(rows)), self._to_device(torch.tensor(source)), *settings, u, draft_u)

        def prefill(ids, lengths, index, source, t, k, p, u, draft_u):
            return self.prefill_at(ids, lengths, index, source, (t, k, p), u, mode, draft_u, want_lp)

        if self.graphs is not None:
            first, lp = self.graphs(("prefill", len(prompts), len(seqs), width, mode, want_lp), prefill, inputs)
        else:
            first, lp = prefill(*inputs)
        stats.prompt_tokens += sum(lens)
        return self._emit(rows, [[t] for t in first.tolist()], stats,
                          None if lp is None else [[x] for x in lp.tolist()])

    def prefill_at(self, ids: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor, source: torch.Tensor,
                   settings: tuple[torch.Tensor, torch.Tensor, torch.Tensor], u: torch.Tensor, mode: str,
                   draft_u: torch.Tensor | None = None,
                   logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill right-padded prompts ids (m, S) of `lengths` (m,) for n sequences in rows `index` (n,),
        sequence i reading prompt source[i], and sample their first tokens with uniforms u (n,) ->
        (first tokens (n,), their log-probabilities (n,) or None). No host syncs (a CUDA graph captures
        it): settings (n,) tensors land in the rows' sampling settings, the latents in their cache rows,
        the first tokens in `pending`. Speculative batches also draft (uniforms draft_u (n, K))."""
        (m, S), n = ids.shape, index.shape[0]
        t, k, p = settings
        self.temperature[index], self.top_k[index], self.top_p[index] = t, k, p
        small = self.model.new_cache(m, S + max(self.k - 1, 0))
        out = self.model(ids, cache=small, logits_at=lengths - 1)
        hidden, last = out.hidden, out.logits[:, 0]  # (m, S, D), (m, V)
        if m != n:  # shared prompts: one copy per sequence from here on
            small, hidden, last = small.gather_rows(source), hidden[source], last[source]
            ids, lengths = ids[source], lengths[source]
        if mode == "greedy":
            first = self.engine.greedy(last)
        else:
            first = sample(sampling_probs(last, t, k, p, mode == "filters"), u)  # (n,)
        if self.k:
            drafts, q = spec.prefill_drafts(self.model, small, hidden, ids, first.clamp_min(0), lengths, self.k,
                                            (t, k, p, mode == "filters"), draft_u)
            self.drafts[index], self.draft_probs[index] = drafts, q
        self.cache.write_rows(index, small)
        self.pending[index] = first.clamp_min(0)  # a failed row (-1) feeds a harmless token until it is freed
        return first, token_logprobs(last, first.clamp_min(0)) if logprobs else None

    # ------------------------------------------------------------------ decode steps
    @torch.no_grad()
    def step(self, stats: GenerationStats) -> Events:
        """One decode step for every running row (K+1 positions each when speculative).

        With `Engine.pipeline` (default on CUDA), plain steps are pipelined: this call launches
        step n and then hands out the tokens of step n-1, whose copy to the host has landed
        meanwhile, so the host's work (detokenising, stop strings, streaming) overlaps the GPU's.
        A row that ends at step n-1 has ridden along in step n; that token is dropped. No step is
        launched once every running row has all its tokens in flight.
        """
        if not self.k and self.engine.pipeline:
            return self._pipelined_step(stats)
        active = [r for r, s in enumerate(self.seqs) if s is not None]
        stats.steps += 1
        stats.row_steps += len(active)
        logprobs = None
        if self.k:
            a, tokens, lp = self._launch_speculative(active)
            host = torch.cat((a[:, None], tokens), dim=1).tolist()
            new = [host[r][1: host[r][0] + 2] for r in active]
            if lp is not None:
                host_lp = lp.tolist()
                logprobs = [host_lp[r][: len(toks)] for r, toks in zip(active, new)]
            for r, toks in zip(active, new):
                self.length[r] += len(toks)
            stats.drafted += self.k * len(active)
            stats.accepted += sum(host[r][0] for r in active)
        else:
            tokens, lp = self._launch_plain(active)
            host = tokens.tolist()
            new = [[host[r]] for r in active]
            if lp is not None:
                host_lp = lp.tolist()
                logprobs = [[host_lp[r]] for r in active]
        stats.step_tokens += sum(len(t) for t in new)
        return self._emit(active, new, stats, logprobs)

    def _launch_plain(self, active: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Enqueue a plain decode step of the active rows (no host sync); advances their lengths.
        Returns the sampled ids (rows,) on the device and their log-probabilities (or None)."""
        max_length = max(self.length[r] for r in active)
        mode, want_lp = self.sampling_mode(), self.wants_logprobs()
        if self.graphs is not None:  # all rows, kv_len bucketed
            bucket = kv_bucket(max_length + 1, self.cache.max_len, 64)
            inputs = (self._to_device(torch.tensor(self.length))[:, None], self._uniforms(self.seqs, 1)[:, 0])
            out = self.graphs(("decode step", bucket, mode, want_lp),
                              lambda positions, u: self.decode_at(self.rows, positions, bucket, u, mode, want_lp),
                              inputs, state=(self.pending,))
        else:
            hi = active[-1] + 1
            positions = self._to_device(torch.tensor(self.length[:hi]))[:, None]  # (hi, 1)
            out = self.decode_at(hi, positions, max_length + 1, self._uniforms(self.seqs[:hi], 1)[:, 0], mode,
                                 want_lp)
        for r in active:
            self.length[r] += 1
        return out

    def _pipelined_step(self, stats: GenerationStats) -> Events:
        previous, self._in_flight = self._in_flight, None
        in_flight = {r for r, seq in previous[0] if self.seqs[r] is seq} if previous else set()
        active = [r for r, s in enumerate(self.seqs) if s is not None]
        # a row whose last token (by max_new_tokens) is already in flight needs no further step
        needed = [r for r in active
                  if len(self.seqs[r].token_ids) + (r in in_flight) < self.seqs[r].params.max_new_tokens]
        if needed or previous is None:
            tokens, lp = self._launch_plain(active)
            cuda = tokens.is_cuda
            host = [None if x is None else torch.empty(x.shape, dtype=x.dtype, pin_memory=cuda) for x in (tokens, lp)]
            for h, x in zip(host, (tokens, lp)):
                if h is not None:
                    h.copy_(x, non_blocking=cuda)
            done = torch.cuda.Event() if cuda else None
            if done is not None:
                done.record()
            self._in_flight = ([(r, self.seqs[r]) for r in active], *host, done)
            stats.steps += 1
            stats.row_steps += len(active)
        if previous is None:
            return []
        launched, host, host_lp, done = previous
        if done is not None:
            done.synchronize()
        ids = host.tolist()
        rows = [r for r, seq in launched if self.seqs[r] is seq]  # still running the same request
        stats.step_tokens += len(rows)
        logprobs = None
        if host_lp is not None:  # the step was launched with every one of these rows' requests
            values = host_lp.tolist()
            logprobs = [[values[r]] for r in rows]
        return self._emit(rows, [[ids[r]] for r in rows], stats, logprobs)

    def rows_view(self, hi: int) -> LatentCache:
        """The cache restricted to rows [0, hi) (a view: writes land in the full cache)."""
        return self.cache if hi == self.rows else self.cache.rows(hi)

    def decode_at(self, hi: int, positions: torch.Tensor, kv_len: int, u: torch.Tensor, mode: str | None = None,
                  logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plain decode of rows [0, hi): feed pending at positions (hi, 1), sample with uniforms u (hi,),
        update pending -> ((hi,) ids, (hi,) their log-probabilities or None). No host syncs: this is
        what a CUDA graph captures. mode: "greedy", "sample" or "filters" (None: `sampling_mode()`)."""
        logits = self.model(self.pending[:hi, None], positions=positions, cache=self.rows_view(hi),
                            kv_len=kv_len).logits[:, -1]  # (hi, V)
        mode = mode or self.sampling_mode()
        if mode == "greedy":
            tokens = self.engine.greedy(logits)
        else:
            tokens = sample(sampling_probs(logits, *self._settings(slice(0, hi), mode == "filters")), u)
        self.pending[:hi] = tokens.clamp_min(0) if mode != "greedy" else tokens  # -1: a failed row (`sample`)
        return tokens, token_logprobs(logits, tokens.clamp_min(0)) if logprobs else None

    def _launch_speculative(self, active: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Enqueue a speculative step (all rows when graphed, else rows up to the last active one) ->
        (a, tokens, log-probabilities of tokens or None) on the device."""
        max_length = max(self.length[r] for r in active)
        want_lp, filters = self.wants_logprobs(), any(s.params.filters for s in self.seqs if s is not None)
        if self.graphs is not None:
            bucket = kv_bucket(max_length + 2 * self.k, self.cache.max_len, 64)  # covers the furthest draft write
            inputs = (self._to_device(torch.tensor(self.length)), self._uniforms(self.seqs, 2 * self.k + 1))
            return self.graphs(("speculative step", bucket, filters, want_lp),
                               lambda lengths, u: self.speculative_at(self.rows, lengths, bucket - 2 * self.k, u,
                                                                      filters, want_lp),
                               inputs, state=(self.pending, self.drafts, self.draft_probs))
        hi = active[-1] + 1
        lengths = self._to_device(torch.tensor(self.length[:hi]))
        return self.speculative_at(hi, lengths, max_length, self._uniforms(self.seqs[:hi], 2 * self.k + 1),
                                   filters, want_lp)

    def speculative_at(self, hi: int, lengths: torch.Tensor, max_length: int, u: torch.Tensor,
                       filters: bool | None = None,
                       logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A speculative step of rows [0, hi) at lengths (hi,) (`spec.speculative_step`, max_length at
        least the longest row's), uniforms u (hi, 2K+1); updates pending, drafts and draft_probs ->
        (a (hi,), tokens (hi, K+1), their log-probabilities (hi, K+1) or None). No host syncs: this is
        what a CUDA graph captures."""
        a, tokens, drafts, q, lp = spec.speculative_step(
            self.model, self.rows_view(hi), self.pending[:hi], self.drafts[:hi], self.draft_probs[:hi], lengths,
            max_length, self._settings(slice(0, hi), filters), u, logprobs=logprobs)
        self.pending[:hi] = tokens.gather(1, a[:, None])[:, 0].clamp_min(0)  # -1: a failed row (`sample`)
        self.drafts[:hi], self.draft_probs[:hi] = drafts, q
        return a, tokens, lp
