"""Pretraining: data -> tokenizer -> shards -> model (+MTP) -> loss (+balance) -> AdamW (+bias update).

    nanoseek train                                    # embedded demo, CPU, minutes
    nanoseek train --preset bench-1b --data.source my.jsonl --data.seq_len 2048 --train.batch_size 8
    nanoseek train --resume                           # continue the latest checkpoint in train.out_dir

Reads top to bottom: (resume: which checkpoint, which configuration), prepare data, build model and
optimizer, (load the checkpoint), loop, finish. Reliability (docs/reliability.md): a NaN/Inf step is
skipped on the device and counted (train/guard.py), a run stops after max_nonfinite in a row, no
checkpoint of a NaN model is written; checkpoints are atomic and checksummed (train/checkpoint.py);
--resume continues the saved configuration and refuses flags that would change it (train/resume.py).
Per optimizer step (`nanoseek/train/step.py`: accumulate_gradients, then optimizer_step):
    loss = CE(main) + lambda/D * sum_k CE(MTP_k) + alpha * sum_layers L_balance   (per micro-batch)
    clip grad norm; AdamW step; router bias b += gamma * sign(mean load - load) (global counts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm import tqdm

from nanoseek.data.corpus import load_user_texts, synthetic_corpus
from nanoseek.data.loader import PackedLoader
from nanoseek.data.shards import write_shards
from nanoseek.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from nanoseek.fp8 import install_fp8
from nanoseek.fp8.install import parse_parts
from nanoseek.hf import CheckpointError
from nanoseek.model.transformer import Transformer
from nanoseek.train.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    lock_run_dir,
    run_record,
    save_checkpoint,
    weights_finite,
)
from nanoseek.train.config import DataConfig, RunConfig, TrainConfig
from nanoseek.train.evaluate import greedy_complete, heldout_accuracy, validation_loss
from nanoseek.train.guard import NonFiniteGuard
from nanoseek.train.master_weights import masters_in_model
from nanoseek.train.metrics import MetricsLogger, flops_per_token, plot_run, step_metrics
from nanoseek.train.optim import SCHEDULES, build_optimizer, continued_multiplier, schedule_anchor
from nanoseek.train.resume import (
    check_fresh_out_dir,
    check_resume_target,
    find_checkpoint,
    resumed_run,
    run_dir_of,
    saved_run,
    truncate_metrics,
)
from nanoseek.train.step import (
    accumulate_gradients,
    compile_blocks,
    compiled_cross_entropy,
    cross_entropy,
    enable_activation_checkpointing,
    optimizer_step,
    pretraining_loss,
)


# ---------------------------------------------------------------------------- data
@dataclasses.dataclass
class PreparedData:
    tokenizer: Tokenizer
    tokenizer_dir: Path
    train_dir: Path
    val_dir: Path


def prepare_data(cfg: DataConfig, out_dir: Path, log=print) -> PreparedData:
    """Corpus -> tokenizer -> token shards, cached under out_dir/data keyed by the data config."""
    keyed = dataclasses.asdict(cfg)
    if not keyed["kinds"]:  # all kinds: the key data caches made before the option existed had
        del keyed["kinds"]
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    root = out_dir / "data" / key
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else root / "tokenizer"
    train_dir, val_dir = root / "train", root / "val"
    if (train_dir / "manifest.json").is_file() and (val_dir / "manifest.json").is_file() \
            and (tok_dir / "tokenizer.json").is_file():
        log(f"data: cached shards in {root}")
        return PreparedData(load_tokenizer(tok_dir), tok_dir, train_dir, val_dir)

    t0 = time.time()
    if cfg.source == "synthetic":
        difficulty = (cfg.difficulty_min, cfg.difficulty_max)
        train_docs = synthetic_corpus(cfg.n_docs, cfg.seed, difficulty, cfg.r1_share, cfg.answer_only_share,
                                      kinds=cfg.kind_list())
        val_docs = synthetic_corpus(cfg.val_docs, cfg.seed + 1, difficulty, cfg.r1_share, cfg.answer_only_share,
                                    split="heldout", kinds=cfg.kind_list())
    else:
        try:
            docs = load_user_texts(cfg.source, cfg.text_field)
        except ValueError as e:
            raise SystemExit(f"nanoseek train: {e}") from None
        if len(docs) < 2:
            raise SystemExit(f"nanoseek train: {cfg.source} holds {len(docs)} document(s); need at least 2 "
                             "(one for validation)")
        n_val = max(1, len(docs) // 50)
        train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    log(f"data: {len(train_docs)} training / {len(val_docs)} validation documents ({time.time() - t0:.1f}s)")
    if cfg.tokenizer:
        if not (tok_dir / "tokenizer.json").is_file():
            raise SystemExit(f"nanoseek train: --data.tokenizer {tok_dir} has no tokenizer.json")
        tokenizer = load_tokenizer(tok_dir)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size, tok_dir)
        log(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens ({time.time() - t0:.1f}s) -> {tok_dir}")
    write_shards(train_docs, tokenizer, train_dir, overwrite=True)
    write_shards(val_docs, tokenizer, val_dir, overwrite=True)
    return PreparedData(tokenizer, tok_dir, train_dir, val_dir)


def unigram_entropy(shard_dir: Path, vocab_size: int) -> float:
    """Entropy (nats/token) of the corpus's token frequencies: the loss of a context-free model."""
    from nanoseek.data.shards import open_shards

    shards, _ = open_shards(shard_dir)
    counts = sum(np.bincount(np.asarray(s), minlength=vocab_size) for s in shards).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def open_loader(shard_dir: Path, seq_len: int, batch_size: int, seed: int, what: str) -> PackedLoader:
    """A packed loader; a small validation split gets a smaller batch instead of an error."""
    from nanoseek.data.shards import open_shards

    total = open_shards(shard_dir)[1]["total_tokens"]
    windows = (total - 1) // seq_len
    if what == "validation":
        batch_size = max(1, min(batch_size, windows))
    if windows < batch_size:
        raise SystemExit(f"nanoseek train: the {what} data holds {total} tokens, but one batch needs "
                         f"{batch_size * seq_len + 1} (batch_size={batch_size} x seq_len={seq_len} + 1); "
                         "add data or lower --train.batch_size / --data.seq_len")
    return PackedLoader(shard_dir, seq_len, batch_size, seed)


