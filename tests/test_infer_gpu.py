"""Inference on CUDA: cached, speculative and CUDA-graph decoding against the reference (skipped without a GPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_infer_fixtures import random_prompts, tiny_model

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer import speculative as spec
from nanoseek.infer.batch import Batch
from nanoseek.infer.sampling import settings_tensors
from nanoseek.infer.sequence import GenerationStats

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
HOT = SamplingParams(temperature=0.8, top_p=0.9, seed=0, max_new_tokens=24, ignore_eos=True)


def generate(model, prompts, params, **kw) -> tuple[list[list[int]], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = Engine(model, max_batch_size=3, max_len=96, **kw).generate(prompts, params)
    return [c.token_ids for c in out], caught


@pytest.mark.parametrize("dense", [True, False])
def test_fp32_cached_speculative_and_graph_equal_reference(dense):
    """fp32: every path gives the reference's tokens, compiled blocks and step ends included. That the
    CUDA graphs capture (no fallback warning) is checked on the dense model (without Triton, fp32
    MoE on CUDA takes the looped expert path, whose nonzero() syncs, and graphs fall back)."""
    model = tiny_model(mtp_agree=1.0, **({"first_k_dense_replace": 3} if dense else {})).cuda()
    prompts = random_prompts([3, 17, 8, 30], model.config.vocab_size)
    ref = [c.token_ids for c in Engine(model, max_len=96).generate_reference(prompts, GREEDY)]
    # compiled last: compiling changes the model's blocks (and RoPE) in place
    def fallbacks(caught, speculative: bool) -> list[str]:
        messages = [str(w.message) for w in caught if "CUDA graph capture" in str(w.message)]
        # the MTP block is a MoE layer even in the dense model: its fp32 prefill syncs, so speculative
        # batches prefill eagerly here; their steps must still capture
        return [m for m in messages if not (speculative and "of the prefill" in m)]

    for kw in ({}, {"speculative": 2}, {"cuda_graph": True}, {"cuda_graph": True, "speculative": 2},
               {"cuda_graph": True, "compile": True}):
        out, caught = generate(model, prompts, GREEDY, **kw)
        assert out == ref, kw
        assert not (dense and fallbacks(caught, "speculative" in kw)), fallbacks(caught, "speculative" in kw)
        if kw == {"cuda_graph": True, "speculative": 2}:  # sampled (top-p filter) steps: the eager ones' tokens
            sampled, caught = generate(model, prompts, HOT, **kw)
            assert sampled == generate(model, prompts, HOT, speculative=2)[0]
            assert not (dense and fallbacks(caught, True)), fallbacks(caught, True)


def test_bf16_moe_graph_and_speculative():
    """bf16 with grouped-GEMM experts: the CUDA graphs capture and replay the eager prefill's and
    steps' tokens; speculative greedy equals plain greedy, graphed or not. The longest prompt is a power of two, so
    the graphed prefill (padded to one) has the eager one's shapes: bf16 results depend on them."""
    model = tiny_model(mtp_agree=1.0).cuda().to_dtype(torch.bfloat16)
    prompts = random_prompts([5, 12, 16], model.config.vocab_size)
    eager, _ = generate(model, prompts, [GREEDY, HOT, GREEDY])
    graphed, caught = generate(model, prompts, [GREEDY, HOT, GREEDY], cuda_graph=True)
    assert not caught, [str(w.message) for w in caught]
    assert graphed == eager
    speculative, _ = generate(model, prompts, GREEDY, speculative=2)
    assert speculative == generate(model, prompts, GREEDY)[0]
    graphed_speculative, caught = generate(model, prompts, GREEDY, speculative=2, cuda_graph=True)
    assert not caught, [str(w.message) for w in caught]
    assert graphed_speculative == speculative


@pytest.mark.parametrize("k", [0, 2])
@torch.no_grad()
def test_decode_steps_do_not_sync_with_the_host(k):
    """The device part of a plain (k=0) and a speculative step never waits for the GPU."""
    model = tiny_model(mtp_agree=1.0).cuda().to_dtype(torch.bfloat16)
    engine = Engine(model, max_len=64, speculative=k)
    batch = Batch(engine, 2)
    batch.admit([engine.sequence(p, GREEDY) for p in random_prompts([4, 9], model.config.vocab_size)],
                GenerationStats())
    lengths = torch.tensor(batch.length, device="cuda")
    u = torch.rand(2, 2 * k + 1, device="cuda")
    settings = (*settings_tensors([HOT, GREEDY], "cuda"), True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if k:
            spec.speculative_step(model, batch.cache, batch.pending, batch.drafts, batch.draft_probs, lengths,
                                  max(batch.length), settings, u)
        else:
            batch.decode_at(2, lengths[:, None], max(batch.length) + 1, u[:, 0], mode="filters")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graphs_follow_an_optimizer_step():
    """Graphs captured before an optimizer step replay with the new weights: the graphed engine, built once
    on a model in training mode, then gives a fresh eager engine's tokens, without capturing again."""
    model = tiny_model().cuda().to_dtype(torch.bfloat16).train()
    prompts = random_prompts([5, 16], model.config.vocab_size)
    engine = Engine(model, max_batch_size=2, max_len=96, cuda_graph=True)
    before = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    captured = set(engine._batch.graphs.graphs)
    assert captured and not engine._batch.graphs.eager
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor(prompts[1], device="cuda")[None]
    (-model(ids).logits.float().log_softmax(-1)[..., 7].mean()).backward()
    optimizer.step()
    after = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert set(engine._batch.graphs.graphs) == captured  # replayed, not recaptured
    assert after == [c.token_ids for c in Engine(model, max_batch_size=2, max_len=96).generate(prompts, GREEDY)]
    assert after != before and model.training


@pytest.mark.parametrize("kw", [{}, {"cuda_graph": True}, {"cuda_graph": True, "speculative": 2}])
def test_a_poisoned_request_fails_alone_on_the_gpu(kw):
    """A request whose distribution turns NaN (a denormal temperature forced past validation) ends with
    reason "error" on CUDA too, without a device-side assert; its three neighbours give their solo tokens,
    graphed and speculative steps included, and the engine keeps serving."""
    import dataclasses

    model = tiny_model(mtp_agree=1.0, first_k_dense_replace=3).cuda()  # fp32: batched rows equal solo ones
    prompts = random_prompts([5, 9, 4, 7], model.config.vocab_size, seed=11)
    good = [GREEDY, dataclasses.replace(HOT, seed=3), GREEDY]
    poisoned = dataclasses.replace(HOT, seed=4)
    object.__setattr__(poisoned, "temperature", 1e-45)  # what validation refuses
    engine = Engine(model, max_batch_size=4, max_len=96, **kw)
    alone = [engine.generate([prompts[i]], sp)[0].token_ids for i, sp in zip((0, 1, 3), good)]
    out = engine.generate(prompts, [*good[:2], poisoned, good[2]])
    assert out[2].finish_reason == "error"
    assert [out[i].token_ids for i in (0, 1, 3)] == alone
    assert engine.generate(prompts[:1], GREEDY)[0].token_ids == alone[0]
    torch.cuda.synchronize()  # a device-side assert would surface here
