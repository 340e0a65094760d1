"""Skinny projections (decode steps): nanoseek's Triton kernels against cuBLAS (`F.linear`).

    python bench/skinny_linear.py                 # bench-1b's projection shapes, 1 and 32 rows
    python bench/skinny_linear.py --sweep         # also time every tile config in CONFIGS
    python bench/skinny_linear.py --rows 1 --sweep-gemv   # the mat-vec kernel's configs (GEMV_CONFIGS)

Each call is timed inside a CUDA graph of many calls (as a decode step replays them), cycling
through enough copies of the weight to exceed the L2 cache, so every call streams its weight
from HBM as in a real step. The peer for `pair` is two F.linear calls and for `swiglu` two
F.linear calls plus the fused activation. Writes bench/results/skinny_linear-DATE.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import kernel_timing  # noqa: E402
from nanoseek.kernels import skinny  # noqa: E402

# (name, form, N (NA, NB), K) for bench-1b (hidden 1024, q rank 512, kv rank 512 + rope 64, 8 heads)
SHAPES = [
    ("q_a", "linear", (512,), 1024),
    ("kv_a", "linear", (576,), 1024),
    ("q_a+kv_a", "pair", (512, 576), 1024),
    ("q_b", "linear", (1536,), 512),
    ("o_proj", "linear", (1024,), 1024),
    ("shared gate+up", "swiglu", (512, 512), 1024),
    ("shared down", "linear", (1024,), 512),
    ("dense gate+up", "swiglu", (4096, 4096), 1024),
    ("dense down", "linear", (1024,), 4096),
    ("lm_head", "linear", (32000,), 1024),
]
FORMS = {"linear": skinny.LINEAR, "pair": skinny.PAIR, "swiglu": skinny.SWIGLU}
GEMV_CONFIGS = [(bn, bk, w, 3) for bn in (2, 4, 8, 16) for bk in (256, 512) for w in (2, 4, 8)]
CONFIGS = [(bn, bk, w, s) for bn in (16, 32, 64) for bk in (128, 256) for w, s in ((4, 3), (4, 4), (2, 3), (8, 3))]


def bench_shape(name: str, form: str, ns: tuple[int, ...], k: int, rows: int, sweep: bool,
                sweep_gemv: bool = False) -> dict:
    dev, dtype = "cuda", torch.bfloat16
    bytes_per_copy = sum(ns) * k * 2
    copies = max(1, min(64, -(-200 * 2**20 // bytes_per_copy)))  # >= 200 MiB of weights: past the L2
    weights = [[torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for n in ns] for _ in range(copies)]
    x = torch.randn(rows, k, device=dev, dtype=dtype)
    calls = max(copies, 16)

    def peer(i):
        ws = weights[i % copies]
        if form == "swiglu":
            return F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1])
        return [F.linear(x, w) for w in ws]

    def ours(i, config=None, gemv=None):
        ws = weights[i % copies]
        return skinny._launch(FORMS[form], x, ws[0], ws[1] if len(ws) > 1 else None, config, gemv)

    ref = peer(0)
    got = ours(0)
    ref = ref if isinstance(ref, list) else [ref]
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
    peer_us = kernel_timing.graph_time_us(peer, calls)
    ours_us = kernel_timing.graph_time_us(ours, calls)
    hbm_us = bytes_per_copy / 4.3e6  # at the measured ~4.3 TB/s
    result = dict(name=name, form=form, n=list(ns), k=k, rows=rows, cublas_us=round(peer_us, 2),
                  nanoseek_us=round(ours_us, 2), speedup=round(peer_us / ours_us, 2),
                  bandwidth_bound_us=round(hbm_us, 2),
                  tiles=list(skinny.tiles(FORMS[form], rows, max(ns), k)), max_abs_err=err,
                  gemv=skinny.gemv_ok(x, ns))
    if rows <= skinny.GEMV_MAX_BATCH:  # both kernels, whichever `gemv_ok` picks
        result["dot_us"] = round(kernel_timing.graph_time_us(lambda i: ours(i, gemv=False), calls), 2)
        result["gemv_us"] = round(kernel_timing.graph_time_us(lambda i: ours(i, gemv=True), calls), 2)
        result["gemv_tiles"] = list(skinny.GEMV_TILES)
    if sweep_gemv and rows <= skinny.GEMV_MAX_BATCH:
        result["best_gemv_configs"] = kernel_timing.sweep(lambda i, c: ours(i, c, gemv=True), GEMV_CONFIGS, calls)[:5]
    if sweep:
        bm = max(16, 1 << (rows - 1).bit_length())
        configs = [(bm, *config) for config in CONFIGS]
        result["best_configs"] = kernel_timing.sweep(lambda i, c: ours(i, c, gemv=False), configs, calls)[:5]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,32", help="comma-separated rows of x (tokens per step)")
    ap.add_argument("--sweep", action="store_true", help="time every tile config too")
    ap.add_argument("--sweep-gemv", action="store_true", help="time every mat-vec config (1-2 rows)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/skinny_linear.py needs a CUDA GPU")
    results = [bench_shape(*shape, rows=int(r), sweep=args.sweep, sweep_gemv=args.sweep_gemv)
               for r in args.rows.split(",") for shape in SHAPES]
    kernel_timing.write_record("skinny_linear", vars(args), args.out, results=results)

if __name__ == "__main__":
    main()
