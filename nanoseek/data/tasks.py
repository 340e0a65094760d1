"""Procedural, verifiable reasoning tasks: multi-digit arithmetic and Countdown.

A problem is made from a `random.Random` instance (so a seed fixes it) and its answer is
checked by an exact rule, never by a model and never by `eval`:

    problem = make_problem("countdown", random.Random(0), difficulty=4)
    completion = render(problem, "r1", random.Random(1))  # '<think>\\n...\\n</think> <answer> ... </answer>'
    verify(problem, completion)                           # True

Kinds, and what `difficulty` counts:
    add, sub, mul   digits of each operand; worked column addition/subtraction with carries and
                    borrows, long multiplication by partial products
    countdown       numbers given (3-6); reach the target with + - * /, each number at most once,
                    whole-number intermediate results; the worked solution is a search trace
                    (tries, dead ends, backtracking, a final check) driven by an exact DFS solver

Styles of a rendered completion:
    r1           "<think>\\n{trace}\\n</think> <answer> {answer} </answer>"
    plain        "{trace}\\nAnswer: {answer}"
    answer_only  "Answer: {answer}"

Split: a problem is "heldout" when a hash of its uid falls in a fixed 5% bucket, else "train".
The uid depends only on the content (kind, numbers, target), so a held-out problem stays held
out whatever prompt wording or seed produced it.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

KINDS = ("add", "sub", "mul", "countdown")
STYLES = ("r1", "plain", "answer_only")
SPLITS = ("train", "heldout", "all")
DIFFICULTY_LIMITS = {"add": (1, 20), "sub": (1, 20), "mul": (1, 12), "countdown": (3, 6)}
HELDOUT_PER_10K = 500  # 5% of uids are held out

R1_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def r1_prompt(question: str) -> str:
    """The R1-Zero prompt for one question; the completion follows after one space.

    The tokenizer's chat template renders exactly this for a single user message.
    """
    return f"{R1_SYSTEM}\nUser: {question}\nAssistant:"


@dataclass(frozen=True)
class Problem:
    """One task instance. `numbers` are the operands (arithmetic) or the numbers given
    (countdown); `target` is the exact result (arithmetic) or the number to reach (countdown);
    `answer` is one correct answer text (countdown has many, any one the verifier accepts)."""

    kind: str
    prompt: str
    numbers: tuple[int, ...]
    target: int
    answer: str
    difficulty: int
    uid: str = field(init=False)

    def __post_init__(self) -> None:
        # Order does not matter for commutative kinds: 3+5 and 5+3 are the same problem.
        nums = self.numbers if self.kind == "sub" else tuple(sorted(self.numbers))
        digest = hashlib.sha256(f"{self.kind}|{nums}|{self.target}".encode()).hexdigest()
        object.__setattr__(self, "uid", f"{self.kind}-{digest[:16]}")


def split_of(problem: Problem) -> str:
    """ "heldout" if the uid hashes into the fixed 5% bucket, else "train"."""
    bucket = int(hashlib.sha256(f"nanoseek-split|{problem.uid}".encode()).hexdigest()[:8], 16) % 10_000
    return "heldout" if bucket < HELDOUT_PER_10K else "train"


# ----------------------------------------------------------------------------- arithmetic

_ARITH_PROMPTS = {
    "add": ("What is {a} plus {b}?", "Compute the sum of {a} and {b}.", "Add {a} and {b}."),
    "sub": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute the difference of {a} and {b}."),
    "mul": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute the product of {a} and {b}."),
}
_ARITH_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}


def _digits(n: int) -> list[int]:
    """Decimal digits, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_steps(a: int, b: int) -> list[str]:
    lines = [f"Add {a} and {b} column by column from the right, carrying the tens."]
    da, db, carry = _digits(a), _digits(b), 0
    for k in range(max(len(da), len(db))):
        x, y = (da[k] if k < len(da) else 0), (db[k] if k < len(db) else 0)
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = s // 10
        lines.append(f"column {k + 1}: {terms} = {s}, write {s % 10}" + (f", carry {carry}" if carry else ""))
    if carry:
        lines.append(f"last carry: write {carry}")
    lines.append(f"So {a} + {b} = {a + b}.")
    return lines


def _sub_steps(a: int, b: int) -> list[str]:
    lines = [f"Subtract {b} from {a} column by column from the right, borrowing when needed."]
    da, db, borrow = _digits(a), _digits(b), 0
    for k in range(len(da)):
        x, y = da[k], (db[k] if k < len(db) else 0)
        d = x - borrow - y
        terms = f"{x} - {borrow} - {y}" if borrow else f"{x} - {y}"
        borrow = int(d < 0)
        tail = f", borrow 10: {d + 10}, write {d + 10}" if borrow else f", write {d}"
        lines.append(f"column {k + 1}: {terms} = {d}{tail}")
    lines.append(f"So {a} - {b} = {a - b}.")
    return lines


