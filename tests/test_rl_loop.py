"""The RL loop on a tiny checkpoint: exact resume, rollouts on the live engine, a smoke run whose reward
must rise, and the bad inputs of issue 17."""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.data.corpus import synthetic_corpus
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.hf import copy_tokenizer_files
from nanoseek.infer.engine import Engine
from nanoseek.model.transformer import Transformer
from nanoseek.rl.config import parse_args
from nanoseek.rl.rewards import Response, RewardWeights, TaskPrompts
from nanoseek.rl.rollout import forward_logprobs, generate_groups, pack
from nanoseek.rl.trainer import rl_train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and on a shared 2-core machine two
    threads per process spin against other processes (measured 16x slower under a load of 10)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random-initialised debug model with a small BPE tokenizer, saved as an HF checkpoint."""
    root = tmp_path_factory.mktemp("rl-base")
    tok = train_tokenizer(synthetic_corpus(150, 0, (1, 3)), 300, root / "tok")
    cfg = preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id,
                 pad_token_id=tok.pad_id, max_position_embeddings=512, num_nextn_predict_layers=1)
    model = Transformer.from_config(cfg, seed=0)
    nanoseek.save_pretrained(model, root / "ckpt")
    copy_tokenizer_files(root / "tok", root / "ckpt")
    return root / "ckpt"


def digit_share(response, problem) -> float:
    """An easy, dense rule reward for a random model: the share of the response's characters that are digits."""
    text = response.text if isinstance(response, Response) else response
    return sum(c.isdigit() for c in text) / max(len(text), 1)


FAST = ["--preset", "debug", "--reward.accuracy", "0", "--reward.format", "0", "--prompts.eval_problems", "0",
        "--rl.max_new_tokens", "12", "--train.lr", "1e-2", "--prompts.kinds", "add,sub"]


def rows(out_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_resume_continues_exactly(base, tmp_path):
    """3 steps + 3 resumed steps == 6 steps: rollouts, rewards, losses and weights (KL to a reference
    model, mu = 2 epochs over 2 mini-batches, the router bias update, all on)."""
    opts = [*FAST, "--ckpt", str(base), "--rl.beta", "0.05", "--rl.ref_reset_every", "2", "--rl.mu", "2",
            "--rl.minibatches", "2", "--rl.micro_batch_size", "4", "--train.bias_gamma", "0.01"]
    extra = {"digits": (1.0, digit_share)}
    rl_train(parse_args([*opts, "--train.out_dir", str(tmp_path / "straight"), "--train.max_steps", "6"]), extra)
    rl_train(parse_args([*opts, "--train.out_dir", str(tmp_path / "split"), "--train.max_steps", "3"]), extra)
    rl_train(parse_args([*opts, "--train.out_dir", str(tmp_path / "split"), "--train.max_steps", "6", "--resume"]),
             extra)
    keys = ("reward", "response_len", "kl", "grad_norm", "clip_low", "clip_high", "entropy")
    straight = [{k: r[k] for k in keys} for r in rows(tmp_path / "straight")]
    split = [{k: r[k] for k in keys} for r in rows(tmp_path / "split")]
    assert [r["step"] for r in rows(tmp_path / "split")] == list(range(1, 7))
    assert straight == split
    assert straight[-1]["kl"] > 0  # the reference model was used (and restored on resume)
    a = nanoseek.load_pretrained(tmp_path / "straight" / "checkpoints" / "step-000006")
    b = nanoseek.load_pretrained(tmp_path / "split" / "checkpoints" / "step-000006")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.moe_layers[0].gate.e_score_correction_bias.abs().sum() > 0  # router bias kept moving


def test_smoke_run_raises_an_easy_reward(base, tmp_path):
    """A short run must raise the digit-share reward clearly; a sign error or a broken gradient path fails it."""
    summary = rl_train(parse_args([*FAST, "--ckpt", str(base), "--train.out_dir", str(tmp_path),
                                   "--train.max_steps", "12", "--rl.group_size", "8", "--rl.beta", "0",
                                   "--train.plots", "true"]), {"digits": (1.0, digit_share)})
    r = [row["reward"] for row in rows(tmp_path)]
    assert len(r) == 12
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert last > first + 0.15, f"reward did not rise: {r}"
    assert Path(summary["checkpoint"]).is_dir()
    assert {Path(p).name for p in summary["plots"]} >= {"rl_reward.png", "rl_length.png", "rl_entropy_kl.png"}
    line = rows(tmp_path)[-1]
    for key in ("reward_digits", "accuracy", "format_rate", "response_len", "response_len_max", "truncated",
                "zero_var_share", "entropy", "kl", "clip_low", "clip_high", "grad_norm", "rollout_tok_s",
                "update_tok_s", "rollout_s", "update_s", "rollout_share", "reflection", "logp_mismatch"):
        assert key in line, key


def test_rollouts_run_on_the_policy_and_logprobs_agree(base):
    """The engine samples from the policy's own parameters; its log-probs equal the training forward's
    (fp32, CPU), so the first update's ratio is 1."""
    model = nanoseek.load_pretrained(base).train()
    tok = load_tokenizer(base)
    engine = Engine(model, tok, max_batch_size=8, max_len=512)
    problems = TaskPrompts(("add",), (1, 2), seed=0).train_batch(0, 2)
    groups = generate_groups(engine, problems, 3, temperature=1.0, top_p=1.0, max_new_tokens=8, template="r1",
                             seed=5, weights=RewardWeights())
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)

    def agree() -> None:
        rollouts = [r for g in groups for r in g]
        batch = pack(rollouts, tok.pad_id)
        trainer = forward_logprobs(model, batch["input_ids"], batch["targets"], contextlib.nullcontext())
        m = batch["mask"].bool()
        assert m.sum() > 0 and torch.allclose(trainer[m], batch["engine_logp"][m], atol=1e-4)

    agree()
    assert model.training  # the no-grad forward left the policy in training mode
    # an in-place change of the policy (what optimizer.step does) is what the next rollout decodes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    groups = generate_groups(engine, problems, 3, temperature=1.0, top_p=1.0, max_new_tokens=8, template="r1",
                             seed=5, weights=RewardWeights())
    agree()


