"""Two probes behind issue 23's profile (one GPU, about a minute), written to a JSON record:

    python bench/train_probe.py --out bench/results/train_probe-<date>.json

1. The router projection, logits (T, E) = x (T, D) . W (E, D)^T in fp32 (as `Router.forward` computes it),
   timed as `F.linear` and in other layouts, each checked for bitwise-equal logits: a profile of the
   `bench-1b` step showed cuBLAS running it as a gemv (2.7 ms forward at T = 16,384).
2. The host syncs of one compiled `bench-1b` training step (`torch.cuda.set_sync_debug_mode("warn")`),
   each with the project's lines of its Python stack and how often it fired.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timing import source_revision  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from nanoseek.train.step import compile_blocks, compiled_cross_entropy, train_step  # noqa: E402


def timed_ms(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def router_layouts(T: int, D: int, E: int) -> dict:
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, D, device="cuda")
    ref = F.linear(x.float(), w)
    variants = {
        "F.linear(x.float(), w)": lambda: F.linear(x.float(), w),
        "(w @ x.float().T).T": lambda: (w @ x.float().T).T,
        "torch.mm(x.float(), w.t().contiguous())": lambda: torch.mm(x.float(), w.t().contiguous()),
        "bf16 F.linear, fp32 out (not fp32 maths)": lambda: F.linear(x, w.to(torch.bfloat16)).float(),
    }
    out = {}
    for name, fn in variants.items():
        y = fn()
        out[name] = {"ms": timed_ms(fn), "max_abs_diff": (y - ref).abs().max().item(),
                     "bitwise_equal": torch.equal(y.contiguous(), ref)}
        print(f"router {name:44s} {out[name]['ms']:.3f} ms  bitwise {out[name]['bitwise_equal']}", flush=True)
    return out


def step_syncs(preset_name: str, batch: int, seq: int) -> list[dict]:
    cfg = preset(preset_name)
    model = Transformer.from_config(cfg, device="cuda", seed=0).train()
    compile_blocks(model)
    opt = build_optimizer(model, 1e-4, (0.9, 0.95), 1e-8, 0.1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    data = [(tokens[:, :-1], tokens[:, 1:])]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        train_step(model, opt, data, lr=1e-4, autocast=autocast, grad_clip=1.0, mtp_lambda=0.3,
                   seq_aux_alpha=1e-4, bias_gamma=1e-3, loss_fn=compiled_cross_entropy)
    for _ in range(3):  # compile, then steady state
        step()
    torch.cuda.synchronize()
    seen: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            ours = [s for s in traceback.format_stack()[:-1] if "/nanoseek/" in s or "/bench/" in s]
            key = "".join(ours[-4:])
            seen[key] = seen.get(key, 0) + 1
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [{"count": n, "stack": k} for k, n in sorted(seen.items(), key=lambda kv: -kv[1])]
    print(f"{len(syncs)} distinct host syncs in one step")
    for s in syncs:
        print(f"--- x{s['count']}\n{s['stack']}")
    return syncs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_probe: needs a CUDA GPU")
    cfg = preset(args.preset)
    record = {"benchmark": "train_probe", "date": time.strftime("%Y-%m-%d"), "commit": source_revision(),
              "device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
                                                                  "python": platform.python_version()},
              "config": vars(args),
              "router": router_layouts(args.tokens, cfg.hidden_size, cfg.n_routed_experts),
              "host_syncs": step_syncs(args.preset, args.batch, args.seq)}
    out = Path(args.out or Path(__file__).parent / "results" / f"train_probe-{record['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
