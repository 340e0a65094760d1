"""Evaluation during and after pretraining: validation loss, greedy samples, held-out accuracy."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F

from nanoseek.data.loader import PackedLoader
from nanoseek.data.tasks import KINDS, r1_prompt, sample_problems, verify
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import Transformer


@torch.no_grad()
def validation_loss(model: Transformer, loader: PackedLoader, batches: int, device: torch.device,
                    autocast: contextlib.AbstractContextManager) -> float:
    """Mean next-token cross-entropy over the first `batches` batches of the validation loader."""
    was_training = model.training
    model.eval()
    loader.load_state_dict(_rewound(loader))  # the same batches every time
    total, count = 0.0, 0
    for _ in range(min(batches, len(loader))):
        x, y = next(loader)
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def _rewound(loader: PackedLoader) -> dict:
    state = loader.state_dict()
    state.update(epoch=0, step=0)
    return state


def greedy_complete(model: Transformer, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int,
                    stop: str | None = None) -> list[str]:
    """Greedy completions of text prompts through the inference engine (latent cache, batched).

    A completion cut by the `stop` string keeps it, so it reads as the model wrote it. The new tokens are
    capped to what the model's context leaves after the longest prompt (a small model's context, long
    prompts: the end-of-run evaluation must not fail the run)."""
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    context = model.config.max_position_embeddings
    if longest >= context:
        raise ValueError(f"greedy_complete: a prompt of {longest} tokens leaves no room in the model's context of "
                         f"{context} tokens; shorten the prompts or raise --model.max_position_embeddings")
    max_new_tokens = min(max_new_tokens, context - longest)
    engine = Engine(model, tokenizer, max_batch_size=32, max_len=longest + max_new_tokens)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=[stop] if stop else [])
    outs = engine.generate(prompts, params)  # the engine leaves the model's mode as it was
    ended_by_eos = [bool(o.token_ids) and o.token_ids[-1] == tokenizer.eos_id for o in outs]
    return [o.text + stop if stop and o.finish_reason == "stop" and not eos else o.text
            for o, eos in zip(outs, ended_by_eos)]


def heldout_accuracy(model: Transformer, tokenizer: Tokenizer, n: int, seed: int, difficulty: tuple[int, int],
                     max_new_tokens: int = 256, kinds: tuple[str, ...] = KINDS) -> dict:
    """Greedy accuracy on held-out problems (never in the training corpus), per task kind.

    Prompts use the R1 template; a completion counts if the task's exact verifier accepts it.
    """
    problems = sample_problems(n, seed, kinds, difficulty_range=difficulty, split="heldout", unique=True)
    texts = greedy_complete(model, tokenizer, [r1_prompt(p.prompt) for p in problems], max_new_tokens,
                            stop="</answer>")
    hits: dict[str, list[int]] = defaultdict(list)
    examples = []
    for problem, text in zip(problems, texts):
        ok = verify(problem, text)
        hits[problem.kind].append(int(ok))
        if len(examples) < 3:
            examples.append({"prompt": problem.prompt, "completion": text, "correct": ok})
    per_kind = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return {"accuracy": overall, "per_kind": per_kind, "n": n, "examples": examples}
