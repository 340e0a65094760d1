"""Golden losses: 20 fp32 training steps of the `debug` preset from a fixed seed, every loss compared with
values recorded before a refactor (`tests/golden_losses.json`). A change that should not touch the maths
(module swaps, a split training step, new files) must leave every figure equal to 1e-6.

Record anew only for a change that means to alter the numerics, and say so in its commit:

    .venv/bin/python tests/test_golden.py --record
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden_losses.json")
STEPS = 20


def golden_run() -> dict[str, list[float]]:
    """Loss, MTP loss, balance loss and grad norm of each of STEPS steps (fp32, CPU, one thread)."""
    from nanoseek import Transformer, preset
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.step import train_step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one fixed order
    try:
        model = Transformer.from_config(preset("debug"), seed=0).train()
        optimizer = build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1)
        data = torch.Generator().manual_seed(1)
        # a skewed token distribution, so the losses fall and the router sees uneven loads
        weights = 1.0 / torch.arange(1, model.config.vocab_size + 1, dtype=torch.float64)
        record: dict[str, list[float]] = {"loss": [], "mtp_loss": [], "balance": [], "grad_norm": [], "maxvio": []}
        for _ in range(STEPS):
            batches = []
            for _ in range(2):  # two micro-batches of (4, 32)
                x = torch.multinomial(weights, 4 * 33, replacement=True, generator=data).view(4, 33)
                batches.append((x[:, :-1], x[:, 1:]))
            out = train_step(model, optimizer, batches, lr=3e-3, autocast=contextlib.nullcontext(), grad_clip=1.0,
                             mtp_lambda=0.3, seq_aux_alpha=1e-2, bias_gamma=1e-2)
            for key in record:
                record[key].append(float(out[key]))
    finally:
        torch.set_num_threads(threads)
    return record


def test_golden_losses():
    want = json.loads(GOLDEN.read_text())
    got = golden_run()
    assert want["loss"][-1] < want["loss"][0] - 0.5  # the recording itself learned something
    for key, values in want.items():
        for step, (w, g) in enumerate(zip(values, got[key], strict=True), start=1):
            assert abs(w - g) <= 1e-6, f"{key} at step {step}: {g!r}, recorded {w!r}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_golden.py --record   (pytest runs the check)")
    GOLDEN.write_text(json.dumps(golden_run(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
