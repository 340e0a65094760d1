"""Expert parallelism and DualPipeV on several GPUs against one (issue 22): tokens/s, scaling, all-to-all
time and the share of it hidden under compute, the pipeline bubble against `nanoseek plan`, peak memory.

    python bench/parallel_scaling.py --gpus 2                 # one host with 2 GPUs: bench-1b, 8 x 2048
    python bench/parallel_scaling.py --gpus 4 --preset bench-2048 --batch 16
    python bench/parallel_scaling.py --gpus 2 --device cpu --preset debug --layers 4 --batch 8 --seq 64 --steps 2
                                                              # gloo smoke run of the whole driver

The driver runs every layout as its own `torchrun` job (a fresh process group each), all with the same
global batch (--batch rows of --seq tokens x --accum micro-batches per optimizer step, split over the
data-parallel ranks as `nanoseek train` splits it):

    1 GPU       the plain single-device step (train.step), the reference of the scaling figures
    ep=N        expert parallel only (dp = ep = N: FSDP2 on the dense part, experts partitioned)
    pp=N        DualPipeV only
    pp x ep     pp = 2, ep = N/2 (N >= 4)

Pipeline layouts run twice: with the overlapped OVERLAP_F_B function (one micro-batch's all-to-all under
the other's compute, nanoseek/parallel/overlap.py) and with the same actions run one after the other.
Each worker times --steps optimizer steps after --warmup (CUDA events, median), then profiles two steps
with torch.profiler on every rank and reads its kernels back:

    a2a_ms      NCCL kernel time per step (all collectives of the step: the all-to-alls dominate in ep
                layouts; FSDP's all-gathers and reduce-scatters are in it too, and named apart)
    hidden      the share of that time during which a compute kernel ran on another stream
    busy        the share of the step during which any kernel ran; 1 - busy is the measured idle time,
                the bubble of pipeline layouts (plus host gaps), compared with the planner's bubble
    peak_gb     torch.cuda.max_memory_allocated, per rank

`nanoseek plan`'s model of the same layout (this host as one node, the measured 1-GPU TFLOP/s as its
compute rate, --a2a-gbs as the all-to-all bandwidth) gives the predicted step time and bubble.
Targets (issue 22): 2 GPUs >= 1.85x one GPU for the best layout; >= 80% of the all-to-all hidden with
overlap; the planner's step time within 15% of the measured one. Every process keeps NVLink multicast
off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1). Result: bench/results/parallel_scaling-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)


# ----------------------------------------------------------------------------------------------- profile maths
def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by a set of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def overlap_length(xs: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of the parts of the intervals `xs` that lie under the union of `cover`."""
    merged: list[list[float]] = []
    for a, b in sorted(cover):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    total = 0.0
    for a, b in xs:
        for c, d in merged:
            if c >= b:
                break
            total += max(0.0, min(b, d) - max(a, c))
    return total


def kernel_stats(trace_file: str, steps: int, step_s: float) -> dict:
    """Comm/compute figures per step from a chrome trace of `steps` steps (kernel events only)."""
    events = json.loads(Path(trace_file).read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {}
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()]
    by_kind: dict[str, float] = {}
    for e in kernels:
        name = e["name"].lower()
        if "nccl" in name:
            kind = next((k for k in ("alltoall", "sendrecv", "allgather", "reducescatter", "allreduce", "broadcast")
                         if k in name.replace("_", "")), "other")
            by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"] / 1e3 / steps
    comm_us = sum(b - a for a, b in comm)
    return {"comm_ms": comm_us / 1e3 / steps, "comm_ms_by_kind": by_kind,
            "hidden": overlap_length(comm, compute) / comm_us if comm_us else None,
            "busy": union_length([(a, b) for a, b in comm + compute]) / 1e6 / steps / step_s}


