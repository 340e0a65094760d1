"""Generation engine: batched decoding over the latent MLA cache, on a model that may keep training.

    engine = Engine(model, tokenizer, max_batch_size=32, cuda_graph=True, compile=True)
    completions = engine.generate(prompts, SamplingParams(temperature=0.7, logprobs=True), n=4)

The engine decodes through its own copy of the model's module tree (`nanoseek.model.swap.shared_copy`),
in eval mode, with the decode kernels swapped in on a GPU (`nanoseek.kernels.modules.install`) and, with
`compile=True`, compiled blocks. The copy holds the very parameter tensors of `model`: the caller's
modules are never replaced, changed or switched to eval, and an optimizer step on `model` is what the
next generate call decodes with (also through CUDA graphs captured before the step, which read the
parameters' storage). So an RL trainer generates rollouts from the policy it is training.

Pieces: `nanoseek.infer.sequence` (requests and their text), `nanoseek.infer.batch` (rows over one
latent cache, prefill and decode steps, the admit/step loop), `nanoseek.infer.graphs` (CUDA graphs),
`nanoseek.infer.speculative` (MTP drafts), `nanoseek.infer.scheduler` (the server's background loop).

`Engine.generate_reference` recomputes the whole sequence without a cache for every token:
the slow reference that the cached (and speculative) paths must match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

import torch

from nanoseek.config import ModelConfig
from nanoseek.infer.batch import Batch, Events, greedy_tokens, token_logprobs
from nanoseek.infer.sampling import SamplingParams, sample, sampling_probs, settings_tensors
from nanoseek.infer.sequence import Completion, GenerationStats, Prompt, Sequence
from nanoseek.model.swap import shared_copy
from nanoseek.model.transformer import Transformer


class ContextLengthError(ValueError):
    """A prompt plus its max_new_tokens does not fit the engine's context."""


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


