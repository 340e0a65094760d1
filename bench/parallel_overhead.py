"""The parallel code path at world size 1 against the plain training step (target: < 3% slower).

    python bench/parallel_overhead.py                      # one GPU: bench-1b, 8 x 2048, bf16
    python bench/parallel_overhead.py --preset debug --batch 2 --seq 64 --device cpu --steps 3 --warmup 1  # smoke

Both variants run full optimizer steps (forward, backward, clip, AdamW, router-bias update) on the same
random micro-batch in this process, as `nanoseek train` does:
    plain     train.step.accumulate_gradients + optimizer_step
    parallel  nanoseek.parallel.runtime.Parallel at world size 1 (a 1-process NCCL/gloo group, the
              mesh, par.wrap, the split batch, gradient sync, global-norm clip, load all-reduce hook)
They alternate plain, parallel, plain, parallel (each with its own model built from the same seed),
so that clock drift hits both; per-step times are CUDA-event timed and the medians compared. The
result JSON lands in bench/results/parallel_overhead-<date>.json.

    torchrun --nproc_per_node 4 bench/parallel_overhead.py --overlap-ab --pp 2 --ep 2 --batch 16 --microbatches 8

--overlap-ab (under torchrun, pp >= 2, ep >= 2): DualPipeV with its OVERLAP_F_B actions run one after
the other ("sequential") against the overlapped function ("overlapped", nanoseek/parallel/overlap.py),
alternating, same timing; rank 0 reports and writes bench/results/parallel_overlap-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timing import source_revision  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from nanoseek.train.step import accumulate_gradients, optimizer_step, pretraining_loss  # noqa: E402


def timed(step_fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step_fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step_fn()
            times.append(time.perf_counter() - t0)
    return times


def run(variant: str, cfg, batch, device, args, par) -> list[float]:
    model = Transformer.from_config(cfg, device=device, seed=0).train()
    if variant in ("sequential", "overlapped"):
        par.overlap = variant == "overlapped"
    if variant != "plain":
        model = par.wrap(model)
    optimizer = build_optimizer(model, 3e-4, (0.9, 0.95), 1e-8, 0.1, False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    loss_fn = pretraining_loss(0.3, 1e-4)
    batches = [batch] * args.accum

    def step():
        if variant != "plain":
            par.accumulate_gradients(model, batches, loss_fn, autocast, mtp_lambda=0.3, seq_aux_alpha=1e-4)
            par.optimizer_step(model, optimizer, lr=3e-4, grad_clip=1.0, bias_gamma=1e-3)
        else:
            accumulate_gradients(model, batches, loss_fn, autocast)
            optimizer_step(model, optimizer, lr=3e-4, grad_clip=1.0, bias_gamma=1e-3)

    return timed(step, args.steps, args.warmup, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="plain/parallel alternations")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    ap.add_argument("--overlap-ab", action="store_true", help="DualPipeV sequential vs overlapped (torchrun)")
    ap.add_argument("--pp", type=int, default=0)
    ap.add_argument("--ep", type=int, default=0)
    ap.add_argument("--microbatches", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep)")
    args = ap.parse_args()
    device = torch.device(args.device)

    from nanoseek.parallel.runtime import Parallel

    par = Parallel.setup(device, bf16=device.type == "cuda", pp=args.pp, ep=args.ep, microbatches=args.microbatches)
    if args.overlap_ab and (par.layout.pp < 2 or par.layout.ep < 2):
        raise SystemExit(f"--overlap-ab needs pp >= 2 and ep >= 2 (got {par.layout}); run it under torchrun with "
                         "--pp and --ep")
    device = par.mesh.device
    variants = ("sequential", "overlapped") if args.overlap_ab else ("plain", "parallel")
    name = "parallel_overlap" if args.overlap_ab else "parallel_overhead"
    quiet = not par.is_logger
    cfg = preset(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {}))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = (tokens[:, :-1].to(device), tokens[:, 1:].to(device))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants:
            t = run(variant, cfg, batch, device, args, par)
            gc.collect()  # the variant's model and optimizer go before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            times[variant] += t
            if not quiet:
                print(f"round {r} {variant:>8}: median {statistics.median(t) * 1e3:.1f} ms/step")
    tokens_per_step = args.batch * args.seq * args.accum
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b = variants
    overhead = med[b] / med[a] - 1
    if quiet:
        par.close()
        return
    print(f"{a} {tokens_per_step / med[a]:,.0f} tok/s, {b} {tokens_per_step / med[b]:,.0f} "
          f"tok/s: {b} vs {a} {100 * overhead:+.2f}%" + ("" if args.overlap_ab else " (target < 3%)"))
    result = {
        "name": name, "layout": str(par.layout), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": source_revision(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "config": vars(args),
        "median_step_s": med, "tok_s": {k: tokens_per_step / v for k, v in med.items()},
        "overhead": overhead, "step_times_s": times,
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / \
        f"{name}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    par.close()


if __name__ == "__main__":
    main()
