"""Byte-level BPE tokenizer: training, saving in the Hugging Face layout, loading.

Byte-level means text is first mapped to its UTF-8 bytes, each byte a base symbol, so every
string encodes and decodes back exactly (no unknown token). BPE then learns merges of frequent
byte pairs up to `vocab_size` entries.

Token layout of a trained tokenizer (ids in order):
    0  <|end_of_text|>   special: EOS, also written between documents in token shards
    1  <|pad|>           special: padding
    2.. 256 byte symbols, then the learned merges
    last 4: <think> </think> <answer> </answer>  added (not special) tokens: always one id
                                                  each, decoded verbatim, kept by skip_special_tokens

`out_dir` then holds tokenizer.json and tokenizer_config.json (class PreTrainedTokenizerFast,
eos/pad tokens, model_max_length, an R1 chat template), so
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads the same tokenizer.
`load_tokenizer` reads that layout, ours or a Hugging Face checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from nanoseek.data.tasks import R1_SYSTEM, TAGS

EOS = "<|end_of_text|>"
PAD = "<|pad|>"

# Chat layout (the R1-Zero prompt): a system line (R1_SYSTEM unless a system message comes
# first), "\nUser: ..." per user turn, "\nAssistant: ...<|end_of_text|>" per past assistant turn,
# and "\nAssistant:" to ask for the next one. One user message gives tasks.r1_prompt(question).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] -}}{%- set turns = messages[1:] -%}"
    "{%- else -%}{{- " + json.dumps(R1_SYSTEM) + " -}}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{- '\\nUser: ' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '\\nAssistant: ' + m['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('chat roles are system (first only), user and assistant, not ' + m['role']) -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\nAssistant:' -}}{%- endif -%}"
)


def _r1_chat(messages: list[dict], eos_token: str, add_generation_prompt: bool) -> str:
    """CHAT_TEMPLATE written in Python: the layout used when a tokenizer ships no template."""
    text, turns = R1_SYSTEM, messages
    if messages and messages[0]["role"] == "system":
        text, turns = messages[0]["content"], messages[1:]
    for m in turns:
        if m["role"] == "user":
            text += "\nUser: " + m["content"]
        elif m["role"] == "assistant":
            text += "\nAssistant: " + m["content"] + eos_token
        else:
            raise ValueError(f"chat roles are system (first only), user and assistant, not {m['role']!r}")
    return text + "\nAssistant:" if add_generation_prompt else text


def _token_text(value: str | dict | None) -> str | None:
    """Special-token entries in HF configs are a string or an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Encode/decode plus the ids a trainer needs. `encode` never adds BOS/EOS: callers place
    EOS themselves (token shards put one after every document), and a rendered chat template
    already holds its special tokens as text. `encode_prompt` encodes a raw prompt as transformers
    does (`tokenizer(text).input_ids`): with the special tokens the tokenizer's own post-processor
    adds, e.g. a BOS in front (none for the tokenizers trained here).

    Attributes: eos_id, pad_id (EOS when the tokenizer has no pad token), vocab_size (with
    added tokens), eos_token, chat_template (Jinja source or None), path.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(
                f"{path} has no tokenizer.json; train one with nanoseek.data.tokenizer.train_tokenizer "
                "or point at a Hugging Face model folder that contains tokenizer.json"
            )
        self.path = path
        self._tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            if (path / name).is_file():
                config.update(json.loads((path / name).read_text(encoding="utf-8")))
        self.config = config
        self.eos_token = _token_text(config.get("eos_token"))
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is None:
            raise ValueError(
                f"{path}: eos_token {self.eos_token!r} is missing from tokenizer_config.json or from the "
                "vocabulary; set eos_token there to the end-of-text token"
            )
        self.eos_id: int = eos_id
        pad_token = _token_text(config.get("pad_token"))
        pad_id = self._tok.token_to_id(pad_token) if pad_token else None
        self.pad_id: int = self.eos_id if pad_id is None else pad_id
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = self._find_chat_template(path, config)

    @staticmethod
    def _find_chat_template(path: Path, config: dict) -> str | None:
        """Newer HF checkpoints keep the template in chat_template.jinja; older ones in the
        config, sometimes as a list of named templates."""
        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}.get("default")
        return template

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    @property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry, an upper bound for byte-level and Metaspace
        vocabularies (their entries spell one symbol per byte or character): a text longer than
        n * max_token_chars cannot encode to n tokens or fewer (text normalizers aside)."""
        if not hasattr(self, "_max_token_chars"):
            self._max_token_chars = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt's ids with the tokenizer's own special-token rules (tokenizer.json's
        post-processor, which transformers 5 follows for every fast tokenizer)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, or a 1-D tensor/array)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages ({"role", "content"} dicts) to the prompt text, with the
        tokenizer's Jinja template as transformers renders it, else the R1 layout."""
        if self.chat_template is None:
            return _r1_chat(messages, self.eos_token or "", add_generation_prompt)
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise ValueError(f"chat template of {self.path}: {message}")

        # Same environment options as transformers, so both render identically.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        special = {
            k: _token_text(self.config.get(k)) or ""
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer folder: ours (train_tokenizer) or a Hugging Face checkpoint's."""
    return Tokenizer(path)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, model_max_length: int = 4096,
    split_digits: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` entries in total (fewer if the texts run out of
    merges), save it to `out_dir` in the Hugging Face layout and return it loaded.

    split_digits: every digit is its own token (no merges across digits), so numbers keep their
    place-value structure. Off by default: in one exploratory run of the CPU demo it did not raise
    held-out accuracy within the same step budget (sequences get longer)."""
    minimum = 256 + 2 + len(TAGS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: 256 bytes + 6 special/added tokens need >= {minimum}"
        )
    tok = _HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAGS),
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def without_markers(stream: Iterable[str]) -> Iterable[str]:
        # Tags and special tokens get their own ids; do not spend merges on their pieces.
        for text in stream:
            for marker in (*TAGS, EOS, PAD):
                text = text.replace(marker, " ")
            yield text

    tok.train_from_iterator(without_markers(texts), trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Tokenizer(out_dir)
