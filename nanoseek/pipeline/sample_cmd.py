"""`nanoseek sample`: rejection sampling into an SFT-ready JSONL (R1's stage 3, and the cold-start set).

    nanoseek sample --ckpt DIR --prompts FILE|synthetic --n K [--temperature T --top-p P] --out FILE

For each prompt, K completions on the engine (or --url). A completion is kept when, in order:
  1. the verifier accepts its answer (`nanoseek.rl.rewards.accuracy` == 1);
  2. it is readable (`readability`): the R1 format, at most `max_chars` characters, no garbled or mixed
     text (the share of characters outside printable ASCII at most `max_foreign`), no repeated line;
     with --reformat, a completion written as reasoning plus a final "Answer:" line is first rewritten
     into the R1 template (`to_r1_format`; R1 post-processed R1-Zero outputs for its cold start);
  3. it is not a duplicate (same prompt, same text up to whitespace).
Then buckets (kind, difficulty) are balanced: at most --per-prompt completions of one prompt and
--per-bucket of one bucket, chosen round-robin over prompts in a seeded order. Each kept sample is one
line `{"messages": [system, user, assistant], "kind", "difficulty", "reward", "provenance"}`, which
`nanoseek sft` reads as is (extra keys are ignored); the system turn is the R1 prompt, so the rendered
conversation is exactly the R1-Zero template the model was sampled with.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from nanoseek.data.tasks import KINDS, R1_SYSTEM, format_ok
from nanoseek.pipeline.eval_cmd import add_backend_args, parse_range
from nanoseek.pipeline.readable import readability, to_r1_format
from nanoseek.rl.rewards import AnyProblem, TaskPrompts, accuracy, load_jsonl_prompts, prompt_text

_SPACES = re.compile(r"\s+")


def dedup_key(problem: AnyProblem, text: str) -> tuple[str, str]:
    return problem.prompt, _SPACES.sub(" ", text).strip()


def balance(kept: list[dict], per_prompt: int, per_bucket: int, seed: int) -> list[dict]:
    """At most per_prompt samples of a prompt and per_bucket of a (kind, difficulty) bucket (0: no cap),
    taken round-robin over the bucket's prompts in a seeded order, so a cap keeps many distinct prompts."""
    by_bucket: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s in kept:
        by_bucket[(s["kind"], s["difficulty"])][s["prompt"]].append(s)
    rng = random.Random(seed)
    out = []
    for bucket in sorted(by_bucket):
        queues = [q[:per_prompt] if per_prompt else q for q in by_bucket[bucket].values()]
        rng.shuffle(queues)
        chosen: list[dict] = []
        while any(queues) and not (per_bucket and len(chosen) >= per_bucket):
            for q in queues:
                if q and not (per_bucket and len(chosen) >= per_bucket):
                    chosen.append(q.pop(0))
        out += chosen
    return out


def load_prompts(spec: str, count: int | None, tasks: str, difficulty: str, seed: int) -> list[AnyProblem]:
    """'synthetic': `count` (default 200) training-split task problems (never the held-out ones eval uses);
    else a JSONL file (its first `count` lines, default all)."""
    if count is not None and count < 1:
        raise SystemExit(f"--num-prompts {count}: sample at least one prompt")
    if spec == "synthetic":
        count = 200 if count is None else count
        kinds = tuple(k.strip() for k in tasks.split(",") if k.strip())
        try:
            return TaskPrompts(kinds, parse_range(difficulty), seed).train_batch(0, count)
        except ValueError as e:
            raise SystemExit(f"--tasks/--difficulty: {e}") from None
    path = Path(spec)
    if path.is_file() and not path.read_text(encoding="utf-8").strip():
        raise SystemExit(f"--prompts {path} is empty; add lines like {{\"prompt\": \"What is 2 + 3?\", "
                         "\"answer\": \"5\"}, or pass --prompts synthetic")
    try:
        return load_jsonl_prompts(path)[:count] if count else load_jsonl_prompts(path)
    except ValueError as e:
        raise SystemExit(f"--prompts: {e}") from None


def rejection_sample(backend, problems: list[AnyProblem], k: int, *, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int, max_chars: int, max_foreign: float, batch: int = 16,
                     progress: bool = True, reformat: bool = False) -> tuple[list[dict], dict]:
    """(accepted samples, statistics): K completions per problem, verified, filtered and deduplicated;
    with `reformat`, plain reasoning + "Answer:" completions are rewritten into the R1 template first."""
    from tqdm import tqdm

    stats = {"drawn": Counter(), "correct": Counter(), "accepted": Counter(), "rejected": Counter(),
             "reformatted": Counter()}
    kept, seen = [], set()
    bar = tqdm(total=len(problems) * k, desc="sampling", unit="completion", disable=not progress, file=sys.stdout)
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        groups = backend.complete([prompt_text(p.prompt, "r1") for p in chunk], k, temperature=temperature,
                                  top_p=top_p, max_tokens=max_new_tokens, seed=seed + start * k)
        for p, texts in zip(chunk, groups):
            bucket = f"{p.kind}/{p.difficulty}"
            for text in texts:
                stats["drawn"][bucket] += 1
                reward = accuracy(text, p)
                if reward != 1.0:
                    stats["rejected"]["wrong"] += 1
                    continue
                stats["correct"][bucket] += 1
                fmt = format_ok(text)
                if reformat and not fmt and (rewritten := to_r1_format(text)) is not None:
                    text = rewritten
                    stats["reformatted"][bucket] += 1
                why = readability(text, max_chars, max_foreign)
                key = dedup_key(p, text)
                why = why or ("duplicate" if key in seen else None)
                if why:
                    stats["rejected"][why] += 1
                    continue
                seen.add(key)
                stats["accepted"][bucket] += 1
                kept.append({"prompt": p.prompt, "completion": text.strip(), "kind": p.kind,
                             "difficulty": p.difficulty, "reward": reward, "format": float(fmt),
                             "uid": getattr(p, "uid", "")})
        bar.update(len(chunk) * k)
        bar.set_postfix(accepted=sum(stats["accepted"].values()))
    bar.close()
    return kept, stats