def test_evaluation_tables_and_run_directory_as_ckpt(base, tmp_path):
    """Held-out evaluation (greedy pass@1, pass@k by kind) before and after; --ckpt may name a run directory."""
    run_dir = tmp_path / "pretrain"
    shutil.copytree(base, run_dir / "checkpoints" / "step-000007")
    (run_dir / "checkpoints" / "step-000007" / "trainer_state.pt").write_bytes(b"")
    summary = rl_train(parse_args([*FAST, "--ckpt", str(run_dir), "--train.out_dir", str(tmp_path / "rl"),
                                   "--train.max_steps", "1", "--prompts.eval_problems", "6", "--prompts.pass_k", "2",
                                   "--prompts.kinds", "add,countdown", "--prompts.difficulty_max", "3"]))
    assert summary["ckpt"].endswith("step-000007")
    before, after = summary["evals"]
    assert before["n"] == 6 and set(before["by_kind"]) <= {"add", "countdown"}
    assert before["pass_k"]["k"] == 2 and 0 <= before["pass_k"]["accuracy"] <= 1
    assert after["step"] == 1 and before["step"] == 0
    # an untrained-ish base: the failures listed are the greedy answers that miss the format
    assert len(before["format_failures"]) == min(3, round((1 - before["format"]) * 6))
    assert 0 <= before["truncated"] <= 1 and before["mean_length"] > 0


# ---------------------------------------------------------------------------- bad input
def test_checkpoint_without_tokenizer(base, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match="no tokenizer"):
        rl_train(parse_args([*FAST, "--ckpt", str(bare), "--train.out_dir", str(tmp_path / "o")]))


def test_max_new_tokens_beyond_context(base, tmp_path):
    with pytest.raises(SystemExit, match="exceeds the model's context"):
        rl_train(parse_args([*FAST, "--ckpt", str(base), "--rl.max_new_tokens", "600",
                             "--train.out_dir", str(tmp_path)]))


