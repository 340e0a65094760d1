"""Decode-step MoE kernels: nanoseek's expert and routing kernels against PyTorch.

    python bench/moe_decode_kernels.py            # bench-1b's expert shapes, 1 and 2 tokens; 32 expert-major
    python bench/moe_decode_kernels.py --sweep    # also time every tile config in CONFIGS
    python bench/moe_decode_kernels.py --expert-major-sweep   # the one-launch layer's tiles at 32 tokens

Times one MoE layer's experts (K routed + the shared one) inside a CUDA graph of many layers, each
with its own weights (more than the L2 cache holds), as a decode step replays them. The pair-major
mat-vecs (`nanoseek.kernels.moe_experts`) at 1-2 tokens:
- `fused`: `moe_experts.experts` with the shared expert riding along (two kernels), summed over
  the slots by PyTorch (a third launch);
- `summed`: `moe_experts.experts_sum`, the same with the slots and a residual added in the down
  kernel (two launches, the output in x's dtype);
- `split`: routed experts by `moe_experts.experts`, the shared expert by the skinny SwiGLU and
  linear kernels (four kernels; the layout before the shared expert was folded in);
- `peer`: PyTorch on the same layer, gathered expert weights and batched mat-vecs
  (`RoutedExperts.forward_gathered`) plus the shared `MLP` on cuBLAS.
The expert-major layer of a larger step (`--batched-tokens`, default 32) in one launch
(`moe_experts.experts_layer`): `routed` (routed experts alone) against the same gathered PyTorch
peer (`peer`), and `one_launch` (the model's path: the shared expert and a residual too) against
`layer_peer` (the gathered peer, the shared `MLP` on cuBLAS, the residual); `--expert-major-sweep`
times the layer's up tile configs (EXPERT_CONFIGS, down at its default), then its down ones.
And the router (fp32 64 x 1024 matmul, sigmoid, 8 groups keep 4, top-6) at 1 and 32 tokens:
- `fused`: `moe_routing.router`, matmul and selection in one kernel;
- `split`: cuBLAS's fp32 matmul, then the selection kernel `moe_routing.route` (the prefill path);
- `peer`: `Router.forward` in PyTorch.
Writes bench/results/moe_decode_kernels-DATE.json.
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
from nanoseek import preset  # noqa: E402
from nanoseek.kernels import moe_experts, moe_routing, skinny  # noqa: E402
from nanoseek.model.moe import Router  # noqa: E402

# bench-1b: hidden 1024, 64 routed experts of width 512, 6 per token, one shared expert
D, I, E, K = 1024, 512, 64, 6
CONFIGS = [(bn, bk, w, s) for bn in (2, 4, 8) for bk in (128, 256, 512)
           for w, s in ((1, 3), (2, 3), (4, 3), (4, 4), (8, 3))]
EXPERT_CONFIGS = [(16, bn, bk, w, s) for bn in (32, 64, 128) for bk in (64, 128, 256)
                  for w, s in ((4, 3), (4, 4), (8, 3), (2, 3))]
ROUTER_CONFIGS = [(be, bd, w) for be in (1, 2, 4, 8) for bd in (128, 256, 512) for w in (1, 2, 4)]


def routed_step(tokens: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's inputs: x (tokens, D) of like's dtype, K distinct random experts per token, gates."""
    x = torch.randn(tokens, D, device=like.device, dtype=like.dtype)
    ids = torch.stack([torch.randperm(E, device=like.device)[:K] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, K, device=like.device)


def layer_flags(layers: int) -> list[torch.Tensor]:
    """Each layer's zeroed counters for `moe_experts.experts_layer` (bench-1b: one shared expert)."""
    return [torch.zeros(moe_experts.moe_layer_flags_size(E, 1, D), dtype=torch.int32, device="cuda")
            for _ in range(layers)]


def gathered_experts(x, ids, gates, w13, w2) -> torch.Tensor:
    """The PyTorch peer for the routed experts: gathered expert weights, batched mat-vecs -> (T, D) fp32."""
    flat = ids.flatten()
    xs = x.repeat_interleave(K, dim=0)[:, :, None]
    gate, up = torch.bmm(w13[flat], xs)[..., 0].split(I, dim=-1)
    y = torch.bmm(w2[flat], (F.silu(gate) * up)[:, :, None])[..., 0].view(x.shape[0], K, D)
    return (y.float() * gates[..., None]).sum(1)


def bench_experts(tokens: int, weights: tuple[list[torch.Tensor], ...], sweep: bool) -> dict:
    w13, w2, sg, su, sd = weights
    layers = len(w13)
    x, ids, gates = routed_step(tokens, w13[0])

    def fused(i, tiles=None):
        return moe_experts._experts(x, ids, gates, w13[i], w2[i], sg[i], su[i], sd[i], tiles=tiles).sum(1)

    def summed(i):  # `experts_sum`: the down kernel adds the slots and a residual (x here)
        return moe_experts._experts(x, ids, gates, w13[i], w2[i], sg[i], su[i], sd[i], summed=True, residual=x)

    def split(i):
        routed = moe_experts._experts(x, ids, gates, w13[i], w2[i]).sum(1)
        return routed + skinny.linear(skinny.swiglu(x, sg[i], su[i]), sd[i]).float()

    def peer(i):
        shared = F.linear(F.silu(F.linear(x, sg[i])) * F.linear(x, su[i]), sd[i])
        return gathered_experts(x, ids, gates, w13[i], w2[i]) + shared.float()

    err = max((fused(0) - peer(0)).abs().max().item(), (split(0) - peer(0)).abs().max().item(),
              (summed(0).float() - x.float() - peer(0)).abs().max().item())
    expert_bytes = (K + 1) * 3 * I * D * 2
    time_us = {name: round(kernel_timing.graph_time_us(fn, layers), 2)
               for name, fn in (("peer_us", peer), ("split_us", split), ("fused_us", fused), ("summed_us", summed))}
    result = dict(tokens=tokens, **time_us, tiles=list(moe_experts.PAIR_TILES),
                  bandwidth_bound_us=round(expert_bytes / 4.3e6, 2), max_abs_err=err)
    if sweep:
        timings = kernel_timing.sweep(fused, CONFIGS, layers)
        result["best_configs"] = timings[:8]
        result["worst_configs"] = timings[-3:]
    print(json.dumps(result), flush=True)
    return result


def bench_expert_major(tokens: int, weights: tuple[list[torch.Tensor], ...], sweep: bool) -> dict:
    """The expert-major layer of `tokens` tokens in one launch, routed experts alone and the model's
    path (the shared expert and a residual too), each against PyTorch."""
    w13, w2, sg, su, sd = weights
    layers = len(w13)
    x, ids, gates = routed_step(tokens, w13[0])
    flags = layer_flags(layers)

    def routed(i, up=None, down=None):
        return moe_experts._experts_layer(x, ids, gates, w13[i], w2[i], flags[i], up_tiles=up, down_tiles=down)

    def peer(i):
        return gathered_experts(x, ids, gates, w13[i], w2[i])

    def one_launch(i, up=None, down=None):
        return moe_experts._experts_layer(x, ids, gates, w13[i], w2[i], flags[i], sg[i], su[i], sd[i], x,
                                          up_tiles=up, down_tiles=down)

    def layer_peer(i):
        shared = F.linear(F.silu(F.linear(x, sg[i])) * F.linear(x, su[i]), sd[i])
        return x + (peer(i) + shared.float()).to(x.dtype)

    used = ids.unique().numel()
    time_us = {name: round(kernel_timing.graph_time_us(fn, layers), 2)
               for name, fn in (("peer_us", peer), ("routed_us", routed), ("layer_peer_us", layer_peer),
                                ("one_launch_us", one_launch))}
    result = dict(tokens=tokens, experts_used=used, **time_us, up_tiles=list(moe_experts.EXPERT_UP_TILES),
                  down_tiles=list(moe_experts.EXPERT_DOWN_TILES), sum_strips=moe_experts.SUM_STRIPS,
                  bandwidth_bound_us=round(used * 3 * I * D * 2 / 4.3e6, 2),  # the routed experts used, 4.3 TB/s
                  max_abs_err=(routed(0).float() - peer(0)).abs().max().item(),
                  one_launch_max_abs_err=(one_launch(0).float() - layer_peer(0).float()).abs().max().item())
    if sweep:
        result["best_one_launch_up_configs"] = kernel_timing.sweep(lambda i, c: one_launch(i, up=c), EXPERT_CONFIGS,
                                                                   layers)[:6]
        result["best_one_launch_down_configs"] = kernel_timing.sweep(lambda i, c: one_launch(i, down=c),
                                                                     EXPERT_CONFIGS, layers)[:6]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,2")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--batched-tokens", type=int, default=32)
    ap.add_argument("--expert-major-sweep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe_decode_kernels.py needs a CUDA GPU")
    dev, dt = "cuda", torch.bfloat16
    layers = 12  # 12 x (64 experts x 3 MiB + shared) = 2.3 GiB of weights, far past the 50 MiB L2
    torch.manual_seed(0)

    def stack(*shape):
        return [torch.randn(*shape, device=dev, dtype=dt) * 0.02 for _ in range(layers)]

    weights = (stack(E, 2 * I, D), stack(E, D, I), stack(I, D), stack(I, D), stack(D, I))
    results = [bench_experts(int(t), weights, args.sweep) for t in args.tokens.split(",")]
    expert_major = bench_expert_major(args.batched_tokens, weights, args.expert_major_sweep)
    router_results = [bench_router(t, args.sweep) for t in (1, 32)]
    kernel_timing.write_record("moe_decode_kernels", dict(vars(args), D=D, I=I, E=E, K=K, shared=1), args.out,
                               results=results, expert_major=expert_major,
                               router=router_results)

