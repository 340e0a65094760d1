"""Cost of the trainer's NaN/Inf guard: one optimizer step with and without it, in the same process.

    python bench/train_guard_overhead.py                     # one GPU: bench-1b, 8 x 2048, bf16 autocast, compiled
    python bench/train_guard_overhead.py --no-compile --steps 10
    python bench/train_guard_overhead.py --preset debug --batch 2 --seq 64 --device cpu --steps 3 --warmup 1  # smoke

plain:   accumulate_gradients + optimizer_step (what `train_step` does; fused AdamW on CUDA)
guarded: the same with skip_nonfinite=True (found_inf on the device) + NonFiniteGuard.update, as the
         trainer runs it. Both variants share one model and optimizer and alternate step by step
         (ABAB...), so drift in clocks or memory affects both. Medians of CUDA-event times; the result
         JSON lands in bench/results/train_guard_overhead-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.train.guard import NonFiniteGuard  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from nanoseek.train.step import (  # noqa: E402
    accumulate_gradients,
    compile_blocks,
    compiled_cross_entropy,
    cross_entropy,
    optimizer_step,
    pretraining_loss,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="eager blocks (default: each block compiled on CUDA)")
    p.add_argument("--out", default=None, help="result JSON path (default bench/results/...)")
    args = p.parse_args()

    device = torch.device(args.device)
    compiled = device.type == "cuda" and not args.no_compile
    cfg = preset(args.preset)
    model = Transformer.from_config(cfg, device=device, seed=0).train()
    if compiled:
        compile_blocks(model)
    optimizer = build_optimizer(model, 3e-4, (0.9, 0.95), 1e-8, 0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    loss_fn = pretraining_loss(0.3, 1e-4, ce=compiled_cross_entropy if compiled else cross_entropy)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device,
                      generator=torch.Generator(device).manual_seed(0))
    batches = [(x[:, :-1], x[:, 1:])]
    guard = NonFiniteGuard(device, 0, limit=10)

    def step(guarded: bool) -> None:
        out = accumulate_gradients(model, batches, loss_fn, autocast)
        out |= optimizer_step(model, optimizer, lr=3e-4, grad_clip=1.0, bias_gamma=1e-3, skip_nonfinite=guarded,
                              also_finite=list(out.values()) if guarded else ())
        if guarded:
            guard.update(out["finite"])

    def timed(guarded: bool) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(guarded)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        step(guarded)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step(False)
        step(True)
    times: dict[str, list[float]] = {"plain": [], "guarded": []}
    for _ in range(args.steps):
        times["plain"].append(timed(False))
        times["guarded"].append(timed(True))
    note, _ = guard.check()
    assert note is None, f"a benchmark step was non-finite: {note}"

    tokens = args.batch * args.seq
    figures = {name: {"median_s": statistics.median(t), "tok_s": tokens / statistics.median(t), "times_s": t}
               for name, t in times.items()}
    ratio = figures["guarded"]["median_s"] / figures["plain"]["median_s"]
    record = {
        "date": time.strftime("%Y-%m-%d"), "bench": "train_guard_overhead",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                   "warmup": args.warmup, "compiled": compiled, "optimizer": type(optimizer).__name__,
                   "fused": bool(optimizer.defaults.get("fused"))},
        "figures": figures, "guarded_over_plain": ratio,
    }
    for name, f in figures.items():
        print(f"{name:>8}: {1e3 * f['median_s']:.2f} ms/step, {f['tok_s']:,.0f} tok/s")
    print(f"guarded / plain step time: {ratio:.4f}")
    default = Path(__file__).parent / "results" / f"train_guard_overhead-{record['date']}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
