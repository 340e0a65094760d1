"""`nanoseek rl` configuration: four sections, presets, config files and command-line overrides.

    nanoseek rl --ckpt runs/demo/checkpoints/step-000800                 # preset "default" (GRPO)
    nanoseek rl --preset demo                   # after `nanoseek train`: the latest checkpoint of runs/demo
    nanoseek rl --ckpt DIR --preset dapo --rl.group_size 16 --train.lr 1e-6
    nanoseek rl --ckpt DIR --config rl.toml --prompts.source my_prompts.jsonl
    nanoseek rl --train.out_dir runs/rl --resume                         # continue exactly

Precedence: preset < config file (TOML/JSON with sections rl, reward, prompts, train) < command line.
Presets are named sets of overrides, so every variant is spelled out as plain settings:
    default   GRPO as in DeepSeekMath/R1: std-scaled advantages, eps 0.2, sequence-mean loss, beta 0.001
    dr_grpo   Dr. GRPO: no std division, constant length normaliser
    dapo      DAPO: eps 0.2/0.28, token-level loss, dynamic sampling, soft overlong penalty, beta 0
              (--rl.overlong_filter true masks truncated responses instead)
    demo      the CPU demo (`make demo`: after `nanoseek train --data.r1_share 0`, a base that never saw the
              R1-Zero prompt): Countdown with 3 numbers, 8 prompts x 8 samples, 160 new tokens, flat groups
              dropped (dynamic sampling without refill), lr 5e-5, 4 minutes of RL between two held-out
              evaluations
    debug     tiny and fast, for tests
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nanoseek.train.config import _fields, doc, read_config_file, set_option, split_argv


@dataclass
class RLConfig:
    group_size: int = doc("G: samples per prompt (the group whose mean is the baseline); >= 2", 8)
    prompts_per_step: int = doc("prompts per step (a rollout batch holds prompts_per_step * group_size)", 16)
    temperature: float = doc("rollout sampling temperature", 1.0)
    top_p: float = doc("rollout nucleus sampling (1 = off)", 1.0)
    max_new_tokens: int = doc("response length limit in tokens (prompt + this must fit the context)", 256)
    template: str = doc("prompt template: 'r1' (R1-Zero's system prompt) or 'raw'", "r1")
    scale_std: bool = doc("divide advantages by the group's std (GRPO); false: Dr. GRPO", True)
    eps_low: float = doc("PPO clip below: ratio >= 1 - eps_low", 0.2)
    eps_high: float = doc("PPO clip above: ratio <= 1 + eps_high (DAPO's clip-higher: 0.28)", 0.2)
    beta: float = doc("k3 KL coefficient; 0 builds no reference model", 0.001)
    ref_reset_every: int = doc("replace the reference model by the policy every N steps (R1: 400; 0 never)", 0)
    aggregation: str = doc("'sequence' (GRPO), 'token' (DAPO) or 'constant' (Dr. GRPO: / max_new_tokens)",
                           "sequence")
    neg_weight: float = doc("weight of negative advantages (1: GRPO; 0: only better-than-average responses "
                            "are reinforced, as in rejection-sampling fine-tuning; in between: W-REINFORCE)", 1.0)
    mu: int = doc("update epochs over each rollout batch", 1)
    minibatches: int = doc("optimizer steps per epoch: the rollout batch is split into this many", 1)
    micro_batch_size: int = doc("responses per forward/backward (gradient accumulation inside a mini-batch)",
                                32)
    old_logprobs: str = doc("pi_old for the ratio: 'trainer' (a no-grad training forward) or 'engine' "
                            "(the rollout's log-probs)", "trainer")
    tis_cap: float = doc("truncated importance sampling: weight min(pi_old/pi_engine, cap) per token; 0 off",
                         0.0)
    dynamic_sampling: bool = doc("drop groups whose rewards are all equal and draw more prompts (DAPO)", False)
    max_draws: int = doc("dynamic sampling: rollout rounds per step at most", 4)
    overlong_filter: bool = doc("leave responses cut by max_new_tokens out of the loss (DAPO)", False)
    mtp_lambda: float = doc("MTP loss weight on the responses (0: MTP not trained)", 0.0)
    seq_aux_alpha: float = doc("sequence-wise balance loss weight", 0.0)


@dataclass
class RewardConfig:
    accuracy: float = doc("weight of the accuracy reward (exact verifier)", 1.0)
    format: float = doc("weight of the format reward (<think>..</think> <answer>..</answer>, tags once)", 0.1)
    overlong: float = doc("weight of DAPO's soft overlong penalty (0 off)", 0.0)
    overlong_buffer: int = doc("soft overlong penalty: tokens before max_new_tokens where it ramps to -1", 64)
    math_verify: float = doc("weight of a math-verify accuracy (needs `pip install math-verify`; 0 off)", 0.0)


@dataclass
class PromptConfig:
    source: str = doc("'tasks' (procedural tasks, train split) or a .jsonl file with prompt/answer fields",
                      "tasks")
    kinds: str = doc("tasks: comma-separated kinds among add, sub, mul, countdown", "add,sub,mul,countdown")
    difficulty_min: int = doc("tasks: lowest difficulty (digits per operand / countdown numbers)", 1)
    difficulty_max: int = doc("tasks: highest difficulty", 3)
    curriculum: bool = doc("tasks: draw (kind, difficulty) cells by recent pass rate, favouring those near 50%",
                           False)
    eval_source: str = doc("'' (held-out tasks, or the prompt file itself) or a .jsonl file for evaluation", "")
    eval_problems: int = doc("held-out problems per evaluation (0: none)", 300)
    eval_every: int = doc("evaluate every N steps (0: only before and after)", 0)
    pass_k: int = doc("samples per problem for pass@k in evaluations (0: greedy pass@1 only)", 0)
    eval_max_new_tokens: int = doc("evaluation response limit (0: rl.max_new_tokens)", 0)
    seed: int = doc("prompt seed", 0)


@dataclass
class TrainConfig:
    out_dir: str = doc("run directory: checkpoints, metrics, plots, samples", "runs/rl")
    device: str = doc("'auto' (cuda if available), 'cpu', 'cuda', ...", "auto")
    dtype: str = doc("'auto' (bf16 autocast on cuda, fp32 on cpu), 'bf16' or 'fp32'", "auto")
    max_steps: int = doc("RL steps (one rollout batch each)", 200)
    time_limit_min: float = doc("stop (and checkpoint) after this many minutes; 0 = no limit", 0.0)
    lr: float = doc("AdamW learning rate (constant after warmup)", 1e-5)
    warmup_steps: int = doc("linear warmup in optimizer steps", 0)
    weight_decay: float = doc("AdamW weight decay (matrices only)", 0.0)
    beta1: float = doc("AdamW beta1", 0.9)
    beta2: float = doc("AdamW beta2", 0.99)
    eps: float = doc("AdamW epsilon", 1e-8)
    grad_clip: float = doc("gradient-norm clip (0 disables)", 1.0)
    bias_gamma: float = doc("router bias update rate (aux-loss-free balancing continues in RL)", 0.001)
    freeze_router_bias: bool = doc("keep the router biases fixed during RL", False)
    compile: bool = doc("torch.compile the engine's blocks and the policy's (for the update)", False)
    cuda_graph: bool = doc("CUDA graphs for rollouts ('auto' on CUDA is on)", True)
    log_every: int = doc("print a line every N steps (every step is logged to metrics.jsonl)", 1)
    ckpt_every: int = doc("checkpoint every N steps (0: only at the end)", 50)
    keep_last: int = doc("checkpoints kept", 2)
    samples_every: int = doc("write sample completions every N steps (0: never)", 10)
    plots: bool = doc("write PNG plots at the end", True)
    tensorboard: bool = doc("write TensorBoard event files", True)
    seed: int = doc("sampling and shuffling seed", 0)
    resume: str = doc("'' (fresh), 'auto' (latest checkpoint in out_dir) or a checkpoint directory", "")


SECTIONS = {"rl": RLConfig, "reward": RewardConfig, "prompts": PromptConfig, "train": TrainConfig}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "dr_grpo": {"rl": {"scale_std": False, "aggregation": "constant"}},
    "dapo": {"rl": {"eps_high": 0.28, "aggregation": "token", "dynamic_sampling": True, "beta": 0.0},
             "reward": {"overlong": 1.0}},
    "demo": {"rl": {"group_size": 8, "prompts_per_step": 8, "max_new_tokens": 160, "beta": 0.0,
                    "aggregation": "token", "eps_high": 0.28, "dynamic_sampling": True, "max_draws": 1,
                    "micro_batch_size": 32, "temperature": 1.0},
             "prompts": {"kinds": "countdown", "difficulty_min": 3, "difficulty_max": 3, "eval_problems": 300,
                         "eval_max_new_tokens": 160},
             # 100 steps, not a time budget: the gain must not depend on the machine's load (78 steps fit
             # the 4 minutes of a loaded 2-core machine, +4.3 points; 100-108 fit an idle one, +5.7 to +8.3)
             "train": {"out_dir": "runs/demo-rl", "lr": 5e-5, "max_steps": 100, "time_limit_min": 6.0,
                       "ckpt_every": 0, "samples_every": 5}},
    "debug": {"rl": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 16, "micro_batch_size": 8},
              "prompts": {"eval_problems": 8, "difficulty_max": 1},
              "train": {"max_steps": 3, "ckpt_every": 0, "samples_every": 0, "plots": False, "tensorboard": False}},
}

PRESET_CKPT = {"demo": "runs/demo"}  # the demo continues `nanoseek train`'s run directory (its latest checkpoint)


@dataclass
class RLRun:
    ckpt: str
    rl: RLConfig
    reward: RewardConfig
    prompts: PromptConfig
    train: TrainConfig
    preset: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {"ckpt": self.ckpt, "preset": self.preset,
                **{s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}}


def help_text() -> str:
    lines = ["usage: nanoseek rl --ckpt DIR [--preset NAME] [--config FILE] [--resume [DIR]] [--SECTION.FIELD VALUE]",
             "", "R1-Zero: GRPO with rule-based rewards, from a pretrained checkpoint, on the project's engine.", "",
             "  --ckpt DIR         the base model (HF format, with its tokenizer), or a `nanoseek train` run directory",
             f"  --preset NAME      {', '.join(PRESETS)} (default: default)",
             "  --config FILE      TOML or JSON with [rl], [reward], [prompts], [train] sections",
             "  --resume [DIR]     continue from DIR, or from the latest checkpoint in train.out_dir", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for name, (typ, help_) in _fields(cls).items():
            tname = getattr(typ, "__name__", str(typ))
            option = f"--{section}.{name} {tname}"
            lines.append(f"  {option:<40} {help_} [default: {getattr(cls(), name)!r}]")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> RLRun:
    """An RLRun from a preset, an optional config file and `--section.field value` pairs."""
    named, pairs = split_argv(argv, "rl", help_text, special=("--preset", "--config", "--ckpt"))
    preset, ckpt = named.get("--preset", "default"), named.get("--ckpt", "")
    if preset not in PRESETS:
        raise SystemExit(f"nanoseek rl: unknown preset {preset!r}; choose one of {list(PRESETS)}")
    values: dict[str, dict[str, Any]] = {s: dict(PRESETS[preset].get(s, {})) for s in SECTIONS}
    if "--config" in named:
        top, loaded = read_config_file(named["--config"], "rl", SECTIONS, top_level=("ckpt",))
        ckpt = ckpt or top.get("ckpt", "")
        for section, items in loaded.items():
            for name, value in items.items():
                _set(values, f"{section}.{name}", value, f"{named['--config']}: {section}.{name}")
    for key, val in pairs:
        _set(values, key, val)
    ckpt = ckpt or PRESET_CKPT.get(preset, "")
    run = RLRun(ckpt=ckpt, preset=preset, **{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    validate(run)
    return run


def _set(values: dict[str, dict[str, Any]], key: str, value: Any, where: str = "") -> None:
    section, _, name = key.partition(".")
    set_option(values, SECTIONS, section, name, value, where or f"--{key}", "rl",
               f"--{'.*, --'.join(SECTIONS)}.*")


def validate(run: RLRun) -> None:
    """Settings that cannot work, refused with the fix; settings that would be ignored, warned about."""
    import warnings

    rl = run.rl
    if rl.group_size < 2:
        raise SystemExit(f"nanoseek rl: --rl.group_size {rl.group_size}: GRPO needs a group (G >= 2) whose mean "
                         "reward is the baseline; use 2 or more (R1 used 16)")
    for name in ("prompts_per_step", "mu", "minibatches", "micro_batch_size", "max_new_tokens", "max_draws"):
        if getattr(rl, name) < 1:
            raise SystemExit(f"nanoseek rl: --rl.{name} must be >= 1, got {getattr(rl, name)}")
    if rl.aggregation not in ("sequence", "token", "constant"):
        raise SystemExit(f"nanoseek rl: --rl.aggregation {rl.aggregation!r}: use sequence, token or constant")
    if rl.old_logprobs not in ("trainer", "engine"):
        raise SystemExit(f"nanoseek rl: --rl.old_logprobs {rl.old_logprobs!r}: use trainer or engine")
    if not (0 <= rl.eps_low < 1 and rl.eps_high >= 0):
        raise SystemExit(f"nanoseek rl: clip range eps_low={rl.eps_low}, eps_high={rl.eps_high}: need "
                         "0 <= eps_low < 1 and eps_high >= 0")
    if not 0 <= rl.neg_weight <= 1:
        raise SystemExit(f"nanoseek rl: --rl.neg_weight {rl.neg_weight} must lie in [0, 1] (1: GRPO)")
    if rl.beta < 0:
        raise SystemExit(f"nanoseek rl: --rl.beta {rl.beta} must be >= 0 (0: no reference model)")
    if rl.minibatches > rl.prompts_per_step * rl.group_size:
        raise SystemExit(f"nanoseek rl: --rl.minibatches {rl.minibatches} exceeds the {rl.prompts_per_step} x "
                         f"{rl.group_size} responses of a step; lower it")
    if rl.template not in ("r1", "raw"):
        raise SystemExit(f"nanoseek rl: --rl.template {rl.template!r}: use r1 or raw")
    if run.train.dtype not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"nanoseek rl: --train.dtype {run.train.dtype!r}: use auto, bf16 or fp32")
    if rl.ref_reset_every and rl.beta == 0:
        warnings.warn("--rl.ref_reset_every is set but --rl.beta is 0: there is no reference model to reset",
                      stacklevel=2)
    if rl.tis_cap and rl.old_logprobs == "engine":
        warnings.warn("--rl.tis_cap with --rl.old_logprobs engine: the weight is always 1 (pi_old is the "
                      "engine's); use old_logprobs trainer", stacklevel=2)
    if run.reward.overlong and rl.overlong_filter:
        warnings.warn("both the overlong penalty and overlong filtering are on: truncated responses are masked "
                      "out of the loss, so their -1 penalty only shifts their group's baseline", stacklevel=2)
    if not run.ckpt and not run.train.resume:
        raise SystemExit("nanoseek rl: --ckpt DIR is required (a pretrained checkpoint with its tokenizer, e.g. "
                         "runs/demo/checkpoints/step-000800), unless --resume continues an RL run")


__all__ = ["RLConfig", "RewardConfig", "PromptConfig", "TrainConfig", "RLRun", "PRESETS", "parse_args",
           "help_text"]