# ------------------------------------------------------------------------------------------------------ worker
def timed(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
    return out


def worker(args: argparse.Namespace) -> None:
    """One layout, in one torchrun job (or one plain process for the 1-GPU reference)."""
    import torch.distributed as dist

    from nanoseek import Transformer, preset
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.step import accumulate_gradients, optimizer_step, pretraining_loss

    device = torch.device(args.device)
    par = None
    if not args.plain:
        from nanoseek.parallel.runtime import Parallel

        par = Parallel.setup(device, bf16=device.type == "cuda", pp=args.pp, ep=args.ep,
                             microbatches=args.microbatches, overlap=bool(args.overlap))
        device = par.mesh.device
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = preset(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {}))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    batches = [(tokens[:, :-1].to(device), tokens[:, 1:].to(device))] * args.accum
    model = Transformer.from_config(cfg, device=device, seed=0).train()
    if par is not None:
        model = par.wrap(model)
    optimizer = build_optimizer(model, 3e-4, (0.9, 0.95), 1e-8, 0.1, False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    loss_fn = pretraining_loss(0.3, 1e-4)

    def step():
        if par is not None:
            par.accumulate_gradients(model, batches, loss_fn, autocast, mtp_lambda=0.3, seq_aux_alpha=1e-4)
            par.optimizer_step(model, optimizer, lr=3e-4, grad_clip=1.0, bias_gamma=1e-3)
        else:
            accumulate_gradients(model, batches, loss_fn, autocast)
            optimizer_step(model, optimizer, lr=3e-4, grad_clip=1.0, bias_gamma=1e-3)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(step, args.steps, args.warmup, device)
    step_s = statistics.median(times)
    stats: dict = {}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize(device)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            trace = f.name
        prof.export_chrome_trace(trace)
        stats = kernel_stats(trace, 2, step_s)
        os.unlink(trace)
    mine = {"step_s": step_s, "step_s_all": times, "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda" else None, **stats}
    ranks = [mine]
    if par is not None and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if par is None or par.is_logger:
        from nanoseek.train.metrics import flops_per_token

        tokens_step = args.batch * args.seq * args.accum
        world = 1 if par is None else dist.get_world_size()
        slowest = max(r["step_s"] for r in ranks)  # every rank ends the step together; the slowest is the step
        record = {"layout": "1 GPU (plain step)" if par is None else str(par.layout), "world": world,
                  "pp": 1 if par is None else par.layout.pp, "ep": 1 if par is None else par.layout.ep,
                  "overlap": None if par is None or par.layout.pp == 1 else bool(args.overlap),
                  "step_s": slowest, "tokens_per_s": tokens_step / slowest,
                  "tokens_per_s_per_gpu": tokens_step / slowest / world,
                  "flops_per_token": flops_per_token(cfg, args.seq, cfg.num_nextn_predict_layers > 0),
                  "ranks": ranks}
        Path(args.result).write_text(json.dumps(record, indent=2) + "\n")
    if par is not None:
        par.close()


# ------------------------------------------------------------------------------------------------------ driver
def layouts(n: int) -> list[tuple[str, dict]]:
    out = [("1gpu", {"plain": True})]
    if n >= 2:
        out.append((f"ep{n}", {"ep": n}))
        out += [(f"pp{n}-overlap{o}", {"pp": n, "overlap": o}) for o in (1, 0)]
    if n >= 4 and n % 2 == 0:
        out += [(f"pp2xep{n // 2}-overlap{o}", {"pp": 2, "ep": n // 2, "overlap": o}) for o in (1, 0)]
    return out


def planned(args: argparse.Namespace, r: dict, tflops: float) -> dict:
    """`nanoseek plan`'s figures for the layout that ran (this host as one node)."""
    from nanoseek import preset
    from nanoseek.parallel.plan import Cluster, plan

    cfg = preset(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {}))
    dp = r["world"] // r["pp"]
    m = args.microbatches or max(1, args.accum * (2 * r["pp"] if r["pp"] > 1 else 1))
    c = Cluster(gpus=r["world"], gpus_per_node=max(r["world"], 1), pp=r["pp"], ep=r["ep"], seq=args.seq,
                global_batch=args.batch * args.accum, micro_batch=max(1, args.batch * args.accum // (dp * m)),
                microbatches=m, tflops=tflops, nvlink_gbs=args.a2a_gbs, fp8_dispatch=False)
    p = plan(cfg, c)
    return {"step_s": p["step_s"], "bubble_frac": p["bubble_frac"], "comm_ms": p["comm_ms"],
            "exposed_comm_ms": p["exposed_comm_ms"], "tflops_assumed": tflops}


def driver(args: argparse.Namespace) -> None:
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--accum",
              str(args.accum), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
              "--layers", str(args.layers), "--microbatches", str(args.microbatches)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in layouts(args.gpus):
            result = Path(tmp) / f"{name}.json"
            flags = [*common, "--worker", "--result", str(result)]
            if opts.get("plain"):
                cmd = [sys.executable, __file__, *flags, "--plain"]
            else:
                flags += ["--pp", str(opts.get("pp", 1)), "--ep", str(opts.get("ep", 1)),
                          "--overlap", str(opts.get("overlap", 1))]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={args.gpus}", __file__, *flags]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, timeout=args.timeout)
            if proc.returncode != 0 or not result.is_file():
                results[name] = {"error": f"exit code {proc.returncode}"}
                print(f"   {name} failed (exit code {proc.returncode})", flush=True)
                continue
            results[name] = json.loads(result.read_text()) | {"wall_s": time.time() - t0}
            r = results[name]
            print(f"   {r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_gpu']:,.0f} per GPU), "
                  f"step {r['step_s'] * 1e3:.1f} ms", flush=True)
    base = results.get("1gpu", {})
    tflops = base["tokens_per_s"] * base["flops_per_token"] / 1e12 if "tokens_per_s" in base else 0.0
    for name, r in results.items():
        if "tokens_per_s" not in r or name == "1gpu" or not base:
            continue
        r["speedup_vs_1gpu"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["scaling_efficiency"] = r["speedup_vs_1gpu"] / r["world"]
        comm = [x.get("comm_ms") for x in r["ranks"] if x.get("comm_ms") is not None]
        hidden = [x.get("hidden") for x in r["ranks"] if x.get("hidden") is not None]
        busy = [x.get("busy") for x in r["ranks"] if x.get("busy") is not None]
        r["comm_ms_mean"] = statistics.mean(comm) if comm else None
        r["hidden_mean"] = statistics.mean(hidden) if hidden else None
        r["idle_frac_mean"] = 1 - statistics.mean(busy) if busy else None
        if tflops:
            r["plan"] = planned(args, r, tflops)
            r["plan_step_error"] = r["plan"]["step_s"] / r["step_s"] - 1
    best = max((r.get("speedup_vs_1gpu", 0) for r in results.values()), default=0)
    record = {
        "benchmark": "parallel_scaling", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "gpus": args.gpus, "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                                        "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                                        if args.device == "cuda" else None, "python": platform.python_version()},
        "commit": os.environ.get("NANOSEEK_REVISION") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "result", "plain")},
        "results": results,
        "targets": {"best_speedup": best, "best_speedup_target": 1.85 if args.gpus == 2 else None,
                    "hidden_target": 0.8, "plan_error_target": 0.15},
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"parallel_scaling-{time.strftime('%Y-%m-%d')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'layout':<22} {'tok/s':>10} {'per GPU':>9} {'scaling':>8} {'a2a ms':>8} {'hidden':>7} "
          f"{'idle':>6} {'plan idle':>9} {'plan err':>8} {'peak GB':>8}")
    for name, r in results.items():
        if "tokens_per_s" not in r:
            print(f"{name:<22} {r.get('error')}")
            continue

        def f(v, fmt):  # a figure, or a dash where the layout has none (no CUDA profile, the reference)
            return format(v, fmt) if v is not None else "-".rjust(int("".join(c for c in fmt if c.isdigit())[:1]))

        peak = max((x["peak_gb"] for x in r["ranks"] if x.get("peak_gb") is not None), default=None)
        print(f"{name:<22} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_gpu']:>9,.0f} "
              f"{f(r.get('scaling_efficiency'), '8.2f')} {f(r.get('comm_ms_mean'), '8.1f')} "
              f"{f(r.get('hidden_mean'), '7.0%')} {f(r.get('idle_frac_mean'), '6.0%')} "
              f"{f(r.get('plan', {}).get('bubble_frac'), '9.0%')} {f(r.get('plan_step_error'), '+8.0%')} "
              f"{f(peak, '8.1f')}")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="processes per layout (GPUs of this host)")
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep)")
    p.add_argument("--batch", type=int, default=8, help="rows per micro-batch of the global batch")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accum", type=int, default=1, help="global micro-batches per optimizer step")
    p.add_argument("--microbatches", type=int, default=0, help="pipeline micro-batches (0: derived)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--a2a-gbs", type=float, default=290.0, help="all-to-all GB/s per rank for the planner "
                   "(measured between the lent H200s: about 290)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=900, help="seconds per layout before it is killed")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--overlap", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