def _mul_steps(a: int, b: int) -> list[str]:
    lines = [f"Multiply {a} by each digit of {b} at its place value, then add the partial products."]
    partials = []
    for k, y in enumerate(_digits(b)):
        lines.append(f"{a} * {y * 10**k} = {a * y * 10**k}")
        if y:
            partials.append(a * y * 10**k)
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    lines.append(f"So {a} * {b} = {a * b}.")
    return lines


def _make_arithmetic(kind: str, rng: random.Random, digits: int) -> Problem:
    a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
    if kind == "sub" and a < b:
        a, b = b, a  # keep results non-negative: the column method below assumes a >= b
    prompt = rng.choice(_ARITH_PROMPTS[kind]).format(a=a, b=b)
    result = _ARITH_OPS[kind](a, b)
    return Problem(kind, prompt, (a, b), result, str(result), digits)


# ----------------------------------------------------------------------------- countdown
# An item is (value, expression text, top operator or "" for a given number). A move combines
# two items into one; only positive whole results are produced, and no-op moves (* 1, / 1) are
# skipped: they never help reach a target.

Item = tuple[int, str, str]
Move = tuple[Item, str, Item, Item]  # (left, op, right, result)

_LARGE = (25, 50, 75, 100)
_COUNTDOWN_RULES = (
    " Use +, -, * and /, each number at most once, and every intermediate result must be a whole "
    "number. Give the answer as one expression."
)
_COUNTDOWN_PROMPTS = (
    "Using the numbers {nums}, make {target}.",
    "Combine the numbers {nums} to reach exactly {target}.",
    "Reach the target {target} from the numbers {nums}.",
)


def _join(a: Item, op: str, b: Item) -> str:
    """Expression text for a op b with just the parentheses needed to keep its value and its
    whole-number intermediates when re-parsed left to right."""
    left = f"({a[1]})" if op in "*/" and a[2] in ("+", "-") else a[1]
    right_needs = {"+": (), "-": ("+", "-"), "*": ("+", "-", "/"), "/": ("+", "-", "*", "/")}[op]
    right = f"({b[1]})" if b[2] in right_needs else b[1]
    return f"{left} {op} {right}"


