"""`nanoseek rl`: parse the RL configuration and run GRPO (see trainer.py)."""

from __future__ import annotations

from nanoseek.rl.config import parse_args
from nanoseek.rl.trainer import rl_train


def main(argv: list[str]) -> int:
    rl_train(parse_args(argv))
    return 0