# ---------------------------------------------------------------------------- the loop
def resolve_device(name: str, command: str = "train") -> torch.device:
    """`--train.device`: "auto" (CUDA where present, else the CPU) or a torch device name CUDA must back."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"nanoseek {command}: --train.device {name} asked for, but CUDA is not available")
    return device


def schedule_settings(tc: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of `continued_multiplier` that come from the train config."""
    return dict(total=tc.max_steps, warmup=tc.warmup_steps, schedule=tc.schedule, decay_frac=tc.decay_frac,
                min_ratio=tc.min_lr_ratio)


def resolve_master_weights(tc: TrainConfig, use_bf16: bool, device: torch.device, parallel: bool) -> TrainConfig:
    """`tc` with --train.master_weights decided: 'auto' (None) turns it on exactly where it computes the default
    setting's numbers and runs our GPU kernel (bf16 autocast on CUDA, one process, no FP8), else off. The
    decided value is what run.json saves, so a resumed run keeps it."""
    if tc.master_weights is not None:
        return tc
    on = device.type == "cuda" and master_weights_problems(tc, use_bf16, parallel) is None
    return dataclasses.replace(tc, master_weights=on)


def master_weights_problems(tc: TrainConfig, use_bf16: bool, parallel: bool) -> str | None:
    """Why --train.master_weights cannot give the default setting's numbers here (it needs bf16 autocast, one
    process and no FP8; nanoseek/train/master_weights.py), with the fix; None where it can."""
    problems = []
    if not use_bf16:
        problems.append("it needs bf16 autocast (--train.dtype bf16, or auto on a GPU)")
    if parallel:
        problems.append("the parallel wrappers do not take it yet (one process)")
    if tc.dtype == "fp8":
        problems.append("FP8 quantizes the fp32 weights themselves (--train.dtype bf16)")
    return "--train.master_weights: " + "; ".join(problems) + "; or drop --train.master_weights" if problems else None


