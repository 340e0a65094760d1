"""An engine on a live policy: it never changes the caller's modules, follows optimizer steps, returns the
sampled tokens' log-probabilities and draws n samples per prompt from one prefill."""

from __future__ import annotations

import pytest
import torch
from test_infer_fixtures import random_prompts, single_thread, tiny_model

from nanoseek.infer import Engine, SamplingParams
from nanoseek.kernels.modules import DecodeBlock, DecodeLinear, DecodeMoE, install
from nanoseek.model.swap import shared_copy

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


def optimizer_step_towards(model, token: int) -> None:
    """One SGD step that makes `token` likelier everywhere (a large, visible change of the weights)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(2, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = -model(ids).logits.log_softmax(-1)[..., token].mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("speculative", [0, 2])
def test_generate_follows_an_optimizer_step(speculative):
    """The engine is built once on a model in training mode; after a step on the model, the next generate
    call decodes with the new weights (it equals the reference on them and differs from before)."""
    model = tiny_model(mtp_agree=1.0 if speculative else 0.0).train()
    prompts = random_prompts([5, 9], model.config.vocab_size, seed=3)
    engine = Engine(model, max_batch_size=2, max_len=64, speculative=speculative)
    before = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert model.training  # the caller's mode is the caller's
    optimizer_step_towards(model, token=7)
    after = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert after == [c.token_ids for c in engine.generate_reference(prompts, GREEDY)]
    assert after != before and model.training


def test_engine_never_changes_the_callers_modules():
    model = tiny_model().train()
    modules = {name: (type(m), m.training) for name, m in model.named_modules()}
    engine = Engine(model, max_len=32, compile=True)
    engine.generate(random_prompts([4], model.config.vocab_size), GREEDY)
    assert {name: (type(m), m.training) for name, m in model.named_modules()} == modules
    assert all(m.__dict__.get("_compiled_call_impl") is None for m in model.modules())
    assert "rope" not in model.__dict__  # compiled RoPE lives on the engine's view
    shared = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert {id(t) for t in [*engine.decoder.parameters(), *engine.decoder.buffers()]} == shared


@pytest.mark.parametrize("speculative", [0, 2])
def test_logprobs_equal_a_full_forward(speculative):
    """Each returned log-probability is log_softmax of a full (uncached) forward's logits at the sampled
    token: the model's own distribution, whatever temperature and top-p drew the token."""
    model = tiny_model(mtp_agree=1.0, head_scale=1.0)
    prompts = random_prompts([6, 3], model.config.vocab_size, seed=5)
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_new_tokens=10, ignore_eos=True,
                             logprobs=True),
              SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=True)]
    for pipeline in (False, True):
        engine = Engine(model, max_batch_size=2, max_len=64, speculative=speculative, pipeline=pipeline)
        for prompt, out in zip(prompts, engine.generate(prompts, params)):
            assert len(out.logprobs) == len(out.token_ids) == 10
            ids = torch.tensor([prompt + out.token_ids])
            with torch.no_grad():
                full = model(ids).logits[0, len(prompt) - 1: -1].log_softmax(-1)  # (new tokens, V)
            want = full.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-5)
        assert engine.generate(prompts, GREEDY)[0].logprobs is None  # only when asked for


def test_n_samples_share_one_prefill():
    model = tiny_model(head_scale=1.0)
    prompts = random_prompts([7, 4], model.config.vocab_size, seed=2)
    params = SamplingParams(temperature=1.0, seed=10, max_new_tokens=8, ignore_eos=True)
    engine = Engine(model, max_batch_size=8, max_len=32)
    many = engine.generate(prompts, params, n=3)
    assert engine.last_stats.prompt_tokens == 7 + 4  # each prompt prefilled once
    assert [c.prompt_ids for c in many] == [prompts[0]] * 3 + [prompts[1]] * 3
    # sample j of a seeded request draws from seed + j, exactly as a request of its own would
    import dataclasses

    alone = [engine.generate([p], dataclasses.replace(params, seed=10 + j))[0].token_ids
             for p in prompts for j in range(3)]
    assert [c.token_ids for c in many] == alone
    assert len({tuple(c.token_ids) for c in many[:3]}) > 1
    with pytest.raises(ValueError, match="n=0"):
        engine.generate(prompts, params, n=0)


def test_install_swaps_modules_and_keeps_the_reference_on_the_cpu():
    """install() swaps every module class that has a decode path; on the CPU the swapped modules compute
    the reference bit for bit (their kernels need a GPU)."""
    model = tiny_model()
    view = install(shared_copy(model).eval())
    assert isinstance(view.layers["0"], DecodeBlock) and isinstance(view.layers["1"].mlp, DecodeMoE)
    assert isinstance(view.lm_head, DecodeLinear) and type(model.lm_head) is torch.nn.Linear
    assert view.state_dict().keys() == model.state_dict().keys()
    ids = torch.tensor([random_prompts([9], model.config.vocab_size)[0]])
    with torch.no_grad():
        assert torch.equal(view(ids).logits, model.eval()(ids).logits)


def test_engine_on_a_model_just_trained():
    """A model whose MoE layers still hold the last training forward's balance loss (a tensor with an
    autograd graph) gets an engine: plain tensor attributes are not copied into the engine's view."""
    model = tiny_model().train()
    ids = torch.randint(2, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids).logits.sum().backward()
    assert model.moe_layers[0].balance_loss.grad_fn is not None
    engine = Engine(model, max_len=32)
    assert engine.decoder.moe_layers[0].balance_loss is None
    want = engine.generate_reference([[3, 4, 5]], GREEDY)[0].token_ids
    assert engine.generate([[3, 4, 5]], GREEDY)[0].token_ids == want