def test_prompt_file_with_missing_fields(base, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(ValueError, match="line 2 has no 'prompt' field"):
        rl_train(parse_args([*FAST, "--ckpt", str(base), "--prompts.source", str(f),
                             "--train.out_dir", str(tmp_path / "o")]))


def test_all_flat_groups_warn_and_skip_and_nan_reward_fails(base, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rl_train(parse_args([*FAST, "--ckpt", str(base), "--train.out_dir", str(tmp_path / "flat"),
                             "--train.max_steps", "1"]))  # accuracy and format weights 0: every reward equal
    assert any("every group's rewards are equal" in str(w.message) for w in caught)
    assert rows(tmp_path / "flat")[0]["skipped"] == 1
    with pytest.raises(ValueError, match="'bad' returned nan"):
        rl_train(parse_args([*FAST, "--ckpt", str(base), "--train.out_dir", str(tmp_path / "nan"),
                             "--train.max_steps", "1"]), {"bad": (1.0, lambda r, p: float("nan"))})


def test_resume_with_another_model_shape(base, tmp_path):
    rl_train(parse_args([*FAST, "--ckpt", str(base), "--train.out_dir", str(tmp_path / "run"),
                         "--train.max_steps", "1"]))
    other = tmp_path / "other"
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    other.mkdir()
    model = Transformer.from_config(nanoseek.ModelConfig.from_hf_dict(cfg), seed=0)
    nanoseek.save_pretrained(model, other)
    copy_tokenizer_files(base, other)
    with pytest.raises(SystemExit, match="another model shape"):
        rl_train(parse_args([*FAST, "--ckpt", str(other), "--train.out_dir", str(tmp_path / "run"), "--resume",
                             "--train.max_steps", "2"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_", [False, True])
def test_gpu_steps_with_cuda_graphs_bf16_and_small_logprob_gap(base, tmp_path, compile_):
    """On a GPU: rollouts through CUDA graphs and the decode kernels (bf16 autocast over the fp32 policy), the
    update under bf16 autocast, with and without compiled blocks; the engine-vs-trainer log-prob gap stays
    small and the reward still rises."""
    rl_train(parse_args([*FAST, "--ckpt", str(base), "--train.out_dir", str(tmp_path), "--train.device", "cuda",
                         "--train.max_steps", "12", "--rl.group_size", "8", "--rl.beta", "0.01",
                         "--rl.tis_cap", "2", "--rl.mu", "2", "--train.compile", str(compile_).lower()]),
             {"digits": (1.0, digit_share)})
    r = rows(tmp_path)
    assert all(row["logp_mismatch"] < 0.1 for row in r), [row["logp_mismatch"] for row in r]
    rewards = [row["reward"] for row in r]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


def test_sigint_finishes_the_step_and_saves(base, tmp_path):
    import os
    import signal

    def interrupt(response, problem) -> float:  # a reward that presses Ctrl-C during the first rollout
        os.kill(os.getpid(), signal.SIGINT)
        return 0.0

    summary = rl_train(parse_args([*FAST, "--ckpt", str(base), "--train.out_dir", str(tmp_path),
                                   "--train.max_steps", "5"]), {"interrupt": (1.0, interrupt)})
    assert summary["interrupted"] == "SIGINT" and summary["step"] == 1
    assert (tmp_path / "checkpoints" / "step-000001" / "trainer_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was restored


def test_router_loads_count_real_tokens_only(base):
    """Padding is routed too; the counts behind the router-bias update must equal those of the unpadded
    sequences run one by one."""
    from nanoseek.rl.rollout import Rollout, count_real_tokens

    model = nanoseek.load_pretrained(base).train()
    rollouts = [Rollout(None, [5, 6, 7], [8, 9], [0.0, 0.0], "", False),
                Rollout(None, [5, 6], [10, 11, 12, 13, 14, 15], [0.0] * 6, "", False)]
    batch = pack(rollouts, pad_id=1)
    with torch.no_grad(), count_real_tokens(model, batch["valid"]):
        model(batch["input_ids"])
    layers = [m for m in model.moe_layers if m.last_load is not None]  # the MTP module did not run
    padded = [m.last_load.clone() for m in layers]
    alone = [torch.zeros_like(x) for x in padded]
    for r in rollouts:
        with torch.no_grad():
            model(torch.tensor([r.prompt_ids + r.token_ids[:-1]]))
        for acc, m in zip(alone, layers):
            acc += m.last_load
    for a, b in zip(padded, alone):
        assert torch.equal(a, b)
        assert a.sum() == (4 + 7) * model.config.num_experts_per_tok  # 11 real tokens of 2 x 7 positions


def test_update_scores_only_positions_after_the_shortest_prompt(base):
    """The update's head and log-softmax skip positions before the first response target (`first_target`):
    loss, statistics and every gradient equal the full-length computation's, with prompts of two lengths,
    old and reference log-probs (beta > 0) and the MTP loss (which keeps the full length)."""
    from nanoseek.rl.rollout import Rollout
    from nanoseek.rl.trainer import rl_loss_fn

    run = parse_args(["--ckpt", "unused", "--rl.beta", "0.04", "--rl.mtp_lambda", "0.3", "--rl.tis_cap", "2"])
    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(None, [5, 6, 7, 8, 9], [10, 11, 12], [-1.0, -2.0, -0.5], "", False),
                Rollout(None, [5, 6, 7], [13, 14, 15, 16, 17], [-1.5] * 5, "", False)]
    for r, a in zip(rollouts, (0.7, -0.7)):
        r.advantage = a
    batch = pack(rollouts, pad_id=1)
    assert batch["first_target"] == 2
    S = batch["input_ids"].shape[1]
    batch["old_logp"] = -torch.rand(2, S, generator=g) * batch["mask"]
    batch["ref_logp"] = -torch.rand(2, S, generator=g) * batch["mask"]
    batch["norm"] = (2, 8, 1)
    results = []
    for first in (batch["first_target"], 0):
        model = nanoseek.load_pretrained(base).train()
        loss, stats = rl_loss_fn(run)(model, {**batch, "first_target": first})
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=1e-7)
    for k in s1:
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-5, atol=1e-6, msg=k)
    assert g0.keys() == g1.keys()
    for n in g1:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)
