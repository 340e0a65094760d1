"""FP8 blockwise training throughput per layer: forward + backward against BF16 in the same run.

    python bench/fp8_throughput.py                 # one H200: dense 1024->4096, 2048->5632, 7168->18432 and
                                                   # routed experts (64, top-6) at M = 16,384 tokens
    python bench/fp8_throughput.py --quick         # 4,096 tokens, fewer repeats (a smoke run, ~1 min)
    python bench/fp8_throughput.py --no-step       # per-layer figures only (no whole training steps)
    python bench/fp8_throughput.py --no-layers --step-models bench-2048   # one whole-step model only

Dense peers: BF16 F.linear with bf16 weights (the denominator), nanoseek FP8 (`nanoseek.fp8.gpu.fp8_linear`,
fp32 master weight quantized on every call, as in training) through `torch._scaled_mm` and through the
Triton blockwise GEMM (`nanoseek_fp8_triton`), and torchao's `Float8BlockwiseLinear` where
torchao imports (skipped with a note otherwise). Routed experts: nanoseek's `RoutedExperts` under bf16
autocast (sort + two `torch._grouped_mm` + SwiGLU) against `FP8RoutedExperts` (the same routing code, two
Triton grouped blockwise-FP8 GEMMs). FLOPs count the three GEMMs of each linear (6 M K N per linear).
Times are medians of CUDA-event timings after warm-up; memory is the peak allocated during one
forward + backward above what the inputs and weights hold, and what the forward leaves saved for
backward. Then whole training steps (8 x 2048 tokens) of `bench-1b` and `bench-2048` (DeepSeek-V2-Lite's layer
shapes, 6 layers + MTP, 3.7B parameters; cut to 3 layers on a GPU under 120 GiB), BF16 against FP8
(`install_fp8`; with `recompute_swiglu=True`; with `pad_partial_blocks=True`; with the routed experts left
in BF16, `parts=("attention", "mlp")`), tokens/s and peak memory. The record lands in
bench/results/fp8_throughput-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timing import profile  # noqa: E402

from nanoseek import preset  # noqa: E402
from nanoseek.fp8.install import FP8RoutedExperts, check_fp8_device  # noqa: E402
from nanoseek.model.moe import RoutedExperts  # noqa: E402
from nanoseek.model.swap import adopt  # noqa: E402

DENSE = [(1024, 4096), (2048, 5632), (7168, 18432)]  # (in, out)
EXPERTS = [(2048, 1408), (1024, 512)]  # (hidden, expert width)


def cuda_time(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def measure(make_step, flops: float, args) -> dict:
    """make_step() -> (forward, backward) closures; time forward + backward, then its memory (after the
    warm-up, so Triton's autotuning and the first call's gradient buffers are not counted)."""
    forward, backward = make_step()
    times = cuda_time(lambda: backward(forward()), args.steps, args.warmup)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    saved = torch.cuda.memory_allocated() - base  # output + what autograd keeps for backward
    backward(out)
    del out
    peak = torch.cuda.max_memory_allocated() - base
    s = statistics.median(times)
    return {"ms": 1e3 * s, "tflops": flops / s / 1e12, "fwd_saved_mb": saved / 2**20, "peak_extra_mb": peak / 2**20}


def dense_steps(M: int, K: int, N: int):
    """Closures for each dense variant: x (M, K) bf16 -> (M, N), backward with a fixed dy."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w32 = (torch.randn(N, K, device="cuda") * K ** -0.5).requires_grad_()
    w16 = w32.detach().to(torch.bfloat16).requires_grad_()

    def bf16():
        return (lambda: F.linear(x, w16)), (lambda y: y.backward(dy))

    def fp8(gemm: str):
        from nanoseek.fp8 import gpu

        def forward():
            gpu.DENSE_GEMM = gemm
            return gpu.fp8_linear(x, w32, torch.bfloat16)
        return forward, (lambda y: y.backward(dy))

    def torchao():
        try:
            from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear
        except ImportError:
            from torchao.prototype.blockwise_fp8_training import Float8BlockwiseLinear
        lin = Float8BlockwiseLinear(K, N, bias=False, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w16)
        return (lambda: lin(x)), (lambda y: y.backward(dy))

    return {"bf16": bf16, "nanoseek_fp8": lambda: fp8("scaled_mm"), "nanoseek_fp8_triton": lambda: fp8("triton"),
            "torchao_blockwise": torchao}


