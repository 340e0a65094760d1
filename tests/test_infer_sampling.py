"""Sampling settings and functions; per-request text handling (EOS, stop strings, streaming)."""

from __future__ import annotations

import pytest
import torch
from test_infer_fixtures import single_thread, tiny_model, write_tiny_ckpt

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.sampling import sample, sampling_probs, settings_tensors
from nanoseek.infer.sequence import Sequence

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    return write_tiny_ckpt(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature=-0.1: must be 0 \\(greedy\\)"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, r"top_p=0.0: must lie in \(0, 1\]"),
    ({"top_k": -1}, "top_k=-1"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_params_stop_string_becomes_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def probs_of(logits, params):
    return sampling_probs(logits, *settings_tensors(params, "cpu"))


def test_temperature_top_k_top_p_per_row():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])).expand(5, 5)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=2.0),
              SamplingParams(top_k=2), SamplingParams(top_p=0.8)]
    probs = probs_of(logits, params)
    assert probs[0].tolist() == [1, 0, 0, 0, 0]
    torch.testing.assert_close(probs[1], logits[0].softmax(-1))
    torch.testing.assert_close(probs[2], (logits[0] / 2).softmax(-1))
    torch.testing.assert_close(probs[3], torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    torch.testing.assert_close(probs[4], torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)  # 0.5+0.2 < 0.8: needs a third
    unfiltered = sampling_probs(logits[:3], *settings_tensors(params[:3], "cpu"), filters=False)
    torch.testing.assert_close(unfiltered, probs[:3])


def test_sample_inverse_cdf():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0])
    edges = torch.tensor([0.0, 0.2999, 0.3001, 1 - 2**-24])
    assert sample(probs.expand(4, 5), edges).tolist() == [1, 1, 3, 3]  # zero-mass tokens never come out
    hot = torch.tensor([0.0, 0.0, 1.0])
    assert sample(hot.expand(3, 3), torch.tensor([0.0, 0.5, 1 - 2**-24])).tolist() == [2, 2, 2]
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.expand(20000, 5), torch.rand(20000, generator=g))
    assert abs((draws == 3).float().mean().item() - 0.7) < 0.015


class ByteTokenizer:
    """Token id = one UTF-8 byte; id 256 is EOS. Multi-byte characters span several tokens."""

    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, params: SamplingParams, eos: bool = False) -> tuple[Sequence, list[str]]:
    tok = ByteTokenizer()
    seq = Sequence([1], params, tok, tok.eos_id)
    deltas = []
    for t in tok.encode(text) + ([tok.eos_id] if eos else []):
        deltas.append(seq.append([t]))
        if seq.finished:
            break
    return seq, deltas


def test_streamed_text_never_splits_characters():
    seq, deltas = feed("héllo wörld 🙂!", SamplingParams(max_new_tokens=100), eos=True)
    assert seq.text == "héllo wörld 🙂!" and seq.finish_reason == "stop"
    assert "".join(deltas) == seq.text and not any("\ufffd" in d for d in deltas)
    assert seq.token_ids[-1] == ByteTokenizer.eos_id


def test_stop_string_cuts_text_and_holds_back_prefixes():
    seq, deltas = feed("abc wörld xyz", SamplingParams(max_new_tokens=100, stop=("wö", "zz")))
    assert seq.text == "abc " and seq.finish_reason == "stop"
    assert "".join(deltas) == "abc "
    assert len(seq.token_ids) == len("abc wö".encode())  # stops at the token completing the stop string
    _, deltas = feed("a w", SamplingParams(max_new_tokens=100, stop=("wö",)))
    assert deltas == ["a", " ", ""]  # "w" waits: it may begin the stop string
    _, deltas = feed("a wa", SamplingParams(max_new_tokens=100, stop=("wö",)))
    assert deltas[-1] == "wa"  # ... until it cannot


def test_stop_string_spanning_a_multi_token_append():
    """Speculative steps append several tokens at once: the stop string still ends the text."""
    tok = ByteTokenizer()
    seq = Sequence([1], SamplingParams(max_new_tokens=100, stop=("END",)), tok, tok.eos_id)
    assert seq.append(tok.encode("abE")) == "ab"
    assert seq.append(tok.encode("NDxyz")) == "" and seq.text == "abE"[:2] and seq.finish_reason == "stop"


def test_max_new_tokens_flushes_partial_character():
    seq, deltas = feed("ab🙂", SamplingParams(max_new_tokens=3))
    assert seq.finish_reason == "length" and len(seq.token_ids) == 3
    assert "".join(deltas) == seq.text == "ab\ufffd"  # the cut character is shown as a replacement


def test_stop_strings_and_seeds_end_to_end(tiny_ckpt):
    from nanoseek.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt)
    engine = Engine(tiny_model(vocab_size=tok.vocab_size), tok, max_len=128)
    base = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    full = engine.generate(["Pack my box"], base)[0].text
    at = next(i for i in range(10, len(full) - 3) if full.find(full[i:i + 3]) == i)  # first occurrence
    stop = full[at:at + 3]
    cut = engine.generate(["Pack my box"], SamplingParams(temperature=0, max_new_tokens=30, stop=(stop, "\x00")))
    assert cut[0].text == full[:at] and cut[0].finish_reason == "stop"
    streamed = "".join(engine.stream("Pack my box", SamplingParams(temperature=0, max_new_tokens=30, stop=(stop,))))
    assert streamed == full[:at]
    hot = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=12, ignore_eos=True) for s in (1, 1, 2)]
    a, b, c = (o.token_ids for o in engine.generate(["Pack my box"] * 3, hot))
    assert a == b != c
