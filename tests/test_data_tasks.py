"""Procedural tasks, verifiers, split and corpora (nanoseek.data.tasks / corpus)."""

import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.data.corpus import format_document, load_user_texts, synthetic_corpus
from nanoseek.data.tasks import (
    DIFFICULTY_LIMITS,
    KINDS,
    STYLES,
    Problem,
    format_ok,
    make_problem,
    parse_expression,
    r1_prompt,
    render,
    sample_problems,
    solve_countdown,
    split_of,
    verify,
)


def countdown(numbers, target):
    return Problem("countdown", "make it", tuple(numbers), target, "", len(numbers))


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_solutions_verify(kind):
    lo, hi = DIFFICULTY_LIMITS[kind]
    for seed in range(30):
        rng = random.Random(seed)
        problem = make_problem(kind, rng, lo + seed % (min(hi, lo + 3) - lo + 1))
        for style in STYLES:
            completion = render(problem, style, rng)
            assert verify(problem, completion), (problem, style, completion)
            assert format_ok(completion) == (style == "r1")


def test_arithmetic_worked_solutions():
    add = Problem("add", "", (4738, 2596), 7334, "7334", 4)
    text = render(add, "plain", random.Random(0))
    assert "column 1: 8 + 6 = 14, write 4, carry 1" in text and text.endswith("Answer: 7334")
    sub = Problem("sub", "", (706, 343), 363, "363", 3)
    assert "column 2: 0 - 4 = -4, borrow 10: 6, write 6" in render(sub, "plain", random.Random(0))
    mul = Problem("mul", "", (343, 706), 242158, "242158", 3)
    assert "343 * 700 = 240100\n2058 + 240100 = 242158" in render(mul, "r1", random.Random(0))


def test_arithmetic_verifier_is_exact():
    p = Problem("mul", "", (343, 706), 242158, "242158", 3)
    assert verify(p, "<think> x </think> <answer> 242158 </answer>")
    assert verify(p, "blah\nAnswer: 242,158.")
    for wrong in (
        "<answer> 242159 </answer>",
        "Answer: 242158.5",
        "Answer: 24215 8",
        "Answer: 2,42158",
        "no answer",
    ):
        assert not verify(p, wrong), wrong
    # The tagged answer wins over an "Answer:" line, and the last one of each counts.
    assert not verify(p, "Answer: 242158\n<answer>1</answer>")
    assert verify(p, "Answer: 1\nAnswer: 242158")


def test_countdown_verifier_rules():
    p = countdown((25, 5, 3, 7), 60)
    assert verify(p, "<answer> (25 - 5) * 3 </answer>")
    assert verify(p, "Answer: (25 - 5) * 3 = 60")
    bad = {
        "wrong value": "(25 - 5) * 7",
        "number not given": "(25 - 5) * 3 + 0",
        "number used twice": "25 + 25 + 5 + 5",
        "non-whole intermediate": "7 / 3 * 25 + 5",
        "division by zero": "25 / (5 - 5)",
        "unary minus": "-25 + 5 * 3 * 7",
        "not arithmetic": "__import__('os').system('true')",
        "unbalanced": "(25 - 5 * 3",
        "empty": "",
    }
    for why, answer in bad.items():
        assert not verify(p, f"<answer>{answer}</answer>"), why
    deep = "(" * 200 + "25" + ")" * 200
    assert not verify(p, f"<answer>{deep}</answer>")  # refused as too long, no recursion blow-up


def test_parse_expression():
    assert parse_expression("100 - (7 - 2) * 3") == (85, [100, 7, 2, 3])
    assert parse_expression("8/4/2") == (1, [8, 4, 2])
    with pytest.raises(ValueError, match="whole"):
        parse_expression("7 / 2 * 2")


def test_format_ok():
    assert format_ok("<think>\nsteps\n</think> <answer> 5 </answer>")
    assert format_ok("  <think></think><answer>5</answer>\n")
    for bad in (
        "<answer> 5 </answer>",
        "<think> a </think> <answer> </answer>",
        "<think> a </think> <answer> 5 </answer> trailing",
        "<think> <think> a </think> <answer> 5 </answer>",
        "<think> a </think> <answer> 5 <answer> 6 </answer>",
        "<answer> 5 </answer> <think> a </think>",
    ):
        assert not format_ok(bad), bad


def test_countdown_traces_search_and_backtrack():
    backtracks = 0
    for seed in range(40):
        rng = random.Random(seed)
        p = make_problem("countdown", rng, 3 + seed % 4)
        assert len(p.numbers) == p.difficulty and p.target not in p.numbers
        assert verify(p, f"Answer: {p.answer}")  # the construction itself is a solution
        text = render(p, "r1", rng)
        lines = text.split("\n")
        assert (
            lines[1].startswith("Numbers:")
            and lines[-2].startswith("Check:")
            and "reached the target" in text
        )
        backtracks += "backtrack" in text
    assert backtracks > 20


def test_dead_ends_are_real():
    """Replay traces: each branch abandoned with "backtrack to L" starts at state L with a move
    after which the exact solver proves the target unreachable."""
    rng, checked = random.Random(7), 0
    for i in range(30):
        p = make_problem("countdown", rng, 4 + i % 3)
        states = []  # sorted values after each line of the trace
        for line in render(p, "plain", rng).split("\n"):
            if line.startswith("Numbers:"):
                states.append(sorted(map(int, line[len("Numbers: ") : line.index(".")].split(", "))))
            elif ", left: " in line:
                states.append(sorted(map(int, line.split(", left: ")[1].split(", "))))
            elif "backtrack to " in line:
                node = sorted(map(int, line.split("backtrack to ")[1].split(", ")))
                start = max(k for k, s in enumerate(states) if s == node)
                leaf = int(line.split(" = ")[1].split(",")[0])
                child = states[start + 1] if start + 1 < len(states) else [leaf]
                assert solve_countdown(child, p.target) is None, (p, line)
                states.append(node)
                checked += 1
    assert checked > 10