def train(run: RunConfig) -> dict[str, Any]:
    """Run pretraining as configured; returns a summary dict (also written to summary.json)."""
    ckpt_path, saved_train, resume_arg = None, run.train, run.train.resume
    if run.train.resume:  # continue the saved run: its configuration, with the allowed changes
        ckpt_path = find_checkpoint(run.train.resume, Path(run.train.out_dir))
        out_dir_given = run.explicit is None or "out_dir" in run.explicit.get("train", {})
        if run.train.resume != "auto" and not out_dir_given:
            run.train = dataclasses.replace(run.train, out_dir=str(run_dir_of(ckpt_path)))
        saved = saved_run(ckpt_path)
        run = resumed_run(run, ckpt_path)
        saved_train = saved.train if saved is not None else run.train
    tc, out_dir = run.train, Path(run.train.out_dir)
    device = resolve_device(tc.device)
    par = None  # ---- parallel: torchrun or --parallel.enable (nanoseek/parallel/runtime.py)
    if run.parallel.enable or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from nanoseek.parallel.runtime import from_config
        par, device = from_config(run.parallel, tc, device)
    torch.manual_seed(tc.seed)
    if tc.dtype not in ("auto", "bf16", "fp32", "fp8"):
        raise SystemExit(f"nanoseek train: --train.dtype {tc.dtype!r} is unknown; use auto, bf16, fp32 or fp8")
    if tc.schedule not in SCHEDULES:
        raise SystemExit(f"nanoseek train: --train.schedule {tc.schedule!r} is unknown; use one of {SCHEDULES}")
    if run.data.seq_len > run.model.max_position_embeddings:
        raise SystemExit(f"nanoseek train: --data.seq_len {run.data.seq_len} exceeds the model's "
                         f"max_position_embeddings={run.model.max_position_embeddings}; lower seq_len or raise "
                         "--model.max_position_embeddings")
    if ckpt_path is None:
        check_fresh_out_dir(out_dir)
    else:
        chosen = resume_arg != "auto" and not (Path(resume_arg) / "checkpoints").is_dir()  # one step-* dir
        check_resume_target(ckpt_path, out_dir, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    if par is None or par.is_logger:  # one claim per run (the ranks of a parallel run share the directory)
        lock_run_dir(out_dir, "train")
    for leftover in clean_partial(out_dir):
        print(f"removed {leftover.name}, a partial checkpoint left by a killed run")
    print(f"nanoseek train: run directory {out_dir.resolve()}")

    # ---- data
    data = prepare_data(run.data, out_dir) if par is None else par.first(lambda: prepare_data(run.data, out_dir))
    tok = data.tokenizer
    if run.model.vocab_size != tok.vocab_size:
        run.model = dataclasses.replace(run.model, vocab_size=tok.vocab_size)  # the tokenizer decides
    run.model = dataclasses.replace(run.model, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id,
                                    pad_token_id=tok.pad_id)
    loader = open_loader(data.train_dir, run.data.seq_len, tc.batch_size, run.data.seed, "training")
    val_loader = open_loader(data.val_dir, run.data.seq_len, tc.batch_size, run.data.seed, "validation")

    # ---- model and optimizer
    model = Transformer.from_config(run.model, device=device, seed=tc.seed).train()
    n_params = sum(p.numel() for p in model.parameters())
    if par is not None:  # ---- parallel: expert parallelism, pipeline stages, FSDP2
        model = par.wrap(model)
    use_bf16 = tc.dtype == "bf16" or (tc.dtype in ("auto", "fp8") and device.type == "cuda")
    if tc.dtype == "fp8":  # FP8 linears/experts (emulated on the CPU); the rest as bf16/fp32 would run
        try:
            install_fp8(model, cache_weights=tc.grad_accum > 1,  # quantize weights once per optimizer step
                        recompute_swiglu=tc.fp8_recompute_swiglu, pad_partial_blocks=tc.fp8_pad_partial,
                        parts=parse_parts(tc.fp8_parts))
        except ValueError as e:
            raise SystemExit(f"nanoseek train: --train.fp8_parts {tc.fp8_parts!r}: {e}") from None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext())
    tc = run.train = resolve_master_weights(tc, use_bf16, device, par is not None)
    if tc.master_weights and (problem := master_weights_problems(tc, use_bf16, par is not None)):
        raise SystemExit(f"nanoseek train: {problem}")
    optimizer = build_optimizer(model, tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay, tc.bf16_moments,
                                tc.master_weights)
    if tc.master_weights:  # several micro-batches: their bf16 gradients summed in fp32, as autocast's .grad does
        optimizer.accumulate_in_fp32 = tc.grad_accum > 1
    if tc.activation_checkpointing:
        enable_activation_checkpointing(model)
    if tc.compile:
        compile_blocks(model)
    step, anchor = 0, None
    if ckpt_path is not None:
        try:
            if par is not None:  # ---- parallel: sharded checkpoint (model and optimizer)
                state = par.load(ckpt_path, model, optimizer)
            else:
                state = load_checkpoint(ckpt_path, model)
                optimizer.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["rng"])
        except CheckpointError as e:
            raise SystemExit(f"nanoseek train: --resume: {e}") from None
        except (ValueError, KeyError, RuntimeError) as e:
            raise SystemExit(f"nanoseek train: --resume: {ckpt_path / 'trainer_state.pt'} does not fit this run "
                             f"({type(e).__name__}: {e})") from None
        step = state["step"]
        anchor = tuple(state["schedule_anchor"]) if state.get("schedule_anchor") else None
        new_anchor = schedule_anchor(step, schedule_settings(saved_train), schedule_settings(tc), anchor)
        if new_anchor != anchor:
            print(f"resume: the learning-rate schedule continues from {new_anchor[1]:.4g} x lr at step {step} "
                  f"and reaches {tc.min_lr_ratio:g} x lr at step {tc.max_steps}")
        anchor = new_anchor
        if step >= tc.max_steps:
            raise SystemExit(f"nanoseek train: the run is already at step {step} of --train.max_steps "
                             f"{tc.max_steps}; extend it with --resume --train.max_steps N")
        dropped = truncate_metrics(out_dir / "metrics.jsonl", step)
        print(f"resumed from {ckpt_path} at step {step}"
              + (f" ({dropped} metric records after step {step} dropped: they are replayed)" if dropped else ""))

    fpt = flops_per_token(run.model, run.data.seq_len, with_mtp=len(model.mtp) > 0)
    tokens_per_step = tc.batch_size * tc.grad_accum * run.data.seq_len
    logger = MetricsLogger(out_dir if par is None else par.log_dir(out_dir), tc.tensorboard,  # ---- parallel
                           purge_step=step + 1 if step else None)
    record = run_record(run.to_dict(), device)
    (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    masters = " (bf16 GEMM weights, fp32 masters)" if tc.master_weights else ""
    print(f"model: {n_params / 1e6:.2f}M parameters ({run.preset} preset), device {device}, "
          f"{'bf16 autocast' if use_bf16 else 'fp32'}{masters}; {tokens_per_step} tokens/step, "
          f"{len(loader)} steps/epoch")

    stop_signal: list[str] = []

    def on_signal(signum, frame):  # finish the step, checkpoint, exit cleanly
        stop_signal.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    guard = NonFiniteGuard(device, step, tc.max_nonfinite)

    def checkpoint(at: int) -> Path | None:
        """Write checkpoint `at`, unless the model is NaN/Inf or the latest step was (then warn, keep the old)."""
        finite = not guard.in_streak() and weights_finite(model) and _optimizer_finite(optimizer)
        if par is not None:  # ---- parallel: each rank checks its shards; all ranks take the same branch
            finite = par.all_true(finite)
        if not finite:
            kept = list_checkpoints(out_dir)
            bar.write(f"warning: no checkpoint at step {at}: the model or its latest step is NaN/Inf; "
                      f"{'the last one is ' + str(kept[-1]) if kept else 'there is no earlier checkpoint'}")
            return kept[-1] if kept else None
        state = {"step": at, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                 "rng": torch.get_rng_state(), "schedule_anchor": list(anchor) if anchor else None}
        if par is not None:  # ---- parallel: sharded (torch.distributed.checkpoint)
            del state["optimizer"]
            return par.save(out_dir, at, model, optimizer, state, record, tc.keep_last)
        try:
            with masters_in_model(optimizer):  # --train.master_weights: the fp32 masters are what is saved
                return save_checkpoint(out_dir, at, model, state, data.tokenizer_dir, record, tc.keep_last)
        except (OSError, RuntimeError, SafetensorError) as e:
            kept = list_checkpoints(out_dir)
            previous_note = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint"
            full = "the disk is full: " if "space" in str(e).lower() or getattr(e, "errno", None) == 28 else ""
            raise SystemExit(f"nanoseek train: could not write the checkpoint at step {at} ({full}"
                             f"{type(e).__name__}: {str(e)[:200]}); {previous_note}. Free space in {out_dir} "
                             "and resume with --resume") from None

    def check_nonfinite() -> None:
        note, stop = guard.check()
        if note:
            bar.write(note)
        if stop:
            kept = list_checkpoints(out_dir)
            logger.close()
            raise SystemExit(f"nanoseek train: {tc.max_nonfinite} steps in a row had a NaN/Inf loss or gradient "
                             f"norm (latest at step {guard.last_bad_step()}); stopped without a new checkpoint. "
                             + (f"The last checkpoint is {kept[-1]}: resume from it with a lower --train.lr "
                                "(--resume --train.lr X)" if kept else "No checkpoint was written: lower --train.lr")
                             + " or check the data")

    load_history: list[tuple[int, np.ndarray]] = []
    started, last_ckpt = time.time(), None
    interval_start, interval_step = started, step
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True, leave=False)
    try:
        while step < tc.max_steps and not (stop_signal and par is None):  # ---- parallel: see agree_stop
            frac = step / max(1, tc.max_steps)
            lr = tc.lr * continued_multiplier(step, anchor=anchor, **schedule_settings(tc))
            batches = [next(loader) for _ in range(tc.grad_accum)]
            loss_fn = pretraining_loss(tc.mtp_lambda if frac < tc.mtp_switch_frac else tc.mtp_lambda_final,
                                       tc.seq_aux_alpha, ce=compiled_cross_entropy if tc.compile else cross_entropy,
                                       fused_head=tc.fused_head and par is None)
            gamma = tc.bias_gamma if frac < tc.bias_freeze_frac else 0.0
            if par is not None:  # ---- parallel: this rank's share of the batch; gradients and loads reduced
                out = par.accumulate_gradients(model, batches, loss_fn, autocast, seq_aux_alpha=tc.seq_aux_alpha,
                                               mtp_lambda=tc.mtp_lambda if frac < tc.mtp_switch_frac
                                               else tc.mtp_lambda_final)
                # the grad norm is global, so every rank skips the same steps
                out |= par.optimizer_step(model, optimizer, lr=lr, grad_clip=tc.grad_clip, bias_gamma=gamma,
                                          skip_nonfinite=True)
            else:
                out = accumulate_gradients(model, batches, loss_fn, autocast)
                out |= optimizer_step(model, optimizer, lr=lr, grad_clip=tc.grad_clip, bias_gamma=gamma,
                                      skip_nonfinite=True, also_finite=list(out.values()))
            guard.update(out["finite"])
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == 1 or step == tc.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.time() - interval_start
                metrics = step_metrics(out, steps=step - interval_step, elapsed=elapsed, lr=lr,
                                       tokens=(step - interval_step) * tokens_per_step, flops_per_tok=fpt,
                                       device=device, skipped_steps=guard.total)
                logger.log(step, "train", metrics)
                bar.write(_log_line(step, tc.max_steps, metrics))
                check_nonfinite()
                if "loads" in out:
                    loads = out["loads"]
                    load_history.append((step, (loads / loads.mean(-1, keepdim=True).clamp_min(1e-9)).cpu().numpy()))
                interval_start, interval_step = time.time(), step
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps \
                    and (par is None or par.pipe is None):  # ---- parallel: no validation through stages yet
                val = validation_loss(model, val_loader, tc.eval_batches, device, autocast)
                logger.log(step, "val", {"loss": val})
                bar.write(f"step {step:>6} | validation loss {val:.4f}")
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.max_steps:
                check_nonfinite()
                last_ckpt = checkpoint(step)
            if step % tc.log_every == 0:
                interval_start = time.time()  # evaluation and checkpoint time is not training speed
            time_up = bool(tc.time_limit_min) and time.time() - started > tc.time_limit_min * 60
            if par is not None:  # ---- parallel: ranks stop at the same step (agreed at log steps only)
                if step % tc.log_every == 0 and par.agree_stop(time_up, stop_signal):
                    break
                continue
            if time_up:
                bar.write(f"time limit of {tc.time_limit_min} min reached at step {step}")
                break
        check_nonfinite()
        last_ckpt = checkpoint(step)
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    # ---- finish: validation, samples, accuracy, plots
    if par is not None:  # ---- parallel: HF export gathered on rank 0; samples and accuracy: single-process runs
        return _finish_parallel(par, model, run, data, val_loader, autocast, logger, step, last_ckpt, started, device)
    if stop_signal:
        logger.close()
        print(f"stopped by {stop_signal[0]} at step {step}; checkpoint {last_ckpt} (resume with --resume)")
        return {"step": step, "checkpoint": str(last_ckpt), "interrupted": stop_signal[0]}
    val = validation_loss(model, val_loader, tc.eval_batches, device, autocast)
    logger.log(step, "val", {"loss": val})
    entropy = unigram_entropy(data.train_dir, tok.vocab_size)
    summary: dict[str, Any] = {"step": step, "val_loss": val, "unigram_entropy": entropy,
                               "checkpoint": str(last_ckpt), "minutes": (time.time() - started) / 60}
    model.eval()
    with autocast:
        if tc.samples:
            prompts = _sample_prompts(run, tc.samples, data)
            outs = greedy_complete(model, tok, prompts, 120)
            summary["samples"] = [{"prompt": p, "completion": o} for p, o in zip(prompts, outs)]
        if tc.eval_problems and run.data.source == "synthetic":
            acc = heldout_accuracy(model, tok, tc.eval_problems, seed=run.data.seed + 12345,
                                   difficulty=(run.data.difficulty_min, run.data.difficulty_max),
                                   kinds=run.data.kind_list())
            summary["heldout"] = acc
            logger.log(step, "eval", {"heldout_accuracy": acc["accuracy"],
                                      **{f"acc_{k}": v for k, v in acc["per_kind"].items()}})
    logger.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary["plots"] = [str(p) for p in plot_run(logger.path, load_history, out_dir)]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out_dir)
    return summary