def expert_steps(T: int, D: int, I: int, E: int = 64, K: int = 6):
    cfg = preset("debug", hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K)
    ref = RoutedExperts(cfg).cuda()
    with torch.no_grad():
        ref.w13.normal_(0, D ** -0.5)
        ref.w2.normal_(0, I ** -0.5)
    fp8 = adopt(FP8RoutedExperts, ref)
    fp8.backend = "gpu"
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices  # (T, K) distinct experts per token
    gates = torch.rand(T, K, device="cuda")
    dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

    def run(module):
        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return module(x, ids, gates)
        return forward, (lambda y: y.backward(dy))

    return {"bf16_grouped_mm": lambda: run(ref), "nanoseek_fp8": lambda: run(fp8)}


def run_group(name: str, variants: dict, flops: float, args, results: dict) -> None:
    row = results.setdefault(name, {})
    for variant, make in variants.items():
        try:
            row[variant] = measure(make, flops, args)
        except (ImportError, ModuleNotFoundError) as e:
            row[variant] = {"skipped": f"not importable: {e}"}
        except Exception as e:  # noqa: BLE001 (a peer that fails is recorded, the run goes on)
            row[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()
    base = row.get("bf16") or row.get("bf16_grouped_mm")
    for r in row.values():
        if "ms" in r and base and "ms" in base:
            r["speedup_vs_bf16"] = base["ms"] / r["ms"]
            r["peak_mem_vs_bf16"] = r["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9)
    print(f"{name}: " + "  ".join(
        f"{v} " + (f"{r['ms']:.2f} ms {r['tflops']:.0f} TFLOP/s {r.get('speedup_vs_bf16', 0):.2f}x"
                   if "ms" in r else str(r)) for v, r in row.items()), flush=True)


# whole-step models: (preset, micro-batch, sequence length); layers cut where the GPU is smaller than an H200
STEP_MODELS = [("bench-1b", 8, 2048), ("bench-2048", 8, 2048)]
SMALL_GPU_LAYERS = {"bench-2048": 3}  # under 120 GiB of GPU memory (an H100): 1 dense + 2 MoE layers + MTP


def whole_step(name: str, batch_size: int, seq: int, args) -> dict:
    """One training step of preset `name` (fp32 master weights, AdamW, bf16 autocast, MTP trained, eager), as
    bench/train_throughput.py runs it, without and with `install_fp8`: tokens/s, peak memory."""
    from nanoseek import Transformer
    from nanoseek.fp8 import gpu, install_fp8
    from nanoseek.fp8.install import PARTS
    from nanoseek.train.metrics import H100_BF16_PEAK, flops_per_token
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.step import compile_blocks, compiled_cross_entropy, cross_entropy, train_step
    gpu.DENSE_GEMM = "auto"  # the per-layer section leaves it at whichever variant ran last
    cfg = preset(name)
    out: dict = {"batch_size": batch_size, "seq_len": seq, "compiled": args.step_compile}
    variants = [v for v in args.step_variants.split(",") if v]
    if torch.cuda.get_device_properties(0).total_memory < 120 * 2**30 and name in SMALL_GPU_LAYERS:
        cfg = preset(name, num_hidden_layers=SMALL_GPU_LAYERS[name])
        out["layers_cut_to_fit_this_gpu"] = cfg.num_hidden_layers
    if args.quick:
        batch_size = out["batch_size"] = 2
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq + 1), device="cuda")
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    for dtype in variants:
        model = optimizer = step = None
        try:
            model = Transformer.from_config(cfg, device="cuda", seed=0).train()
            out["parameters"] = sum(p.numel() for p in model.parameters())
            if dtype != "bf16":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # recorded instead
                    report = install_fp8(model, recompute_swiglu=dtype == "fp8_recompute",
                                         pad_partial_blocks=dtype == "fp8_padded",
                                         parts=("attention", "mlp") if dtype == "fp8_dense" else PARTS)
                    out["fp8_layers_left_in_bf16"] = report["bf16"]
            if args.step_compile:  # each block compiled, as `nanoseek train --train.compile true` does
                compile_blocks(model)
            optimizer = build_optimizer(model, 3e-4, (0.9, 0.95), 1e-8, 0.1)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
            ce = compiled_cross_entropy if args.step_compile else cross_entropy

            def step(model=model, optimizer=optimizer, autocast=autocast, ce=ce):
                train_step(model, optimizer, [batch], lr=3e-4, autocast=autocast, grad_clip=1.0, mtp_lambda=0.3,
                           seq_aux_alpha=1e-4, bias_gamma=1e-3, loss_fn=ce)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = cuda_time(step, args.steps, args.warmup)
            tok_s = batch_size * seq / statistics.median(times)
            out[dtype] = {"tokens_per_s": tok_s, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                          "mfu": tok_s * flops_per_token(cfg, seq, True) / H100_BF16_PEAK}
            if args.profile:  # where the step's GPU time goes, kernel by kernel
                print(f"  {name} {dtype}: top kernels")
                out[dtype]["top_kernels"] = profile(step)
        except Exception as e:  # noqa: BLE001 (an out-of-memory or kernel failure is recorded, the run goes on)
            out[dtype] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        del model, optimizer, step
        torch.cuda.empty_cache()
    for variant in [v for v in variants if v != "bf16"]:
        if "tokens_per_s" in out.get(variant, {}) and "tokens_per_s" in out.get("bf16", {}):
            out[variant]["speedup_vs_bf16"] = out[variant]["tokens_per_s"] / out["bf16"]["tokens_per_s"]
            out[variant]["peak_mem_vs_bf16"] = out[variant]["peak_mem_gb"] / out["bf16"]["peak_mem_gb"]
    print(f"whole step {name} {batch_size}x{seq}: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="4,096 tokens, 4 steps, 2 warm-up (smoke)")
    p.add_argument("--no-step", action="store_true", help="skip the whole training steps, BF16 vs FP8")
    p.add_argument("--step-models", default="", help="comma-separated presets of the whole-step section "
                   f"(default: all of {', '.join(m[0] for m in STEP_MODELS)})")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer section")
    p.add_argument("--profile", action="store_true", help="whole steps: the top CUDA kernels of each variant")
    p.add_argument("--step-variants", default="bf16,fp8,fp8_recompute,fp8_padded,fp8_dense",
                   help="whole-step variants, comma-separated (bf16 is the reference of the ratios; fp8_dense: "
                        "the attention and MLP linears in FP8, the routed experts in BF16)")
    p.add_argument("--step-compile", action="store_true", help="whole steps with each block compiled (the "
                   "trainer's --train.compile; FP8 calls stay outside the compiled graphs)")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/fp8_throughput-<date>.json)")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.steps, args.warmup = 4096, 4, 2
    if not torch.cuda.is_available():
        raise SystemExit("fp8_throughput: needs a CUDA GPU (SM >= 8.9); there is none here")
    device = torch.device("cuda")
    check_fp8_device(device)
    M = args.tokens
    results: dict = {}
    from nanoseek.fp8 import gpu
    dense_route = {"backend": gpu.dense_backend(device), "probe_errors": gpu.PROBE_ERRORS}
    print(f"dense FP8 GEMM route: {dense_route}", flush=True)
    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    import triton
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    record = {
        "benchmark": "fp8_throughput", "date": time.strftime("%Y-%m-%d"), "git_commit": commit,
        "device": torch.cuda.get_device_name(device),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                     "torchao": torchao_version, "python": platform.python_version()},
        "config": {"tokens": M, "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
                   "dense": DENSE, "experts": {"shapes": EXPERTS, "n_experts": 64, "top_k": 6},
                   "step_models": STEP_MODELS},
        "dense_gemm_route": dense_route,
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"fp8_throughput-{record['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(done: bool) -> None:  # after every group: a run cut short by a timeout keeps what it measured
        record["complete"] = done
        out.write_text(json.dumps(record, indent=2) + "\n")

    for K, N in [] if args.no_layers else DENSE:
        run_group(f"dense {K}->{N}", dense_steps(M, K, N), 6.0 * M * K * N, args, results)
        save(False)
    for D, I in [] if args.no_layers else EXPERTS:
        # three GEMMs (forward, dgrad, wgrad) of w13 (2I x D) and w2 (D x I) over M*6 routed rows
        run_group(f"experts 64x {D}->{I} top-6", expert_steps(M, D, I), 18.0 * M * 6 * D * I, args, results)
        save(False)
    if not args.no_step:
        for name, batch_size, seq in STEP_MODELS:
            if args.step_models and name not in args.step_models.split(","):
                continue
            key = f"whole step {name}" + (" compiled" if args.step_compile else "")
            results[key] = whole_step(name, batch_size, seq, args)
            save(False)
    save(True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
