"""Shared by the kernel benchmarks (`skinny_linear`, `moe_decode_kernels`, `mla_decode_kernels`):
time calls inside a CUDA graph, sweep tile configs, write the result record (and, for every
benchmark, the source revision it measured)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def graph_time_us(fn: Callable[[int], object], calls: int, replays: int = 20) -> float:
    """Mean time per call of fn(i) for i in range(calls), captured in one CUDA graph (as a decode step
    replays its kernels: launch gaps included, no host work)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def sweep(fn: Callable[[int, tuple], object], configs: list[tuple], calls: int) -> list[tuple[float, list]]:
    """[(us per call, config)] of fn(i, config) for every config that compiles, fastest first."""
    timings = []
    for config in configs:
        try:
            us = graph_time_us(lambda i, c=config: fn(i, c), calls, replays=10)
        except Exception as e:  # a config that does not compile (e.g. out of shared memory)
            print(f"  config {config} failed: {type(e).__name__}", flush=True)
            continue
        timings.append((round(us, 2), list(config)))
    return sorted(timings)


def source_revision() -> str | None:
    """The git commit of this checkout ("+changes" when the tree differs from it), None without git.
    NANOSEEK_REVISION overrides it, for a copied tree whose .git is not the source's."""
    if os.environ.get("NANOSEEK_REVISION"):
        return os.environ["NANOSEEK_REVISION"]
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")


def write_record(name: str, config: dict, out: str | None, **results) -> Path:
    """Write {benchmark, date, device, versions, config, **results} to out (default
    bench/results/NAME-DATE.json) and return the path."""
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "python": platform.python_version(),
                           "triton": __import__("triton").__version__},
              "revision": source_revision(), "config": config, **results}
    path = Path(out or Path(__file__).parent / "results" / f"{name}-{record['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return path


def profile(step, rows: int = 25) -> list[dict]:
    """CUDA time per kernel over two steps (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) or 1
    table = [{"kernel": e.key[:120], "ms_per_step": e.device_time_total / 2e3, "share": e.device_time_total / total,
              "calls_per_step": e.count / 2} for e in events[:rows]]
    for r in table:
        print(f"  {100 * r['share']:5.1f}%  {r['ms_per_step']:7.2f} ms  x{r['calls_per_step']:<5g} {r['kernel']}")
    return table


def profile_ops(step, rows: int = 25) -> list[dict]:
    """GPU time per aten op and input shapes over two steps (self device time: the kernels an op launched
    itself), largest first: which op, on which tensors, launches the kernels `profile` lists."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    table = [{"op": e.key[:80], "shapes": str(e.input_shapes)[:160], "ms_per_step": e.self_device_time_total / 2e3,
              "calls_per_step": e.count / 2} for e in events[:rows]]
    for r in table:
        print(f"  {r['ms_per_step']:7.2f} ms  x{r['calls_per_step']:<5g} {r['op']}  {r['shapes']}")
    return table

