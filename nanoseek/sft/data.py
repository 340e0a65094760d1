"""SFT data: JSONL conversations -> chat-template tokens with an assistant-only loss mask -> rows -> batches.

Input lines (JSONL, one example per line; other keys, e.g. provenance, are ignored):

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}    ("developer": system)
    {"prompt": "...", "completion": "..."}      (+ optional "system"): one user turn, one assistant turn

Rendering. A conversation is cut into segments with the tokenizer's chat template, the way a server
would see it: for each assistant turn i,
    before_i = render(messages[:i], add_generation_prompt=True)   the prompt a server would send
    after_i  = render(messages[:i + 1])                          the conversation through turn i
the template must render incrementally (after_{i-1} is a prefix of before_i, before_i of after_i);
the text between them is the prompt part (mask 0), after_i minus before_i the assistant part (mask 1,
it holds the template's end-of-turn token, so the model learns to stop). Each segment is encoded on
its own: the first prompt segment is exactly what the server encodes at inference. Turns after the
last assistant turn carry no loss and are dropped.

Rows. A document of n tokens gives n - 1 (input, target) positions; targets whose token is not an
assistant token are IGNORE. `pack_rows` puts documents into rows of at most seq_len positions
(best-fit decreasing, deterministic); `pad_rows` gives every document its own row. A batch is a dict
of (B, S) tensors: input_ids, targets (IGNORE off the loss), positions (restarting at 0 in each
document) and, when packed, doc_ids (the row-local document index, -1 on padding) for the
document-causal mask (`nanoseek/sft/masking.py`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tokenizer import Tokenizer

IGNORE = -100  # F.cross_entropy's ignore_index
ROLES = ("system", "user", "assistant")


class SFTDataError(ValueError):
    """A bad SFT data file or template; the message names the file, line and field."""


@dataclass
class Document:
    """One rendered example: token ids (n,) and the assistant mask (n,) (1: the loss falls on it)."""
    ids: list[int]
    mask: list[int]
    line: int  # 1-based line in the data file

    @property
    def trained(self) -> int:
        """Tokens the loss falls on (targets are ids[1:], so the first token never is)."""
        return sum(self.mask[1:])


# ---------------------------------------------------------------------------- reading
def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_examples(path: str | Path, max_errors: int = 5) -> list[tuple[int, list[dict[str, str]]]]:
    """Read a JSONL file into (line number, messages) pairs, checking every line.

    All bad lines are collected (up to `max_errors` shown) into one SFTDataError, so a file is fixed in
    one pass and nothing starts training on part of it."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"--sft.data {path}: no such file; pass a JSONL file of messages or prompt/completion")
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append((number, parse_example(line)))
            except SFTDataError as e:
                errors.append(f"{path}:{number}: {e}")
    if errors:
        shown = "\n  ".join(errors[:max_errors])
        more = f"\n  ... and {len(errors) - max_errors} more bad line(s)" if len(errors) > max_errors else ""
        raise SFTDataError(f"{len(errors)} bad line(s) in {path}, nothing trained:\n  {shown}{more}")
    if not examples:
        raise SFTDataError(f"{path}: holds no examples (the file is empty); each line needs a JSON object with "
                           "'messages' or 'prompt' and 'completion'")
    return examples


def parse_example(line: str) -> list[dict[str, str]]:
    """One JSONL line -> OpenAI-style messages, validated (SFTDataError names the field)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SFTDataError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise SFTDataError(f"a line must be a JSON object, not {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError("'messages' must be a non-empty list of {'role', 'content'} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise SFTDataError(f"messages[{i}] must be an object with a string 'role'")
            role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name, as the server
            if role not in ROLES:
                raise SFTDataError(f"messages[{i}].role {m['role']!r} is unknown; use one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise SFTDataError(f"messages[{i}].content must be a string")
            out.append({"role": role, "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise SFTDataError("'messages' has no assistant turn; the loss falls only on assistant tokens, so the "
                               "example would teach nothing (add the assistant's answer or drop the line)")
        return out
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise SFTDataError(f"'{key}' must be a string (a prompt/completion line needs both)")
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise SFTDataError("'system' must be a string")
        head = [{"role": "system", "content": system}] if system is not None else []
        return head + [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise SFTDataError(f"no 'messages' and no 'prompt'/'completion' field (keys: {sorted(obj)[:6]})")


# ---------------------------------------------------------------------------- rendering
def render(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Messages -> (ids, mask) with the tokenizer's chat template; mask 1 on assistant tokens only."""
    if tokenizer.chat_template is None:
        raise SFTDataError(f"{tokenizer.path} has no chat template (tokenizer_config.json 'chat_template' or "
                           "chat_template.jinja); SFT renders conversations with it. Add one to the checkpoint, or "
                           "pass --sft.chat_template r1 (the built-in R1 layout) or --sft.chat_template FILE.jinja")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # text rendered and encoded so far
    for i in range(last + 1):
        if messages[i]["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise SFTDataError(f"the chat template of {tokenizer.path} does not render messages[{i}] incrementally "
                               "(a rendered prefix changes when a turn is added), so assistant tokens cannot be "
                               "told apart; use a template that appends turns, e.g. --sft.chat_template r1")
        for text, trained in ((before[len(done):], 0), (after[len(before):], 1)):
            piece = tokenizer.encode(text) if text else []
            ids += piece
            mask += [trained] * len(piece)
        done = after
    return ids, mask


