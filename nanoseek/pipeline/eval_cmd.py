"""`nanoseek eval`: one held-out evaluation for pretraining, SFT and RL checkpoints, or any OpenAI server.

    nanoseek eval --ckpt DIR [--tasks add,mul] [--difficulty 1-3] [--n 300] [--k 8] [--out FILE]
    nanoseek eval --url http://host:port/v1 --model NAME [...]      (the same prompts and rules, remotely)

Per problem: one greedy completion (pass@1) and S = --samples (default k) sampled ones. pass@k uses
the unbiased estimator of Chen et al. (2021) from S >= k samples with c correct:

    pass@k = 1 - C(S - c, k) / C(S, k)      (with S = k: 1 if any sample is correct, else 0)

averaged over problems, by kind and by kind/difficulty. Also: mean length (characters and tokens, greedy),
format rate (R1 `<think></think><answer></answer>`), readable rate (`nanoseek.pipeline.readable`: the
format, no garbled text, no repeated line, what `nanoseek sample` keeps), reflection-marker rate (share of
greedy completions with any marker of `nanoseek.rl.rewards.REFLECTION_MARKERS`). Prompts use the R1-Zero
template.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

from nanoseek.data.tasks import KINDS, format_ok
from nanoseek.pipeline.readable import readability
from nanoseek.rl.evaluate import wilson
from nanoseek.rl.rewards import AnyProblem, TaskPrompts, accuracy, load_jsonl_prompts, prompt_text, reflection_markers


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def parse_range(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1-3' -> (1, 3)."""
    try:
        lo, _, hi = text.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"--difficulty {text!r} is not a range; write e.g. 1-3 or 2") from None
    if lo_i > hi_i or lo_i < 1:
        raise SystemExit(f"--difficulty {text!r}: need 1 <= low <= high, e.g. 1-3")
    return lo_i, hi_i


def load_problems(tasks: str, difficulty: str, n: int, prompts: str | None, seed: int) -> list[AnyProblem]:
    """Held-out task problems (never drawn by training), or the first n of a user's JSONL prompt file."""
    if n < 1:
        raise SystemExit(f"--n {n}: evaluate at least one problem")
    if prompts:
        try:
            return load_jsonl_prompts(prompts)[:n]
        except ValueError as e:
            raise SystemExit(str(e)) from None
    kinds = tuple(k.strip() for k in tasks.split(",") if k.strip())
    try:
        return TaskPrompts(kinds, parse_range(difficulty), seed).heldout(n)
    except ValueError as e:
        raise SystemExit(f"--tasks/--difficulty: {e}") from None


def _groups(problems: list[AnyProblem], values: list[float], key) -> dict[str, dict]:
    groups: dict[str, list[float]] = defaultdict(list)
    for p, v in zip(problems, values):
        groups[key(p)].append(v)
    return {g: {"n": len(v), "value": sum(v) / len(v)} for g, v in sorted(groups.items())}


def evaluate(backend, problems: list[AnyProblem], *, k: int = 8, samples: int | None = None,
             max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             template: str = "r1", tokenizer=None) -> dict:
    """The full report as a dict (see the module docstring); `backend.complete` gives the texts."""
    samples = k if samples is None else samples
    if k > 0 and samples < k:
        raise SystemExit(f"--samples {samples} < --k {k}: pass@k needs at least k samples per problem")
    prompts = [prompt_text(p.prompt, template) for p in problems]
    greedy = [g[0] for g in backend.complete(prompts, 1, temperature=0.0, top_p=1.0, max_tokens=max_new_tokens,
                                             seed=seed)]
    hits = [accuracy(t, p) for t, p in zip(greedy, problems)]
    fmt = [float(format_ok(t)) for t in greedy]
    readable = [float(readability(t) is None) for t in greedy]
    refl = [float(any(reflection_markers(t).values())) for t in greedy]
    n, c = len(problems), int(sum(hits))
    out: dict = {"n": n, "pass@1": c / n, "pass@1_ci95": wilson(c, n), "format_rate": sum(fmt) / n,
                 "readable_rate": sum(readable) / n, "reflection_rate": sum(refl) / n,
                 "mean_length_chars": sum(len(t) for t in greedy) / n,
                 "by_kind": {}, "by_difficulty": {}}
    if tokenizer is not None:
        out["mean_length_tokens"] = sum(len(tokenizer.encode(t)) for t in greedy) / n
    columns = {"pass@1": hits, "format": fmt, "readable": readable}
    if k > 0:
        sampled = backend.complete(prompts, samples, temperature=temperature, top_p=top_p,
                                   max_tokens=max_new_tokens, seed=seed)
        correct = [int(sum(accuracy(t, p) for t in group)) for group, p in zip(sampled, problems)]
        columns[f"pass@{k}"] = [pass_at_k(samples, ci, k) for ci in correct]
        columns["sampled_acc"] = [ci / samples for ci in correct]
        out[f"pass@{k}"] = sum(columns[f"pass@{k}"]) / n
        out["sampled_acc"] = sum(columns["sampled_acc"]) / n
    for name, values in columns.items():
        for key, label in ((lambda p: p.kind, "by_kind"), (lambda p: f"{p.kind}/{p.difficulty}", "by_difficulty")):
            for g, row in _groups(problems, values, key).items():
                out[label].setdefault(g, {"n": row["n"]})[name] = row["value"]
    # per problem (by uid), so two checkpoints scored on the same problems can be compared pairwise
    out["per_problem"] = [{"uid": p.uid, **{name: values[i] for name, values in columns.items()}}
                          for i, p in enumerate(problems)]
    out["examples"] = [{"prompt": p.prompt, "completion": t, "correct": bool(h)}
                       for p, t, h in list(zip(problems, greedy, hits))[:3]]
    return out


