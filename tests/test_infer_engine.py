"""Engine: cached batched decoding equals the no-cache reference; cache sizes; continuous batching."""

from __future__ import annotations

import threading

import pytest
import torch
from test_infer_fixtures import random_prompts, single_thread, tiny_model, write_tiny_ckpt

from nanoseek.config import preset
from nanoseek.infer import Engine, SamplingParams, cache_bytes_per_token
from nanoseek.infer.scheduler import Scheduler

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    return write_tiny_ckpt(tmp_path_factory.mktemp("ckpt"))

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("pipeline", [False, True])
def test_greedy_batched_equals_reference(model, pipeline):
    """Different prompt lengths, more prompts than rows (rows refill), YaRN and MoE layers; with
    pipelined steps (launch step n, then hand out step n-1's tokens) as well."""
    prompts = random_prompts([3, 17, 8, 1, 30], model.config.vocab_size)
    engine = Engine(model, max_batch_size=3, max_len=96, pipeline=pipeline)
    out = engine.generate(prompts, GREEDY)
    ref = engine.generate_reference(prompts, GREEDY)
    for o, r in zip(out, ref):
        assert o.token_ids == r.token_ids
        assert o.finish_reason == "length" and len(o.token_ids) == GREEDY.max_new_tokens
    assert engine.last_stats.steps < 5 * GREEDY.max_new_tokens  # batched: not one pass per prompt


def test_outputs_do_not_depend_on_batch(model):
    prompts = random_prompts([5, 12, 9], model.config.vocab_size, seed=1)
    engine = Engine(model, max_batch_size=4, max_len=64)
    together = engine.generate(prompts, GREEDY)
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


@pytest.mark.parametrize("pipeline", [False, True])
def test_seeded_sampling_matches_reference(model, pipeline):
    """Same seed, same uniforms: the cached path draws the same tokens as the reference."""
    prompts = random_prompts([4, 10], model.config.vocab_size, seed=2)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_new_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.3, seed=8, max_new_tokens=16, ignore_eos=True)]
    engine = Engine(model, max_len=64, pipeline=pipeline)
    out = engine.generate(prompts, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in engine.generate_reference(prompts, params)]
    assert [o.token_ids for o in out] == [o.token_ids for o in engine.generate(prompts, params)]  # reproducible
    other = engine.generate(prompts, [SamplingParams(temperature=0.9, seed=9, max_new_tokens=16, ignore_eos=True)] * 2)
    assert [o.token_ids for o in other] != [o.token_ids for o in out]


def test_cache_bytes_per_token(model):
    latent, expanded = cache_bytes_per_token(model.config, torch.float32)
    assert latent == model.new_cache(1, 4).bytes_per_token() == 4 * 4 * (32 + 8)  # 3 layers + 1 MTP
    assert expanded == 4 * 4 * 4 * (24 + 16)
    v3_latent, v3_expanded = cache_bytes_per_token(preset("v3-671b", num_nextn_predict_layers=0), torch.bfloat16)
    assert v3_latent == 61 * 576 * 2  # 70 KB per token (DeepSeek-V3: 61 layers x (512 + 64) latent values)
    assert v3_expanded / v3_latent == pytest.approx(40960 / 576)
    assert "latent 640 B vs expanded per-head K/V 2,560 B" in Engine(model).cache_report()


@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 12), (torch.bfloat16, 6), (torch.float32, 12)])
def test_latent_cache_write_rows(dtype, width):
    """A prefill's small cache lands in the batch's rows (in any order), as 8-byte words where the
    entry width allows (bf16 x 12 = 24 bytes) and element by element where it does not (bf16 x 6)."""
    from nanoseek.model.cache import LatentCache

    big = LatentCache(3, 6, 40, width - 4, 4, dtype=dtype)
    big.data.normal_()
    small = LatentCache(3, 2, 20, width - 4, 4, dtype=dtype)
    small.data.normal_()
    rows = torch.tensor([4, 1])
    expected = big.data.clone()
    expected[:, rows, :20] = small.data
    big.write_rows(rows, small)
    assert torch.equal(big.data, expected)


