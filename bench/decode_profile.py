"""Where a decode step's time goes: kernels per step, GPU time per step, wall time per step.

    python bench/decode_profile.py                       # bench-1b, batch 1 and 32, compile+graph
    python bench/decode_profile.py --variant graph --batches 1

Prefills `--batches` random prompts of `--prompt-len` tokens, then times `--steps` decode steps
(`Batch.step`, host work included) and profiles the same number of steps with the CUDA
profiler (kernels inside CUDA graphs are recorded individually). The gap between wall time and
GPU time per step is host work the GPU waits for. Writes bench/results/decode_profile-DATE.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_timing import source_revision  # noqa: E402
from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.infer.engine import Engine, GenerationStats  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_prefill(engine, prompts, params, batch_size: int, args_host_profile: bool = False) -> dict:
    """Wall time of admitting (prefilling) the prompts into the engine's warmed-up batch (its prefill
    graphs, if any, already captured), and the prefill's top kernels."""
    from torch.profiler import ProfilerActivity, profile

    batch = engine._batch

    def admit(seqs=None) -> None:
        batch.admit(seqs or [engine.sequence(p, params) for p in prompts], GenerationStats())
        sync()

    def release() -> None:
        for r in range(batch.rows):
            batch.release(r)

    times = []
    for _ in range(3):
        release()
        seqs = [engine.sequence(p, params) for p in prompts]
        sync()
        t0 = time.perf_counter()
        admit(seqs)
        times.append((time.perf_counter() - t0) * 1e3)
    replay_ms = None
    prefills = [entry for key, entry in (batch.graphs.graphs if batch.graphs else {}).items() if key[0] == "prefill"]
    if prefills:  # the captured prefill alone
        graph = prefills[0][0]
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            graph.replay()
        sync()
        replay_ms = (time.perf_counter() - t0) / 3 * 1e3
    if args_host_profile:  # where the host's time goes in one prefill (cProfile, top functions)
        import cProfile
        import pstats

        release()
        prof = cProfile.Profile()
        prof.enable()
        admit()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    if not torch.cuda.is_available():
        return {"wall_ms": times}
    release()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        admit()
    rows = sorted(((e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[2])
    gpu_ms = sum(r[2] for r in rows) / 1e3
    print(f"batch {batch_size} prefill: wall {min(times):.2f} ms, graph replay alone {replay_ms or 0:.2f} ms, "
          f"GPU {gpu_ms:.2f} ms", flush=True)
    for k, c, t in rows[:8]:
        print(f"  {t:8.1f} us  {c:4d}x  {k[:110]}")
    return {"wall_ms": times, "graph_replay_ms": replay_ms, "gpu_ms": gpu_ms,
            "top": [{"kernel": k[:160], "calls": c, "us": t} for k, c, t in rows[:20]]}


def profile_batch(model, batch_size: int, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    variant, cuda = args.variant, torch.cuda.is_available()
    engine = Engine(
        model,
        None,
        max_batch_size=batch_size,
        max_len=args.prompt_len + 4 * args.steps + 8,
        cuda_graph="graph" in variant,
        compile="compile" in variant,
    )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, args.prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=4 * args.steps, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up: compiles, captures graphs
    seqs = [engine.sequence(p, params) for p in prompts]
    prefill = time_prefill(engine, prompts, params, batch_size, args.host_profile)
    batch = engine._batch  # the warmed-up batch: its graphs are captured
    for r in range(batch.rows):
        batch.release(r)
    stats = GenerationStats()
    batch.admit(seqs, stats)
    for _ in range(3):
        batch.step(stats)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch.step(stats)
    sync()
    wall_us = (time.perf_counter() - t0) / args.steps * 1e6
    with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            batch.step(stats)
        sync()
    rows = [
        (e.key, e.count / args.steps, (e.device_time_total if cuda else e.self_cpu_time_total) / args.steps)
        for e in prof.key_averages()
        if (e.device_time_total if cuda else e.self_cpu_time_total) > 0
    ]
    rows.sort(key=lambda r: -r[2])
    replay_us = None
    steps = {key: entry for key, entry in (batch.graphs.graphs if batch.graphs else {}).items()
             if key[0] in ("decode step", "speculative step")}
    if steps:  # the graph alone, back to back: no host work between
        graph = steps[max(steps, key=lambda key: key[1])][0]  # the longest kv bucket: the one in use
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            graph.replay()
        sync()
        replay_us = (time.perf_counter() - t0) / args.steps * 1e6
    gpu_us = sum(r[2] for r in rows)
    kernels = sum(r[1] for r in rows)
    print(
        f"batch {batch_size} {variant}: wall {wall_us:.0f} us/step, GPU {gpu_us:.0f} us/step, "
        f"{kernels:.0f} kernels/step, graph replay alone {replay_us or 0:.0f} us/step",
        flush=True,
    )
    for k, c, t in rows[:25]:
        print(f"  {t:8.1f} us  {c:6.1f}x  {k[:110]}")
    return {
        "prefill": prefill,
        "wall_us_per_step": wall_us,
        "graph_replay_us_per_step": replay_us,
        "gpu_us_per_step": gpu_us,
        "kernels_per_step": kernels,
        "top": [{"kernel": k[:160], "calls_per_step": c, "us_per_step": t} for k, c, t in rows[:40]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--variant", default="compile+graph", help="eager, graph or compile+graph")
    p.add_argument("--host-profile", action="store_true", help="print a cProfile of one prefill")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    model = Transformer.from_config(
        preset(args.preset), device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32, seed=0
    ).eval()
    record = {
        "benchmark": "decode_profile",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "revision": source_revision(),
        "config": vars(args),
        "results": {},
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_profile-{record['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for b in [int(x) for x in args.batches.split(",")]:
        try:
            record["results"][f"batch{b}"] = profile_batch(model, b, args)
        except Exception as e:  # keep the other batches' results; this one's error goes in the record
            traceback.print_exc()
            record["results"][f"batch{b}"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
            failed.append(b)
        tmp = out.with_suffix(".tmp")  # written after every batch, replaced atomically
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(out)
    print(f"wrote {out}")
    if failed:
        sys.exit(f"decode_profile: batch {', '.join(map(str, failed))} failed (see the traceback above)")


if __name__ == "__main__":
    main()
