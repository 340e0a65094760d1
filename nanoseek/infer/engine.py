"""Generation engine: batched decoding over the latent MLA cache.

Shapes: B batch rows, S prompt tokens (padded), V vocabulary, L cached layers (main + MTP).

A `Batch` is B rows of one `LatentCache`; each row decodes one request (`Sequence`) at its own
position. Admitting requests prefills their right-padded prompts together (expanded MLA) into
a small cache whose rows are then copied into free rows of the big one; decoding feeds every
row's pending token at its own position (absorbed MLA over the cache). Rows join and leave
between steps, which is all continuous batching needs (`nanoseek.infer.scheduler`):

    admit:  logits = model(prompts (n, S), cache=small, logits_at=len-1);  first token per row
            big.data[:, rows, :S] = small.data   (`LatentCache.write_rows`)
    step:   logits = model(pending (B, 1), positions=length (B, 1), cache=big, kv_len=max(length)+1)
            pending = sample(logits); length += 1   (speculative: `nanoseek.infer.speculative`)

Host syncs: one per step, to read the new tokens (needed for streaming, EOS and stop strings).
Lengths live on the host (they follow from the tokens), sampling settings and uniforms are
(B,) tensors, so the step itself never syncs; on CUDA it can be replayed as a CUDA graph
(`cuda_graph=True`: static batch, kv_len bucketed to powers of two; speculative steps and prefills
too, prompts padded to power-of-two lengths), and plain steps are pipelined: step n is launched
before the host handles step n-1's tokens.

`Engine.generate_reference` recomputes the whole sequence without a cache for every token:
the slow reference that the cached (and speculative) paths must match.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.infer import speculative as spec
from nanoseek.infer.sampling import SamplingParams, sample, sampling_probs, settings_tensors
from nanoseek.model.cache import LatentCache
from nanoseek.model.transformer import Transformer

Prompt = str | Seq[int]


@dataclass
class Completion:
    """A finished request: its prompt and generated ids, the text, and why it stopped."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated, EOS included when it ended the text
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)


@dataclass
class GenerationStats:
    """Counters of one generate() call or of a scheduler's life."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # emitted to requests
    steps: int = 0  # decode forwards of the main model (batched)
    row_steps: int = 0  # sum over steps of the rows decoding in it
    step_tokens: int = 0  # tokens those rows produced (a + 1 per row and speculative step)
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float:
        """Share of draft tokens the main model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a request gains per main-model decode forward (1 without speculation)."""
        return self.step_tokens / self.row_steps if self.row_steps else 0.0

    def summary(self) -> str:
        line = (f"{self.new_tokens} new tokens ({self.prompt_tokens} prompt) in {self.seconds:.2f}s: "
                f"{self.tokens_per_second:.1f} tok/s, {self.steps} decode steps")
        if self.drafted:
            line += (f", acceptance {self.acceptance:.1%}, "
                     f"{self.tokens_per_forward:.2f} tokens per main-model forward")
        return line


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(latent, expanded) cache bytes per token over the main and MTP layers.

    latent: kv_lora_rank + qk_rope_head_dim values per layer (what `LatentCache` stores);
    expanded: per-head K and V, heads * (qk_head_dim + v_head_dim) values per layer.
    """
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    size = torch.empty((), dtype=dtype).element_size()
    latent = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    expanded = layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * size
    return latent, expanded


