"""Byte-level BPE tokenizer (nanoseek.data.tokenizer): round trip, tags, HF parity, chat template."""

import json
import random

import pytest
import torch

from nanoseek.data.corpus import synthetic_corpus
from nanoseek.data.tasks import TAGS, r1_prompt
from nanoseek.data.tokenizer import EOS, PAD, _r1_chat, load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "What is 2 plus 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "<think> 2 + 3 = 5 </think> <answer> 5 </answer>"},
        {"role": "user", "content": "And times 4?"},
    ],
]


@pytest.fixture(scope="module")
def docs():
    return synthetic_corpus(300, seed=0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(docs, vocab_size=512, out_dir=out)
    return out


def random_unicode(rng: random.Random, n: int) -> str:
    """Mixed scripts, emoji, combining marks, controls and whitespace runs."""
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x1F),
        (0xA0, 0x24F),
        (0x300, 0x36F),
        (0x400, 0x4FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F64F),
        (0xE000, 0xE0FF),
    ]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n)) + "  \n\t "


def test_vocab_and_special_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == 512
    assert (tok.eos_id, tok.pad_id) == (0, 1) and tok.decode([tok.eos_id, tok.pad_id]) == EOS + PAD
    for tag in TAGS:
        ids = tok.encode(tag)
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == tag
    text = "<think>\nx\n</think> <answer> 5 </answer>"
    assert len(tok.encode(text)) < 12


def test_byte_level_round_trip(tok_dir, docs):
    tok = load_tokenizer(tok_dir)
    rng = random.Random(0)
    samples = [random_unicode(rng, rng.randint(0, 60)) for _ in range(200)] + docs[:20]
    samples += [
        "",
        " ",
        "  leading",
        "trailing  ",
        "\r\n",
        "é",
        "e\u0301",
        "👩‍👩‍👧",
        "<think>x</think>",
        "a<answer>b",
    ]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, repr(s)
    assert [tok.decode(ids) for ids in tok.encode_batch(samples)] == samples
    assert tok.decode(torch.tensor(tok.encode(samples[0]))) == samples[0]


def test_compression_on_domain_text(tok_dir, docs):
    tok = load_tokenizer(tok_dir)
    text = "\n".join(docs[:50])
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_transformers_autotokenizer_matches(tok_dir, docs):
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok = load_tokenizer(tok_dir)
    rng = random.Random(1)
    for s in docs[:30] + [random_unicode(rng, 40) for _ in range(30)]:
        assert hf.encode(s) == tok.encode(s)
        assert hf.decode(tok.encode(s)) == s
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    for chat in CHATS:
        assert hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        ) == tok.apply_chat_template(chat)


def test_chat_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    question = "What is 2 plus 3?"
    assert tok.apply_chat_template([{"role": "user", "content": question}]) == r1_prompt(question)
    for chat in CHATS:  # the Jinja template and its Python twin agree
        for gen in (True, False):
            assert tok.apply_chat_template(chat, gen) == _r1_chat(chat, EOS, gen)
    assert tok.apply_chat_template(CHATS[2]).count(EOS) == 1
    with pytest.raises(ValueError, match="not tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_hf_checkpoint_folder(tok_dir, tmp_path):
    """A folder written by transformers' save_pretrained (an HF checkpoint's layout) loads too."""
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    hf.save_pretrained(tmp_path)
    tok, ref = load_tokenizer(tmp_path), load_tokenizer(tok_dir)
    s = "Question: What is 12 plus 30?\nAnswer: 42 <answer> 42 </answer>"
    assert tok.encode(s) == ref.encode(s) and (tok.eos_id, tok.pad_id) == (ref.eos_id, ref.pad_id)
    assert tok.apply_chat_template(CHATS[2]) == ref.apply_chat_template(CHATS[2])
    # Without a chat template the R1 layout is the fallback; without a pad token, pad is EOS.
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "special_tokens_map.json").unlink(missing_ok=True)
    bare = load_tokenizer(tmp_path)
    assert bare.chat_template is None and bare.pad_id == bare.eos_id
    assert bare.apply_chat_template(CHATS[0]) == r1_prompt(CHATS[0][0]["content"])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json.*train_tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], 100, tmp_path)
