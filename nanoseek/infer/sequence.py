"""Requests and their text: `Sequence` (one request while it runs), `Completion` (a finished one) and
`GenerationStats` (counters of a generate call or of a scheduler's life).

A `Sequence` takes newly sampled tokens (`append`) and applies EOS, max_new_tokens and stop strings;
its text is detokenised incrementally, and a tail that could begin a stop string is held back until
it cannot. It knows nothing of batches or devices.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from nanoseek.infer.sampling import SamplingParams

Prompt = str | Seq[int]


@dataclass
class Completion:
    """A finished request: its prompt and generated ids, the text, and why it stopped."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated, EOS included when it ended the text
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    # log p(token) of each generated token under the model's own distribution (temperature 1, no
    # top-k/top-p), when the request asked for them (SamplingParams.logprobs)
    logprobs: list[float] | None = None


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
        self.logprobs: list[float] | None = [] if params.logprobs else None
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
        return Completion(self.prompt_ids, list(self.token_ids), self.text, self.finish_reason or "",
                          None if self.logprobs is None else list(self.logprobs))

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error

    def append(self, tokens: Seq[int], logprobs: Seq[float] | None = None) -> str:
        """Add sampled tokens and, if kept, their log-probabilities (the rest is dropped once finished);
        returns the new text to show."""
        p = self.params
        for i, t in enumerate(tokens):
            if self.finished:
                break
            if t < 0:  # the sampler's mark of a row with no valid distribution (`sampling.sample`)
                self.finish("error", RuntimeError("the model's next-token distribution was not finite (NaN or "
                                                  "infinite logits); this request was stopped"))
                break
            self.token_ids.append(t)
            if self.logprobs is not None:
                self.logprobs.append(logprobs[i])
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