class Sequence:
    """One request: prompt, settings, generated ids, text, and what has been handed out.

    `append` takes newly sampled tokens and applies EOS, max_new_tokens and stop strings;
    text is detokenised incrementally (a token that ends inside a UTF-8 character waits for the
    next), and a tail that could begin a stop string is held back until it cannot.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, eos_id: int | None,
                 on_event: Callable[[Sequence, str], None] | None = None):
        self.prompt_ids, self.params, self.tokenizer, self.eos_id = prompt_ids, params, tokenizer, eos_id
        self.on_event = on_event  # called as on_event(seq, delta) by the scheduler
        self.generator = None if params.greedy else params.generator()
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (cut before a stop string)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._sent = 0  # characters of text handed out
        self._prefix = self._read = 0  # detokenisation window: token_ids[_prefix:_read] already decoded
        self._text_ids = 0  # leading token_ids that are text (all but a final EOS)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def uniforms(self, n: int) -> torch.Tensor:
        """n uniforms in [0, 1) from this request's generator (zeros when greedy: unused)."""
        return torch.zeros(n) if self.generator is None else torch.rand(n, generator=self.generator)

    def completion(self) -> Completion:
        return Completion(self.prompt_ids, list(self.token_ids), self.text, self.finish_reason or "")

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error

    def append(self, tokens: Seq[int]) -> str:
        """Add sampled tokens (the rest is dropped once finished); returns the new text to show."""
        p = self.params
        for t in tokens:
            if self.finished:
                break
            self.token_ids.append(t)
            if t == self.eos_id and not p.ignore_eos:
                self.finish("stop")
                self._decode(final=True)
                break
            self._text_ids = len(self.token_ids)
            self._decode(final=False)
            if not self.finished and len(self.token_ids) >= p.max_new_tokens:
                self.finish("length")
                self._decode(final=True)
        end = len(self.text) if self.finished else len(self.text) - self._stop_prefix_len()
        delta = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return delta

    def _decode(self, final: bool) -> None:
        """Move newly complete characters of the text tokens into text, then look for stop strings.

        Decoding token_ids[_prefix:] against token_ids[_prefix:_read] keeps the cost per token
        constant and lets the tokenizer see a little context (leading-space rules). Unless
        `final`, text that ends inside a UTF-8 character waits for the next token.
        """
        ids = self.token_ids[: self._text_ids]
        if self.tokenizer is None or self._read == len(ids):
            return
        before = self.tokenizer.decode(ids[self._prefix:self._read])
        after = self.tokenizer.decode(ids[self._prefix:])
        if final or (len(after) > len(before) and not after.endswith("\ufffd")):
            checked = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(ids)
            hits = [i for s in self.params.stop if (i := self.text.find(s, max(0, checked - len(s) + 1))) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish("stop")

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


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


class Batch:
    """B decode rows over one latent cache; row r runs seqs[r] or is free.

    Per row: length[r] (host) tokens are cached at positions 0 .. length-1 and pending[r]
    (device) is the sampled token the next step feeds at position length[r]. Free rows decode a
    dummy token at position 0 (harmless: the row is prefilled afresh when reused).
    """

    def __init__(self, engine: Engine, rows: int):
        self.engine, self.model, self.k = engine, engine.model, engine.speculative
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
        self._in_flight: tuple | None = None  # a launched plain step: ([(row, seq)], host ids, event)
        graphs = engine.cuda_graph and dev.type == "cuda"
        self.graph: CudaGraphStep | CudaGraphSpeculativeStep | None = None
        if graphs:
            self.graph = CudaGraphSpeculativeStep(self) if self.k else CudaGraphStep(self)
        self.prefill_graphs = CudaGraphPrefill(self) if graphs else None

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

    def release_cancelled(self) -> list[tuple[Sequence, str]]:
        """Free the rows of cancelled requests; returns their (seq, "") events."""
        events = []
        for r, s in enumerate(self.seqs):
            if s is not None and s.cancelled:
                s.finish("cancelled")
                self.release(r)
                events.append((s, ""))
        return events

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

    def _emit(self, rows: list[int], tokens: list[list[int]], stats: GenerationStats) -> list[tuple[Sequence, str]]:
        """Hand each row's new tokens to its sequence; free the rows that finished."""
        events = []
        for r, toks in zip(rows, tokens):
            seq = self.seqs[r]
            before = len(seq.token_ids)
            delta = seq.append(toks)
            stats.new_tokens += len(seq.token_ids) - before
            events.append((seq, delta))
            if seq.finished:
                self.release(r)
        return events

    @torch.no_grad()
    def admit(self, seqs: list[Sequence], stats: GenerationStats) -> list[tuple[Sequence, str]]:
        """Prefill `seqs` (at most as many as free rows) and sample their first tokens."""
        rows = self.free_rows()[: len(seqs)]
        assert len(rows) == len(seqs), "admit() got more sequences than free rows"
        lens = [len(s.prompt_ids) for s in seqs]
        for r, s, n_prompt in zip(rows, seqs, lens):
            self.seqs[r], self.length[r] = s, n_prompt
        params = [s.params for s in seqs]
        mode = "greedy" if all(p.greedy for p in params) else "filters" if any(p.filters for p in params) else "sample"
        t, k, p = settings_tensors(params, self.device)
        u = self._uniforms(seqs, 1)[:, 0]
        draft_u = self._uniforms(seqs, self.k) if self.k else None
        first = None
        if self.prefill_graphs is not None and not self.prefill_graphs.failed:
            first = self.prefill_graphs(seqs, rows, (t, k, p), u, mode, draft_u)
        if first is None:  # eager: no graphs, or their capture failed
            ids = self._to_device(padded([s.prompt_ids for s in seqs], max(lens)))
            first = self.prefill_at(ids, self._to_device(torch.tensor(lens)), self._to_device(torch.tensor(rows)),
                                    (t, k, p), u, mode, draft_u)
        stats.prompt_tokens += sum(lens)
        return self._emit(rows, [[t] for t in first.tolist()], stats)

    def prefill_at(self, ids: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor,
                   settings: tuple[torch.Tensor, torch.Tensor, torch.Tensor], u: torch.Tensor,
                   mode: str, draft_u: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill right-padded prompts ids (n, S) of `lengths` (n,) into rows `index` (n,) and sample
        their first tokens with uniforms u (n,) -> (n,). No host syncs (a CUDA graph captures it):
        settings (n,) tensors land in the rows' sampling settings, the latents in their cache rows,
        the first tokens in `pending`. Speculative batches also draft (uniforms draft_u (n, K))."""
        n, S = ids.shape
        t, k, p = settings
        self.temperature[index], self.top_k[index], self.top_p[index] = t, k, p
        small = self.model.new_cache(n, S + max(self.k - 1, 0))
        out = self.model(ids, cache=small, logits_at=lengths - 1)
        last = out.logits[:, 0]  # (n, V)
        if mode == "greedy":
            first = self.engine.greedy(last)
        else:
            first = sample(sampling_probs(last, t, k, p, mode == "filters"), u)  # (n,)
        if self.k:
            drafts, q = spec.prefill_drafts(self.model, small, out.hidden, ids, first, lengths, self.k,
                                            (t, k, p, mode == "filters"), draft_u)
            self.drafts[index], self.draft_probs[index] = drafts, q
        self.cache.write_rows(index, small)
        self.pending[index] = first
        return first

    @torch.no_grad()
    def step(self, stats: GenerationStats) -> list[tuple[Sequence, str]]:
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
        if self.k:
            hi = active[-1] + 1
            a, tokens = self._speculative_step(hi, max(self.length[r] for r in active))
            host = torch.cat((a[:, None], tokens), dim=1).tolist()
            new = [host[r][1: host[r][0] + 2] for r in active]
            for r, toks in zip(active, new):
                self.length[r] += len(toks)
            stats.drafted += self.k * len(active)
            stats.accepted += sum(host[r][0] for r in active)
        else:
            host = self._launch_plain(active).tolist()
            new = [[host[r]] for r in active]
        stats.step_tokens += sum(len(t) for t in new)
        return self._emit(active, new, stats)

    def _launch_plain(self, active: list[int]) -> torch.Tensor:
        """Enqueue a plain decode step of the active rows (no host sync); advances their lengths.
        Returns the sampled ids (rows,) on the device."""
        max_length = max(self.length[r] for r in active)
        if self.graph is not None:
            tokens = self.graph(max_length + 1, self._uniforms(self.seqs, 1)[:, 0])
        else:
            hi = active[-1] + 1
            positions = self._to_device(torch.tensor(self.length[:hi]))[:, None]  # (hi, 1)
            tokens = self.decode_at(hi, positions, max_length + 1, self._uniforms(self.seqs[:hi], 1)[:, 0])
        for r in active:
            self.length[r] += 1
        return tokens

    def _pipelined_step(self, stats: GenerationStats) -> list[tuple[Sequence, str]]:
        previous, self._in_flight = self._in_flight, None
        in_flight = {r for r, seq in previous[0] if self.seqs[r] is seq} if previous else set()
        active = [r for r, s in enumerate(self.seqs) if s is not None]
        # a row whose last token (by max_new_tokens) is already in flight needs no further step
        needed = [r for r in active
                  if len(self.seqs[r].token_ids) + (r in in_flight) < self.seqs[r].params.max_new_tokens]
        if needed or previous is None:
            tokens = self._launch_plain(active)
            cuda = tokens.is_cuda
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
            host.copy_(tokens, non_blocking=cuda)
            done = torch.cuda.Event() if cuda else None
            if done is not None:
                done.record()
            self._in_flight = ([(r, self.seqs[r]) for r in active], host, done)
            stats.steps += 1
            stats.row_steps += len(active)
        if previous is None:
            return []
        launched, host, done = previous
        if done is not None:
            done.synchronize()
        ids = host.tolist()
        rows = [r for r, seq in launched if self.seqs[r] is seq]  # still running the same request
        stats.step_tokens += len(rows)
        return self._emit(rows, [[ids[r]] for r in rows], stats)

    def _to_device(self, values: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the batch's device without waiting for the GPU (pinned, non-blocking)."""
        if self.device.type != "cuda":
            return values.to(self.device)
        return values.pin_memory().to(self.device, non_blocking=True)

    def sampling_mode(self) -> str:
        """"greedy" when every running row is greedy (the step takes an argmax), "filters" when one
        uses top-k/top-p (the step sorts), else "sample"."""
        params = [s.params for s in self.seqs if s is not None]
        if all(p.greedy for p in params):
            return "greedy"
        return "filters" if any(p.filters for p in params) else "sample"

    def rows_view(self, hi: int) -> LatentCache:
        """The cache restricted to rows [0, hi) (a view: writes land in the full cache)."""
        return self.cache if hi == self.rows else self.cache.rows(hi)

    def decode_at(self, hi: int, positions: torch.Tensor, kv_len: int, u: torch.Tensor,
                  mode: str | None = None) -> torch.Tensor:
        """Plain decode of rows [0, hi): feed pending at positions (hi, 1), sample with uniforms u (hi,),
        update pending -> (hi,) ids. No host syncs: this is what a CUDA graph captures.
        mode: "greedy", "sample" or "filters" (None: `sampling_mode()`)."""
        logits = self.model(self.pending[:hi, None], positions=positions, cache=self.rows_view(hi),
                            kv_len=kv_len).logits[:, -1]  # (hi, V)
        mode = mode or self.sampling_mode()
        if mode == "greedy":
            tokens = self.engine.greedy(logits)
        else:
            tokens = sample(sampling_probs(logits, *self._settings(slice(0, hi), mode == "filters")), u)
        self.pending[:hi] = tokens
        return tokens

    def _speculative_step(self, hi: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Enqueue a speculative step of rows [0, hi) (all rows when graphed) -> (a, tokens) on the device."""
        if self.graph is not None:
            return self.graph(max_length, self._uniforms(self.seqs, 2 * self.k + 1))
        lengths = self._to_device(torch.tensor(self.length[:hi]))
        return self.speculative_at(hi, lengths, max_length, self._uniforms(self.seqs[:hi], 2 * self.k + 1))

    def speculative_at(self, hi: int, lengths: torch.Tensor, max_length: int, u: torch.Tensor,
                       filters: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A speculative step of rows [0, hi) at lengths (hi,) (`spec.speculative_step`, max_length at
        least the longest row's), uniforms u (hi, 2K+1); updates pending, drafts and draft_probs ->
        (a (hi,), tokens (hi, K+1)). No host syncs: this is what a CUDA graph captures."""
        a, tokens, drafts, q = spec.speculative_step(
            self.model, self.rows_view(hi), self.pending[:hi], self.drafts[:hi], self.draft_probs[:hi], lengths,
            max_length, self._settings(slice(0, hi), filters), u)
        self.pending[:hi] = tokens.gather(1, a[:, None])[:, 0]
        self.drafts[:hi], self.draft_probs[:hi] = drafts, q
        return a, tokens


def warm_up_for_capture(run: Callable[[], object]) -> None:
    """Run `run` twice on a side stream before a CUDA graph captures it. The first run may compile
    (compiling syncs); the second must not sync with the host, and runs with sync debugging set to
    raise, so a step that syncs (e.g. `nonzero` in the looped expert path) fails here. Capture would
    fail on it too, but a capture that fails part-way leaves PyTorch's CUDA generator in capture
    mode, and every later CUDA random op (the compiler's own included) raises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)


class CudaGraphStep:
    """The plain decode step of all B rows, captured as CUDA graphs, one per kv_len bucket.

    Buckets are powers of two (at least 64, at most the cache length), captured on first use.
    Inputs are copied into static buffers (positions, uniforms) before each replay; the cache,
    pending tokens and sampling settings are the batch's own persistent tensors. Capturing runs
    the step twice for warm-up, which rewrites the same cache entries with the same values; the
    pending tokens are restored afterwards. If the warm-up syncs with the host (e.g. `nonzero` in
    the looped expert path, which fp32 MoE prefills take on CUDA) or capture fails, it warns and
    the batch decodes eagerly.
    """

    def __init__(self, batch: Batch):
        self.batch = batch
        self.positions = torch.zeros(batch.rows, 1, dtype=torch.long, device=batch.device)
        self.u = torch.zeros(batch.rows, device=batch.device)
        self.graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (bucket, mode)
        self.pool = None
        self.failed = False

    def __call__(self, kv_len: int, u: torch.Tensor) -> torch.Tensor:
        b = self.batch
        self.positions.copy_(b._to_device(torch.tensor(b.length))[:, None], non_blocking=True)
        self.u.copy_(u, non_blocking=True)
        bucket = min(max(64, 1 << (kv_len - 1).bit_length()), b.cache.max_len)
        mode = b.sampling_mode()
        if not self.failed and (bucket, mode) not in self.graphs:
            self._capture(bucket, mode)
        if self.failed:
            return b.decode_at(b.rows, self.positions, kv_len, self.u, mode)
        graph, out = self.graphs[bucket, mode]
        graph.replay()
        return out

    def _capture(self, kv_len: int, mode: str) -> None:
        b = self.batch
        saved = b.pending.clone()

        def run() -> None:
            b.pending.copy_(saved)
            b.decode_at(b.rows, self.positions, kv_len, self.u, mode)

        try:
            warm_up_for_capture(run)
            b.pending.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = b.decode_at(b.rows, self.positions, kv_len, self.u, mode)
            self.pool = graph.pool()
            self.graphs[kv_len, mode] = (graph, out)
        except Exception as e:  # CUDA errors, or the compiler's own when a capture triggers a compile
            warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly", stacklevel=2)
            self.failed = True
        b.pending.copy_(saved)


class CudaGraphSpeculativeStep:
    """The speculative step of all B rows (verify K drafts, accept, draft K more), captured as CUDA
    graphs, one per (kv_len bucket, top-k/top-p filters on or off).

    As `CudaGraphStep`: buckets are powers of two (at least 64, at most the cache length) that
    cover the step's furthest cache write (the longest row's length + 2K), captured on first use;
    lengths and uniforms are copied into static buffers before each replay; pending tokens, drafts
    and their distributions are the batch's persistent tensors, saved before the warm-up runs and
    restored after them (which rewrite the same cache entries with the same values). A failed
    capture warns and the batch steps eagerly.
    """

    def __init__(self, batch: Batch):
        self.batch = batch
        self.lengths = torch.zeros(batch.rows, dtype=torch.long, device=batch.device)
        self.u = torch.zeros(batch.rows, 2 * batch.k + 1, device=batch.device)
        # (bucket, filters) -> (graph, (a, tokens))
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = None
        self.failed = False

    def __call__(self, max_length: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch
        self.lengths.copy_(b._to_device(torch.tensor(b.length)), non_blocking=True)
        self.u.copy_(u, non_blocking=True)
        bucket = min(max(64, 1 << (max_length + 2 * b.k - 1).bit_length()), b.cache.max_len)
        key = (bucket, any(s.params.filters for s in b.seqs if s is not None))
        if not self.failed and key not in self.graphs:
            self._capture(key)
        if self.failed:
            return b.speculative_at(b.rows, self.lengths, max_length, self.u, key[1])
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, key: tuple[int, bool]) -> None:
        b = self.batch
        bucket, filters = key
        saved = (b.pending.clone(), b.drafts.clone(), b.draft_probs.clone())

        def restore() -> None:
            for state, value in zip((b.pending, b.drafts, b.draft_probs), saved):
                state.copy_(value)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            # max_length such that the draft's kv_len (max_length + 2K) is the bucket
            return b.speculative_at(b.rows, self.lengths, bucket - 2 * b.k, self.u, filters)

        try:
            warm_up_for_capture(lambda: (restore(), run()))
            restore()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = run()
            self.pool = graph.pool()
            self.graphs[key] = (graph, out)
        except Exception as e:  # as in CudaGraphStep._capture
            warnings.warn(f"CUDA graph capture of the speculative step failed ({e}); decoding eagerly", stacklevel=2)
            self.failed = True
        restore()


class CudaGraphPrefill:
    """Admission prefills captured as CUDA graphs, one per (prompts, padded length, sampling mode).

    Prompts are right-padded to a power-of-two length (at least 16, at most the cache length):
    causal attention keeps the padding out of the real positions, and the cache entries it leaves
    beyond a row's length are overwritten before any step reads them. Static buffers hold the ids,
    lengths, target rows, settings and uniforms; the graph writes the latents into the batch's
    cache and the first tokens into `pending`. Eager prefill is host-bound at small batches: on the
    H200 a 512-token bench-1b prompt took 30 ms of wall time for 3.3 ms of GPU work
    (`bench/results/decode_profile-2026-11-30.json`), the host launching the compiled blocks' kernels.
    """

    def __init__(self, batch: Batch):
        self.batch = batch
        # (n, bucket, mode) -> (graph, static inputs, first tokens)
        self.graphs: dict[tuple[int, int, str], tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]] = {}
        self.failed = False

    def __call__(self, seqs: list[Sequence], rows: list[int], settings: tuple[torch.Tensor, ...],
                 u: torch.Tensor, mode: str, draft_u: torch.Tensor | None = None) -> torch.Tensor | None:
        """Prefill `seqs` into `rows` (speculative batches: and draft, with uniforms draft_u (n, K));
        returns their first tokens (n,), or None if capture failed."""
        b = self.batch
        lens = [len(s.prompt_ids) for s in seqs]
        n = len(seqs)
        # a speculative prefill's small cache holds K - 1 positions beyond the padded prompts
        bucket = min(max(16, 1 << (max(lens) - 1).bit_length()), b.cache.max_len - max(b.k - 1, 0))
        key = (n, bucket, mode)
        captured = key in self.graphs
        if captured:
            inputs = self.graphs[key][1]
        else:
            dev = b.device
            inputs = (torch.zeros(n, bucket, dtype=torch.long, device=dev),
                      *(torch.zeros(n, dtype=torch.long, device=dev) for _ in range(2)),
                      *(torch.zeros_like(x) for x in settings), torch.zeros(n, device=dev),
                      torch.zeros(n, b.k, device=dev) if b.k else None)
        ids, lengths, index, *static_settings, static_u, static_draft_u = inputs
        ids.copy_(padded([s.prompt_ids for s in seqs], bucket).pin_memory(), non_blocking=True)
        lengths.copy_(torch.tensor(lens).pin_memory(), non_blocking=True)
        index.copy_(torch.tensor(rows).pin_memory(), non_blocking=True)
        for static, x in zip(static_settings, settings):
            static.copy_(x)
        static_u.copy_(u)
        if static_draft_u is not None:
            static_draft_u.copy_(draft_u)
        if not captured and not self._capture(key, inputs):
            return None
        graph, _, first = self.graphs[key]
        graph.replay()
        return first

    def _capture(self, key: tuple[int, int, str], inputs: tuple) -> bool:
        """Warm up (the real prefill: same writes each time) and capture; False on failure."""
        b = self.batch
        ids, lengths, index, t, k, p, u, draft_u = inputs
        step_graphs = b.graph

        def run() -> torch.Tensor:
            return b.prefill_at(ids, lengths, index, (t, k, p), u, key[2], draft_u)

        try:
            warm_up_for_capture(run)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=step_graphs.pool if step_graphs is not None else None):
                first = run()
            if step_graphs is not None and step_graphs.pool is None:
                step_graphs.pool = graph.pool()
            self.graphs[key] = (graph, inputs, first)
            return True
        except Exception as e:  # as in CudaGraphStep._capture; the eager prefill re-raises real errors
            warnings.warn(f"CUDA graph capture of the prefill failed ({e}); prefilling eagerly", stacklevel=2)
            self.failed = True
            return False


class Engine:
    """Batched generation with a model and a tokenizer.

    max_batch_size: rows decoded together; max_len: the context (prompt + new tokens), default
    the model's max_position_embeddings; speculative: draft tokens per step from the MTP module
    (0 = off); cuda_graph: replay plain decode steps and prefills as CUDA graphs on a GPU; compile:
    torch.compile each block, the output norms and RoPE's cos/sin (in place, on the model itself) and
    the greedy argmax (fewer, fused kernels per decode step); pipeline: launch each plain
    decode step before handling the previous step's tokens on the host (default: on CUDA).
    The tokenizer needs `encode`, `decode` and `eos_id` (see `nanoseek.data.tokenizer`); it may
    be None when prompts are given as token ids (the text fields then stay empty).
    """

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch_size: int = 8, max_len: int | None = None,
                 speculative: int = 0, cuda_graph: bool = False, compile: bool = False,
                 pipeline: bool | None = None):
        cfg = model.config
        if speculative and not cfg.num_nextn_predict_layers:
            raise ValueError(f"speculative={speculative}: the model has no MTP module "
                             "(num_nextn_predict_layers=0); use speculative=0")
        if speculative < 0:
            raise ValueError(f"speculative={speculative}: the number of draft tokens must be >= 0 (0 turns "
                             "speculation off)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: an engine needs room for at least one sequence")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", cfg.eos_token_id)
        self.max_batch_size, self.speculative, self.cuda_graph = max_batch_size, speculative, cuda_graph
        self.max_len = max_len or cfg.max_position_embeddings
        self.pipeline = self.device.type == "cuda" if pipeline is None else pipeline
        self.last_stats = GenerationStats()
        self._batch: Batch | None = None  # kept between calls: its cache and captured graphs are reused
        self.greedy = greedy_tokens
        if compile:  # fuse each block's small decode kernels (captured inside the CUDA graphs too)
            # one graph per (batch rows, prefill length, kv bucket): allow more than dynamo's default 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            for block in [*model.layers.values(), *model.mtp]:
                block.compile(dynamic=False)
            # and the step's work around the blocks, each one or two kernels instead of a chain of eager
            # launches: RoPE's cos/sin of the positions (seven), the output norms (five), greedy's argmax
            # over the vocabulary (a cast and a single-block reduction)
            for norm in [model.norm, *(layer.shared_head.norm for layer in model.mtp)]:
                norm.compile(dynamic=False)
            model.rope = torch.compile(model.rope, dynamic=False)
            self.greedy = torch.compile(greedy_tokens, dynamic=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def cache_report(self) -> str:
        """One line: latent cache bytes per token against an expanded per-head K/V cache, and the
        memory a full batch's cache takes."""
        dtype = self.model.embed_tokens.weight.dtype
        latent, expanded = cache_bytes_per_token(self.model.config, dtype)
        positions = self.max_len + 2 * self.speculative
        return (f"KV cache per token ({str(dtype).removeprefix('torch.')}): latent {latent:,} B vs expanded "
                f"per-head K/V {expanded:,} B ({expanded / latent:.1f}x smaller); {self.max_batch_size} rows x "
                f"{positions} positions take {self.max_batch_size * positions * latent / 2**20:,.1f} MiB")

    def sequence(self, prompt: Prompt, params: SamplingParams,
                 on_event: Callable[[Sequence, str], None] | None = None) -> Sequence:
        """Tokenise and check a request; raises ValueError naming the problem."""
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("this Engine has no tokenizer: give prompts as token ids and no stop strings")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens); give at least one token of text")
        V = self.model.config.vocab_size
        if not all(0 <= t < V for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {V}) (the model's vocab_size)")
        if len(ids) + params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                             f"context of {self.max_len} tokens; lower max_new_tokens to at most "
                             f"{max(self.max_len - len(ids), 0)} or shorten the prompt")
        return Sequence(ids, params, self.tokenizer, self.eos_id, on_event)

    def _params(self, params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        """One SamplingParams per prompt (None: the defaults)."""
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
        return list(params)

    def run(self, seqs: list[Sequence], stats: GenerationStats) -> Iterator[tuple[Sequence, str]]:
        """Decode `seqs` to the end, max_batch_size at a time (rows refill as requests finish).

        Yields (seq, text delta) as tokens are produced.
        """
        waiting = deque(seqs)
        rows = min(len(seqs), self.max_batch_size)
        if self._batch is None or self._batch.rows != rows or self._batch.busy:
            self._batch = Batch(self, rows)
        batch = self._batch
        start = time.perf_counter()
        while waiting or batch.busy:
            free = batch.free_rows()
            if waiting and free:
                yield from batch.admit([waiting.popleft() for _ in range(min(len(free), len(waiting)))], stats)
            if batch.busy:
                yield from batch.step(stats)
            stats.seconds = time.perf_counter() - start

    def generate(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 on_delta: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Generate for a list of prompts (text or token ids), batched.

        params: one SamplingParams for all or one per prompt. on_delta(i, text) streams the text
        of prompt i as it is produced. Counters land in `last_stats`.
        """
        seqs = [self.sequence(p, sp) for p, sp in zip(prompts, self._params(params, len(prompts)))]
        self.last_stats = GenerationStats()
        index = {id(s): i for i, s in enumerate(seqs)}
        for seq, delta in self.run(seqs, self.last_stats):
            if on_delta is not None and delta:
                on_delta(index[id(seq)], delta)
        return [s.completion() for s in seqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request piece by piece as tokens are produced."""
        self.last_stats = GenerationStats()
        for _, delta in self.run([self.sequence(prompt, params or SamplingParams())], self.last_stats):
            if delta:
                yield delta

    @torch.no_grad()
    def generate_reference(self, prompts: Seq[Prompt],
                           params: SamplingParams | Seq[SamplingParams] | None = None) -> list[Completion]:
        """The slow reference: one prompt at a time, the full sequence recomputed (no cache) per token.

        Uses the same sampling functions and uniforms as `generate`, so a seeded request gives the
        same tokens on both paths (up to floating-point ties).
        """
        out = []
        for prompt, sp in zip(prompts, self._params(params, len(prompts))):
            seq = self.sequence(prompt, sp)
            t, k, p = settings_tensors([sp], self.device)
            while not seq.finished:
                ids = torch.tensor([seq.prompt_ids + seq.token_ids], device=self.device)
                logits = self.model(ids).logits[:, -1]  # (1, V)
                token = sample(sampling_probs(logits, t, k, p), seq.uniforms(1).to(self.device))
                seq.append(token.tolist())
            out.append(seq.completion())
        return out