@pytest.mark.parametrize("pipeline", [False, True])
def test_eos_and_context_errors(model, pipeline):
    prompts = random_prompts([6, 7], model.config.vocab_size, seed=3)
    prompt = prompts[0]
    engine = Engine(model, max_len=32, pipeline=pipeline)
    ref = engine.generate([prompt], GREEDY)[0].token_ids
    other = engine.generate([prompts[1]], GREEDY)[0].token_ids
    engine.eos_id = ref[5]  # pretend the 6th generated token is EOS
    out = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=24))[0]
    assert out.token_ids == ref[: ref.index(ref[5]) + 1] and out.finish_reason == "stop"
    # a row that stops early next to one that runs on: the other row's tokens are unaffected
    both = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
    assert both[0].token_ids == out.token_ids
    assert both[1].token_ids == (other[: other.index(ref[5]) + 1] if ref[5] in other else other)
    with pytest.raises(ValueError, match="max_new_tokens=27 exceeds the context of 32"):
        engine.generate([prompt], SamplingParams(max_new_tokens=27))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate(["text"])


@pytest.mark.parametrize("pipeline", [False, True])
def test_scheduler_concurrent_requests_match_alone(model, pipeline):
    """Requests arriving while others decode join the batch and give their solo outputs."""
    prompts = random_prompts([3, 14, 7, 22, 5, 9], model.config.vocab_size, seed=4)
    lengths = [10, 30, 6, 20, 25, 3]
    engine = Engine(model, max_batch_size=4, max_len=64, pipeline=pipeline)
    alone = [engine.generate([p], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))[0].token_ids
             for p, n in zip(prompts, lengths)]
    scheduler = Scheduler(engine).start()
    done, results = threading.Event(), {}

    def on_event(seq, delta):
        if seq.finished:
            results[id(seq)] = seq
            if len(results) == len(prompts):
                done.set()

    seqs = []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        seqs.append(scheduler.submit(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), on_event))
        if i == 2:  # let the first ones start decoding before the rest arrive
            while scheduler.stats.steps < 3:
                threading.Event().wait(0.001)
    assert done.wait(60)
    scheduler.stop()
    assert [s.token_ids for s in seqs] == alone
    assert scheduler.stats.steps < sum(lengths)  # requests shared decode steps


def test_scheduler_cancel_and_stop(model):
    engine = Engine(model, max_batch_size=2, max_len=64)
    scheduler = Scheduler(engine).start()
    finished = threading.Event()
    seq = scheduler.submit([5, 6, 7], SamplingParams(max_new_tokens=60, ignore_eos=True),
                           lambda s, d: s.finished and finished.set())
    scheduler.cancel(seq)
    assert finished.wait(30) and seq.finish_reason == "cancelled"
    scheduler.stop()
    with pytest.raises(RuntimeError, match="not running"):
        scheduler.submit([5], SamplingParams(max_new_tokens=4))


def test_stream_with_tokenizer(tiny_ckpt):
    from nanoseek.data.tokenizer import load_tokenizer

    engine = Engine(tiny_model(vocab_size=load_tokenizer(tiny_ckpt).vocab_size), load_tokenizer(tiny_ckpt),
                    max_len=128)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    pieces = list(engine.stream("The quick brown", params))
    full = engine.generate(["The quick brown"], params)[0]
    assert len(pieces) > 1 and "".join(pieces) == full.text
    assert full.text == engine.tokenizer.decode(full.token_ids)


def test_speculative_needs_an_mtp_module():
    with pytest.raises(ValueError, match="no MTP module"):
        Engine(tiny_model(num_nextn_predict_layers=0), speculative=1)


def test_engine_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_batch_size=0: an engine needs room"):
        Engine(tiny_model(), max_batch_size=0)
    with pytest.raises(ValueError, match="speculative=-1: the number of draft tokens"):
        Engine(tiny_model(), speculative=-1)


def test_compiled_engine_gives_the_eager_engines_tokens():
    """compile=True (Inductor on each block, the output norm, RoPE's cos/sin and greedy's argmax) changes
    fusions, not results: fp32 greedy tokens equal the eager engine's."""
    model = tiny_model(mtp_agree=1.0)
    prompts = random_prompts([3, 11], model.config.vocab_size)
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    eager = [c.token_ids for c in Engine(model, max_batch_size=2, max_len=32).generate(prompts, params)]
    compiled = Engine(model, max_batch_size=2, max_len=32, compile=True)
    assert [c.token_ids for c in compiled.generate(prompts, params)] == eager


