"""Absorbed MLA attention for decode batches: nanoseek's three Triton kernels against the matmul path.

    python bench/mla_decode_kernels.py            # bench-1b's attention shapes, batches 1, 4 and 32
    python bench/mla_decode_kernels.py --sweep    # also time the tile configs in CONFIGS and BATCH_CONFIGS
    python bench/mla_decode_kernels.py --sweep-batch   # only batch 32, with BATCH_CONFIGS

One layer's attention from q (nope and rope parts) to the per-head values (before o_proj), over a
latent cache bucket of 1,024 positions with rows at position 600 (a 512-token prompt, some tokens
in), timed inside a CUDA graph of many layers with their own weights and caches (past the L2):
- `kernels`: `nanoseek.kernels.mla_decode.attention` (W_uk product, split-key partials, merge with W_uv);
- `peer`: the matmul path of `MLA.absorbed` (two einsums with W, scores, softmax, values).
Writes bench/results/mla_decode_kernels-DATE.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import kernel_timing  # noqa: E402
from nanoseek.kernels import mla_decode  # noqa: E402
from nanoseek.model.mla import latent_attention  # noqa: E402

H, N, P, V, R = 8, 128, 64, 128, 512  # bench-1b
BUCKET, POSITION = 1024, 600
# mla_decode.Tiles: (keys per step, partials' warps, V block, merge's warps, partials programs aimed at,
# balanced chunks, partials' pipeline stages); batch 1 and 2 (mla_decode.TILES)
CONFIGS = ([(bt, w, 32, 8, 512, False) for bt in (16, 32, 64) for w in (2, 4, 8)]
           + [(32, 4, bv, w, 512, False) for bv in (16, 64) for w in (4, 8)] + [(32, 4, 32, 4, 512, False)])
# batch 32 (mla_decode.BATCH_TILES): around the pipelined partials (32-key steps, 3-4 stages) and the
# 8-warp merge that led a first sweep (mla_decode_kernels-2026-12-01-pipelined-sweep1.json, which also
# tried a pipelined merge, slower everywhere), the chunk
# length (programs aimed at), and the unpipelined tiles before them for reference
BATCH_CONFIGS = ([(32, 4, 32, mw, n, True, st) for n in (64, 96, 128, 192) for mw in (4, 8) for st in (3, 4)]
                 + [(16, 4, 32, 8, 128, True, 4), (32, 2, 32, 8, 128, True, 3), (64, 4, 32, 8, 128, True, 3)]
                 + [(32, 4, bv, 8, 128, True, 3) for bv in (16, 64)] + [(64, 8, 32, 4, 128, True, 0)])

def bench(batch: int, queries: int, configs: list[tuple] | None) -> dict:
    dev, dt = "cuda", torch.bfloat16
    layers = 48  # 48 x (2 MiB of kv_b weight + 1.2 MiB of cache per row): past the 50 MiB L2
    torch.manual_seed(0)
    w = [torch.randn(H * (N + V), R, device=dev, dtype=dt) * 0.05 for _ in range(layers)]
    cache = [torch.randn(batch, BUCKET, R + P, device=dev, dtype=dt) for _ in range(layers)]
    q_nope = torch.randn(batch, queries, H, N, device=dev, dtype=dt)
    q_pe = torch.randn(batch, queries, H, P, device=dev, dtype=dt)
    positions = POSITION + torch.arange(queries, device=dev).expand(batch, queries).contiguous()
    scale = (N + P) ** -0.5

    def ours(i, tiles=None):
        return mla_decode._attention(q_nope, q_pe, cache[i], positions, w[i], scale, V, tiles=tiles)

    def peer(i):
        wv = w[i].view(H, N + V, R)
        q_lat = torch.einsum("bshn,hnr->bshr", q_nope, wv[:, :N])
        o_lat = latent_attention(torch.cat((q_lat, q_pe), dim=-1), cache[i], positions, scale, R)
        return torch.einsum("bshr,hvr->bshv", o_lat, wv[:, N:]).reshape(batch, queries, H * V)

    tiles = mla_decode.BATCH_TILES if batch * queries >= mla_decode.BATCH_ROWS else mla_decode.TILES
    err = (ours(0).float() - peer(0).float()).abs().max().item()
    peer_us, ours_us = kernel_timing.graph_time_us(peer, layers), kernel_timing.graph_time_us(ours, layers)
    result = dict(batch=batch, queries=queries, kv_bucket=BUCKET, position=POSITION, peer_us=round(peer_us, 2),
                  kernels_us=round(ours_us, 2), speedup=round(peer_us / ours_us, 2), tiles=list(tiles),
                  max_abs_err=err)
    if configs:
        result["configs"] = kernel_timing.sweep(ours, configs, layers)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-batch", action="store_true", help="time batch 32 alone, sweeping BATCH_CONFIGS")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/mla_decode_kernels.py needs a CUDA GPU")
    sweep = CONFIGS if args.sweep else None
    batch_sweep = BATCH_CONFIGS if args.sweep or args.sweep_batch else None
    results = [] if args.sweep_batch else [bench(1, 1, sweep), bench(1, 2, sweep), bench(4, 1, None)]
    results.append(bench(32, 1, batch_sweep))
    kernel_timing.write_record("mla_decode_kernels", dict(vars(args), H=H, N=N, P=P, V=V, R=R), args.out,
                               results=results)

if __name__ == "__main__":
    main()
