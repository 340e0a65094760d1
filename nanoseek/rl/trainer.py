"""R1-Zero: GRPO with rule-based rewards, on the project's engine, from a pretrained checkpoint.

    nanoseek rl --ckpt runs/demo/checkpoints/step-000800 --preset demo
    nanoseek rl --train.out_dir runs/demo-rl --resume

Per step:
    rollout   P prompts (train split) x G samples on Engine(policy): the policy's own parameters, one
              prefill per prompt, stop at EOS or </answer>; engine log-probs kept; rewards scored.
              Dynamic sampling drops groups whose rewards are all equal and draws more prompts.
    advantage A = (r - mean_group(r)) [/ std_group(r)]
    update    mu epochs x `minibatches` optimizer steps; each: accumulate_gradients(grpo loss) over
              micro-batches, then optimizer_step (clip, AdamW, router-bias update unless frozen).
              pi_old: a no-grad training forward before the first step (or the engine's log-probs);
              with mu = minibatches = 1 it is the update's own forward, detached (ratio exactly 1).
    log       one dense line per step (metrics.jsonl + TensorBoard), held-out evaluation every N steps,
              samples at intervals, plots at the end; checkpoints (HF + optimizer/RNG/step) resume exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.hf import load_pretrained, read_config
from nanoseek.infer.engine import Engine
from nanoseek.rl.config import RLRun
from nanoseek.rl.evaluate import evaluate, summary_line
from nanoseek.rl.loss import group_advantages, grpo_loss, weight_negatives
from nanoseek.rl.rewards import JsonlPrompts, Reward, RewardWeights, TaskPrompts, math_verify_reward
from nanoseek.rl.rollout import (
    Rollout,
    count_real_tokens,
    forward_logprobs,
    generate_groups,
    pack,
    response_stats,
    sample_seed,
    token_logprobs,
)
from nanoseek.train.checkpoint import list_checkpoints, lock_run_dir, run_record, save_checkpoint
from nanoseek.train.metrics import MetricsLogger
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import accumulate_gradients, compile_blocks, optimizer_step
from nanoseek.train.trainer import resolve_device


def fail(message: str) -> SystemExit:
    return SystemExit(f"nanoseek rl: {message}")


# ---------------------------------------------------------------------------- the loss of one micro-batch
def rl_loss_fn(run: RLRun):
    """A `loss_fn(model, batch)` for `accumulate_gradients`: the GRPO loss of one micro-batch.

    batch: pack()'s tensors plus old_logp (N, S) (optional: the forward's own, detached), ref_logp (N, S)
    (beta > 0) and norm = (n_seqs, n_tokens, n_micro) of the whole mini-batch: the loss is scaled by n_micro
    so that accumulate_gradients' mean over micro-batches gives the mini-batch's aggregate.
    """
    rl = run.rl

    def loss_fn(model, batch: dict[str, torch.Tensor]):
        x, y, full_mask = batch["input_ids"], batch["targets"], batch["mask"]
        use_mtp = rl.mtp_lambda > 0 and len(model.mtp) > 0
        s0 = batch.get("first_target", 0)  # positions before s0 are prompt in every row: not scored
        with count_real_tokens(model, batch["valid"]):
            out = model(x, mtp_tokens=y if use_mtp else None, logits_from=s0)
        logp, entropy = token_logprobs(out.logits, y[:, s0:])  # (N, S - s0) each
        mask, engine_logp = full_mask[:, s0:], batch["engine_logp"][:, s0:]
        old = batch["old_logp"][:, s0:] if "old_logp" in batch else logp.detach()
        ref = batch["ref_logp"][:, s0:] if "ref_logp" in batch else None
        n_seqs, n_tokens, n_micro = (int(v) for v in batch["norm"])
        loss, stats = grpo_loss(logp, old, batch["advantages"], mask, eps_low=rl.eps_low, eps_high=rl.eps_high,
                                beta=rl.beta, ref_logp=ref, aggregation=rl.aggregation,
                                max_tokens=rl.max_new_tokens, engine_logp=engine_logp, tis_cap=rl.tis_cap,
                                normaliser=(n_seqs, n_tokens))
        loss = loss * n_micro
        stats["loss"] = loss.detach()  # averaged over the micro-batches: the mini-batch's loss
        m = mask.sum().clamp_min(1)
        stats["entropy"] = (entropy * mask).sum() / m
        stats["logp_mismatch"] = ((logp.detach() - engine_logp).abs() * mask).sum() / m
        if use_mtp:  # MTP depth k predicts token i+k+1: trained on the response tokens only
            terms = []
            for k, logits in enumerate(out.mtp_logits, start=1):
                lp = logits[:, :-k].float().log_softmax(-1).gather(-1, y[:, k:, None])[..., 0]
                mk = full_mask[:, k:]
                terms.append(-(lp * mk).sum() / mk.sum().clamp_min(1))
            mtp = torch.stack(terms).mean()
            loss = loss + rl.mtp_lambda * mtp
            stats["mtp_loss"] = mtp.detach()
        if rl.seq_aux_alpha:
            loss = loss + rl.seq_aux_alpha * model.balance_loss()
        return loss, stats

    return loss_fn


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def per_token(rollouts: list[Rollout], logp: torch.Tensor, mask_start: list[int]) -> list[torch.Tensor]:
    """Cut (N, S) log-probs back into each rollout's response tokens."""
    return [logp[i, s:s + len(r.token_ids)].cpu() for i, (r, s) in enumerate(zip(rollouts, mask_start))]


