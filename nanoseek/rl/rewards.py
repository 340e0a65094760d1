"""Rule-based rewards and the prompt sets they score (R1-Zero: no reward model, only rules).

A reward is a pure function `f(response, problem) -> float`:

    accuracy(response, problem)      1.0 if the answer is exactly right (data/tasks verifiers, or exact
                                     integer/fraction matching for a user's JSONL answers), else 0.0
    format_reward(response, problem) 1.0 for `<think> ... </think> <answer> ... </answer>`, each tag once
    OverlongPenalty(L, buffer)       DAPO's soft penalty: 0 up to L - buffer tokens, then linear down to
                                     -1 at L tokens (a response cut at the limit gets -1)

`RewardWeights` combines them with explicit weights, total = sum_k w_k f_k, and keeps each component
so the loop can log them separately. A reward that returns NaN or inf raises (naming the reward).

Prompt sets hand out problems:

    TaskPrompts   the procedural tasks of `data/tasks` (kinds, difficulty range); training draws only
                  the "train" split, evaluation only "heldout", so a held-out problem is never trained on
    JsonlPrompts  a user's file of {"prompt": ..., "answer": ...} lines; answers are integers or
                  fractions ("-3", "1,024", "3/4", "0.75"), matched exactly
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from nanoseek.data.tasks import (
    DIFFICULTY_LIMITS,
    KINDS,
    Problem,
    extract_answer,
    format_ok,
    make_problem,
    r1_prompt,
    sample_problems,
    split_of,
    verify,
)


@dataclass(frozen=True)
class Response:
    """A completion as the rewards see it: its text (stop string included), its length in tokens and
    whether it was cut by max_new_tokens."""

    text: str
    num_tokens: int = 0
    truncated: bool = False


@dataclass(frozen=True)
class UserProblem:
    """A prompt from a user's JSONL file with its exact answer. `kind` and `difficulty` group the
    evaluation tables ("jsonl" and 0 unless the file gives them)."""

    prompt: str
    answer: str
    kind: str = "jsonl"
    difficulty: int = 0
    uid: str = ""


AnyProblem = Problem | UserProblem
Reward = Callable[[Response | str, AnyProblem], float]


def _text(response: Response | str) -> str:
    return response if isinstance(response, str) else response.text


# ---------------------------------------------------------------------------- answers
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*[-+]?\d+)?")


def parse_number(text: str) -> Fraction | None:
    """An integer, decimal or fraction written alone ("-12", "1,024", "0.75", "3/4", "3 / 4") as an exact
    Fraction; None for anything else (words, expressions, a zero denominator)."""
    text = text.strip().rstrip(".").strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, expected: str) -> bool:
    """Exact match of two numeric answers (integer/decimal/fraction); text answers compare verbatim after
    stripping whitespace."""
    a, b = parse_number(predicted), parse_number(expected)
    if b is None:
        return predicted.strip() == expected.strip()
    return a is not None and a == b


# ---------------------------------------------------------------------------- rewards
def accuracy(response: Response | str, problem: AnyProblem) -> float:
    """1.0 when the final answer (last <answer>...</answer>, else last "Answer:" line) is exactly right."""
    text = _text(response)
    if isinstance(problem, Problem):
        return float(verify(problem, text))
    answer = extract_answer(text)
    return float(answer is not None and answers_match(answer, problem.answer))


def format_reward(response: Response | str, problem: AnyProblem) -> float:
    """1.0 for exactly `<think> ... </think> <answer> ... </answer>`, each tag once, a non-empty answer."""
    return float(format_ok(_text(response)))


@dataclass(frozen=True)
class OverlongPenalty:
    """DAPO's soft overlong punishment over response length n (tokens), limit L, buffer c:
    0 for n <= L - c; ((L - c) - n) / c for L - c < n <= L; -1 beyond L or when cut by the limit."""

    max_tokens: int
    buffer: int

    def __post_init__(self) -> None:
        if not 0 < self.buffer <= self.max_tokens:
            raise ValueError(f"overlong buffer={self.buffer} must lie in [1, max_new_tokens={self.max_tokens}]; "
                             "lower --reward.overlong_buffer")

    def __call__(self, response: Response | str, problem: AnyProblem) -> float:
        if isinstance(response, str):
            raise ValueError("the overlong penalty needs the response length: pass a Response, not a str")
        if response.truncated or response.num_tokens > self.max_tokens:
            return -1.0
        return min(0.0, ((self.max_tokens - self.buffer) - response.num_tokens) / self.buffer)


@dataclass
class RewardWeights:
    """total = sum_k weight_k * reward_k over the components with a non-zero weight."""

    accuracy: float = 1.0
    format: float = 0.1
    overlong: float = 0.0
    overlong_buffer: int = 64
    extra: dict[str, tuple[float, Reward]] = field(default_factory=dict)  # name -> (weight, f), e.g. math-verify

    def components(self, max_new_tokens: int) -> dict[str, tuple[float, Reward]]:
        parts: dict[str, tuple[float, Reward]] = {"accuracy": (self.accuracy, accuracy),
                                                  "format": (self.format, format_reward)}
        if self.overlong:
            parts["overlong"] = (self.overlong, OverlongPenalty(max_new_tokens, min(self.overlong_buffer,
                                                                                    max_new_tokens)))
        return parts | self.extra

    def score(self, response: Response, problem: AnyProblem, max_new_tokens: int) -> tuple[float, dict[str, float]]:
        """(total, {component: unweighted value}). Components of weight 0 are still computed and logged
        (accuracy and format rates), but add nothing."""
        values, total = {}, 0.0
        for name, (weight, f) in self.components(max_new_tokens).items():
            v = float(f(response, problem))
            if not math.isfinite(v):
                raise ValueError(f"reward {name!r} returned {v} for a completion of problem "
                                 f"{getattr(problem, 'uid', '') or problem.prompt[:60]!r}; a reward must be a finite "
                                 "number: fix the reward function (NaN would poison every advantage of its group)")
            values[name] = v
            total += weight * v
        return total, values


# ---------------------------------------------------------------------------- reflection markers
REFLECTION_MARKERS = {
    "wait": re.compile(r"\bwait\b", re.I),
    "check": re.compile(r"\b(?:check|verify|verif(?:y|ied|ication))\b", re.I),
    "retry": re.compile(r"\b(?:re-?try|try again|another way|instead)\b", re.I),
    "backtrack": re.compile(r"\bbacktrack|\bnot \d+\b|\bdead end\b", re.I),
}


def reflection_markers(text: str) -> dict[str, int]:
    """Occurrences of each reflection marker (R1's Extended Data Fig. 1 counts such words)."""
    return {name: len(p.findall(text)) for name, p in REFLECTION_MARKERS.items()}


# ---------------------------------------------------------------------------- prompt sets
def prompt_text(question: str, template: str) -> str:
    """The model's input for a question: the R1-Zero template ("r1") or the question as given ("raw")."""
    if template == "r1":
        return r1_prompt(question)
    if template == "raw":
        return question
    raise ValueError(f"prompt template {template!r} is unknown; use 'r1' or 'raw'")


@dataclass
class TaskPrompts:
    """Procedural problems of `kinds`, difficulty in [lo, hi] intersected with each kind's limits.

    `train_batch(step, n, weights)` is deterministic in (seed, step, draw), draws only the "train" split and,
    given `weights` {(kind, difficulty): w}, draws those cells in proportion (the curriculum). `heldout(n)`
    is a fixed set of distinct held-out problems.
    """

    kinds: Sequence[str] = KINDS
    difficulty: tuple[int, int] = (1, 3)
    seed: int = 0

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"task kinds {bad or '(none)'} are unknown; choose from {KINDS}")
        self.cells = [(k, d) for k in self.kinds
                      for d in range(max(self.difficulty[0], DIFFICULTY_LIMITS[k][0]),
                                     min(self.difficulty[1], DIFFICULTY_LIMITS[k][1]) + 1)]
        missing = [k for k in self.kinds if not any(c[0] == k for c in self.cells)]
        if missing:
            raise ValueError(f"difficulty range {self.difficulty} leaves no difficulty for {missing} "
                             f"(limits {[DIFFICULTY_LIMITS[k] for k in missing]}); widen it or drop those kinds")

    def train_batch(self, step: int, n: int, weights: dict[tuple[str, int], float] | None = None,
                    draw: int = 0) -> list[Problem]:
        rng = random.Random(f"rl-prompts-{self.seed}-{step}-{draw}")
        cells = self.cells
        # uniform kind, then uniform difficulty within the kind (as the pretraining corpus draws)
        w = [1.0 / sum(c[0] == k for c in cells) for k, _ in cells]
        if weights:
            w = [wi * max(weights.get(c, 1.0), 1e-3) for wi, c in zip(w, cells)]
        out = []
        while len(out) < n:
            kind, difficulty = rng.choices(cells, weights=w)[0]
            problem = make_problem(kind, rng, difficulty)
            if split_of(problem) == "train":
                out.append(problem)
        return out

    def heldout(self, n: int, seed: int = 12345) -> list[Problem]:
        return sample_problems(n, self.seed + seed, self.kinds, self.difficulty, split="heldout", unique=True)


