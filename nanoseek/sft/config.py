"""`nanoseek sft` configuration: the SFT section, the trainer's TrainConfig, and (fresh students) a model.

    nanoseek sft --ckpt runs/demo --data chats.jsonl                    # fine-tune a checkpoint
    nanoseek sft --preset demo --model.num_hidden_layers 2 --tokenizer runs/teacher/checkpoints/step-000800 \
                 --data teacher_outputs.jsonl                          # distil into a fresh, smaller student
    nanoseek sft --train.out_dir runs/sft --resume                      # continue a run exactly

Precedence as in `nanoseek train`: SFT defaults < config file (TOML/JSON sections model/sft/train) <
command line (`--section.field VALUE`). `--ckpt`, `--data`, `--tokenizer` are short for `--sft.*`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.train.config import TrainConfig, _check, _fields, doc, read_config_file, set_option, split_argv


@dataclass
class SFTConfig:
    ckpt: str = doc("model to fine-tune: an HF checkpoint directory (ours or a Hugging Face one), a step-* "
                    "checkpoint, or a run directory (its newest intact checkpoint); '' with --preset: a fresh model",
                    "")
    data: str = doc("JSONL file: {'messages': [...]} or {'prompt', 'completion'} per line", "")
    tokenizer: str = doc("tokenizer directory ('' : the checkpoint's); required for a fresh --preset model", "")
    chat_template: str = doc("'' (the tokenizer's template), 'r1' (the built-in R1 layout) or a .jinja file", "")
    pack: bool = doc("pack several documents per row with document-causal attention (else one padded row each)",
                     True)
    attention: str = doc("document-causal attention of packed rows: 'sdpa' (a dense boolean mask, the reference) "
                         "or 'flex' (FlexAttention's block mask, skips empty blocks; compiled on CUDA)", "sdpa")
    seq_len: int = doc("positions per row; longer documents are cut (counted in the log)", 512)
    epochs: float = doc("passes over the data (sets --train.max_steps unless that is given)", 2.0)
    val_examples: int = doc("last N examples held out for a validation loss (0: none)", 0)
    mtp: bool = doc("train the MTP modules too (their loss weighted by --train.mtp_lambda)", False)
    seed: int = doc("shuffling seed", 0)

    def __post_init__(self) -> None:
        _check(self, "sft", {"seq_len": (lambda v: v >= 2, "must be at least 2"),
                             "attention": (lambda v: v in ("sdpa", "flex"), "must be 'sdpa' or 'flex'"),
                             "epochs": (lambda v: v > 0 and v == v and v != float("inf"), "must be a positive number"),
                             "val_examples": (lambda v: v >= 0, "must be 0 or more")})


# SFT's own defaults for trainer fields (fine-tuning: smaller lr, short warmup, a log line every step)
TRAIN_DEFAULTS: dict[str, Any] = dict(out_dir="runs/sft", batch_size=8, lr=3e-4, warmup_steps=10, schedule="cosine",
                                      min_lr_ratio=0.1, eval_every=50, ckpt_every=200, log_every=1, samples=0,
                                      eval_problems=0)
UNUSED_TRAIN = {"samples", "eval_problems"}  # trainer fields SFT does not read (a warning if set)
SECTIONS = {"model": ModelConfig, "sft": SFTConfig, "train": TrainConfig}
SHORT = {"--ckpt": "--sft.ckpt", "--data": "--sft.data", "--tokenizer": "--sft.tokenizer"}


@dataclass
class SFTRun:
    sft: SFTConfig
    train: TrainConfig
    preset: str = "demo"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # --model.* (fresh models only)
    explicit: dict[str, Any] = field(default_factory=dict, repr=False)  # what the user set, by section
    model: ModelConfig | None = None  # resolved by the loop (from the checkpoint or the preset)

    def to_dict(self) -> dict[str, Any]:
        model = dataclasses.asdict(self.model) if self.model is not None else None
        if model is not None:
            model.pop("extra", None)
        return {"command": "sft", "preset": self.preset, "model": model, "sft": dataclasses.asdict(self.sft),
                "train": dataclasses.asdict(self.train)}


def help_text() -> str:
    lines = ["usage: nanoseek sft (--ckpt DIR | --preset NAME --tokenizer DIR) --data FILE [--config FILE]",
             "                    [--resume [DIR]] [--SECTION.FIELD VALUE ...]", "",
             "Supervised fine-tuning on chat data (docs/sft.md): the loss falls on assistant tokens only.", "",
             "  --ckpt DIR         model to fine-tune (short for --sft.ckpt)",
             "  --data FILE        JSONL data (short for --sft.data)",
             "  --preset NAME      a fresh model of this preset instead of --ckpt (distillation into a student); "
             f"one of {', '.join(sorted(PRESETS))}; --model.* fields apply",
             "  --tokenizer DIR    tokenizer of a fresh model (short for --sft.tokenizer)",
             "  --config FILE      TOML or JSON file with [model], [sft], [train] sections",
             "  --resume [DIR]     continue a run with its saved configuration (as nanoseek train --resume)", ""]
    for section in ("sft", "train"):
        lines.append(f"{section}:")
        defaults = SFTConfig() if section == "sft" else TrainConfig(**TRAIN_DEFAULTS)
        for name, (typ, help_) in _fields(SECTIONS[section]).items():
            if section == "train" and name in UNUSED_TRAIN | {"resume"}:
                continue
            tname = getattr(typ, "__name__", str(typ))
            option = f"--{section}.{name} {tname}"
            default = repr(getattr(defaults, name))
            if (section, name) == ("train", "max_steps"):
                default = "from --sft.epochs"
            lines.append(f"  {option:<46} {help_} [default: {default}]")
        lines.append("")
    lines.append("model: --model.FIELD VALUE as in `nanoseek train --help` (fresh --preset models only)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> SFTRun:
    """Build an SFTRun from defaults, an optional config file and `--section.field value` pairs."""
    named, pairs = split_argv(argv, "sft", help_text, aliases=SHORT)
    preset_name, preset_set = named.get("--preset", "demo"), "--preset" in named
    overrides: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if "--config" in named:
        top, loaded = read_config_file(named["--config"], "sft", SECTIONS)
        if "preset" in top:
            preset_name, preset_set = top["preset"], True
        for section, values in loaded.items():
            for name, value in values.items():
                _set_option(overrides, section, name, value, f"{named['--config']}: {section}.{name}")
    for key, val in pairs:
        section, _, name = key.partition(".")
        _set_option(overrides, section, name, val, f"--{key}")
    if preset_name not in PRESETS:
        raise SystemExit(f"nanoseek sft: unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    explicit = {s: dict(v) for s, v in overrides.items()}
    if preset_set:
        explicit["preset"] = preset_name
    try:
        sft = SFTConfig(**overrides["sft"])
        train = TrainConfig(**{**TRAIN_DEFAULTS, **overrides["train"]})
        if overrides["model"]:
            ModelConfig(**{**PRESETS[preset_name], **overrides["model"]})  # check the values now
    except ValueError as e:
        message = re.sub(r"ModelConfig\.(\w+)=", r"--model.\1 ", str(e))
        raise SystemExit(f"nanoseek sft: {message}") from None
    return SFTRun(sft=sft, train=train, preset=preset_name, model_overrides=overrides["model"], explicit=explicit)


def _set_option(overrides: dict, section: str, name: str, value: Any, where: str) -> None:
    """Check and convert one option (the trainer's checks, SFT's sections and messages)."""
    set_option(overrides, SECTIONS, section, name, value, where, "sft",
               "--ckpt, --data, --preset, --tokenizer, --sft.*, --train.*, --model.* (see `nanoseek sft --help`)")