def bench_router(tokens: int, sweep: bool) -> dict:
    cfg = preset("bench-1b")
    layers = 64  # 64 routers of 256 KiB: 16 MiB, mostly L2-resident (a real step's other weights evict them)
    routers = [Router(cfg).cuda() for _ in range(layers)]
    for r in routers:
        r.weight.data.normal_(0, 0.02)
        r.e_score_correction_bias.normal_(0, 0.01)
    arrivals = torch.zeros(64, dtype=torch.int32, device="cuda")
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)

    def args(i):
        r = routers[i]
        return (r.e_score_correction_bias, cfg.num_experts_per_tok, r.groups, cfg.topk_group, True, True,
                cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def fused(i, tiles=None):
        return moe_routing._router(x, routers[i].weight, arrivals, *args(i), tiles=tiles)

    def split(i):
        return moe_routing.route(F.linear(x.float(), routers[i].weight), *args(i))

    def peer(i):
        return routers[i](x)[:2]

    with torch.no_grad():
        same = all(torch.equal(fused(i)[1].sort(-1).values, peer(i)[1].sort(-1).values) for i in range(layers))
        result = dict(tokens=tokens, peer_us=round(kernel_timing.graph_time_us(peer, layers), 2),
                      split_us=round(kernel_timing.graph_time_us(split, layers), 2),
                      fused_us=round(kernel_timing.graph_time_us(fused, layers), 2),
                      tiles=list(moe_routing.ROUTER_TILES if tokens <= 2 else moe_routing.ROUTER_TILES_BATCHED),
                      route_warps=moe_routing.ROUTE_WARPS, same_experts_as_peer=same)
        if sweep:
            timings = kernel_timing.sweep(fused, ROUTER_CONFIGS, layers)
            result["best_configs"] = timings[:6]
            result["worst_configs"] = timings[-2:]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
