"""How many graphs the engine's compiled decode view makes, and why it recompiles (CPU, a few minutes):

    python bench/compile_probe.py --out bench/results/compile_probe-<date>-cpu.json

A debug model with 4 layers (1 dense, 3 MoE), `Engine(compile=True)` without CUDA graphs, 4 prompts x 4
samples of 32 tokens at temperature 1. Counts dynamo's unique graphs and, from its recompile log
(`torch._logs` "recompiles"), each recompile's first failed guard, grouped by kind: a layer number
(`layer_idx`), the kv length (`kv_len`), the module type, the rest. docs/inference.md reads it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timing import source_revision  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402


class Guards(logging.Handler):
    """Collects the first failed guard of each recompile message."""

    def __init__(self):
        super().__init__()
        self.reasons: collections.Counter = collections.Counter()
        self.recompiles = 0

    def emit(self, record):
        text = record.getMessage()
        if "Recompiling function" not in text:
            return
        self.recompiles += 1
        failed = re.search(r"triggered by the following guard failure\(s\):\s*-\s*\S+:\s*(.*)", text)
        guard = failed.group(1) if failed else ""
        kind = ("layer_idx" if "layer_idx" in guard else "kv_len" if "kv_len" in guard else
                "module type" if "check_type_id" in guard else "other")
        self.reasons[kind] += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch._logging.set_logs(recompiles=True)
    guards = Guards()
    logging.getLogger("torch._dynamo").addHandler(guards)
    from torch._dynamo.utils import counters

    cfg = preset("debug", num_hidden_layers=4, first_k_dense_replace=1)
    model = Transformer.from_config(cfg, seed=0).eval()
    engine = Engine(model, max_batch_size=16, max_len=96, compile=True)
    prompts = [[1 + (i * 7 + j) % 400 for j in range(5 + i % 4)] for i in range(4)]
    t = time.time()
    engine.generate(prompts, [SamplingParams(temperature=1.0, max_new_tokens=32, seed=i) for i in range(4)], n=4)
    record = {"benchmark": "compile_probe", "date": time.strftime("%Y-%m-%d"), "git_commit": source_revision(),
              "device": "cpu", "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "config": {"preset": "debug", "layers": 4, "prompts": 4, "samples": 4, "new_tokens": 32},
              "seconds": time.time() - t, "unique_graphs": counters["stats"]["unique_graphs"],
              "recompiles": guards.recompiles, "first_failed_guard": dict(guards.reasons)}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
