"""Text corpora: the embedded procedural corpus, and the user's own files.

`synthetic_corpus` turns task problems (tasks.py) into training documents. Each document is a
prompt followed by a completion in one of three styles:

    r1           r1_prompt(question) + " " + "<think>\\n...\\n</think> <answer> A </answer>"
                 (exactly what the chat template renders, so RL prompts match pretraining)
    plain        "Question: {question}\\n" + worked solution + "\\nAnswer: A"
    answer_only  "Question: {question}\\n" + "Answer: A"

`load_user_texts` reads a .txt/.md file, a .jsonl or .parquet file with a text field, or a
folder of such files (searched recursively, in sorted order) into a list of documents.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

from nanoseek.data.tasks import KINDS, Problem, r1_prompt, render, sample_problems

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def format_document(problem: Problem, style: str, rng: random.Random) -> str:
    """Prompt plus a correct completion in `style`, as one training document."""
    completion = render(problem, style, rng)
    if style == "r1":
        return f"{r1_prompt(problem.prompt)} {completion}"
    return f"Question: {problem.prompt}\n{completion}"


def synthetic_corpus(
    n_docs: int,
    seed: int,
    difficulty: tuple[int, int] = (1, 4),
    r1_share: float = 0.5,
    answer_only_share: float = 0.15,
    split: str = "train",
    kinds: tuple[str, ...] = KINDS,
) -> list[str]:
    """`n_docs` documents over all task kinds, deterministic by seed; the share of each style
    is r1_share, answer_only_share and the rest plain. Only problems of `split` are used, so the
    default "train" corpus never contains a held-out problem."""
    if not (0 <= r1_share <= 1 and 0 <= answer_only_share <= 1 and r1_share + answer_only_share <= 1):
        raise ValueError(
            f"r1_share={r1_share} and answer_only_share={answer_only_share} must lie in [0, 1] and sum to at "
            "most 1 (the rest is plain)"
        )
    problems = sample_problems(n_docs, seed, kinds, difficulty, split)
    rng = random.Random(f"corpus-styles-{seed}")  # a stream of its own: styles do not shift the problems
    docs = []
    for problem in problems:
        u = rng.random()
        style = "r1" if u < r1_share else "answer_only" if u < r1_share + answer_only_share else "plain"
        docs.append(format_document(problem, style, rng))
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path} line {line_no} is not valid JSON ({e.msg}); fix or remove that line"
                ) from e
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path} line {line_no} has no field {text_field!r} (it has {keys}); "
                    f"pass text_field=<the field holding the text>"
                )
            if not isinstance(record[text_field], str):
                raise ValueError(
                    f"{path} line {line_no}: field {text_field!r} holds {type(record[text_field]).__name__}, "
                    "not text; pass text_field=<the field holding the text>"
                )
            docs.append(record[text_field])
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if text_field not in schema.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (it has {schema.names}); pass text_field=<the text column>"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(
            f"{path}: column {text_field!r} holds {kind}, not text; pass text_field=<the text column>"
        )
    return [
        t for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist() if t is not None
    ]


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    if suffix in (".txt", ".md"):
        return [path.read_text(encoding="utf-8")]
    raise ValueError(
        f"{path} has an unsupported suffix {suffix!r}; use one of {TEXT_SUFFIXES} or a folder of them"
    )


def load_user_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a file or folder: a .txt/.md file is one document, a .jsonl line or a
    parquet row is one document (its `text_field`). Blank documents are dropped."""
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"data path {path} does not exist; pass a {'/'.join(TEXT_SUFFIXES)} file or a folder of them"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        used = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
        skipped = [p for p in files if p.suffix.lower() not in TEXT_SUFFIXES and not p.name.startswith(".")]
        if skipped:
            warnings.warn(
                f"{path}: skipping {len(skipped)} files with other suffixes, e.g. {skipped[0]}", stacklevel=2
            )
    else:
        used = [path]
    docs = [doc for p in used for doc in _read_file(p, text_field) if doc.strip()]
    if not docs:
        raise ValueError(
            f"no text found in {path}; it needs non-empty {'/'.join(TEXT_SUFFIXES)} files "
            f"(for .jsonl/.parquet, in the field {text_field!r})"
        )
    return docs
