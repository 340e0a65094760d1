"""`nanoseek sft`: supervised fine-tuning on chat data with the trainer's step, checkpoints and resume.

    nanoseek sft --ckpt runs/demo --data chats.jsonl --train.out_dir runs/sft
    nanoseek sft --preset demo --model.num_hidden_layers 2 --tokenizer runs/demo --data traces.jsonl  # student
    nanoseek sft --train.out_dir runs/sft --resume                                              # continue

Reads top to bottom: (resume: which checkpoint, which configuration), tokenizer (+ chat template), data
(render, mask, pack), model (checkpoint, fresh preset, or the resumed checkpoint), optimizer, loop,
finish. Per optimizer step: `accumulate_gradients(model, batches, sft_loss(...))` then
`optimizer_step(..., skip_nonfinite=True)` (train/step.py), the router bias moving as the trainer's
settings say (--train.bias_gamma, --train.bias_freeze_frac). Checkpoints are the trainer's
(train/checkpoint.py: HF weights + tokenizer with the chat template used + trainer state + manifest);
--resume continues exactly (same data file, checked by its SHA-256).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.data.tokenizer import CHAT_TEMPLATE, Tokenizer, load_tokenizer
from nanoseek.fp8 import install_fp8
from nanoseek.fp8.install import parse_parts
from nanoseek.hf import CheckpointError, load_pretrained
from nanoseek.model.transformer import Transformer
from nanoseek.sft.config import UNUSED_TRAIN, SFTConfig, SFTRun
from nanoseek.sft.data import (
    IGNORE,
    SFTDataError,
    SFTLoader,
    file_digest,
    pack_rows,
    pad_rows,
    read_examples,
    render_all,
)
from nanoseek.sft.loss import forward, sft_loss, token_losses
from nanoseek.sft.masking import DocumentMask, install_document_masking
from nanoseek.train.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    lock_run_dir,
    read_run_record,
    run_record,
    save_checkpoint,
    verify_checkpoint,
    weights_finite,
)
from nanoseek.train.config import TrainConfig
from nanoseek.train.guard import NonFiniteGuard
from nanoseek.train.master_weights import masters_in_model
from nanoseek.train.metrics import MetricsLogger, flops_per_token, step_metrics
from nanoseek.train.optim import SCHEDULES, build_optimizer, continued_multiplier, schedule_anchor
from nanoseek.train.resume import (
    MAY_CHANGE,
    check_fresh_out_dir,
    check_resume_target,
    find_checkpoint,
    run_dir_of,
    truncate_metrics,
)
from nanoseek.train.step import accumulate_gradients, compile_blocks, enable_activation_checkpointing, optimizer_step
from nanoseek.train.trainer import (
    _log_line,
    _optimizer_finite,
    master_weights_problems,
    resolve_device,
    resolve_master_weights,
    schedule_settings,
)


def fail(message: str) -> SystemExit:
    return SystemExit(f"nanoseek sft: {message}")


# ---------------------------------------------------------------------------- configuration on resume
def resumed(run: SFTRun, ckpt: Path) -> SFTRun:
    """The run saved in the checkpoint's run.json, with the user's allowed --train.* changes applied;
    any other change (model, sft section, fixed trainer fields) is an error naming the flag."""
    saved = read_run_record(ckpt).get("config") or {}
    if saved.get("command") != "sft":
        raise fail(f"--resume {ckpt}: not an SFT checkpoint (its run.json has no sft configuration); fine-tune it "
                   "with --ckpt instead")
    sft = SFTConfig(**saved["sft"])
    train = TrainConfig(**{k: v for k, v in saved["train"].items() if k in {f.name for f in dataclasses.fields(
        TrainConfig)}})
    errors, changes = [], {}
    if run.explicit.get("preset", saved["preset"]) != saved["preset"] or run.explicit.get("model"):
        errors.append("--preset/--model.* (a resumed run keeps its model)")
    for name, value in run.explicit.get("sft", {}).items():
        if getattr(sft, name) != value:
            errors.append(f"--sft.{name} {value!r} (the run has {getattr(sft, name)!r})")
    for name, value in run.explicit.get("train", {}).items():
        if name in ("resume", "out_dir") or getattr(train, name) == value:
            continue
        if name in MAY_CHANGE:
            changes[name] = value
            print(f"resume: --train.{name} {getattr(train, name)!r} -> {value!r}")
        else:
            errors.append(f"--train.{name} {value!r} (the run has {getattr(train, name)!r})")
    if errors:
        raise fail(f"--resume continues the run saved in {ckpt / 'run.json'}; these flags would change it: "
                   f"{', '.join(errors)}. Drop them, or start a new run in a fresh --train.out_dir")
    train = dataclasses.replace(train, **changes, resume=str(ckpt), out_dir=run.train.out_dir)
    return SFTRun(sft=sft, train=train, preset=saved["preset"], explicit=run.explicit,
                  model=ModelConfig(**saved["model"]))


# ---------------------------------------------------------------------------- tokenizer and model sources
def init_checkpoint(path_arg: str) -> Path:
    """--sft.ckpt -> a checkpoint directory: a run directory gives its newest intact step-*."""
    path = Path(path_arg)
    if (path / "checkpoints").is_dir():
        problems = []
        for step_dir in reversed(list_checkpoints(path)):
            try:
                verify_checkpoint(step_dir)
                return step_dir
            except CheckpointError as e:
                problems.append(str(e))
                print(f"--ckpt: skipping {step_dir.name}, damaged: {e}")
        raise fail(f"--ckpt {path_arg}: no intact checkpoint in {path / 'checkpoints'}"
                   + (f" ({'; '.join(problems)})" if problems else ""))
    if not (path / "config.json").is_file():
        raise fail(f"--ckpt {path_arg}: no config.json there; pass an HF checkpoint directory, a step-* "
                   "checkpoint or a run directory")
    return path


def chat_tokenizer(source: Path, template: str) -> Tokenizer:
    """The tokenizer of `source` with the chat template SFT renders with: its own (an error naming the fix
    when it has none), 'r1' (the built-in R1 layout) or a .jinja file. Writes nothing."""
    if not (source / "tokenizer.json").is_file():
        raise fail(f"{source} has no tokenizer.json; pass --tokenizer DIR (e.g. the teacher's checkpoint)")
    tok = load_tokenizer(source)
    if template == "r1":
        tok.chat_template = CHAT_TEMPLATE
    elif template:
        if not Path(template).is_file():
            raise fail(f"--sft.chat_template {template}: no such file; use '', 'r1' or a .jinja file")
        tok.chat_template = Path(template).read_text(encoding="utf-8")
    elif tok.chat_template is None:
        raise fail(f"{source} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                   "SFT renders conversations with it. Add one, or pass --sft.chat_template r1 (the built-in R1 "
                   "layout) or --sft.chat_template FILE.jinja")
    return tok


def write_tokenizer(tok: Tokenizer, out_dir: Path) -> Path:
    """Copy the tokenizer files to out_dir/tokenizer with the chat template in use written into
    tokenizer_config.json, so every checkpoint (and a server loading it) renders chats the same way."""
    from nanoseek.hf import copy_tokenizer_files

    dst = out_dir / "tokenizer"
    dst.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(tok.path, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text()) if (dst / "tokenizer_config.json").is_file() \
        else {"eos_token": tok.eos_token}
    config["chat_template"] = tok.chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validation_loss(model: Transformer, loader: SFTLoader, batches: int, doc_mask: DocumentMask | None,
                    device: torch.device, autocast: contextlib.AbstractContextManager) -> float:
    """Mean CE per assistant token over the first `batches` validation batches (always the same ones)."""
    was_training = model.training
    model.eval()
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 0})
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for _ in range(min(batches, len(loader))):
        batch = {k: v.to(device) for k, v in next(loader).items()}
        with autocast:
            logits = forward(model, batch, doc_mask, mtp=False).logits
        total += token_losses(logits, batch["targets"]).sum()
        count += (batch["targets"] != IGNORE).sum()
    model.train(was_training)
    return float(total / count.clamp_min(1))


# ---------------------------------------------------------------------------- the run
def sft(run: SFTRun) -> dict[str, Any]:
    """Run supervised fine-tuning as configured; returns a summary (also written to summary.json)."""
    ckpt_path, resume_arg = None, run.train.resume
    if resume_arg:
        ckpt_path = find_checkpoint(resume_arg, Path(run.train.out_dir))
        if resume_arg != "auto" and "out_dir" not in run.explicit.get("train", {}):
            run.train = dataclasses.replace(run.train, out_dir=str(run_dir_of(ckpt_path)))
        run = resumed(run, ckpt_path)
    sc, tc, out_dir = run.sft, run.train, Path(run.train.out_dir)
    if not sc.data:
        raise fail("--data FILE is required (JSONL: messages or prompt/completion per line)")
    if ckpt_path is None and bool(sc.ckpt) == ("preset" in run.explicit):
        raise fail("give a model: --ckpt DIR (fine-tune a checkpoint) or --preset NAME --tokenizer DIR (a fresh "
                   "student, for distillation), not both and not neither")
    if ckpt_path is None and sc.ckpt and run.model_overrides:
        raise fail(f"--model.{next(iter(run.model_overrides))}: a checkpoint fixes the model's shape; --model.* "
                   "options apply to a fresh --preset model")
    if tc.schedule not in SCHEDULES:
        raise fail(f"--train.schedule {tc.schedule!r} is unknown; use one of {SCHEDULES}")
    if tc.dtype not in ("auto", "bf16", "fp32", "fp8"):
        raise fail(f"--train.dtype {tc.dtype!r} is unknown; use auto, bf16, fp32 or fp8")
    for name in sorted(UNUSED_TRAIN & set(run.explicit.get("train", {}))):
        print(f"warning: --train.{name} is not used by nanoseek sft")
    device = resolve_device(tc.device, "sft")
    if sc.pack and sc.attention == "flex" and device.type != "cuda":
        raise fail(f"--sft.attention flex trains on CUDA only (FlexAttention has no backward on {device.type}); "
                   "use --sft.attention sdpa")
    torch.manual_seed(tc.seed)
    if ckpt_path is None:
        check_fresh_out_dir(out_dir)
    else:
        chosen = resume_arg != "auto" and not (Path(resume_arg) / "checkpoints").is_dir()  # one step-* dir
        check_resume_target(ckpt_path, out_dir, chosen)

    # ---- tokenizer and data, all checked before the run directory is touched
    init = init_checkpoint(sc.ckpt) if ckpt_path is None and sc.ckpt else None
    if ckpt_path is not None:
        tok = chat_tokenizer(ckpt_path, "")  # the template the run wrote into its checkpoints
    else:
        if init is None and not sc.tokenizer:
            raise fail("a fresh --preset model needs --tokenizer DIR (e.g. the teacher's checkpoint directory)")
        tok = chat_tokenizer(Path(sc.tokenizer) if sc.tokenizer else init, sc.chat_template)
    try:
        examples = read_examples(sc.data)
        held_out = examples[len(examples) - sc.val_examples:] if sc.val_examples else []
        if sc.val_examples and len(held_out) >= len(examples):
            raise SFTDataError(f"--sft.val_examples {sc.val_examples} leaves no training example "
                               f"({sc.data} holds {len(examples)})")
        docs, stats = render_all(tok, examples[:len(examples) - len(held_out)], sc.data, sc.seq_len)
        val_docs = render_all(tok, held_out, sc.data, sc.seq_len)[0] if held_out else []
    except SFTDataError as e:
        raise fail(str(e)) from None
    digest = file_digest(sc.data)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(out_dir, "sft")
    for leftover in clean_partial(out_dir):
        print(f"removed {leftover.name}, a partial checkpoint left by a killed run")
    print(f"nanoseek sft: run directory {out_dir.resolve()}")
    tok_dir = write_tokenizer(tok, out_dir)
    arrange = (lambda d: pack_rows(d, sc.seq_len)) if sc.pack else pad_rows
    rows = arrange(docs)
    pad_to = sc.seq_len if sc.pack else None  # packed batches: one shape
    loader = SFTLoader(rows, tc.batch_size, sc.seed, tok.pad_id, sc.pack, pad_to)
    val_loader = SFTLoader(arrange(val_docs), tc.batch_size, sc.seed, tok.pad_id, sc.pack, pad_to) if val_docs \
        else None
    trained = sum(d.trained for d in docs)
    positions = sum(len(d.ids) - 1 for d in docs)
    print(f"data: {len(docs)} documents ({stats['truncated']} cut to {sc.seq_len}, {stats['dropped']} dropped with no "
          f"assistant token left), {positions} positions of which {trained} trained (assistant), "
          f"{len(rows)} {'packed' if sc.pack else 'padded'} rows, {len(loader)} batches/epoch"
          + (f"; {len(val_docs)} held out" if val_docs else ""))

    # ---- model and optimizer
    if ckpt_path is not None:
        model = Transformer.from_config(run.model, device=device, seed=tc.seed)
    elif init is not None:
        try:
            model = load_pretrained(init, dtype=torch.float32, device=device)
        except CheckpointError as e:
            raise fail(f"--ckpt: {e}") from None
    else:
        cfg = ModelConfig(**{**PRESETS[run.preset], **run.model_overrides, "vocab_size": tok.vocab_size,
                             "eos_token_id": tok.eos_id, "bos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        model = Transformer.from_config(cfg, device=device, seed=tc.seed)
    run.model = model.config
    if tok.vocab_size > model.config.vocab_size:
        raise fail(f"the tokenizer in {tok_dir} has {tok.vocab_size} tokens, the model's vocab_size is "
                   f"{model.config.vocab_size}; use the model's own tokenizer")
    if sc.seq_len > model.config.max_position_embeddings:
        raise fail(f"--sft.seq_len {sc.seq_len} exceeds the model's max_position_embeddings="
                   f"{model.config.max_position_embeddings}")
    model.train()
    doc_mask = install_document_masking(model, sc.attention) if sc.pack else None
    use_bf16 = tc.dtype == "bf16" or (tc.dtype in ("auto", "fp8") and device.type == "cuda")
    if tc.dtype == "fp8":
        try:
            install_fp8(model, cache_weights=tc.grad_accum > 1, recompute_swiglu=tc.fp8_recompute_swiglu,
                        pad_partial_blocks=tc.fp8_pad_partial, parts=parse_parts(tc.fp8_parts))
        except ValueError as e:
            raise fail(f"--train.fp8_parts {tc.fp8_parts!r}: {e}") from None
    tc = run.train = resolve_master_weights(tc, use_bf16, device, parallel=False)
    if tc.master_weights and (problem := master_weights_problems(tc, use_bf16, parallel=False)):
        raise fail(problem)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    optimizer = build_optimizer(model, tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay, tc.bf16_moments,
                                tc.master_weights)
    if tc.master_weights:  # several micro-batches: their bf16 gradients summed in fp32
        optimizer.accumulate_in_fp32 = tc.grad_accum > 1
    if tc.activation_checkpointing:
        enable_activation_checkpointing(model)
    if tc.compile:
        compile_blocks(model)
    if "max_steps" not in run.explicit.get("train", {}) and ckpt_path is None:
        tc = run.train = dataclasses.replace(tc, max_steps=max(1, math.ceil(sc.epochs * len(loader) / tc.grad_accum)))
    step, anchor = 0, None
    if ckpt_path is not None:
        try:
            state = load_checkpoint(ckpt_path, model)
            if state.get("data_sha256") != digest:
                raise fail(f"--resume: {sc.data} changed since the run started (SHA-256 differs); exact resume "
                           "needs the same data: restore it, or fine-tune the checkpoint with --ckpt in a new run")
            optimizer.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["rng"])
        except CheckpointError as e:
            raise fail(f"--resume: {e}") from None
        except (ValueError, KeyError, RuntimeError) as e:
            raise fail(f"--resume: {ckpt_path} does not fit this run ({type(e).__name__}: {e})") from None
        step = state["step"]
        anchor = tuple(state["schedule_anchor"]) if state.get("schedule_anchor") else None
        saved_train = TrainConfig(**{k: v for k, v in state["train"].items()})
        anchor = schedule_anchor(step, schedule_settings(saved_train), schedule_settings(tc), anchor)
        if step >= tc.max_steps:
            raise fail(f"the run is already at step {step} of --train.max_steps {tc.max_steps}; extend it with "
                       "--resume --train.max_steps N")
        dropped = truncate_metrics(out_dir / "metrics.jsonl", step)
        print(f"resumed from {ckpt_path} at step {step}" + (f" ({dropped} metric records replayed)" if dropped else ""))

    n_params = sum(p.numel() for p in model.parameters())
    use_mtp = sc.mtp and len(model.mtp) > 0
    fpt = flops_per_token(model.config, sc.seq_len, with_mtp=use_mtp)
    logger = MetricsLogger(out_dir, tc.tensorboard, purge_step=step + 1 if step else None)
    record = run_record(run.to_dict(), device)
    (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    source = f"checkpoint {init or ckpt_path}" if init or ckpt_path else f"fresh {run.preset} preset"
    print(f"model: {n_params / 1e6:.2f}M parameters ({source}), "
          f"device {device}, {'bf16 autocast' if use_bf16 else 'fp32'}; {tc.max_steps} steps "
          f"({tc.max_steps * tc.grad_accum / len(loader):.2f} epochs), MTP {'on' if use_mtp else 'off'}")

    stop_signal: list[str] = []
    previous = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))
                for s in (signal.SIGINT, signal.SIGTERM)}
    guard = NonFiniteGuard(device, step, tc.max_nonfinite)

    def checkpoint(at: int) -> Path | None:
        if guard.in_streak() or not weights_finite(model) or not _optimizer_finite(optimizer):
            kept = list_checkpoints(out_dir)
            bar.write(f"warning: no checkpoint at step {at}: the model or its latest step is NaN/Inf")
            return kept[-1] if kept else None
        state = {"step": at, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                 "rng": torch.get_rng_state(), "schedule_anchor": list(anchor) if anchor else None,
                 "data_sha256": digest, "train": dataclasses.asdict(tc)}
        try:
            with masters_in_model(optimizer):  # --train.master_weights: the fp32 masters are what is saved
                return save_checkpoint(out_dir, at, model, state, tok_dir, record, tc.keep_last)
        except (OSError, RuntimeError) as e:
            raise fail(f"could not write the checkpoint at step {at} ({type(e).__name__}: {str(e)[:200]}); "
                       f"free space in {out_dir} and resume with --resume") from None

    def check_nonfinite() -> None:
        note, stop = guard.check()
        if note:
            bar.write(note)
        if stop:
            logger.close()
            raise fail(f"{tc.max_nonfinite} steps in a row had a NaN/Inf loss or gradient norm; stopped without a "
                       "new checkpoint: lower --train.lr or check the data")

    started, last_ckpt = time.time(), None
    interval_start, interval_step = started, step
    bar = tqdm(total=tc.max_steps, initial=step, desc="sft", dynamic_ncols=True, leave=False)
    try:
        while step < tc.max_steps and not stop_signal:
            frac = step / tc.max_steps
            lr = tc.lr * continued_multiplier(step, anchor=anchor, **schedule_settings(tc))
            batches = [next(loader) for _ in range(tc.grad_accum)]
            positions_done = sum(b["input_ids"].numel() for b in batches)
            loss_fn = sft_loss(doc_mask, tc.mtp_lambda if frac < tc.mtp_switch_frac else tc.mtp_lambda_final,
                               tc.seq_aux_alpha, use_mtp)
            out = accumulate_gradients(model, batches, loss_fn, autocast)
            out |= optimizer_step(model, optimizer, lr=lr, grad_clip=tc.grad_clip,
                                  bias_gamma=tc.bias_gamma if frac < tc.bias_freeze_frac else 0.0,
                                  skip_nonfinite=True, also_finite=list(out.values()))
            guard.update(out["finite"])
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == 1 or step == tc.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.time() - interval_start
                metrics = step_metrics(out, steps=step - interval_step, elapsed=elapsed, lr=lr,
                                       tokens=(step - interval_step) * positions_done, flops_per_tok=fpt,
                                       device=device, skipped_steps=guard.total)
                metrics["trained"] *= tc.grad_accum  # assistant tokens in the step (the loss averaged per batch)
                metrics["epoch"] = loader.epoch + loader.step / len(loader)
                logger.log(step, "train", metrics)
                bar.write(_log_line(step, tc.max_steps, metrics) + f" | epoch {metrics['epoch']:.2f}")
                check_nonfinite()
                interval_start, interval_step = time.time(), step
            if val_loader is not None and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                val = validation_loss(model, val_loader, tc.eval_batches, doc_mask, device, autocast)
                logger.log(step, "val", {"loss": val})
                bar.write(f"step {step:>6} | validation loss {val:.4f} (assistant tokens)")
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.max_steps:
                check_nonfinite()
                last_ckpt = checkpoint(step)
            if step % tc.log_every == 0:
                interval_start = time.time()
            if tc.time_limit_min and time.time() - started > tc.time_limit_min * 60:
                bar.write(f"time limit of {tc.time_limit_min} min reached at step {step}")
                break
        check_nonfinite()
        last_ckpt = checkpoint(step)
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    summary: dict[str, Any] = {"step": step, "checkpoint": str(last_ckpt), "minutes": (time.time() - started) / 60}
    if stop_signal:
        summary["interrupted"] = stop_signal[0]
        print(f"stopped by {stop_signal[0]} at step {step}; checkpoint {last_ckpt} (resume with --resume)")
    elif val_loader is not None:
        summary["val_loss"] = validation_loss(model, val_loader, tc.eval_batches, doc_mask, device, autocast)
        logger.log(step, "val", {"loss": summary["val_loss"]})
    logger.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done: {step} steps in {summary['minutes']:.1f} min"
          + (f", validation loss {summary['val_loss']:.4f} per assistant token" if "val_loss" in summary else ""))
    print(f"checkpoint  {last_ckpt}  (HF format, with the chat template: nanoseek chat --ckpt {last_ckpt})")
    print(f"metrics     {out_dir / 'metrics.jsonl'}")
    return summary


def main(argv: list[str]) -> int:
    from nanoseek.sft.config import parse_args

    sft(parse_args(argv))
    return 0