def _finish_parallel(par, model, run, data, val_loader, autocast, logger, step, last_ckpt, started,
                     device) -> dict[str, Any]:
    """---- parallel: the end of a parallel run (validation without a pipeline, HF export, summary on rank 0)."""
    val = (validation_loss(model, val_loader, run.train.eval_batches, device, autocast)
           if par.pipe is None else float("nan"))
    hf_dir = par.export(model, run.model, run.train.out_dir, data.tokenizer_dir)
    summary = {"step": step, "val_loss": val, "checkpoint": str(last_ckpt), "hf_export": str(hf_dir),
               "minutes": (time.time() - started) / 60, "parallel": dataclasses.asdict(par.layout)}
    logger.log(step, "val", {"loss": val})
    logger.close()
    if par.is_logger:
        (Path(run.train.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"done: {step} steps, validation loss {val:.4f}; HF export {hf_dir}; sharded checkpoint {last_ckpt}")
    par.close()
    return summary


def _log_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step:>6}/{total}", f"loss {m['loss']:.4f}"]
    if "mtp_loss" in m:
        parts.append(f"mtp {m['mtp_loss']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.2f}", f"{m['tok_s']:,.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    parts += [f"mem {m['mem_gb']:.1f}G", f"maxvio {m['maxvio']:.2f}"]
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)


