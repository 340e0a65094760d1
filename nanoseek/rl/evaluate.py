"""Held-out evaluation of a policy: greedy pass@1 and sampled pass@k, by task kind and difficulty,
with 95% Wilson intervals, on the project's engine.

pass@k (unbiased, from n >= k samples with c correct): 1 - C(n - c, k) / C(n, k); here n = k, so it is
the share of problems with at least one correct sample among k.
"""

from __future__ import annotations

import math
from collections import defaultdict

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.rl.rewards import AnyProblem, accuracy, format_reward, prompt_text
from nanoseek.rl.rollout import STOP


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0% and 100%, unlike p +- 1.96 se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _table(problems: list[AnyProblem], hits: list[bool], key) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for p, h in zip(problems, hits):
        groups[key(p)].append(h)
    return {k: {"n": len(v), "accuracy": sum(v) / len(v), "ci95": wilson(sum(v), len(v))}
            for k, v in sorted(groups.items())}


def evaluate(engine: Engine, problems: list[AnyProblem], *, template: str, max_new_tokens: int, pass_k: int = 0,
             temperature: float = 1.0, seed: int = 0) -> dict:
    """Greedy accuracy (pass@1), format rate and, with pass_k > 0, sampled pass@k over `problems`.

    Returns {"n", "accuracy", "ci95", "format", "truncated", "mean_length", "by_kind", "by_difficulty",
    "pass_k"?, "examples", "format_failures"}: truncated is the share of greedy answers cut by
    max_new_tokens; format_failures holds up to 3 greedy answers without the format (their ends).
    """
    tok = engine.tokenizer
    prompts = [prompt_text(p.prompt, template) for p in problems]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=(STOP,))
    outs = engine.generate(prompts, greedy)
    texts = [tok.decode([t for t in o.token_ids if t != engine.eos_id]) for o in outs]
    hits = [accuracy(t, p) == 1.0 for t, p in zip(texts, problems)]
    n, c = len(problems), sum(hits)
    fmt = [format_reward(t, p) for t, p in zip(texts, problems)]
    lengths = [len(o.token_ids) for o in outs]
    result = {"n": n, "accuracy": c / max(n, 1), "ci95": wilson(c, n), "format": sum(fmt) / max(n, 1),
              "truncated": sum(x >= max_new_tokens for x in lengths) / max(n, 1),
              "mean_length": sum(lengths) / max(n, 1),
              "by_kind": _table(problems, hits, lambda p: p.kind),
              "by_difficulty": _table(problems, hits, lambda p: f"{p.kind}/{p.difficulty}"),
              "examples": [{"prompt": p.prompt, "completion": t, "correct": h}
                           for p, t, h in list(zip(problems, texts, hits))[:3]],
              "format_failures": [{"prompt": p.prompt, "tokens": x, "end": t[-400:]}
                                  for p, t, f, x in zip(problems, texts, fmt, lengths) if f < 1][:3]}
    if pass_k > 0:
        sampled = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop=(STOP,),
                                  seed=seed + i * pass_k) for i in range(n)]
        outs = engine.generate(prompts, sampled, n=pass_k)
        any_hit = []
        for i, p in enumerate(problems):
            group = outs[i * pass_k:(i + 1) * pass_k]
            any_hit.append(any(accuracy(tok.decode([t for t in o.token_ids if t != engine.eos_id]), p) == 1.0
                               for o in group))
        result["pass_k"] = {"k": pass_k, "accuracy": sum(any_hit) / max(n, 1), "ci95": wilson(sum(any_hit), n),
                            "by_kind": _table(problems, any_hit, lambda p: p.kind)}
    return result


def summary_line(result: dict) -> str:
    lo, hi = result["ci95"]
    kinds = ", ".join(f"{k} {100 * v['accuracy']:.0f}%" for k, v in result["by_kind"].items())
    line = (f"pass@1 {100 * result['accuracy']:.1f}% [95% CI {100 * lo:.1f}-{100 * hi:.1f}] on {result['n']} "
            f"held-out problems ({kinds}); format {100 * result['format']:.0f}%")
    if "truncated" in result:  # records written before it was kept lack it
        line += f", {100 * result['truncated']:.0f}% cut at the length limit"
    if "pass_k" in result:
        line += f"; pass@{result['pass_k']['k']} {100 * result['pass_k']['accuracy']:.1f}%"
    return line
