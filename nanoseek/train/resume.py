"""Run management: which checkpoint `--resume` continues, with which configuration, and guarded run dirs.

    nanoseek train --train.out_dir runs/x --resume               # newest intact checkpoint of runs/x
    nanoseek train --resume runs/x/checkpoints/step-000500        # that one (an error if it is damaged)
    nanoseek train --resume runs/x --train.max_steps 2000         # a run dir; extend the run

A resumed run is the saved run: its configuration comes from the checkpoint's run.json. Flags given
again with the saved value change nothing; a flag that would change the model, the data or the
tokenizer (or the batch layout the loader position counts in) is an error that names it; a flag in
`MAY_CHANGE` is applied with a one-line notice.

The learning-rate schedule stays continuous when max_steps changes (`ScheduleAnchor`): see
`nanoseek/train/optim.py: continued_multiplier`.

A fresh run refuses an out_dir that already holds another run's checkpoints or metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoseek.config import ModelConfig
from nanoseek.hf import CheckpointError
from nanoseek.train.checkpoint import list_checkpoints, read_run_record, verify_checkpoint
from nanoseek.train.config import DataConfig, RunConfig, TrainConfig

# train.* fields a resumed run may change (applied with a notice); every other field is fixed
MAY_CHANGE = {
    "device", "grad_accum", "max_steps", "time_limit_min", "lr", "min_lr_ratio", "warmup_steps", "schedule",
    "decay_frac", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "mtp_lambda", "mtp_lambda_final",
    "mtp_switch_frac", "bias_gamma", "bias_freeze_frac", "seq_aux_alpha", "dtype", "fp8_recompute_swiglu",
    "fp8_pad_partial", "fp8_parts", "compile",
    "activation_checkpointing", "eval_every", "eval_batches", "ckpt_every", "keep_last", "log_every",
    "max_nonfinite", "samples", "eval_problems", "tensorboard",
}
WHY_FIXED = {
    "batch_size": "the loader's saved position counts batches of the saved size",
    "seed": "it only seeds a fresh model",
    "bf16_moments": "the optimizer's saved moments have the saved dtype",
    "master_weights": "the optimizer's saved state holds the fp32 masters (or has none)",
}


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- which checkpoint
def find_checkpoint(resume: str, out_dir: Path, log: Callable[[str], None] = _say) -> Path:
    """The checkpoint to continue: `resume` is 'auto' (newest intact one in out_dir), a run directory
    (the same, there) or a step-* directory (that one). Skipped checkpoints are logged with the reason;
    a missing or damaged explicit checkpoint is a SystemExit naming the file and the problem."""
    if resume == "auto":
        run_dir = out_dir
    else:
        path = Path(resume)
        if not path.exists():
            raise SystemExit(f"nanoseek train: --resume {resume}: no such directory; pass a run's out_dir, one "
                             "of its checkpoints/step-* directories, or --resume alone for --train.out_dir")
        if (path / "checkpoints").is_dir():
            run_dir = path
        else:
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                raise SystemExit(f"nanoseek train: --resume {resume}: {e}") from None
            return path
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise SystemExit(f"nanoseek train: --resume: no checkpoint in {run_dir / 'checkpoints'}; start a fresh run "
                         "without --resume")
    skipped = []
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append(f"{path.name}: {e}")
            log(f"resume: skipping {path.name}, damaged: {e}")
            continue
        return path
    raise SystemExit(f"nanoseek train: --resume: no intact checkpoint in {run_dir / 'checkpoints'} "
                     f"({'; '.join(skipped)})")


def run_dir_of(ckpt: Path) -> Path:
    """The out_dir a step-* checkpoint belongs to (its parent's parent)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


# ---------------------------------------------------------------------------- which configuration
def resumed_run(run: RunConfig, ckpt: Path, log: Callable[[str], None] = _say) -> RunConfig:
    """The checkpoint's saved configuration with the user's allowed changes applied.

    `run.explicit` holds what the user set; without a saved configuration (an older checkpoint) the
    given one is used as it is."""
    saved_cfg = saved_run(ckpt)
    if saved_cfg is None:
        log(f"resume: {ckpt / 'run.json'} holds no saved configuration; using the command line's")
        return run
    model, data, train = saved_cfg.model, saved_cfg.data, saved_cfg.train
    explicit = run.explicit if run.explicit is not None else {
        "preset": run.preset, **{s: dataclasses.asdict(getattr(run, s)) for s in ("model", "data", "train")}}
    errors, notices = [], []
    if "preset" in explicit and explicit["preset"] != saved_cfg.preset:
        errors.append(f"--preset {explicit['preset']} (the run used {saved_cfg.preset!r})")
    for section, cfg in (("model", model), ("data", data)):
        for name, value in explicit.get(section, {}).items():
            if name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id") and section == "model":
                continue  # the tokenizer sets these; the saved values are the ones it set
            if name != "extra" and getattr(cfg, name) != value:
                errors.append(f"--{section}.{name} {value!r} (the run has {getattr(cfg, name)!r})")
    changes: dict[str, Any] = {}
    for name, value in explicit.get("train", {}).items():
        old = getattr(train, name)
        if name in ("resume", "out_dir") or old == value:
            continue
        if name in MAY_CHANGE:
            changes[name] = value
            notices.append(f"--train.{name} {old!r} -> {value!r}")
        else:
            why = WHY_FIXED.get(name, "a resumed run keeps it")
            errors.append(f"--train.{name} {value!r} (the run has {old!r}; {why})")
    if errors:
        raise SystemExit("nanoseek train: --resume continues the run saved in "
                         f"{ckpt / 'run.json'}, which keeps its model, data and tokenizer; these flags would "
                         f"change it: {', '.join(errors)}. Drop them, or start a new run with a fresh --train.out_dir")
    for note in notices:
        log(f"resume: {note}")
    train = dataclasses.replace(train, **changes, resume=str(ckpt), out_dir=run.train.out_dir)
    return RunConfig(model=model, data=data, train=train, preset=saved_cfg.preset, explicit=run.explicit)


def saved_run(ckpt: Path) -> RunConfig | None:
    """The configuration saved in a checkpoint's run.json (None for a record without one)."""
    try:
        saved = read_run_record(ckpt).get("config")
    except CheckpointError as e:
        raise SystemExit(f"nanoseek train: {e}") from None
    if not isinstance(saved, dict) or not {"model", "data", "train"} <= set(saved):
        return None
    try:
        return RunConfig(model=ModelConfig(**saved["model"]), data=DataConfig(**saved["data"]),
                         train=TrainConfig(**{k: v for k, v in saved["train"].items() if k in _names(TrainConfig)}),
                         preset=saved.get("preset", "demo"))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"nanoseek train: {ckpt / 'run.json'}: the saved configuration does not load ({e})") from None


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------- run directories
def check_fresh_out_dir(out_dir: Path) -> None:
    """A fresh run must not write into another run's directory (it would prune that run's checkpoints
    and mix both runs' metrics)."""
    found = [p.name for p in list_checkpoints(out_dir)]
    if found:
        raise SystemExit(f"nanoseek train: {out_dir} already holds a run (checkpoints {found[0]}..{found[-1]}); "
                         "continue it with --resume, or start this run in a fresh directory with --train.out_dir DIR")
    if (out_dir / "metrics.jsonl").is_file():
        raise SystemExit(f"nanoseek train: {out_dir} already holds the metrics.jsonl of a run that wrote no "
                         "checkpoint; start this run in a fresh directory with --train.out_dir DIR, or delete "
                         f"{out_dir / 'metrics.jsonl'} to reuse this one")


def check_resume_target(ckpt: Path, out_dir: Path, chosen: bool) -> None:
    """A resume continues one line of checkpoints. Into another directory: that directory must be
    fresh. In the checkpoint's own directory, a chosen (explicit) checkpoint must be its newest: resuming
    an older one would mix two continuations there (damaged newer ones, skipped by `--resume`, are
    replaced as the run reaches them)."""
    if run_dir_of(ckpt).resolve() != out_dir.resolve():
        check_fresh_out_dir(out_dir)
        return
    newer = [p.name for p in list_checkpoints(out_dir) if p.name > ckpt.name and (p / "manifest.json").is_file()]
    if chosen and newer:
        raise SystemExit(f"nanoseek train: --resume {ckpt}: the run went on past it ({', '.join(newer)} exist(s)); "
                         "resuming here would mix two continuations in one directory. Resume it into a fresh "
                         f"directory (--resume {ckpt} --train.out_dir NEW), or delete the newer checkpoints")


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metric records after `step` (the steps a resumed run replays); return how many were dropped.
    Rewritten atomically; a damaged last line (a kill mid-write) is dropped too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
