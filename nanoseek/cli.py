"""`nanoseek <command>`: train, sft, eval, sample, generate, chat, serve. A bare `nanoseek` prints the usage.

    nanoseek train [--preset NAME] [--config FILE] [--section.field VALUE ...]
    nanoseek sft --ckpt DIR --data FILE [--section.field VALUE ...]
    nanoseek eval --ckpt DIR [--tasks add,mul] [--k 8] [--out FILE]
    nanoseek sample --ckpt DIR --prompts FILE|synthetic --n K --out FILE
    nanoseek generate --ckpt DIR --prompt "..."
    nanoseek chat --ckpt DIR
    nanoseek serve --ckpt DIR --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("nanoseek.train.cli", "main", "pretrain a model (default: the embedded demo)"),
    "sft": ("nanoseek.sft.loop", "main", "supervised fine-tuning on chat data (docs/sft.md)"),
    "generate": ("nanoseek.infer.cli", "generate_main", "generate text from a checkpoint"),
    "chat": ("nanoseek.infer.cli", "chat_main", "interactive chat with a checkpoint"),
    "serve": ("nanoseek.infer.cli", "serve_main", "OpenAI-compatible HTTP server"),
    "rl": ("nanoseek.rl.cli", "main", "R1-Zero: GRPO with rule-based rewards from a checkpoint"),
    "eval": ("nanoseek.pipeline.eval_cmd", "main", "pass@1, pass@k, format rate of a checkpoint or server"),
    "sample": ("nanoseek.pipeline.sample_cmd", "main", "rejection sampling into SFT-ready JSONL"),
    "plan": ("nanoseek.parallel.plan", "main", "memory, bubble, all-to-all and step time of a cluster layout"),
}


def usage() -> str:
    lines = ["usage: nanoseek <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`nanoseek <command> --help` documents each command's options; `nanoseek --version` prints the",
              "version. `nanoseek train` with no options trains the embedded demo into runs/demo (`make demo` adds",
              "--data.r1_share 0, then runs `nanoseek rl --preset demo`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):  # a bare `nanoseek` explains itself; it starts nothing
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import nanoseek

        print(f"nanoseek {nanoseek.__version__}")
        return 0
    if argv[0].startswith("-"):
        print(f"nanoseek: {argv[0]} needs a command before it, e.g. `nanoseek train {' '.join(argv)}`\n\n{usage()}",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nanoseek: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[command]
    import importlib

    return getattr(importlib.import_module(module_name), func_name)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