@pytest.mark.parametrize("vocab", [1000, 1024 + 256, 32000, 32003])
def test_greedy_tokens_equal_argmax_with_ties(vocab):
    """The two-stage argmax picks argmax's token, the first maximum, also for ties across and within
    chunks and a vocabulary that is not a multiple of the chunk."""
    from nanoseek.infer.batch import GREEDY_CHUNK, greedy_tokens

    torch.manual_seed(0)
    logits = torch.randn(6, vocab).to(torch.bfloat16)
    logits[1, [5, vocab - 1]] = 9.0  # tie across chunks: the first wins
    logits[2, [GREEDY_CHUNK + 3, GREEDY_CHUNK + 7]] = 9.0  # tie inside a chunk
    logits[3, vocab - 1] = 9.0  # the last token, in the padded chunk
    logits[4] = 0.0  # all equal: token 0
    assert torch.equal(greedy_tokens(logits), logits.float().argmax(dim=-1))
    assert greedy_tokens(logits)[4] == 0


@pytest.mark.parametrize("speculative,pipeline", [(0, False), (0, True), (2, False)])
def test_a_poisoned_request_fails_alone(speculative, pipeline):
    """A request whose distribution turns NaN (a denormal temperature, forced past validation) ends with
    reason "error"; the three requests decoding beside it give their solo outputs."""
    import dataclasses

    model = tiny_model(mtp_agree=1.0 if speculative else 0.0)
    prompts = random_prompts([5, 9, 4, 7], model.config.vocab_size, seed=11)
    good = [GREEDY, dataclasses.replace(GREEDY, temperature=0.8, seed=3), GREEDY]
    poisoned = dataclasses.replace(GREEDY, temperature=0.8, seed=4)
    object.__setattr__(poisoned, "temperature", 1e-45)  # what validation now refuses
    engine = Engine(model, max_batch_size=4, max_len=64, speculative=speculative, pipeline=pipeline)
    alone = [engine.generate([prompts[i]], sp)[0].token_ids for i, sp in zip((0, 1, 3), good)]
    out = engine.generate(prompts, [*good[:2], poisoned, good[2]])
    assert out[2].finish_reason == "error"
    assert [out[i].token_ids for i in (0, 1, 3)] == alone
    assert engine.generate(prompts[:1], GREEDY)[0].token_ids == alone[0]  # the engine keeps serving
    assert isinstance(out[2].token_ids, list) and all(0 <= t < model.config.vocab_size for t in out[2].token_ids)


def test_sampling_settings_are_checked_where_they_enter():
    with pytest.raises(ValueError, match="temperature=1e-45: must be 0"):
        SamplingParams(temperature=1e-45)
    with pytest.raises(ValueError, match="temperature=inf"):
        SamplingParams(temperature=float("inf"))
    from nanoseek.infer.sampling import settings_tensors

    _, top_k, top_p = settings_tensors([SamplingParams(top_k=2**63, top_p=1e-46)], "cpu")
    assert top_k.item() == 2**31 - 1 and top_p.item() > 0  # clamped to values that keep the meaning


def test_autocast_engine_decodes_fp32_weights_in_bf16():
    """Engine(autocast=bf16) over fp32 weights (`nanoseek rl`'s policy on a GPU) computes in bf16: its
    log-probs move off the fp32 engine's by bf16 rounding, and stay within bf16's reach of the training
    forward under the same autocast (teacher-forced on the engine's tokens). The two bf16 paths differ in
    association (a cached, absorbed-MLA decode against a full expanded forward), so they do not agree
    bit for bit; `nanoseek rl` logs this gap and takes the ratio's log-probs from the training forward."""
    from nanoseek.rl.rollout import forward_logprobs

    model = tiny_model()
    prompts = random_prompts([5, 9], model.config.vocab_size, seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    logprobs = {}
    for dtype in (None, torch.bfloat16):
        out = Engine(model, max_batch_size=2, max_len=32, autocast=dtype).generate(prompts, params)
        logprobs[dtype] = torch.tensor([x for o in out for x in o.logprobs])
        if dtype is not None:
            for p, o in zip(prompts, out):
                ids = torch.tensor([p + o.token_ids])
                trainer = forward_logprobs(model, ids[:, :-1], ids[:, 1:], autocast)[0, len(p) - 1:]
                assert (trainer - torch.tensor(o.logprobs)).abs().max() < 0.1
    moved = (logprobs[None] - logprobs[torch.bfloat16]).abs().max()
    assert 1e-4 < moved < 0.1, moved
    with pytest.raises(ValueError, match="autocast=torch.float32"):
        Engine(model, autocast=torch.float32)