def to_record(sample: dict, provenance: dict) -> dict:
    """One SFT line: the conversation as `nanoseek sft` reads it, plus the sample's reward and provenance."""
    messages = [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": sample["prompt"]},
                {"role": "assistant", "content": sample["completion"]}]
    return {"messages": messages, "kind": sample["kind"], "difficulty": sample["difficulty"],
            "reward": {"accuracy": sample["reward"], "format": sample["format"]}, "uid": sample["uid"],
            "provenance": provenance}


def report(stats: dict, written: int) -> str:
    lines = [f"{'bucket':<16}{'drawn':>8}{'correct':>9}{'accepted':>10}{'rate':>8}"]
    for bucket in sorted(stats["drawn"]):
        d, c, a = stats["drawn"][bucket], stats["correct"][bucket], stats["accepted"][bucket]
        lines.append(f"{bucket:<16}{d:>8}{c:>9}{a:>10}{100 * a / d:>7.1f}%")
    total = sum(stats["drawn"].values())
    acc = sum(stats["accepted"].values())
    lines.append(f"{'all':<16}{total:>8}{sum(stats['correct'].values()):>9}{acc:>10}"
                 f"{100 * acc / max(total, 1):>7.1f}%")
    why = ", ".join(f"{k} {v}" for k, v in stats["rejected"].most_common()) or "none"
    reformatted = sum(stats.get("reformatted", {}).values())
    lines.append(f"rejected: {why}; {written} written after balancing"
                 + (f"; {reformatted} correct completions rewritten into the R1 template" if reformatted else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nanoseek sample", description=__doc__.split("\n\n")[0])
    add_backend_args(ap)
    ap.add_argument("--prompts", required=True, help="a JSONL file of {prompt, answer}, or 'synthetic'")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="synthetic prompts (default 200), or the first N of the file (default: all)")
    ap.add_argument("--tasks", default=",".join(KINDS), help="synthetic task kinds")
    ap.add_argument("--difficulty", default="1-3", help="synthetic difficulty range")
    ap.add_argument("--n", type=int, default=8, help="K: completions sampled per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-chars", type=int, default=4000, help="readability: longest kept completion")
    ap.add_argument("--reformat", action="store_true",
                    help="rewrite correct completions written as reasoning plus a final 'Answer:' line into the "
                         "R1 template before the readability checks (a cold start from a base that never saw it)")
    ap.add_argument("--max-foreign", type=float, default=0.0,
                    help="readability: largest share of characters outside printable ASCII")
    ap.add_argument("--per-prompt", type=int, default=0, help="at most this many kept per prompt (0: no cap)")
    ap.add_argument("--per-bucket", type=int, default=0, help="at most this many per kind/difficulty (0: no cap)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the SFT JSONL to write")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"--n {args.n}: K must be at least 1 completion per prompt")
    if not 0 < args.temperature or not 0 < args.top_p <= 1:
        raise SystemExit(f"--temperature {args.temperature} / --top-p {args.top_p}: rejection sampling needs "
                         "temperature > 0 and 0 < top_p <= 1 (greedy would give K identical completions)")
    problems = load_prompts(args.prompts, args.num_prompts, args.tasks, args.difficulty, args.seed)
    from nanoseek.pipeline.backend import ckpt_step
    from nanoseek.pipeline.eval_cmd import make_backend

    backend, _ = make_backend(args)
    t = time.time()
    kept, stats = rejection_sample(backend, problems, args.n, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed, max_chars=args.max_chars,
                                   max_foreign=args.max_foreign, reformat=args.reformat,
                                   batch=max(1, args.max_batch_size // args.n))  # prompts per engine call
    chosen = balance(kept, args.per_prompt, args.per_bucket, args.seed)
    path = getattr(backend, "path", None)
    provenance = {"model": backend.name, "step": ckpt_step(path) if path else None,
                  "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for s in chosen:
            f.write(json.dumps(to_record(s, provenance)) + "\n")
    print(report(stats, len(chosen)))
    print(f"wrote {len(chosen)} samples to {out} ({time.time() - t:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
