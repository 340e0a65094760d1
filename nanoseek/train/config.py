"""Run configuration: model + data + training, with presets, config files and CLI overrides.

    nanoseek train                                   # the embedded demo (preset "demo")
    nanoseek train --preset bench-1b --data.source corpus.jsonl --train.max_steps 20000
    nanoseek train --config run.toml --model.hidden_size 512 --train.lr 1e-3

Precedence: preset < config file (TOML or JSON with sections model/data/train) < command line.
Every field of every section can be overridden as `--section.field VALUE`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.data.tasks import KINDS


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with a help text (shown by `nanoseek train --help`)."""
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class DataConfig:
    source: str = doc("'synthetic' (embedded procedural corpus) or a path: .txt/.md, .jsonl, .parquet, or a folder",
                      "synthetic")
    text_field: str = doc("field/column holding the text in JSONL/Parquet data", "text")
    n_docs: int = doc("synthetic corpus: training documents", 30000)
    val_docs: int = doc("synthetic: held-out documents for validation (user data: 2% of documents)", 400)
    difficulty_min: int = doc("synthetic: lowest difficulty (digits per operand / countdown numbers)", 1)
    difficulty_max: int = doc("synthetic: highest difficulty", 3)
    r1_share: float = doc("synthetic: share of solutions in the <think>/<answer> template", 0.5)
    answer_only_share: float = doc("synthetic: share of answer-only solutions", 0.15)
    kinds: str = doc("synthetic: comma-separated task kinds to draw from (add, sub, mul, countdown); '' = all", "")
    tokenizer: str = doc("'' trains a byte-level BPE on the corpus; else a directory holding tokenizer.json", "")
    vocab_size: int = doc("vocabulary size of a trained tokenizer (the model's vocab_size follows it)", 1024)
    seq_len: int = doc("training sequence length (tokens per packed window)", 256)
    seed: int = doc("corpus and shuffling seed", 0)

    def __post_init__(self) -> None:
        _check(self, "data", {
            "n_docs": (lambda v: v >= 2, "must be at least 2"), "val_docs": (lambda v: v >= 1, "must be at least 1"),
            "difficulty_min": (lambda v: v >= 1, "must be at least 1"),
            "difficulty_max": (lambda v: v >= self.difficulty_min, "must be at least --data.difficulty_min"),
            "r1_share": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
            "answer_only_share": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
            "kinds": (lambda v: all(k in KINDS for k in self.kind_list()),
                      f"must be a comma-separated list of {', '.join(KINDS)} (or empty for all)"),
            "vocab_size": (lambda v: v >= 262, "must be at least 262 (256 bytes + 6 special tokens)"),
            "seq_len": (lambda v: v >= 2, "must be at least 2")})

    def kind_list(self) -> tuple[str, ...]:
        """The task kinds of the synthetic corpus (all of them when `kinds` is empty)."""
        return tuple(k.strip() for k in self.kinds.split(",") if k.strip()) or KINDS


def _check(obj: Any, section: str, rules: dict[str, tuple[Any, str]]) -> None:
    """Raise ValueError naming `--section.field` for the first field whose rule fails."""
    for name, (ok, want) in rules.items():
        value = getattr(obj, name)
        if not ok(value):
            raise ValueError(f"--{section}.{name} {value!r}: {want}")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@dataclass