def _sample_prompts(run: RunConfig, n: int, data: PreparedData, words: int = 6) -> list[str]:
    """Prompts for the end-of-run samples: held-out problems (synthetic data), else the openings
    (first `words` tokens) of different documents, validation documents first, so the completions differ."""
    if run.data.source != "synthetic":
        from nanoseek.data.shards import open_shards

        tok, prompts = data.tokenizer, []
        for shard in [*open_shards(data.val_dir)[0], *open_shards(data.train_dir)[0]]:
            ends = np.flatnonzero(np.asarray(shard) == tok.eos_id)  # documents end with EOS
            for start in np.concatenate([[0], ends + 1])[:4 * n]:
                opening = np.asarray(shard[start:start + words])
                opening = opening[:np.argmax(opening == tok.eos_id)] if tok.eos_id in opening else opening
                text = tok.decode(opening.tolist()).strip()
                if text and text not in prompts:
                    prompts.append(text)
                if len(prompts) == n:
                    return prompts
        return prompts or ["The"]
    from nanoseek.data.tasks import r1_prompt, sample_problems

    problems = sample_problems(n, run.data.seed + 999, run.data.kind_list(),
                               difficulty_range=(run.data.difficulty_min, run.data.difficulty_max), split="heldout")
    return [r1_prompt(p.prompt) for p in problems]