@dataclass
class JsonlPrompts:
    """A user's prompts: one JSON object per line with "prompt" and "answer" (optional "kind",
    "difficulty"). Training cycles through the file in a seeded order."""

    path: str
    seed: int = 0
    problems: list[UserProblem] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.problems = load_jsonl_prompts(self.path)
        self.cells = sorted({(p.kind, p.difficulty) for p in self.problems})

    def train_batch(self, step: int, n: int, weights: dict | None = None, draw: int = 0) -> list[UserProblem]:
        rng = random.Random(f"rl-jsonl-{self.seed}-{step}-{draw}")
        return [self.problems[rng.randrange(len(self.problems))] for _ in range(n)]

    def heldout(self, n: int, seed: int = 0) -> list[UserProblem]:
        return self.problems[:n]


def load_jsonl_prompts(path: str | Path) -> list[UserProblem]:
    """Read {"prompt", "answer"} lines; a missing or empty field raises naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist; give a .jsonl file with 'prompt' and 'answer' fields")
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no} is not valid JSON ({e.msg}); fix or remove it") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {line_no} is a {type(record).__name__}, not an object with "
                                 "'prompt' and 'answer' fields")
            for name in ("prompt", "answer"):
                value = record.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ValueError(f"{path} line {line_no} has no {name!r} field (it has {sorted(record)}); "
                                     "every line needs a non-empty 'prompt' and 'answer'")
            if not isinstance(record["prompt"], str):
                raise ValueError(f"{path} line {line_no}: 'prompt' must be text, not {type(record['prompt']).__name__}")
            answer = str(record["answer"])
            out.append(UserProblem(record["prompt"], answer, str(record.get("kind", "jsonl")),
                                   int(record.get("difficulty", 0)), uid=f"{path.name}:{line_no}"))
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts; add lines like "
                         '{"prompt": "What is 2 + 3?", "answer": "5"}')
    return out


def math_verify_reward() -> Reward:
    """An optional accuracy for free-form math answers through the `math-verify` package."""
    try:
        from math_verify import parse
        from math_verify import verify as mv_verify
    except ImportError:
        raise ValueError("the math-verify reward needs the `math-verify` package: pip install math-verify, "
                         "or keep the exact integer/fraction accuracy") from None

    def reward(response: Response | str, problem: AnyProblem) -> float:
        answer = extract_answer(_text(response))
        if answer is None:
            return 0.0
        return float(bool(mv_verify(parse(str(problem.answer)), parse(answer))))

    return reward