class TrainConfig:
    out_dir: str = doc("run directory: data cache, checkpoints, metrics, plots", "runs/demo")
    device: str = doc("'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...", "auto")
    batch_size: int = doc("micro-batch size in sequences", 16)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    max_steps: int = doc("optimizer steps", 800)
    time_limit_min: float = doc("stop (and checkpoint) after this many minutes; 0 = no limit "
                                "(the demo preset defaults to 8, so `make demo` ends in time on slow machines)", 0.0)
    lr: float = doc("peak learning rate", 3e-3)
    min_lr_ratio: float = doc("final learning rate as a fraction of lr", 0.1)
    warmup_steps: int = doc("linear warmup steps", 30)
    schedule: str = doc("'v3' (warmup, constant, cosine decay), 'wsd' (warmup, stable, linear decay), 'cosine'",
                        "v3")
    decay_frac: float = doc("fraction of steps spent decaying ('v3' and 'wsd')", 0.4)
    weight_decay: float = doc("AdamW weight decay (matrices only)", 0.1)
    beta1: float = doc("AdamW beta1", 0.9)
    beta2: float = doc("AdamW beta2", 0.95)
    eps: float = doc("AdamW epsilon", 1e-8)
    bf16_moments: bool = doc("keep AdamW moments in bf16 (as in DeepSeek-V3)", False)
    master_weights: bool | None = doc("GEMM weights in bf16 with their fp32 masters in the optimizer: the bf16-"
                                      "autocast numbers with less memory traffic (docs/training.md). 'auto' (the "
                                      "default): on for bf16 autocast on a GPU in one process without FP8; "
                                      "true / false force it", None)
    grad_clip: float = doc("gradient-norm clip (0 disables)", 1.0)
    mtp_lambda: float = doc("MTP loss weight lambda for the first part of training", 0.3)
    mtp_lambda_final: float = doc("MTP loss weight after mtp_switch_frac of the steps", 0.1)
    mtp_switch_frac: float = doc("fraction of steps after which lambda drops to mtp_lambda_final", 0.7)
    bias_gamma: float = doc("router bias update rate gamma (aux-loss-free balancing)", 0.001)
    bias_freeze_frac: float = doc("fraction of steps after which gamma is 0", 1.0)
    seq_aux_alpha: float = doc("complementary sequence-wise balance loss weight alpha", 1e-4)
    dtype: str = doc("'auto' (bf16 autocast on cuda, fp32 on cpu), 'bf16', 'fp32' or 'fp8' (docs/fp8.md)", "auto")
    fp8_recompute_swiglu: bool = doc("with dtype fp8: recompute silu(gate) in backward instead of storing it", False)
    fp8_parts: str = doc("with dtype fp8: which parts run in FP8, a comma list of attention (the MLA projections), "
                         "mlp (dense MLPs, shared experts) and experts (the routed experts)",
                         "attention,mlp,experts")
    fp8_pad_partial: bool = doc("with dtype fp8 on the GPU: run linears whose sizes are not multiples of 128 on "
                                "zero-padded copies instead of leaving them in BF16", False)
    compile: bool = doc("torch.compile each transformer block", False)
    fused_head: bool = doc("each output head and its cross-entropy as one chunked operation: the logits never "
                           "exist whole (single-device steps; docs/performance.md)", False)
    activation_checkpointing: bool = doc("recompute each block in backward to save memory", False)
    eval_every: int = doc("validation every N steps (0: only at the end)", 100)
    eval_batches: int = doc("validation batches", 8)
    ckpt_every: int = doc("checkpoint every N steps (0: only at the end)", 250)
    keep_last: int = doc("checkpoints kept", 2)
    log_every: int = doc("log line every N steps", 10)
    seed: int = doc("model init seed", 0)
    resume: str = doc("'' (fresh run), 'auto' (latest intact checkpoint in out_dir) or a checkpoint directory; "
                      "the run's saved configuration is used", "")
    max_nonfinite: int = doc("stop after this many NaN/Inf steps in a row (each is skipped; checked at log steps)",
                             10)
    samples: int = doc("samples generated at the end", 4)
    eval_problems: int = doc("held-out problems scored for accuracy at the end (synthetic data)", 300)
    tensorboard: bool = doc("write TensorBoard event files", True)

    def __post_init__(self) -> None:
        positive = (lambda v: v >= 1, "must be at least 1")
        not_negative = (lambda v: v >= 0, "must be 0 or more")
        fraction = (lambda v: 0 <= v <= 1, "must lie in [0, 1]")
        _check(self, "train", {
            "batch_size": positive, "grad_accum": positive, "max_steps": positive, "log_every": positive,
            "eval_batches": positive, "keep_last": positive, "max_nonfinite": positive,
            "warmup_steps": not_negative, "eval_every": not_negative, "ckpt_every": not_negative,
            "samples": not_negative, "eval_problems": not_negative,
            "time_limit_min": (lambda v: v >= 0 and _finite(v), "must be 0 (no limit) or a positive number"),
            "lr": (lambda v: v > 0 and _finite(v), "must be a positive finite number"),
            "min_lr_ratio": fraction, "decay_frac": fraction, "mtp_switch_frac": fraction,
            "bias_freeze_frac": fraction, "beta1": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
            "beta2": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
            "eps": (lambda v: v > 0 and _finite(v), "must be a positive finite number"),
            **{k: (lambda v: v >= 0 and _finite(v), "must be 0 or a positive finite number")
               for k in ("weight_decay", "grad_clip", "mtp_lambda", "mtp_lambda_final", "bias_gamma",
                         "seq_aux_alpha")}})