def render_all(tokenizer: Tokenizer, examples: list[tuple[int, list[dict[str, str]]]], path: str | Path,
               seq_len: int) -> tuple[list[Document], dict[str, int]]:
    """Render every example; documents longer than seq_len + 1 tokens are cut (counted), documents left
    with no trained token are dropped (counted). Template errors name the line."""
    from jinja2 import TemplateError  # (a dependency of torch) as in Tokenizer.apply_chat_template

    docs, stats = [], {"examples": len(examples), "truncated": 0, "dropped": 0}
    for line, messages in examples:
        try:
            ids, mask = render(tokenizer, messages)
        except SFTDataError as e:
            raise SFTDataError(f"{path}:{line}: {e}") from None
        except (ValueError, TemplateError) as e:  # the template's raise_exception (a system turn not first), jinja's
            raise SFTDataError(f"{path}:{line}: the chat template fails ({type(e).__name__}: {e})") from None
        if len(ids) > seq_len + 1:
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            stats["truncated"] += 1
        doc = Document(ids, mask, line)
        if doc.trained == 0:
            stats["dropped"] += 1
            continue
        docs.append(doc)
    if not docs:
        raise SFTDataError(f"{path}: no example keeps an assistant token within --sft.seq_len {seq_len}; "
                           "raise --sft.seq_len")
    return docs, stats


# ---------------------------------------------------------------------------- rows
def pack_rows(docs: list[Document], seq_len: int) -> list[list[Document]]:
    """Best-fit decreasing: each document (n - 1 positions) goes into the fullest row it still fits in.
    Deterministic (ties by input order); O(n log n) searches."""
    order = sorted(range(len(docs)), key=lambda i: (-len(docs[i].ids), i))
    rows: list[list[Document]] = []
    free: list[tuple[int, int]] = []  # sorted (free positions, row index)
    for i in order:
        need = len(docs[i].ids) - 1
        j = bisect.bisect_left(free, (need, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(docs[i])
        if space - need > 0:
            bisect.insort(free, (space - need, r))
    return rows


def pad_rows(docs: list[Document]) -> list[list[Document]]:
    """One document per row (padded in `collate`)."""
    return [[d] for d in docs]


def collate(rows: list[list[Document]], pad_id: int, packed: bool,
            pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of documents -> a batch of (B, S) tensors, S the longest row (or `pad_to`: one shape for every
    packed batch, so compiled attention compiles once); see the module docstring."""
    S = max(sum(len(d.ids) - 1 for d in row) for row in rows)
    S = max(S, pad_to or 0)
    B = len(rows)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    targets = torch.full((B, S), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    doc_ids = torch.full((B, S), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for k, d in enumerate(row):
            n = len(d.ids) - 1
            ids = torch.tensor(d.ids)
            keep = torch.tensor(d.mask[1:], dtype=torch.bool)
            input_ids[b, at:at + n] = ids[:-1]
            targets[b, at:at + n] = torch.where(keep, ids[1:], IGNORE)
            positions[b, at:at + n] = torch.arange(n)
            doc_ids[b, at:at + n] = k
            at += n
        positions[b, at:] = torch.arange(S - at)  # padding: any positions (masked off, never attended)
    batch = {"input_ids": input_ids, "targets": targets, "positions": positions}
    if packed:
        batch["doc_ids"] = doc_ids
    return batch


class SFTLoader:
    """Endless batches of rows, reshuffled each epoch (seed + epoch), with an exact-resume state; batches
    are (B, pad_to) when pad_to is given (packed rows), else as long as their longest row.

    len(loader) = batches per epoch (the last one may be smaller); `state_dict` / `load_state_dict`
    hold the epoch and the batch index within it."""

    def __init__(self, rows: list[list[Document]], batch_size: int, seed: int, pad_id: int, packed: bool,
                 pad_to: int | None = None):
        if not rows:
            raise ValueError("SFTLoader: no rows")
        self.rows, self.batch_size, self.seed, self.pad_id, self.packed = rows, batch_size, seed, pad_id, packed
        self.pad_to = pad_to
        self.epoch, self.step = 0, 0
        self._order = self._shuffle(0)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _shuffle(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
            self._order = self._shuffle(self.epoch)
        take = self._order[self.step * self.batch_size:(self.step + 1) * self.batch_size]
        self.step += 1
        return collate([self.rows[i] for i in take], self.pad_id, self.packed, self.pad_to)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "rows": len(self.rows), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rows") != len(self.rows) or state.get("batch_size") != self.batch_size:
            raise ValueError(f"the saved loader had {state.get('rows')} rows in batches of {state.get('batch_size')}, "
                             f"this one {len(self.rows)} in batches of {self.batch_size}")
        self.epoch, self.step = state["epoch"], state["step"]
        self._order = self._shuffle(self.epoch)
