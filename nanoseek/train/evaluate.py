"""Evaluation during and after pretraining: validation loss, greedy samples, held-out accuracy."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F

from nanoseek.data.loader import PackedLoader
from nanoseek.data.tasks import r1_prompt, sample_problems, verify
from nanoseek.data.tokenizer import Tokenizer
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


@torch.no_grad()
def greedy_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                    stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Batched greedy completion with the latent cache; returns the new tokens of each prompt."""
    device = model.embed_tokens.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    max_prompt = max(lengths)
    limit = min(max_prompt + max_new_tokens, model.config.max_position_embeddings)
    ids = torch.zeros(B, max_prompt, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # right-padded; padding positions are overwritten before use
        ids[b, : len(p)] = torch.tensor(p)
    cache = model.new_cache(B, limit)
    logits = model(ids, cache=cache).logits  # (B, S, V)
    pos = torch.tensor(lengths, device=device)  # next position per row
    token = logits[torch.arange(B), pos - 1].argmax(-1)  # (B,)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stops = {eos_id, *stop_ids}
    for _ in range(max_new_tokens):
        for b in range(B):
            if not done[b]:
                out[b].append(int(token[b]))
                done[b] = int(token[b]) in stops or lengths[b] + len(out[b]) >= limit
        if all(done) or int(pos.max()) >= limit:
            break
        logits = model(token[:, None], positions=pos[:, None], cache=cache, kv_len=int(pos.max()) + 1).logits
        pos = pos + 1
        token = logits[:, -1].argmax(-1)
    return out


def heldout_accuracy(model: Transformer, tokenizer: Tokenizer, n: int, seed: int, difficulty: tuple[int, int],
                     max_new_tokens: int = 256, batch_size: int = 32) -> dict:
    """Greedy accuracy on held-out problems (never in the training corpus), per task kind.

    Prompts use the R1 template; a completion counts if the task's exact verifier accepts it.
    """
    problems = sample_problems(n, seed, difficulty_range=difficulty, split="heldout", unique=True)
    stop = tokenizer.encode("</answer>")
    stop_ids = tuple(stop) if len(stop) == 1 else ()
    hits: dict[str, list[int]] = defaultdict(list)
    examples = []
    was_training = model.training
    model.eval()
    for start in range(0, n, batch_size):
        chunk = problems[start: start + batch_size]
        prompts = [tokenizer.encode(r1_prompt(p.prompt)) for p in chunk]
        outs = greedy_generate(model, prompts, max_new_tokens, tokenizer.eos_id, stop_ids)
        for problem, toks in zip(chunk, outs):
            text = tokenizer.decode([t for t in toks if t != tokenizer.eos_id])
            ok = verify(problem, text)
            hits[problem.kind].append(int(ok))
            if len(examples) < 3:
                examples.append({"prompt": problem.prompt, "completion": text, "correct": ok})
    model.train(was_training)
    per_kind = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return {"accuracy": overall, "per_kind": per_kind, "n": n, "examples": examples}