# ---- parallel (issue 19; nanoseek/parallel): the ParallelConfig section
@dataclass
class ParallelConfig:
    enable: bool = doc("run through the parallel code path also in one process (torchrun turns it on)", False)
    pp: int = doc("pipeline-parallel ranks (0: 1)", 0)
    dp: int = doc("data-parallel ranks, each seeing its own tokens (0: world size / pp)", 0)
    ep: int = doc("expert-parallel ranks, taken out of dp (0: 1); must divide dp and n_routed_experts", 0)
    schedule: str = doc("pipeline schedule for pp > 1: 'dualpipev', 'zbv' or '1f1b'", "dualpipev")
    microbatches: int = doc("pipeline micro-batches per step (0: the smallest count >= stages that divides "
                            "the rank's sequences)", 0)
    fsdp: bool = doc("shard parameters, gradients and optimizer state with FSDP2 (else all-reduce gradients)",
                     True)
    fp8_dispatch: bool = doc("send expert-parallel dispatch in FP8 with 1x128 scales (combine stays bf16)", False)
    overlap: bool = doc("dualpipev: overlap one micro-batch's all-to-all with the other's compute", True)
    timeout_s: float = doc("collective timeout: a dead rank makes the others fail after at most this", 600.0)


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    preset: str = "demo"
    # what the user set (config file and command line), {section: {field: value}}, "preset" included;
    # None: every field counts as set (a RunConfig built in code). `--resume` checks these.
    explicit: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # ---- parallel

    def to_dict(self) -> dict[str, Any]:
        model = dataclasses.asdict(self.model)
        model.pop("extra", None)
        return {"preset": self.preset, "model": model, "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train),
                "parallel": dataclasses.asdict(self.parallel)}  # ---- parallel


MODEL_FIELD_HELP = {
    "model_type": "'deepseek_v3' or 'deepseek_v2' (checkpoint format)",
    "vocab_size": "vocabulary size (set from the tokenizer when one is trained)",
    "hidden_size": "model width D", "intermediate_size": "dense SwiGLU width",
    "moe_intermediate_size": "width of one routed expert", "num_hidden_layers": "decoder layers",
    "num_attention_heads": "attention heads", "num_key_value_heads": "equal to num_attention_heads (MLA)",
    "q_lora_rank": "query low-rank dim (null: full q_proj)", "kv_lora_rank": "latent KV dim (cached)",
    "qk_nope_head_dim": "per-head non-rotary q/k dim", "qk_rope_head_dim": "rotary q/k dim (shared key)",
    "v_head_dim": "per-head value dim", "n_routed_experts": "routed experts",
    "n_shared_experts": "shared experts", "num_experts_per_tok": "experts per token (top-k)",
    "n_group": "expert groups", "topk_group": "groups kept per token",
    "routed_scaling_factor": "gate multiplier", "norm_topk_prob": "renormalise top-k gates",
    "scoring_func": "'sigmoid' (V3) or 'softmax' (V2)", "topk_method": "'noaux_tc', 'greedy', 'group_limited_greedy'",
    "first_k_dense_replace": "leading dense layers", "num_nextn_predict_layers": "MTP depth D",
    "max_position_embeddings": "longest supported sequence", "rope_theta": "RoPE base",
    "rope_scaling": "YaRN parameters (JSON) or null", "rope_interleave": "interleaved rotary channel layout",
    "rms_norm_eps": "RMSNorm epsilon", "initializer_range": "init std", "tie_word_embeddings": "tie embedding/head",
    "bos_token_id": "BOS id", "eos_token_id": "EOS id", "pad_token_id": "PAD id",
}