class Engine:
    """Batched generation with a model and a tokenizer.

    max_batch_size: rows decoded together; max_len: the context (prompt + new tokens), default
    the model's max_position_embeddings; speculative: draft tokens per step from the MTP module
    (0 = off); cuda_graph: replay decode steps and prefills as CUDA graphs on a GPU; compile:
    torch.compile each block, the output norms and RoPE's cos/sin (of the engine's own view, see
    `decode_view`) and the greedy argmax (fewer, fused kernels per decode step); pipeline: launch each plain
    decode step before handling the previous step's tokens on the host (default: on CUDA); autocast: a
    dtype (torch.bfloat16) to run the model under torch.autocast, for fp32 master weights decoded in bf16
    as the training forward's matmuls run (`nanoseek rl`'s policy). Its casts are not cached, so a captured
    graph reads the weights afresh each replay and sees every optimizer step. Without it an fp32 model decodes in fp32,
    where a GPU's grouped expert GEMM (bf16 only) gives way to a per-expert loop that syncs and cannot be
    captured: 45 against 1.9 ms per 128-row decode step for a 135M model on an H100 (bench/grpo_throughput.py).
    The tokenizer needs `encode`, `decode` and `eos_id` (see `nanoseek.data.tokenizer`); it may
    be None when prompts are given as token ids (the text fields then stay empty).
    """

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch_size: int = 8, max_len: int | None = None,
                 speculative: int = 0, cuda_graph: bool = False, compile: bool = False,
                 pipeline: bool | None = None, autocast: torch.dtype | None = None):
        cfg = model.config
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast={autocast}: give torch.bfloat16, torch.float16 or None (the weights' dtype)")
        if speculative and not cfg.num_nextn_predict_layers:
            raise ValueError(f"speculative={speculative}: the model has no MTP module "
                             "(num_nextn_predict_layers=0); use speculative=0")
        if speculative < 0:
            raise ValueError(f"speculative={speculative}: the number of draft tokens must be >= 0 (0 turns "
                             "speculation off)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: an engine needs room for at least one sequence")
        self.model = model  # the caller's: never changed here
        self.decoder = self.decode_view(model, compile)  # the engine's modules over model's parameters
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", cfg.eos_token_id)
        self.max_batch_size, self.speculative, self.cuda_graph = max_batch_size, speculative, cuda_graph
        self.autocast = autocast
        self.max_len = max_len or cfg.max_position_embeddings
        self.pipeline = self.device.type == "cuda" if pipeline is None else pipeline
        self.last_stats = GenerationStats()
        self._batch: Batch | None = None  # kept between calls: its cache and captured graphs are reused
        self.greedy = greedy_tokens
        if compile:  # greedy's argmax over the vocabulary: a cast and a single-block reduction otherwise
            self.greedy = torch.compile(greedy_tokens, dynamic=False)

    @staticmethod
    def decode_view(model: Transformer, compile: bool = False) -> Transformer:
        """`model`'s module tree copied over its parameter and buffer tensors, in eval mode, with the
        decode kernels installed where they can run (a CUDA GPU with Triton) and, with `compile`, each
        block, the output norms and RoPE's cos/sin compiled (fewer, fused kernels per decode step)."""
        view = shared_copy(model).eval()
        device = model.embed_tokens.weight.device
        from nanoseek.kernels import HAVE_TRITON

        if HAVE_TRITON and device.type == "cuda":
            from nanoseek.kernels.modules import install

            install(view)
        if compile:  # fuse each block's small decode kernels (captured inside the CUDA graphs too)
            # one graph per (batch rows, prefill length, kv bucket): allow more than dynamo's default 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            for block in [*view.layers.values(), *view.mtp]:
                block.compile(dynamic=False)
            # and the step's work around the blocks, each one or two kernels instead of a chain of eager
            # launches: RoPE's cos/sin of the positions (seven), the output norms (five)
            for norm in [view.norm, *(layer.shared_head.norm for layer in view.mtp)]:
                norm.compile(dynamic=False)
            view.rope = torch.compile(view.rope, dynamic=False)
        return view

    def compute(self) -> contextlib.AbstractContextManager:
        """The context the model's forwards run in: `autocast` without its cast cache, or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=False)

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
        """Tokenise and check a request: the one place the token budget is checked. Raises ValueError
        naming the problem (ContextLengthError when prompt + max_new_tokens exceeds max_len).
        Text is encoded as it is (`tokenizer.encode`: right for a rendered chat template, which writes
        its own special tokens); pass `tokenizer.encode_prompt(text)` for a raw prompt that should get
        the tokenizer's BOS, as the CLI and the server do."""
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("this Engine has no tokenizer: give prompts as token ids and no stop strings")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens); give at least one token of text")
        V = self.model.config.vocab_size
        if not all(0 <= t < V for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {V}) (the model's vocab_size)")
        if len(ids) + params.max_new_tokens > self.max_len:
            raise ContextLengthError(
                f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the context of "
                f"{self.max_len} tokens; lower max_new_tokens to at most {max(self.max_len - len(ids), 0)} or "
                "shorten the prompt")
        return Sequence(ids, params, self.tokenizer, self.eos_id, on_event)

    def _params(self, params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        """One SamplingParams per prompt (None: the defaults)."""
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
        return list(params)

    def run(self, seqs: list[Sequence], stats: GenerationStats) -> Iterator[Events]:
        """Decode `seqs` to the end, max_batch_size at a time (rows refill as requests finish), by the
        batch's admit/step loop (`Batch.turn`). Yields each turn's (seq, text delta) events."""
        waiting = deque(seqs)
        rows = min(len(seqs), self.max_batch_size)
        if self._batch is None or self._batch.rows != rows or self._batch.busy:
            self._batch = Batch(self, rows)
        batch = self._batch
        take = lambda free: [waiting.popleft() for _ in range(min(free, len(waiting)))]  # noqa: E731
        start = time.perf_counter()
        while waiting or batch.busy:
            yield batch.turn(take, stats)
            stats.seconds = time.perf_counter() - start

    def generate(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 n: int = 1, on_delta: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Generate for a list of prompts (text or token ids), batched; n samples per prompt.

        params: one SamplingParams for all or one per prompt. Returns len(prompts) * n completions,
        prompt-major (the n samples of prompt i at i * n .. i * n + n - 1). The n samples of a prompt
        share one prefill; with a seed, sample j draws from seed + j. on_delta(i, text) streams the
        text of completion i as it is produced. Counters land in `last_stats`.
        """
        if n < 1:
            raise ValueError(f"n={n}: the number of samples per prompt must be >= 1")
        seqs = []
        for prompt, sp in zip(prompts, self._params(params, len(prompts))):
            first = self.sequence(prompt, sp)
            seqs.append(first)
            for j in range(1, n):
                seed = None if sp.seed is None else sp.seed + j
                seqs.append(Sequence(first.prompt_ids, dataclasses.replace(sp, seed=seed), self.tokenizer,
                                     self.eos_id))
        self.last_stats = GenerationStats()
        index = {id(s): i for i, s in enumerate(seqs)}
        for events in self.run(seqs, self.last_stats):
            for seq, delta in events:
                if on_delta is not None and delta:
                    on_delta(index[id(seq)], delta)
        return [s.completion() for s in seqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request piece by piece as tokens are produced."""
        self.last_stats = GenerationStats()
        for events in self.run([self.sequence(prompt, params or SamplingParams())], self.last_stats):
            for _, delta in events:
                if delta:
                    yield delta

    @torch.no_grad()
    def generate_reference(self, prompts: Seq[Prompt],
                           params: SamplingParams | Seq[SamplingParams] | None = None) -> list[Completion]:
        """The slow reference: one prompt at a time, the full sequence recomputed (no cache) per token.

        Uses the same sampling functions and uniforms as `generate`, so a seeded request gives the
        same tokens on both paths (up to floating-point ties). Runs the caller's own model (no kernels,
        no compilation) in eval mode and restores its mode afterwards.
        """
        out, was_training = [], self.model.training
        self.model.eval()
        try:
            for prompt, sp in zip(prompts, self._params(params, len(prompts))):
                seq = self.sequence(prompt, sp)
                t, k, p = settings_tensors([sp], self.device)
                while not seq.finished:
                    ids = torch.tensor([seq.prompt_ids + seq.token_ids], device=self.device)
                    with self.compute():
                        logits = self.model(ids).logits[:, -1]  # (1, V)
                    token = sample(sampling_probs(logits, t, k, p), seq.uniforms(1).to(self.device))
                    seq.append(token.tolist(), token_logprobs(logits, token).tolist())
                out.append(seq.completion())
        finally:
            self.model.train(was_training)
        return out