def place(rollouts: list[Rollout], values: list[torch.Tensor], S: int) -> torch.Tensor:
    """Per-rollout response values -> (N, S) at the response positions (zeros elsewhere)."""
    out = torch.zeros(len(rollouts), S)
    for i, (r, v) in enumerate(zip(rollouts, values)):
        start = len(r.prompt_ids) - 1
        out[i, start:start + len(v)] = v[:S - start]
    return out


def micro_batches(rollouts: list[Rollout], run: RLRun, pad_id: int, old: dict[int, torch.Tensor],
                  ref: dict[int, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One mini-batch of rollouts as micro-batches of tensors (see rl_loss_fn)."""
    mask_truncated = run.rl.overlong_filter
    n_tokens = sum(len(r.token_ids) for r in rollouts if not (mask_truncated and r.truncated))
    parts = chunks(rollouts, run.rl.micro_batch_size)
    out = []
    for part in parts:
        batch = pack(part, pad_id, mask_truncated)
        S = batch["input_ids"].shape[1]
        if old:
            batch["old_logp"] = place(part, [old[id(r)] for r in part], S)
        if ref:
            batch["ref_logp"] = place(part, [ref[id(r)] for r in part], S)
        batch["norm"] = (len(rollouts), n_tokens, len(parts))  # host ints: reading them costs no sync
        out.append(batch)
    return out


def logprobs_of(model, rollouts: list[Rollout], run: RLRun, pad_id: int, device, autocast) -> dict[int, torch.Tensor]:
    """{id(rollout): log p of its response tokens} under `model`, without gradients."""
    out = {}
    for part in chunks(rollouts, run.rl.micro_batch_size):
        batch = pack(part, pad_id)
        s0 = batch["first_target"]
        logp = forward_logprobs(model, batch["input_ids"].to(device), batch["targets"].to(device), autocast, s0)
        starts = [len(r.prompt_ids) - 1 - s0 for r in part]
        for r, v in zip(part, per_token(part, logp, starts)):
            out[id(r)] = v
    return out


# ---------------------------------------------------------------------------- set-up
def find_resume(run: RLRun, out_dir: Path) -> Path | None:
    if not run.train.resume:
        return None
    if run.train.resume != "auto":
        return Path(run.train.resume)
    found = list_checkpoints(out_dir)
    if not found:
        raise fail(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; start without --resume")
    return found[-1]


def check_source(path: Path) -> None:
    """A usable starting checkpoint: HF weights and its tokenizer next to them."""
    if not (path / "config.json").is_file():
        raise fail(f"{path} is not a checkpoint (no config.json); pass a step-* directory written by "
                   "`nanoseek train` or a Hugging Face model folder")
    if not (path / "tokenizer.json").is_file():
        raise fail(f"{path} has no tokenizer (tokenizer.json): RL must sample and score text. Copy the tokenizer "
                   "files of the run that trained it into that directory (nanoseek train writes them next to "
                   "every checkpoint)")


def build_prompts(run: RLRun):
    p = run.prompts
    if p.source == "tasks":
        train = TaskPrompts(tuple(k.strip() for k in p.kinds.split(",") if k.strip()),
                            (p.difficulty_min, p.difficulty_max), p.seed)
    else:
        train = JsonlPrompts(p.source, p.seed)
    if p.eval_source:
        heldout = JsonlPrompts(p.eval_source, p.seed).heldout(p.eval_problems)
    else:
        heldout = train.heldout(p.eval_problems) if p.eval_problems else []
        if p.source != "tasks" and heldout:
            warnings.warn(f"evaluating on the first {len(heldout)} prompts of the training file {p.source}: "
                          "they are not held out; pass --prompts.eval_source FILE for a held-out set", stacklevel=2)
    return train, heldout


def curriculum_weights(pass_rates: dict[str, float]) -> dict[tuple[str, int], float]:
    """Edge of competence: weight p (1 - p) + 0.05 per (kind, difficulty) from its recent pass rate p."""
    out = {}
    for key, p in pass_rates.items():
        kind, d = key.rsplit("/", 1)
        out[(kind, int(d))] = p * (1 - p) + 0.05
    return out


# ---------------------------------------------------------------------------- the loop
def rl_train(run: RLRun, extra_rewards: dict[str, tuple[float, Reward]] | None = None) -> dict[str, Any]:
    """Run GRPO as configured; returns a summary (also written to summary.json).

    extra_rewards: {name: (weight, f(response, problem) -> float)} added to the configured rewards (a
    Python caller's own rule rewards; each is logged as reward_<name>)."""
    rl, tc = run.rl, run.train
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(out_dir, "rl")
    device = resolve_device(tc.device, "rl")
    resume = find_resume(run, out_dir)
    if resume is not None and not run.ckpt:
        saved = json.loads((resume / "run.json").read_text()) if (resume / "run.json").is_file() else {}
        run.ckpt = saved.get("config", {}).get("ckpt", "")
    if resume is None and run.ckpt and not (Path(run.ckpt) / "config.json").is_file() and list_checkpoints(run.ckpt):
        run.ckpt = str(list_checkpoints(run.ckpt)[-1])  # a `nanoseek train` run directory: its latest checkpoint
    source = resume or Path(run.ckpt)
    check_source(source)
    if resume is not None and run.ckpt and (Path(run.ckpt) / "config.json").is_file():
        ours, theirs = read_config(run.ckpt).to_hf_dict(), read_config(resume).to_hf_dict()
        diffs = [f"{k}: {theirs.get(k)!r} vs --ckpt {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                 if ours.get(k) != theirs.get(k)]
        if diffs:
            raise fail(f"cannot resume {resume}: it holds another model shape than --ckpt {run.ckpt} "
                       f"({'; '.join(diffs)}); resume with the same --ckpt or use a new --train.out_dir")
    tok = load_tokenizer(source)
    model = load_pretrained(source, dtype=torch.float32, device=device).train()
    if model.config.vocab_size < tok.vocab_size:
        raise fail(f"the tokenizer of {source} has {tok.vocab_size} tokens but the model only "
                   f"{model.config.vocab_size}; pair the checkpoint with the tokenizer it was trained with")
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    optimizer = build_optimizer(model, tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay)
    ref = None
    if rl.beta > 0:  # pi_ref: a frozen copy (R1 resets it to the policy every ref_reset_every steps)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    step, pass_rates = 0, {}
    if resume is not None:
        state = torch.load(resume / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, pass_rates = state["step"], state.get("pass_rates", {})
        if ref is not None:
            if "ref_model" not in state:
                raise fail(f"{resume} was saved with --rl.beta 0 (no reference model); resume with --rl.beta 0")
            ref.load_state_dict(state["ref_model"])
        print(f"resumed from {resume} at step {step}")

    prompts, heldout = build_prompts(run)
    longest_prompt = max((len(tok.encode(p)) for p in _prompt_texts(run, heldout[:50])), default=0)
    max_pos = model.config.max_position_embeddings
    eval_tokens = run.prompts.eval_max_new_tokens or rl.max_new_tokens
    need = longest_prompt + max(rl.max_new_tokens, eval_tokens)
    if max(rl.max_new_tokens, eval_tokens) >= max_pos or need > max_pos:
        raise fail(f"--rl.max_new_tokens {rl.max_new_tokens} (evaluation: {eval_tokens}) plus prompts of up to "
                   f"{longest_prompt} tokens exceeds the model's context of {max_pos} tokens; lower it to at most "
                   f"{max(max_pos - longest_prompt - 8, 1)}")
    weights = RewardWeights(run.reward.accuracy, run.reward.format, run.reward.overlong, run.reward.overlong_buffer)
    if run.reward.math_verify:
        weights.extra["math_verify"] = (run.reward.math_verify, math_verify_reward())
    weights.extra.update(extra_rewards or {})
    engine = Engine(model, tok, max_batch_size=rl.prompts_per_step * rl.group_size, max_len=max_pos,
                    cuda_graph=tc.cuda_graph and device.type == "cuda", compile=tc.compile,
                    autocast=torch.bfloat16 if use_bf16 else None)  # rollouts compute as the update does
    if tc.compile:  # the update's blocks too (the engine compiled its own view of them, see Engine.decode_view);
        # response lengths vary, so the second shape a block sees recompiles it with dynamic shapes, once
        compile_blocks(model)

    logger = MetricsLogger(out_dir, tc.tensorboard)
    record = run_record(run.to_dict(), device)
    (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"nanoseek rl: {n_params / 1e6:.2f}M-parameter policy from {source}, device {device}, "
          f"{'bf16 autocast' if use_bf16 else 'fp32'}; {rl.prompts_per_step} prompts x G={rl.group_size}, "
          f"{rl.max_new_tokens} new tokens, beta={rl.beta}, aggregation={rl.aggregation}; out {out_dir}")

    summary: dict[str, Any] = {"ckpt": run.ckpt, "evals": []}
    eval_sampling = dict(template=rl.template, max_new_tokens=eval_tokens, pass_k=run.prompts.pass_k,
                         temperature=rl.temperature, seed=tc.seed + 777)

    def run_eval(at: int) -> dict:
        t = time.time()
        result = evaluate(engine, heldout, **eval_sampling)
        result["step"], result["seconds"] = at, time.time() - t
        logger.log(at, "eval", {"accuracy": result["accuracy"], "format": result["format"],
                                **{f"acc_{k}": v["accuracy"] for k, v in result["by_kind"].items()},
                                **({"pass_k": result["pass_k"]["accuracy"]} if "pass_k" in result else {})})
        with (out_dir / "evals.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"eval at step {at}: {summary_line(result)} ({result['seconds']:.0f}s)")
        summary["evals"].append(result)
        return result

    if heldout and resume is None:
        run_eval(0)

    stop_signal: list[str] = []
    previous = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))
                for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(at: int) -> Path:
        state = {"step": at, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "pass_rates": pass_rates}
        if ref is not None:
            state["ref_model"] = ref.state_dict()
        try:
            return save_checkpoint(out_dir, at, model, state, source, record, tc.keep_last)
        except OSError as e:
            raise fail(f"could not write the checkpoint at step {at} ({e})") from None

    loss_fn = rl_loss_fn(run)
    started, last_ckpt = time.time(), None
    try:
        while step < tc.max_steps and not stop_signal:
            metrics = train_step(run, step, engine, model, optimizer, ref, prompts, weights, loss_fn, autocast,
                                 device, tok.pad_id, pass_rates)
            step += 1
            samples = metrics.pop("_samples")
            logger.log(step, "train", metrics)
            if step % tc.log_every == 0 or step == 1:
                print(log_line(step, tc.max_steps, metrics))
            if tc.samples_every and (step % tc.samples_every == 0 or step == 1):
                with (out_dir / "samples.jsonl").open("a") as f:
                    for s in samples:
                        f.write(json.dumps({"step": step, **s}) + "\n")
            if ref is not None and rl.ref_reset_every and step % rl.ref_reset_every == 0:
                ref.load_state_dict(model.state_dict())
            if run.prompts.eval_every and step % run.prompts.eval_every == 0 and step < tc.max_steps and heldout:
                run_eval(step)
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.max_steps:
                last_ckpt = checkpoint(step)
            if tc.time_limit_min and time.time() - started > tc.time_limit_min * 60:
                print(f"time limit of {tc.time_limit_min} min reached at step {step}")
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    last_ckpt = checkpoint(step)
    summary.update(step=step, checkpoint=str(last_ckpt), minutes=(time.time() - started) / 60)
    if stop_signal:
        logger.close()
        print(f"stopped by {stop_signal[0]} at step {step}; checkpoint {last_ckpt} (continue with --resume)")
        return summary | {"interrupted": stop_signal[0]}
    if heldout:
        run_eval(step)
    logger.close()
    if tc.plots:
        from nanoseek.rl.plots import plot_rl

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary["plots"] = [str(p) for p in plot_rl(out_dir)]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out_dir)
    return summary


def _prompt_texts(run: RLRun, problems) -> list[str]:
    from nanoseek.rl.rewards import prompt_text

    return [prompt_text(p.prompt, run.rl.template) for p in problems]


def train_step(run: RLRun, step: int, engine: Engine, model, optimizer, ref, prompts, weights: RewardWeights,
               loss_fn, autocast, device, pad_id: int, pass_rates: dict[str, float]) -> dict[str, Any]:
    """One RL step: rollouts (with dynamic sampling), advantages, mu x minibatches optimizer steps."""
    rl, tc = run.rl, run.train
    t0 = time.perf_counter()
    groups, seen, gen_tokens, zero_var = [], [], 0, 0
    rounds = rl.max_draws if rl.dynamic_sampling else 1
    curriculum = curriculum_weights(pass_rates) if run.prompts.curriculum and pass_rates else None
    for draw in range(rounds):
        need = rl.prompts_per_step - len(groups)
        problems = prompts.train_batch(step, need if draw else rl.prompts_per_step, curriculum, draw)
        new = generate_groups(engine, problems, rl.group_size, temperature=rl.temperature, top_p=rl.top_p,
                              max_new_tokens=rl.max_new_tokens, template=rl.template,
                              seed=sample_seed(tc.seed, step, draw), weights=weights)
        gen_tokens += engine.last_stats.new_tokens
        for g in new:
            seen.append(g)
            flat = len({r.reward for r in g}) == 1
            zero_var += flat
            if not (rl.dynamic_sampling and flat):
                groups.append(g)
        if len(groups) >= rl.prompts_per_step:
            break
    groups = groups[:rl.prompts_per_step]
    rollout_s = time.perf_counter() - t0
    everything = [r for g in seen for r in g]
    m: dict[str, Any] = response_stats(everything)
    m["accuracy"], m["format_rate"] = m.pop("reward_accuracy"), m.pop("reward_format")
    m.update(zero_var_share=zero_var / max(len(seen), 1), groups=len(groups), draws=draw + 1,
             rollout_s=rollout_s, rollout_tok_s=gen_tokens / max(rollout_s, 1e-9))
    for g in seen:  # curriculum statistics: an exponential average of each cell's pass rate
        p = g[0].problem
        key = f"{p.kind}/{p.difficulty}"
        rate = sum(r.components["accuracy"] for r in g) / len(g)
        pass_rates[key] = 0.7 * pass_rates.get(key, rate) + 0.3 * rate
    m["_samples"] = [{"prompt": g[0].problem.prompt, "completion": g[0].text, "reward": g[0].reward}
                     for g in seen[:2]]

    informative = [g for g in groups if len({r.reward for r in g}) > 1]
    if not informative:
        warnings.warn(f"step {step + 1}: every group's rewards are equal (no advantage signal); the update is "
                      "skipped. Raise --rl.group_size or the temperature, use --rl.dynamic_sampling true, or "
                      "pick easier/harder prompts", stacklevel=2)
        return m | {"skipped": 1, "update_s": 0.0, "lr": tc.lr}
    rewards = torch.tensor([[r.reward for r in g] for g in groups])  # (P, G)
    adv = group_advantages(rewards, rl.scale_std)
    if rl.neg_weight != 1.0:  # down-weight the push-down on below-average responses
        adv = weight_negatives(adv, rl.neg_weight)
    for g, a in zip(groups, adv.tolist()):
        for r, ai in zip(g, a):
            r.advantage = ai
    rollouts = [r for g in groups for r in g]

    t1 = time.perf_counter()
    old = {}
    if rl.old_logprobs == "engine":
        old = {id(r): torch.tensor(r.engine_logprobs) for r in rollouts}
    elif rl.mu > 1 or rl.minibatches > 1:  # pi_old must be frozen before the first step changes the policy
        old = logprobs_of(model, rollouts, run, pad_id, device, autocast)
    refs = logprobs_of(ref, rollouts, run, pad_id, device, autocast) if ref is not None else {}
    gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
    sums: dict[str, float] = {}
    updates, first = 0, None
    for _ in range(rl.mu):
        order = torch.randperm(len(rollouts), generator=gen).tolist()
        size = math.ceil(len(rollouts) / rl.minibatches)
        for idx in chunks(order, size):
            batch = micro_batches([rollouts[i] for i in idx], run, pad_id, old, refs)
            out = accumulate_gradients(model, batch, loss_fn, autocast)
            lr = tc.lr * min(1.0, (optimizer_steps(optimizer) + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
            out |= optimizer_step(model, optimizer, lr=lr, grad_clip=tc.grad_clip,
                                  bias_gamma=0.0 if tc.freeze_router_bias else tc.bias_gamma)
            if first is None:
                first = float(out["logp_mismatch"])  # before any update: the engine-vs-trainer gap
            for k, v in out.items():
                if v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + float(v)
            updates += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    update_s = time.perf_counter() - t1
    m.update({k: v / updates for k, v in sums.items()})
    m["logp_mismatch"] = first
    train_tokens = sum(len(r.prompt_ids) + len(r.token_ids) for r in rollouts) * rl.mu
    m.update(update_s=update_s, update_tok_s=train_tokens / max(update_s, 1e-9), lr=lr,
             rollout_share=rollout_s / max(rollout_s + update_s, 1e-9), skipped=0)
    return m


def optimizer_steps(optimizer) -> int:
    """Optimizer steps taken so far (AdamW's per-parameter counter)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def log_line(step: int, total: int, m: dict[str, Any]) -> str:
    parts = [f"step {step:>4}/{total}", f"reward {m['reward']:.3f}", f"acc {m['accuracy']:.3f}",
             f"fmt {m['format_rate']:.2f}", f"len {m['response_len']:.0f}/{m['response_len_max']:.0f}",
             f"trunc {m['truncated']:.2f}", f"flat {m['zero_var_share']:.2f}"]
    if not m.get("skipped"):
        parts += [f"ent {m['entropy']:.3f}", f"kl {m['kl']:.4f}", f"clip {m['clip_low']:.3f}/{m['clip_high']:.3f}",
                  f"gnorm {m['grad_norm']:.2f}", f"|dlogp| {m['logp_mismatch']:.1e}"]
    parts += [f"refl {m['reflection']:.2f}", f"roll {m['rollout_tok_s']:,.0f} tok/s",
              f"upd {m['update_tok_s']:,.0f} tok/s" if not m.get("skipped") else "update skipped",
              f"roll {100 * m.get('rollout_share', 1.0):.0f}% of time"]
    return " | ".join(parts)


def print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    print("\n" + "=" * 72)
    print(f"done: {summary['step']} RL steps in {summary['minutes']:.1f} min")
    evals = summary["evals"]
    if evals:
        print(f"held-out before: {summary_line(evals[0])}")
        if len(evals) > 1:
            print(f"held-out after:  {summary_line(evals[-1])}")
            for kind, after in evals[-1]["by_kind"].items():
                before = evals[0]["by_kind"].get(kind, {"accuracy": float('nan')})
                lo, hi = after["ci95"]
                print(f"  {kind:<10} {100 * before['accuracy']:5.1f}% -> {100 * after['accuracy']:5.1f}% "
                      f"[95% CI {100 * lo:.1f}-{100 * hi:.1f}] (n={after['n']})")
    print(f"checkpoint  {summary['checkpoint']}")
    print(f"metrics     {out_dir / 'metrics.jsonl'} (TensorBoard: {out_dir / 'tensorboard'})")
    if summary.get("plots"):
        print(f"plots       {', '.join(summary['plots'])}")


__all__ = ["rl_train", "train_step", "rl_loss_fn"]