def table(result: dict) -> str:
    """The report as a fixed-width table: one row per kind/difficulty, per kind, and overall."""
    cols = ["pass@1", *[c for c in result if c.startswith("pass@") and c[5:].isdigit() and c != "pass@1"], "format",
            "readable"]
    head = f"{'group':<16}{'n':>6}" + "".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for label in ("by_difficulty", "by_kind"):
        for g, row in result[label].items():
            lines.append(f"{g:<16}{row['n']:>6}" + "".join(f"{100 * row.get(c, 0):>9.1f}%" for c in cols))
        lines.append("-" * len(head))
    overall = {**result, "format": result["format_rate"], "readable": result["readable_rate"]}
    lines.append(f"{'all':<16}{result['n']:>6}" + "".join(f"{100 * overall[c]:>9.1f}%" for c in cols))
    lo, hi = result["pass@1_ci95"]
    tokens = f", {result['mean_length_tokens']:.1f} tokens" if "mean_length_tokens" in result else ""
    lines.append(f"pass@1 95% CI {100 * lo:.1f}-{100 * hi:.1f}%; mean length {result['mean_length_chars']:.0f} "
                 f"chars{tokens}; reflection markers in {100 * result['reflection_rate']:.1f}% of completions")
    return "\n".join(lines)


def add_backend_args(ap: argparse.ArgumentParser) -> None:
    """Where completions come from: --ckpt on the engine, or --url/--model on an OpenAI-compatible server."""
    ap.add_argument("--ckpt", help="checkpoint or run directory (its latest checkpoint)")
    ap.add_argument("--url", help="use an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="", help="the model id on --url")
    ap.add_argument("--api-key", default="", help="bearer token for --url")
    ap.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", help="float32 | bfloat16; auto: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--max-batch-size", type=int, default=256, help="sequences the engine decodes at once")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="on a GPU in bfloat16, replay the engine's decode steps as CUDA graphs (--no-cuda-graph: "
                         "eager, which for a small model is bound by the host)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nanoseek eval", description=__doc__.split("\n\n")[0])
    add_backend_args(ap)
    ap.add_argument("--tasks", default=",".join(KINDS), help=f"comma-separated task kinds of {KINDS}")
    ap.add_argument("--difficulty", default="1-3", help="difficulty range, e.g. 1-3")
    ap.add_argument("--prompts", help="a JSONL file of {prompt, answer} to evaluate instead of the tasks")
    ap.add_argument("--n", type=int, default=300, help="problems (held-out split)")
    ap.add_argument("--k", type=int, default=8, help="pass@k (0: greedy only)")
    ap.add_argument("--samples", type=int, default=None, help="samples per problem for pass@k (default k)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the pass@k samples")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON report path (default: stdout table only)")
    return ap


def make_backend(args):
    """(backend, tokenizer or None) for --ckpt or --url (with --url, --ckpt only lends its tokenizer)."""
    from nanoseek.pipeline.backend import EngineBackend, HTTPBackend, resolve_ckpt

    if args.max_batch_size < 1:
        raise SystemExit(f"--max-batch-size {args.max_batch_size}: the engine needs at least 1 sequence at once")
    if not args.ckpt and not args.url:
        raise SystemExit("pass --ckpt DIR (evaluate locally) or --url URL --model NAME (evaluate a server)")
    if args.url:
        tok = None
        if args.ckpt:
            from nanoseek.data.tokenizer import load_tokenizer

            tok = load_tokenizer(resolve_ckpt(args.ckpt))
        return HTTPBackend(args.url, args.model, args.api_key), tok
    backend = EngineBackend(args.ckpt, args.device, args.max_batch_size, args.dtype, args.cuda_graph)
    return backend, backend.tokenizer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.k < 0 or args.max_new_tokens < 1:
        raise SystemExit(f"--k {args.k} / --max-new-tokens {args.max_new_tokens}: need k >= 0 and at least 1 token")
    problems = load_problems(args.tasks, args.difficulty, args.n, args.prompts, args.seed)
    backend, tok = make_backend(args)
    t = time.time()
    result = evaluate(backend, problems, k=args.k, samples=args.samples, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, tokenizer=tok)
    result["source"], result["seconds"] = backend.name, time.time() - t
    result["settings"] = {k: v for k, v in vars(args).items() if k != "api_key"}
    print(f"nanoseek eval: {backend.name}, {len(problems)} problems, {result['seconds']:.0f}s")
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
