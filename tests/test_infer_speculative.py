"""MTP speculative decoding: greedy output identical to plain greedy; sampling keeps the target law."""

from __future__ import annotations

import pytest
import torch
from test_infer_fixtures import random_prompts, single_thread, tiny_model

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.speculative import accept

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

# chi-square critical value at p = 1e-4 (df = 15, the tests' 16 outcomes): a fixed seed makes the
# tests deterministic; the threshold says how unlikely a failure would be for a correct sampler.
CHI2_DF15_P1E4 = 42.6


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled an outcome of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_accept_rule_preserves_target_distribution():
    """The first emitted token is distributed as p_0 whatever the draft distribution q is."""
    g = torch.Generator().manual_seed(0)
    V, N = 16, 200_000
    p = torch.rand(2, V, generator=g) ** 3
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(1, V, generator=g) ** 3
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.multinomial(q.expand(N, V), 1, replacement=True, generator=g)  # (N, 1)
    a, tokens = accept(p.expand(N, 2, V), q.expand(N, 1, V), drafts, torch.rand(N, 1, generator=g),
                       torch.rand(N, generator=g))
    counts = torch.bincount(tokens[:, 0], minlength=V).float()
    assert chi_square(counts, p[0]) < CHI2_DF15_P1E4
    assert chi_square(counts, q[0]) > 1000  # the test can tell p from q
    accept_rate = torch.minimum(p[0], q[0]).sum()  # P(accept) = sum_x min(p(x), q(x))
    assert a.float().mean().item() == pytest.approx(accept_rate.item(), abs=0.01)
    bonus = tokens[a == 1, 1]  # after an accepted draft the bonus token comes from p_1
    assert chi_square(torch.bincount(bonus, minlength=V).float(), p[1]) < CHI2_DF15_P1E4


def test_accept_rule_greedy_is_prefix_match():
    V = 8
    logits_best = torch.tensor([[3, 5, 1, 2]])  # argmax at the K+1 = 4 verified positions
    p = torch.nn.functional.one_hot(logits_best, V).float()
    drafts = torch.tensor([[3, 5, 4]])
    q = torch.nn.functional.one_hot(drafts, V).float()
    a, tokens = accept(p, q, drafts, torch.rand(1, 3), torch.rand(1))
    assert a.item() == 2 and tokens[0, :3].tolist() == [3, 5, 1]


@pytest.mark.parametrize("agree", [1.0, 3.0])
def test_speculative_greedy_equals_plain_greedy(agree):
    """K = 1, 2, 3 drafts; rows accept different numbers of tokens; more prompts than rows."""
    model = tiny_model(mtp_agree=agree)
    prompts = random_prompts([3, 17, 8, 1, 30], model.config.vocab_size, seed=5)
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    plain = [c.token_ids for c in Engine(model, max_batch_size=3, max_len=96).generate(prompts, params)]
    for k in (1, 2, 3):
        engine = Engine(model, max_batch_size=3, max_len=96, speculative=k)
        assert [c.token_ids for c in engine.generate(prompts, params)] == plain, f"K={k}"
        stats = engine.last_stats
        assert 0 < stats.acceptance < 1  # both the accept and the reject paths ran
        assert stats.tokens_per_forward == pytest.approx(1 + k * stats.acceptance)


def test_speculative_greedy_rows_in_a_sampling_batch():
    """Greedy requests next to sampling ones still give plain greedy output; EOS ends mid-step."""
    model = tiny_model(mtp_agree=3.0)
    prompts = random_prompts([4, 9, 6], model.config.vocab_size, seed=6)
    greedy = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    hot = SamplingParams(temperature=1.0, seed=3, max_new_tokens=20, ignore_eos=True)
    plain = Engine(model, max_len=64).generate(prompts, greedy)
    engine = Engine(model, max_len=64, speculative=2)
    mixed = engine.generate(prompts, [greedy, hot, greedy])
    assert mixed[0].token_ids == plain[0].token_ids and mixed[2].token_ids == plain[2].token_ids
    engine.eos_id = plain[0].token_ids[4]
    out = engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=20))[0]
    assert out.token_ids == plain[0].token_ids[:5] and out.finish_reason == "stop"


@torch.no_grad()
def exact_marginals(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """P(t_1), ..., P(t_steps) of plain sampling at temperature 1, by enumerating every prefix."""
    V = model.config.vocab_size
    prefixes = torch.tensor([prompt])  # (P, S): every continuation so far
    weights = torch.ones(1)  # (P,) their probabilities
    out = []
    for _ in range(steps):
        probs = model(prefixes).logits[:, -1].float().softmax(-1)  # (P, V)
        joint = weights[:, None] * probs  # (P, V)
        out.append(joint.sum(0))
        prefixes = torch.cat((prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]), 1)
        weights = joint.flatten()
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_matches_target_distribution(k):
    """End to end with a 16-token vocabulary: many seeded requests, one batch; the emitted tokens'
    marginals (the first comes from the prefill, later ones from accept/reject) match the exact
    marginals of plain sampling."""
    model = tiny_model(seed=1, vocab_size=16, mtp_agree=1.0)
    prompt, steps, n = [3, 7, 2, 9], 3, 4000
    exact = exact_marginals(model, prompt, steps)
    engine = Engine(model, max_batch_size=n, max_len=16, speculative=k)
    params = [SamplingParams(temperature=1.0, seed=i, max_new_tokens=steps, ignore_eos=True) for i in range(n)]
    out = torch.tensor([c.token_ids for c in engine.generate([prompt] * n, params)])  # (n, steps)
    assert 0.1 < engine.last_stats.acceptance < 0.9
    for t in range(steps):
        counts = torch.bincount(out[:, t], minlength=16).float()
        assert chi_square(counts, exact[t]) < CHI2_DF15_P1E4, f"token {t}"
    assert chi_square(torch.bincount(out[:, 1], minlength=16).float(), exact[0]) > 100  # marginals differ


@pytest.mark.parametrize("k", [1, 2])
@torch.no_grad()
def test_first_draft_equals_mtp_on_full_recompute(k):
    """The MTP cache is right: each step's first draft is what MTP module 1 predicts when the
    whole committed sequence is recomputed without a cache (`forward(mtp_tokens=...)`)."""
    from nanoseek.infer.batch import Batch
    from nanoseek.infer.sequence import GenerationStats

    model = tiny_model(mtp_agree=1.0)
    engine = Engine(model, max_len=64, speculative=k)
    seqs = [engine.sequence(p, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))
            for p in random_prompts([5, 11, 2], model.config.vocab_size, seed=7)]
    batch, stats = Batch(engine, 3), GenerationStats()
    batch.admit(seqs, stats)
    for _ in range(6):
        for row, seq in enumerate(seqs):
            full = torch.tensor([seq.prompt_ids + seq.token_ids])  # the last token is the pending one
            ref = model(full[:, :-1], mtp_tokens=full[:, 1:]).mtp_logits[0][0, -1].argmax()
            assert batch.drafts[row, 0] == ref
        batch.step(stats)
    assert 0 < stats.accepted < stats.drafted