def _fields(cls: type) -> dict[str, tuple[Any, str]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("help", MODEL_FIELD_HELP.get(f.name, "")))
            for f in dataclasses.fields(cls) if f.name != "extra"}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
            "parallel": ParallelConfig}  # ---- parallel


def convert(value: str | Any, typ: Any, option: str, command: str = "train") -> Any:
    """Turn a command-line string (or a config-file value) into the field's type."""
    if not isinstance(value, str):
        return value
    args = typing.get_args(typ)
    if type(None) in args:
        if value.lower() in ("none", "null") or (value.lower() == "auto" and bool in args):
            return None  # an optional switch's 'auto' is its unset value
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return value
        return json.loads(value)  # dicts (rope_scaling)
    except (ValueError, json.JSONDecodeError):
        name = "auto, true or false" if args == (bool, type(None)) else getattr(typ, "__name__", str(typ))
        raise SystemExit(f"nanoseek {command}: {option} expects {name}, got {value!r}") from None


def help_text() -> str:
    lines = ["usage: nanoseek train [--preset NAME] [--config FILE] [--resume [DIR]] [--SECTION.FIELD VALUE ...]",
             "", "Pretrain a DeepSeek-V3-style model. With no arguments: the embedded demo (synthetic reasoning",
             "corpus, BPE tokenizer, small MLA + MoE + MTP model, checkpoints, plots, samples, accuracy).", "",
             f"  --preset NAME      model preset: {', '.join(sorted(PRESETS))} (default: demo)",
             "  --config FILE      TOML or JSON file with [model], [data], [train] sections",
             "  --resume [DIR]     continue a run with its saved configuration: alone, from the newest intact",
             "                     checkpoint of --train.out_dir; DIR: a run directory or one step-* checkpoint.",
             "                     Flags that change the model, data or batch size are refused; others apply.", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        defaults = ModelConfig(**PRESETS["demo"]) if section == "model" else cls()
        for name, (typ, help_) in _fields(cls).items():
            switch = typing.get_args(typ) == (bool, type(None))  # true / false / auto
            tname = "auto|bool" if switch else getattr(typ, "__name__", str(typ).replace("typing.", ""))
            default = getattr(defaults, name)
            shown = "auto" if switch and default is None else repr(default)
            option = f"--{section}.{name} {tname}"
            lines.append(f"  {option:<46} {help_} [default: {shown}]")
        lines.append("")
    return "\n".join(lines)


def split_argv(argv: list[str], command: str, help_text: Callable[[], str],
               special: tuple[str, ...] = ("--preset", "--config"),
               aliases: dict[str, str] | None = None) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Split `--key value` / `--key=value` arguments, as every `nanoseek` training command takes them.

    Returns (named, pairs): `named` holds the `special` keys (--preset, --config, --ckpt ...) by name;
    `pairs` holds ("section.field", value) for the rest, in order, with `aliases` applied first
    (e.g. sft's --data -> --sft.data). `--resume` alone means train.resume "auto"; `--resume DIR`, DIR.
    """
    named: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        key, eq, val = arg.partition("=")
        if not key.startswith("--"):
            raise SystemExit(f"nanoseek {command}: unexpected argument {arg!r} (options look like --train.lr 1e-3)")
        if key == "--resume" and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            pairs.append(("train.resume", "auto"))
            i += 1
            continue
        if not eq:
            if i + 1 == len(argv):
                raise SystemExit(f"nanoseek {command}: {key} needs a value")
            val = argv[i + 1]
            i += 1
        i += 1
        key = (aliases or {}).get(key, key)
        if key in special:
            named[key] = val
        elif key == "--resume":
            pairs.append(("train.resume", val))
        else:
            pairs.append((key[2:], val))
    return named, pairs


def read_config_file(file: str, command: str, sections: dict[str, type],
                     top_level: tuple[str, ...] = ("preset",)) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A TOML or JSON config file: (its top-level keys among `top_level`, its {section: {field: value}})."""
    path = Path(file)
    if not path.is_file():
        raise SystemExit(f"nanoseek {command}: config file {path} not found")
    try:
        loaded = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"nanoseek {command}: cannot parse {path}: {e}") from None
    top = {key: loaded.pop(key) for key in top_level if key in loaded}
    for section, values in loaded.items():
        if section not in sections or not isinstance(values, dict):
            raise SystemExit(f"nanoseek {command}: {path}: unknown section {section!r}; use {sorted(sections)}")
    return top, loaded


def set_option(values: dict[str, dict[str, Any]], sections: dict[str, type], section: str, name: str, value: Any,
               where: str, command: str, known: str) -> None:
    """Check one option against its section's dataclass, convert it to the field's type, store it.

    `where` names the option in errors (`--train.lr` or `run.toml: train.lr`); `known` lists the valid ones.
    """
    if section not in sections:
        raise SystemExit(f"nanoseek {command}: unknown option {where!r}; options are {known}")
    fields = _fields(sections[section])
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"; did you mean --{section}.{close[0]}?" if close else f"; see `nanoseek {command} --help`"
        raise SystemExit(f"nanoseek {command}: unknown option {where!r}{hint}")
    typ = fields[name][0]
    value = convert(value, typ, where, command)
    base = typing.get_args(typ)[0] if type(None) in typing.get_args(typ) else typ
    if value is not None and base in (int, float, bool, str) and not isinstance(value, base):
        if not (base is float and isinstance(value, int) and not isinstance(value, bool)):
            raise SystemExit(f"nanoseek {command}: {where} expects {base.__name__}, got {value!r}")
        value = float(value)
    values[section][name] = value


def parse_args(argv: list[str]) -> RunConfig:
    """Build a RunConfig from presets, an optional config file and `--section.field value` pairs."""
    named, pairs = split_argv(argv, "train", help_text)
    preset_name, preset_set = named.get("--preset", "demo"), "--preset" in named
    overrides: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if "--config" in named:
        top, loaded = read_config_file(named["--config"], "train", SECTIONS)
        if "preset" in top:
            preset_name, preset_set = top["preset"], True
        for section, values in loaded.items():
            for name, value in values.items():
                _set(overrides, section, name, value, f"{named['--config']}: {section}.{name}")
    for key, val in pairs:
        section, _, name = key.partition(".")
        _set(overrides, section, name, val, f"--{key}")
    if preset_name not in PRESETS:
        raise SystemExit(f"nanoseek train: unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    explicit: dict[str, Any] = {s: dict(v) for s, v in overrides.items()}
    if preset_set:
        explicit["preset"] = preset_name
    if preset_name == "demo":
        overrides["train"].setdefault("time_limit_min", 8.0)
    try:
        model = ModelConfig(**{**PRESETS[preset_name], **overrides["model"]})
        return RunConfig(model=model, data=DataConfig(**overrides["data"]),
                         train=TrainConfig(**overrides["train"]), preset=preset_name, explicit=explicit,
                         parallel=ParallelConfig(**overrides["parallel"]))  # ---- parallel
    except ValueError as e:  # name the option: "ModelConfig.hidden_size=-5: ..." -> "--model.hidden_size -5: ..."
        message = re.sub(r"ModelConfig\.(\w+)=", r"--model.\1 ", str(e))
        raise SystemExit(f"nanoseek train: {message}") from None


def _set(overrides: dict, section: str, name: str, value: Any, where: str) -> None:
    set_option(overrides, SECTIONS, section, name, value, where, "train",
               "--model.*, --data.*, --train.*, --parallel.*")