def _optimizer_finite(optimizer: torch.optim.Optimizer) -> bool:
    """True when every floating-point optimizer state tensor (moments) is free of NaN/Inf (one sync)."""
    flags = [torch.isfinite(v.to_local() if hasattr(v, "to_local") else v).all() for st in optimizer.state.values()
             for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


def _print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    print("\n" + "=" * 72)
    print(f"done: {summary['step']} steps in {summary['minutes']:.1f} min")
    print(f"validation loss {summary['val_loss']:.4f} nats/token "
          f"(unigram entropy of the corpus: {summary['unigram_entropy']:.4f})")
    if "heldout" in summary:
        acc = summary["heldout"]
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc["per_kind"].items())
        print(f"held-out accuracy {100 * acc['accuracy']:.1f}% on {acc['n']} problems never trained on ({kinds})")
    for s in summary.get("samples", [])[:2]:
        print("-" * 72)
        print(s["prompt"][-160:] + " \u2192" + s["completion"][:400])
    print("-" * 72)
    print(f"checkpoint  {summary['checkpoint']}  (HF format: nanoseek.load_pretrained / transformers)")
    print(f"metrics     {out_dir / 'metrics.jsonl'}  (TensorBoard: {out_dir / 'tensorboard'})")
    print(f"plots       {', '.join(summary['plots'])}")
    print(f"summary     {out_dir / 'summary.json'}")
