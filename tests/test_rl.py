"""GRPO pieces as pure functions: the loss against a hand computation, advantages, k3, clipping,
aggregations, truncated importance sampling; rewards and prompt sets; configuration errors."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from nanoseek.data.tasks import make_problem, render, split_of
from nanoseek.rl.config import parse_args
from nanoseek.rl.loss import group_advantages, grpo_loss, k3_kl, weight_negatives
from nanoseek.rl.rewards import (
    OverlongPenalty,
    Response,
    RewardWeights,
    TaskPrompts,
    UserProblem,
    accuracy,
    answers_match,
    format_reward,
    load_jsonl_prompts,
    reflection_markers,
)


# ---------------------------------------------------------------------------- loss
def test_loss_matches_a_hand_computed_example():
    # two responses of 2 and 1 tokens; advantages +1 and -1; eps 0.2
    logp = torch.tensor([[math.log(0.5), math.log(0.9)], [math.log(0.3), 0.0]])
    old = torch.tensor([[math.log(0.4), math.log(0.6)], [math.log(0.5), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    # ratios: 1.25 (clipped to 1.2 for A>0: min(1.25, 1.2) = 1.2), 1.5 (-> 1.2), 0.6 (A<0: min(-0.6, -0.8) = -0.8)
    per_seq = [-(1.2 + 1.2) / 2, 0.8 / 1]
    loss, stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, aggregation="sequence")
    assert loss.item() == pytest.approx(sum(per_seq) / 2, abs=1e-6)
    loss, _ = grpo_loss(logp, old, adv, mask, aggregation="token")
    assert loss.item() == pytest.approx((-1.2 - 1.2 + 0.8) / 3, abs=1e-6)
    loss, _ = grpo_loss(logp, old, adv, mask, aggregation="constant", max_tokens=4)
    assert loss.item() == pytest.approx((-1.2 - 1.2 + 0.8) / (2 * 4), abs=1e-6)
    assert stats["clip_high"].item() == pytest.approx(2 / 3)  # both tokens of the A>0 response
    assert stats["clip_low"].item() == pytest.approx(1 / 3)  # the A<0 token with ratio 0.6 < 0.8
    assert stats["ratio"].item() == pytest.approx((1.25 + 1.5 + 0.6) / 3, rel=1e-5)


def test_gradient_flows_only_through_unclipped_tokens():
    logp = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, -0.5, 0.5]])  # ratios 1, e^0.5 = 1.65 (clipped), e^-0.5 = 0.61
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), eps_low=0.2, eps_high=0.28,
                        aggregation="token")
    loss.backward()
    g = logp.grad[0]
    assert g[0] == pytest.approx(-1 / 3) and g[1] == 0  # ratio above 1 + eps_high with A > 0: no gradient
    assert g[2] == pytest.approx(-math.exp(-0.5) / 3, rel=1e-5)  # below 1 - eps_low with A > 0: still pushed up


def test_clip_at_both_bounds_uses_eps_low_and_eps_high():
    ratio = torch.tensor([0.5, 0.79, 0.81, 1.27, 1.29, 2.0])
    logp, old, mask = ratio.log()[None], torch.zeros(1, 6), torch.ones(1, 6)
    for a, expect in ((1.0, [0.5, 0.79, 0.81, 1.27, 1.28, 1.28]), (-1.0, [-0.8, -0.8, -0.81, -1.27, -1.29, -2.0])):
        loss, stats = grpo_loss(logp, old, torch.tensor([a]), mask, eps_low=0.2, eps_high=0.28, aggregation="token")
        assert loss.item() == pytest.approx(-sum(expect) / 6, abs=1e-6)
        if a > 0:
            assert stats["clip_high"].item() == pytest.approx(2 / 6) and stats["clip_low"].item() == 0
        else:
            assert stats["clip_low"].item() == pytest.approx(2 / 6) and stats["clip_high"].item() == 0


def test_ratio_is_one_and_nothing_clips_when_old_equals_new():
    torch.manual_seed(0)
    logp = torch.randn(4, 5) - 2
    loss, stats = grpo_loss(logp, logp.clone(), torch.randn(4), torch.ones(4, 5), eps_low=0.01, eps_high=0.01)
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert stats["clip_low"].item() == 0 and stats["clip_high"].item() == 0


def test_k3_is_nonnegative_and_zero_for_equal_policies():
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(1000))
    # unbiased: E_{x~p}[k3] = KL(p || q) for two categorical distributions
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = k3_kl(p.log()[x], q.log()[x]).mean().item()
    assert est == pytest.approx((p * (p / q).log()).sum().item(), rel=0.03)


def test_kl_term_adds_beta_times_k3_and_needs_a_reference():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    base, _ = grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), aggregation="token")
    with_kl, stats = grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logp=ref,
                               aggregation="token")
    assert with_kl.item() - base.item() == pytest.approx(0.1 * k3_kl(logp, ref).mean().item(), rel=1e-6)
    assert stats["kl"].item() > 0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)


def test_truncated_importance_sampling_weights_are_capped():
    old = torch.tensor([[0.0, 0.0]])
    engine = torch.tensor([[-0.1, -3.0]])  # pi_old / pi_engine = e^0.1 and e^3 (capped at 2)
    _, stats = grpo_loss(old, old, torch.tensor([1.0]), torch.ones(1, 2), engine_logp=engine, tis_cap=2.0)
    assert stats["tis_weight"].item() == pytest.approx((math.exp(0.1) + 2.0) / 2, rel=1e-6)


def test_group_advantages_normalise_per_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    a = group_advantages(r)
    assert torch.allclose(a.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (r[0].std() + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # a flat group gives no signal
    assert torch.allclose(a[2].std(), torch.tensor(1.0), atol=1e-3)
    dr = group_advantages(r, scale_std=False)
    assert torch.allclose(dr[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(torch.ones(3, 1))


def test_weight_negatives_scales_only_below_average_responses():
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # one success in four: +1.5 / -0.5 (x 1/std)
    assert torch.equal(weight_negatives(a, 1.0), a)  # GRPO unchanged
    half = weight_negatives(a, 0.5)
    assert half[0, 0] == a[0, 0] and torch.allclose(half[0, 1:], a[0, 1:] / 2)
    none = weight_negatives(a, 0.0)
    assert none[0, 0] > 0 and torch.equal(none[0, 1:], torch.zeros(3))
    # with only positive advantages, a loss step can only raise the log-probs of the reinforced response
    logp = torch.zeros(4, 3, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), none[0], torch.ones(4, 3), aggregation="token")
    loss.backward()
    assert (logp.grad[0] < 0).all() and torch.equal(logp.grad[1:], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="neg_weight"):
        weight_negatives(a, 1.5)


# ---------------------------------------------------------------------------- rewards and prompts
def test_rewards_accuracy_format_and_overlong():
    problem = make_problem("countdown", random.Random(3), 3)
    good = render(problem, "r1", random.Random(0))
    assert accuracy(good, problem) == 1.0 and format_reward(good, problem) == 1.0
    assert accuracy(good.rsplit("<answer>", 1)[0] + "<answer> 1 + 1 </answer>", problem) == 0.0
    twice = good.replace("</think>", "</think> <think> </think>", 1)
    assert format_reward(twice, problem) == 0.0  # each tag once
    assert format_reward(f"Answer: {problem.answer}", problem) == 0.0
    pen = OverlongPenalty(100, 20)
    assert pen(Response("x", 80), problem) == 0.0
    assert pen(Response("x", 90), problem) == pytest.approx(-0.5)
    assert pen(Response("x", 100, truncated=True), problem) == -1.0
    w = RewardWeights(accuracy=1.0, format=0.1, overlong=1.0, overlong_buffer=20)
    total, parts = w.score(Response(good, 90), problem, 100)
    assert parts == {"accuracy": 1.0, "format": 1.0, "overlong": -0.5}
    assert total == pytest.approx(1.0 + 0.1 - 0.5)


def test_nan_reward_is_refused_naming_it():
    problem = UserProblem("q", "1")
    w = RewardWeights(extra={"mine": (1.0, lambda r, p: float("nan"))})
    with pytest.raises(ValueError, match="'mine' returned nan"):
        w.score(Response("<answer> 1 </answer>"), problem, 10)


def test_exact_integer_and_fraction_answers():
    assert answers_match("3/4", "0.75") and answers_match("1,024", "1024") and answers_match(" -7. ", "-7")
    assert not answers_match("3/4", "0.7501") and not answers_match("seven", "7") and not answers_match("1/0", "1")
    p = UserProblem("What is 3/4 of 1?", "3/4")
    assert accuracy("<think>x</think> <answer> 0.75 </answer>", p) == 1.0
    assert accuracy("Answer: 3 / 4", p) == 1.0 and accuracy("<answer>4/3</answer>", p) == 0.0


def test_jsonl_prompts_and_missing_fields(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "2+3?", "answer": 5}\n\n{"prompt": "half?", "answer": "1/2", "kind": "frac"}\n')
    probs = load_jsonl_prompts(f)
    assert [p.answer for p in probs] == ["5", "1/2"] and probs[1].kind == "frac"
    f.write_text('{"prompt": "2+3?", "answer": 5}\n{"prompt": "no answer"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no 'answer' field"):
        load_jsonl_prompts(f)
    f.write_text('{"answer": 1}\n')
    with pytest.raises(ValueError, match=r"line 1 has no 'prompt' field"):
        load_jsonl_prompts(f)


def test_task_prompts_never_hand_out_heldout_problems():
    prompts = TaskPrompts(("add", "countdown"), (1, 3), seed=1)
    batch = [p for step in range(20) for p in prompts.train_batch(step, 16)]
    assert all(split_of(p) == "train" for p in batch)
    assert {p.kind for p in batch} == {"add", "countdown"} and all(p.difficulty <= 3 for p in batch)
    assert prompts.train_batch(5, 8) == prompts.train_batch(5, 8)  # deterministic: resume is exact
    held = prompts.heldout(30)
    assert all(split_of(p) == "heldout" for p in held) and not {p.uid for p in held} & {p.uid for p in batch}
    # the curriculum's weights move the draw towards the favoured cell
    skewed = prompts.train_batch(0, 200, weights={("add", 2): 100.0})
    assert sum(p.kind == "add" and p.difficulty == 2 for p in skewed) > 120
    with pytest.raises(ValueError, match="countdown"):
        TaskPrompts(("countdown",), (1, 2))


def test_reflection_markers():
    m = reflection_markers("Wait, let me check. 12 + 3 = 15, not 16, backtrack. Try again.")
    assert m["wait"] == 1 and m["check"] == 1 and m["backtrack"] >= 1 and m["retry"] == 1
    assert not any(reflection_markers("12 + 3 = 15").values())


# ---------------------------------------------------------------------------- configuration
def test_config_presets_overrides_and_errors(tmp_path):
    run = parse_args(["--ckpt", "x", "--preset", "dapo", "--rl.group_size", "4", "--train.lr", "1e-6"])
    assert run.rl.eps_high == 0.28 and run.rl.aggregation == "token" and run.rl.dynamic_sampling
    assert run.rl.group_size == 4 and run.train.lr == 1e-6 and run.rl.beta == 0.0
    with pytest.raises(SystemExit, match="G >= 2"):
        parse_args(["--ckpt", "x", "--rl.group_size", "1"])
    with pytest.raises(SystemExit, match="did you mean --rl.group_size"):
        parse_args(["--ckpt", "x", "--rl.group_sise", "4"])
    with pytest.raises(SystemExit, match="--ckpt DIR is required"):
        parse_args([])
    with pytest.raises(SystemExit, match="expects int"):
        parse_args(["--ckpt", "x", "--rl.mu", "two"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_args(["--ckpt", "x", "--rl.beta", "0", "--rl.ref_reset_every", "10"])
    assert any("no reference model" in str(w.message) for w in caught)
    cfg = tmp_path / "rl.toml"
    cfg.write_text('ckpt = "base"\n[rl]\nmu = 2\n[train]\nlr = 3e-6\n')
    run = parse_args(["--config", str(cfg), "--rl.mu", "3"])
    assert run.ckpt == "base" and run.rl.mu == 3 and run.train.lr == 3e-6


def test_wilson_interval_and_curriculum_weights():
    from nanoseek.rl.evaluate import wilson
    from nanoseek.rl.trainer import curriculum_weights

    lo, hi = wilson(0, 300)
    assert lo == 0 and 0 < hi < 0.02  # a sound interval at 0%
    lo, hi = wilson(150, 300)
    assert lo == pytest.approx(0.5 - 0.0561, abs=2e-3) and hi == pytest.approx(0.5 + 0.0561, abs=2e-3)
    w = curriculum_weights({"add/1": 1.0, "add/2": 0.5, "mul/3": 0.0})
    assert w[("add", 2)] > w[("add", 1)] == w[("mul", 3)] > 0  # most weight at the edge of competence