def test_solver():
    for numbers, target in [((25, 5, 3, 7), 60), ((100, 75, 50, 25, 6, 3), 952), ((2, 3), 6)]:
        expr = solve_countdown(numbers, target)
        assert verify(countdown(numbers, target), f"Answer: {expr}"), expr
    assert solve_countdown((1, 1, 1), 1000) is None
    assert solve_countdown((2, 3, 4), 3) == "3"


def test_determinism_by_seed():
    a = sample_problems(50, seed=3, split="all")
    assert a == sample_problems(50, seed=3, split="all")
    assert a != sample_problems(50, seed=4, split="all")
    p = next(x for x in a if x.kind == "countdown")
    assert render(p, "r1", random.Random(1)) == render(p, "r1", random.Random(1))
    assert synthetic_corpus(40, seed=5) == synthetic_corpus(40, seed=5)
    assert synthetic_corpus(40, seed=5) != synthetic_corpus(40, seed=6)


def test_uid_is_content_derived():
    a = Problem("add", "What is 3 plus 5?", (3, 5), 8, "8", 1)
    assert a.uid == Problem("add", "Add 5 and 3.", (5, 3), 8, "8", 1).uid
    assert a.uid != Problem("mul", "", (3, 5), 15, "15", 1).uid
    assert Problem("sub", "", (5, 3), 2, "2", 1).uid != Problem("sub", "", (3, 5), -2, "-2", 1).uid


def test_heldout_split_is_disjoint():
    everything = sample_problems(4000, seed=0, split="all", difficulty_range=(2, 5))
    share = sum(split_of(p) == "heldout" for p in everything) / len(everything)
    assert 0.03 < share < 0.07
    train = sample_problems(2000, seed=1, split="train", difficulty_range=(2, 5))
    heldout = sample_problems(100, seed=1, split="heldout", difficulty_range=(2, 5))
    assert {split_of(p) for p in train} == {"train"} and {split_of(p) for p in heldout} == {"heldout"}
    assert not {p.uid for p in train} & {p.uid for p in heldout}
    # The training corpus is built only from training problems: no held-out question appears in it.
    corpus = "\n".join(synthetic_corpus(1000, seed=1, difficulty=(2, 5)))
    assert not [p for p in heldout if f": {p.prompt}\n" in corpus]


def test_sample_problems_errors():
    with pytest.raises(ValueError, match="countdown"):
        sample_problems(5, 0, difficulty_range=(1, 2))
    with pytest.raises(ValueError, match="unknown split"):
        sample_problems(5, 0, split="test")
    with pytest.raises(ValueError, match="widen"):
        sample_problems(50, 0, kinds=("add",), difficulty_range=(1, 1), split="heldout", unique=True)
    with pytest.raises(ValueError, match="out of range"):
        make_problem("countdown", random.Random(0), 7)
    evaluation = sample_problems(100, 0, difficulty_range=(3, 3), split="heldout", unique=True)
    assert len({p.uid for p in evaluation}) == 100
    assert {p.difficulty for p in sample_problems(60, 0, kinds=("countdown",), difficulty_range=(1, 4))} == {
        3,
        4,
    }


def test_corpus_styles_and_documents():
    docs = synthetic_corpus(400, seed=0, r1_share=0.5, answer_only_share=0.25)
    counts = Counter(
        "r1" if d.startswith(r1_prompt("")[:20]) else "answer_only" if d.count("\n") == 1 else "plain"
        for d in docs
    )
    assert 150 < counts["r1"] < 250 and 60 < counts["answer_only"] < 140 and counts["plain"] > 50
    p = make_problem("add", random.Random(0), 2)
    doc = format_document(p, "r1", random.Random(0))
    prompt = r1_prompt(p.prompt)
    assert doc.startswith(prompt + " <think>") and verify(p, doc[len(prompt) :])
    with pytest.raises(ValueError, match="sum to at most 1"):
        synthetic_corpus(10, 0, r1_share=0.9, answer_only_share=0.2)


def test_load_user_texts(tmp_path):
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# second")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["fifth", None, "  "]}), tmp_path / "d.parquet")
    assert load_user_texts(tmp_path / "a.txt") == ["first doc"]
    assert load_user_texts(tmp_path / "c.jsonl") == ["third", "fourth"]
    assert load_user_texts(tmp_path / "d.parquet") == ["fifth"]
    assert load_user_texts(tmp_path) == ["first doc", "third", "fourth", "fifth", "# second"]

    with pytest.raises(ValueError, match="does not exist"):
        load_user_texts(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text(" \n")
    with pytest.raises(ValueError, match="no text found"):
        load_user_texts(tmp_path / "empty")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no field 'text'.*text_field="):
        load_user_texts(tmp_path / "bad.jsonl")
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="line 1: field 'text' holds int"):
        load_user_texts(tmp_path / "num.jsonl")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"no column 'text'.*body"):
        load_user_texts(tmp_path / "bad.parquet")
    assert load_user_texts(tmp_path / "bad.parquet", text_field="body") == ["x"]
    with pytest.raises(ValueError, match="holds int64, not text"):
        pq.write_table(pa.table({"text": [1]}), tmp_path / "int.parquet")
        load_user_texts(tmp_path / "int.parquet")