def _moves_of(a: Item, b: Item) -> list[Move]:
    """Useful legal moves on two items, larger operand on the left."""
    if a[0] < b[0]:
        a, b = b, a
    x, y = a[0], b[0]
    results = [("+", x + y)]
    if x > y:
        results.append(("-", x - y))
    if y > 1:
        results.append(("*", x * y))
        if x % y == 0:
            results.append(("/", x // y))
    return [(a, op, b, (v, _join(a, op, b), op)) for op, v in results]


def _all_moves(items: list[Item]) -> list[Move]:
    return [
        m for i in range(len(items)) for j in range(i + 1, len(items)) for m in _moves_of(items[i], items[j])
    ]


def _apply(items: list[Item], move: Move) -> list[Item]:
    rest = list(items)
    rest.remove(move[0])
    rest.remove(move[2])
    return rest + [move[3]]


def _dfs(
    items: list[Item], target: int, rng: random.Random | None, dead: set[tuple[int, ...]]
) -> list[Move] | None:
    """Exact depth-first search: moves that reach `target` from `items`, or None if no subset can.

    `dead` collects value multisets proven hopeless (reachability depends on values only), which
    keeps the search small; share it between calls for the same target.
    """
    if any(v == target for v, _, _ in items):
        return []
    key = tuple(sorted(v for v, _, _ in items))
    if len(items) < 2 or key in dead:
        return None
    moves = _all_moves(items)
    if rng is not None:
        rng.shuffle(moves)
    for move in moves:
        path = _dfs(_apply(items, move), target, rng, dead)
        if path is not None:
            return [move, *path]
    dead.add(key)
    return None


def solve_countdown(
    numbers: tuple[int, ...] | list[int], target: int, rng: random.Random | None = None
) -> str | None:
    """An expression over `numbers` (each at most once) equal to `target`, or None if none exists.
    With an `rng` the search order is shuffled, so different seeds find different solutions."""
    items = [(n, str(n), "") for n in numbers]
    path = _dfs(items, target, rng, set())
    if path is None:
        return None
    return path[-1][3][1] if path else str(target)


def _make_countdown(rng: random.Random, count: int) -> Problem:
    """Draw numbers, then build the target from a random expression over most of them, so the
    problem is solvable by construction."""
    while True:
        numbers = [rng.choice(_LARGE) if rng.random() < 0.2 else rng.randint(1, 25) for _ in range(count)]
        items: list[Item] = [(n, str(n), "") for n in numbers]
        rng.shuffle(items)
        items = items[: rng.randint(count - 1, count)]
        while len(items) > 1:
            a, b = rng.sample(items, 2)
            items = _apply(items, rng.choice(_moves_of(a, b)))
        target, expr, _ = items[0]
        if 10 <= target <= 999 and target not in numbers:
            break
    nums = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
    prompt = rng.choice(_COUNTDOWN_PROMPTS).format(nums=nums, target=target) + _COUNTDOWN_RULES
    return Problem("countdown", prompt, tuple(numbers), target, expr, count)


def _listing(items: list[Item]) -> str:
    return ", ".join(str(v) for v in sorted((v for v, _, _ in items), reverse=True))


def _dead_end(items: list[Item], move: Move, target: int, rng: random.Random) -> list[str]:
    """Lines for one failed try: the move, then greedy moves (closest to the target) until one
    number is left, which is not the target; then back to where the try started."""
    start, lines = items, []
    while True:
        items = _apply(items, move)
        a, op, b, c = move
        if len(items) == 1:
            return lines + [f"{a[0]} {op} {b[0]} = {c[0]}, not {target}, backtrack to {_listing(start)}"]
        lines.append(f"{a[0]} {op} {b[0]} = {c[0]}, left: {_listing(items)}")
        moves = _all_moves(items)
        rng.shuffle(moves)
        move = min(moves, key=lambda m: abs(m[3][0] - target))


def _countdown_trace(problem: Problem, rng: random.Random) -> tuple[list[str], str]:
    """Search trace: follow a solution the exact solver finds (in a shuffled order); near the
    leaves, first show a try the solver proved hopeless, ending in "not T, backtrack"."""
    target, dead = problem.target, set()
    items: list[Item] = [(n, str(n), "") for n in problem.numbers]
    path = _dfs(items, target, rng, dead)
    assert path, "countdown problems are built solvable and their target is not a given number"
    lines = [f"Numbers: {_listing(items)}. Target: {target}."]
    for move in path:
        # Dead ends are proven (by exhaustive search) only where few numbers remain: cheap, short.
        if len(items) <= 4 and rng.random() < 0.6:
            tries = _all_moves(items)  # the solution's move is never hopeless, so it is never picked
            rng.shuffle(tries)
            for m in tries:
                if _dfs(_apply(items, m), target, None, dead) is None:
                    lines += _dead_end(items, m, target, rng)
                    break
        items = _apply(items, move)
        a, op, b, c = move
        lines.append(
            f"{a[0]} {op} {b[0]} = {c[0]}"
            + (", reached the target" if c[0] == target else f", left: {_listing(items)}")
        )
    answer = path[-1][3][1]
    value, used = parse_expression(answer)
    assert value == target and not Counter(used) - Counter(problem.numbers)
    lines.append(
        f"Check: {answer} = {target}, using {', '.join(map(str, used))}, each at most once. Correct."
    )
    return lines, answer


# ----------------------------------------------------------------------------- problems and rendering


def make_problem(kind: str, rng: random.Random, difficulty: int) -> Problem:
    """One problem of `kind`; `difficulty` is the digits per operand (arithmetic) or the count of
    numbers (countdown), within DIFFICULTY_LIMITS."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {KINDS}")
    lo, hi = DIFFICULTY_LIMITS[kind]
    if not lo <= difficulty <= hi:
        raise ValueError(f"difficulty {difficulty} is out of range for {kind!r}; use {lo}..{hi}")
    return (
        _make_countdown(rng, difficulty) if kind == "countdown" else _make_arithmetic(kind, rng, difficulty)
    )


def sample_problems(
    n: int,
    seed: int,
    kinds: tuple[str, ...] | list[str] = KINDS,
    difficulty_range: tuple[int, int] = (1, 4),
    split: str = "train",
    unique: bool = False,
) -> list[Problem]:
    """`n` problems of the given split ("train", "heldout" or "all"), deterministic by seed.

    Each problem draws a kind uniformly and a difficulty uniformly from `difficulty_range`
    intersected with that kind's DIFFICULTY_LIMITS (e.g. (1, 4) gives countdown 3-4 numbers).
    Problems of the other split are drawn and skipped, so "train" never holds a held-out one.
    unique=True also skips repeats (same uid), as an evaluation set wants; small difficulties
    hold few distinct problems (1-digit addition: 45), so repeats are allowed by default.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if not kinds:
        raise ValueError("kinds is empty; pass at least one of " + str(KINDS))
    ranges = {}
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; choose one of {KINDS}")
        lo, hi = (
            max(difficulty_range[0], DIFFICULTY_LIMITS[kind][0]),
            min(difficulty_range[1], DIFFICULTY_LIMITS[kind][1]),
        )
        if lo > hi:
            raise ValueError(
                f"difficulty_range {difficulty_range} leaves no valid difficulty for {kind!r} "
                f"(valid: {DIFFICULTY_LIMITS[kind]}); widen the range or drop {kind!r} from kinds"
            )
        ranges[kind] = (lo, hi)
    rng, out, seen, max_draws = random.Random(seed), [], set(), 200 * n + 10_000
    for _ in range(max_draws):
        if len(out) == n:
            return out
        kind = rng.choice(list(kinds))
        problem = make_problem(kind, rng, rng.randint(*ranges[kind]))
        if (split == "all" or split_of(problem) == split) and not (unique and problem.uid in seen):
            out.append(problem)
            seen.add(problem.uid)
    if len(out) == n:
        return out
    what = "distinct " if unique else ""
    raise ValueError(
        f"found only {len(out)} of {n} {what}{split!r} problems in {max_draws} draws for kinds "
        f"{tuple(kinds)} and difficulty_range {difficulty_range}; widen the range or ask for fewer problems"
    )


def render(problem: Problem, style: str, rng: random.Random) -> str:
    """A correct completion for `problem` in `style` ("r1", "plain" or "answer_only").
    `rng` varies the countdown search trace (search order, which dead ends are shown)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    if style == "answer_only":
        return f"Answer: {problem.answer}"
    if problem.kind == "countdown":
        lines, answer = _countdown_trace(problem, rng)
    else:
        a, b = problem.numbers
        lines = {"add": _add_steps, "sub": _sub_steps, "mul": _mul_steps}[problem.kind](a, b)
        answer = problem.answer
    trace = "\n".join(lines)
    if style == "r1":
        return f"<think>\n{trace}\n</think> <answer> {answer} </answer>"
    return f"{trace}\nAnswer: {answer}"


# ----------------------------------------------------------------------------- verifiers

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_LINE = re.compile(r"^\s*Answer:\s*(.*?)\s*$", re.M)
_INTEGER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_R1_SHAPE = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.S)


def extract_answer(completion: str) -> str | None:
    """The answer text: the last <answer>...</answer> if any, else the last "Answer: ..." line."""
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    lines = _ANSWER_LINE.findall(completion)
    return lines[-1] if lines else None


def format_ok(completion: str) -> bool:
    """True for exactly `<think> ... </think> <answer> ... </answer>` (whitespace around is fine),
    each tag once and a non-empty answer."""
    m = _R1_SHAPE.fullmatch(completion)
    return m is not None and m[2].strip() != "" and not any(t in m[1] + m[2] for t in TAGS)


class _ExpressionParser:
    """Recursive descent over   expr := term (('+'|'-') term)*
                                term := factor (('*'|'/') factor)*
                                factor := NUMBER | '(' expr ')'
    evaluated exactly with Fraction; collects the numbers used."""

    def __init__(self, text: str):
        self.tokens = re.findall(r"\d+|\S", text)
        self.pos = 0
        self.used: list[int] = []

    def parse(self) -> Fraction:
        value = self.expr()
        if self.pos != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.pos]!r}")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ValueError("expression ends early")
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value *= self.factor()
                continue
            divisor = self.factor()
            if divisor == 0:
                raise ValueError("division by zero")
            value /= divisor
            if value.denominator != 1:
                raise ValueError("intermediate result is not a whole number")
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.expr()
            if self.take() != ")":
                raise ValueError("missing ')'")
            return value
        if not token.isdigit():
            raise ValueError(f"unexpected {token!r}")
        self.used.append(int(token))
        return Fraction(int(token))


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression over whole numbers with + - * / and parentheses,
    and the numbers it uses. Raises ValueError for anything else, division by zero, or a
    non-whole intermediate result. No eval: only these tokens are understood."""
    if len(text) > 256:
        raise ValueError("expression longer than 256 characters")
    parser = _ExpressionParser(text)
    return parser.parse(), parser.used


def verify(problem: Problem, completion: str) -> bool:
    """Exact check of the completion's answer (see `extract_answer`).
    Arithmetic: the integer equals the result. Countdown: the expression (an optional "= N"
    suffix is ignored) uses only the given numbers, each at most once, and equals the target."""
    answer = extract_answer(completion)
    if not answer:
        return False
    if problem.kind != "countdown":
        answer = answer.rstrip(".").strip()
        return _INTEGER.fullmatch(answer) is not None and int(answer.replace(",", "")) == problem.target
    try:
        value, used = parse_expression(answer.split("=")[0])
    except ValueError:
        return False
    return value == problem.target and not Counter(used) - Counter(problem.numbers)
