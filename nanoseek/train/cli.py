"""`nanoseek train`: parse the run configuration and run pretraining (see trainer.py)."""

from __future__ import annotations

from nanoseek.train.config import parse_args
from nanoseek.train.trainer import train


def main(argv: list[str]) -> int:
    run = parse_args(argv)
    train(run)
    return 0
