"""Rollouts on the live policy, scoring, and the tensors of the update.

Rollouts run on the project's engine over the policy's own parameters (`Engine(policy)` decodes a
`shared_copy`: no weight copy, no sync; the optimizer's in-place step is what the next rollout samples).
G samples of a prompt share one prefill (`Engine.generate(..., n=G)`); sampling stops at EOS or
`</answer>`, and the engine's log-probs of the sampled tokens are kept.

Shapes: N responses, S padded length of prompt + response - 1 (the model's input), V vocabulary.
A response's tokens sit at target positions len(prompt) - 1 .. len(prompt) + len(response) - 2;
`mask` (N, S) marks them, so every per-token tensor (log-probs, advantages' broadcast) is (N, S).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field

import torch

from nanoseek.infer.engine import ContextLengthError, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.moe import expert_counts
from nanoseek.rl.rewards import AnyProblem, Response, RewardWeights, prompt_text, reflection_markers

STOP = "</answer>"


@dataclass
class Rollout:
    """One sampled response with its scores. `group` indexes the prompt it answers within the step."""

    problem: AnyProblem
    prompt_ids: list[int]
    token_ids: list[int]
    engine_logprobs: list[float]
    text: str
    truncated: bool
    reward: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    group: int = 0
    advantage: float = 0.0


def sample_seed(seed: int, step: int, draw: int) -> int:
    """A base seed for one draw of one step: rollouts are reproducible, so resume is exact."""
    return random.Random(f"rl-sample-{seed}-{step}-{draw}").getrandbits(40)


def generate_groups(engine: Engine, problems: list[AnyProblem], group_size: int, *, temperature: float,
                    top_p: float, max_new_tokens: int, template: str, seed: int | None,
                    weights: RewardWeights) -> list[list[Rollout]]:
    """G scored samples per problem, one prefill per prompt. Returns one list of G rollouts per problem."""
    tok = engine.tokenizer
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop=(STOP,),
                            logprobs=True, seed=None)
    prompts = [prompt_text(p.prompt, template) for p in problems]
    per_prompt = [params if seed is None else dataclasses.replace(params, seed=seed + i * group_size)
                  for i in range(len(prompts))]
    try:
        outs = engine.generate(prompts, per_prompt, n=group_size)
    except ContextLengthError as e:
        raise SystemExit(f"nanoseek rl: {e} (--rl.max_new_tokens)") from None
    groups = []
    for i, problem in enumerate(problems):
        group = []
        for out in outs[i * group_size:(i + 1) * group_size]:
            ids = out.token_ids
            body = ids[:-1] if ids and ids[-1] == engine.eos_id else ids
            text = tok.decode(body)  # the stop string included, as the model wrote it
            truncated = out.finish_reason == "length"
            r = Rollout(problem, out.prompt_ids, list(ids), list(out.logprobs or []), text, truncated, group=i)
            r.reward, r.components = weights.score(Response(text, len(ids), truncated), problem, max_new_tokens)
            group.append(r)
        groups.append(group)
    return groups


def response_stats(rollouts: list[Rollout]) -> dict[str, float]:
    """Per-step figures of a list of responses: reward components, lengths, truncation, reflection."""
    n = max(len(rollouts), 1)
    lengths = [len(r.token_ids) for r in rollouts]
    out = {"reward": sum(r.reward for r in rollouts) / n,
           "response_len": sum(lengths) / n, "response_len_max": float(max(lengths, default=0)),
           "truncated": sum(r.truncated for r in rollouts) / n}
    for name in rollouts[0].components if rollouts else []:
        out[f"reward_{name}"] = sum(r.components[name] for r in rollouts) / n
    marks = [reflection_markers(r.text) for r in rollouts]
    out["reflection"] = sum(any(m.values()) for m in marks) / n  # share of responses with any marker
    for name in marks[0] if marks else []:
        out[f"reflection_{name}"] = sum(m[name] for m in marks) / n  # occurrences per response
    return out


def pack(rollouts: list[Rollout], pad_id: int, mask_truncated: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded tensors of the update for a list of rollouts:

    input_ids (N, S), targets (N, S), mask (N, S) response targets (0 for truncated ones when
    `mask_truncated`: DAPO's overlong filtering), valid (N, S) real (not padding) input positions,
    engine_logp (N, S), advantages (N,); and first_target, an int: the first position whose target is a
    response token in any row (the shortest prompt's length - 1). Positions before it are prompt in
    every row, so the update's output head can skip them (`Transformer.forward(logits_from=...)`).
    """
    seqs = [r.prompt_ids + r.token_ids for r in rollouts]
    S = max(len(s) for s in seqs) - 1
    N = len(rollouts)
    input_ids = torch.full((N, S), pad_id, dtype=torch.long)
    targets = torch.full((N, S), pad_id, dtype=torch.long)
    mask = torch.zeros(N, S)
    valid = torch.zeros(N, S, dtype=torch.bool)
    engine_logp = torch.zeros(N, S)
    for i, (r, s) in enumerate(zip(rollouts, seqs)):
        t = torch.tensor(s)
        input_ids[i, :len(s) - 1] = t[:-1]
        targets[i, :len(s) - 1] = t[1:]
        start, end = len(r.prompt_ids) - 1, len(s) - 1
        valid[i, :end] = True
        if not (mask_truncated and r.truncated):
            mask[i, start:end] = 1.0
        engine_logp[i, start:end] = torch.tensor(r.engine_logprobs[:end - start])
    return {"input_ids": input_ids, "targets": targets, "mask": mask, "valid": valid, "engine_logp": engine_logp,
            "advantages": torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
            "first_target": min(len(r.prompt_ids) - 1 for r in rollouts)}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, S, V), targets (N, S) -> (log p(target) (N, S), entropy (N, S) detached), in fp32."""
    logp_all = logits.float().log_softmax(-1)  # (N, S, V)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@contextlib.contextmanager
def count_real_tokens(model, valid: torch.Tensor):
    """After the forward this context runs, each MoE layer's `last_load` (the counts the router-bias update
    uses) covers the real tokens only (valid (N, S)): padding is routed too, and would otherwise pull the
    biases towards the experts the pad token prefers. The counts are redone from the layer's `last_ids`
    (T = N * S tokens, K ids each) with 0/1 weights: no hooks (compiled blocks stay one graph) and no
    boolean indexing (no host sync)."""
    for moe in model.moe_layers:
        moe.last_ids = None
    yield
    weights = valid.flatten().float()  # (T,)
    with torch.no_grad():
        for moe in model.moe_layers:
            ids = moe.last_ids
            if moe.training and ids is not None and ids.shape[0] == weights.numel():
                moe.last_load = expert_counts(ids.flatten(), moe.cfg.n_routed_experts,
                                              weights[:, None].expand_as(ids).flatten())


@torch.no_grad()
def forward_logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor, autocast,
                     logits_from: int = 0) -> torch.Tensor:
    """log p(targets[:, logits_from:]) (N, S - logits_from) under `model` without gradients, in eval mode
    (the same maths as training: eval only stops the MoE layers' balance statistics), under the training
    autocast."""
    was = model.training
    model.eval()
    try:
        with autocast:
            logits = model(input_ids, logits_from=logits_from).logits
        return token_logprobs(logits, targets[:, logits_from:])[0]
    finally:
        model.train(was)
