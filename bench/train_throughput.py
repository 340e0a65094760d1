"""Training throughput: nanoseek's training step against transformers' DeepseekV3ForCausalLM and torchtitan.

    python bench/train_throughput.py                          # one H200: bench-1b, 8 x 2048, bf16
    python bench/train_throughput.py --variants eager,compile --steps 12
    python bench/train_throughput.py --preset debug --batch 2 --seq 64 --device cpu --steps 2 --warmup 1  # smoke

Both sides run a full optimizer step (forward, backward, fused AdamW) on the same random batch in
the same process. nanoseek: fp32 master weights under bf16 autocast, grouped-GEMM experts, cuDNN
SDPA, MTP depth 1 trained (as `nanoseek train` does). Peer: bf16 weights, `experts_implementation=
"grouped_mm"`, `attn_implementation="sdpa"`, no MTP (transformers has none). Tokens/s, MFU
(docs/performance.md's formula, with MTP FLOPs only where MTP is trained) and peak memory are medians over
the timed steps; the result JSON lands in bench/results/.

Second peer (when `torchtitan` imports; CUDA only): torchtitan's DeepSeekV3Model with the same shapes,
bf16 weights, SDPA, grouped-GEMM experts, each block compiled by its own `apply_compile`, fused AdamW
and its expert-bias update; compare it with the `compile+bf16+nomtp` variant (the same work). Carry its
wheels: torchtitan 0.2.2, torchdata, tyro, docstring-parser, typeguard, shtab, tomli (`datasets` is
stubbed when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timing import profile, profile_ops, source_revision  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.train.metrics import H100_BF16_PEAK, flops_per_token  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from nanoseek.train.step import (  # noqa: E402
    accumulate_gradients,
    compile_blocks,
    compiled_cross_entropy,
    cross_entropy,
    optimizer_step,
    pretraining_loss,
    train_step,
)

GEMM_CEILING = 812e12  # measured bf16 GEMM ceiling of the lent H200 (measured on 2026-12-04)


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


def run_nanoseek(cfg, batch, device, args, variant: str) -> dict:
    if "nomtp" in variant:
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    model = Transformer.from_config(cfg, device=device, seed=0).train()
    if "bf16" in variant:
        model.to_dtype(torch.bfloat16)
    whole = "whole" in variant  # one graph: the model's forward and the loss (else each block compiled)
    graphs = "+cg" in variant  # each compiled block replayed as CUDA graphs (forward and backward)
    if "compile" in variant and not whole:
        compile_blocks(model, mode="reduce-overhead" if graphs else None)
    optimizer = build_optimizer(model, 3e-4, (0.9, 0.95), 1e-8, 0.1, bf16_moments="+bm" in variant,
                                master_weights="+mw" in variant)
    bf16 = device.type == "cuda" or "+mw" in variant  # bf16 autocast (master weights need it on the CPU too)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    loss_fn = compiled_cross_entropy if "compile" in variant and not whole else cross_entropy
    fused_head = "+fce" in variant  # each head and its CE as one chunked operation (nanoseek/train/fused_head.py)
    whole_loss = torch.compile(pretraining_loss(0.3, 1e-4, cross_entropy)) if whole else None

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if whole:
            metrics = accumulate_gradients(model, [batch], whole_loss, autocast)
            metrics |= optimizer_step(model, optimizer, lr=3e-4, grad_clip=1.0, bias_gamma=1e-3)
            return metrics
        return train_step(model, optimizer, [batch], lr=3e-4, autocast=autocast, grad_clip=1.0, mtp_lambda=0.3,
                          seq_aux_alpha=1e-4, bias_gamma=1e-3, loss_fn=loss_fn, fused_head=fused_head)

    result = measure(step, model, device, args, flops_per_token(cfg, args.seq, cfg.num_nextn_predict_layers > 0))
    if args.profile and device.type == "cuda":
        result["top_kernels"] = profile(step, rows=80)
        result["top_ops"] = profile_ops(step, rows=60)
    return result


def run_transformers(cfg, batch, device, args) -> dict:
    import transformers

    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                              if k not in ("architectures", "rope_scaling")})
    model = transformers.DeepseekV3ForCausalLM._from_config(
        hf_cfg, attn_implementation="sdpa", experts_implementation="grouped_mm" if device.type == "cuda" else "eager",
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    x, y = batch

    def step():
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    no_mtp = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    return measure(step, model, device, args, flops_per_token(no_mtp, args.seq, with_mtp=False))


def import_torchtitan():
    """torchtitan's DeepSeek-V3 model, or None. Its package imports `datasets` (for its data loaders, which
    this benchmark does not use); where `datasets` is missing, a stub module stands in for it."""
    import importlib.util
    import types

    if importlib.util.find_spec("torchtitan") is None:
        return None
    if importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")

        def missing(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})  # a placeholder class per imported name, never instantiated here

        stub.__getattr__ = missing
        sys.modules["datasets"] = sys.modules["datasets.distributed"] = stub
    import torchtitan
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.moe import MoEArgs

    return torchtitan, DeepSeekV3ModelArgs, DeepSeekV3Model, MoEArgs


def run_torchtitan(cfg, batch, device, args) -> dict | None:
    """torchtitan's DeepSeekV3Model with the same shapes: bf16 weights, SDPA attention, the standard MoE
    (grouped GEMMs on CUDA), each block compiled by torchtitan's own `apply_compile` (as its trainer does),
    fused AdamW, and its load-balancing expert-bias update (sign rule, an optimizer pre-hook in its trainer)
    run before each optimizer step. No MTP (torchtitan has none)."""
    found = import_torchtitan()
    if found is None:
        print("torchtitan: not installed, skipped", flush=True)
        return None
    torchtitan, Args, Model, MoEArgs = found
    if device.type != "cuda":
        print("torchtitan: its MoE router needs CUDA (torch.histc on integer ids), skipped", flush=True)
        return None
    margs = Args(vocab_size=cfg.vocab_size, dim=cfg.hidden_size, inter_dim=cfg.intermediate_size,
                 moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
                 n_dense_layers=cfg.first_k_dense_replace, n_heads=cfg.num_attention_heads, norm_eps=cfg.rms_norm_eps,
                 moe_args=MoEArgs(num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
                                  score_func=cfg.scoring_func, route_norm=cfg.norm_topk_prob,
                                  route_scale=cfg.routed_scaling_factor, top_k=cfg.num_experts_per_tok,
                                  num_expert_groups=cfg.n_group, num_limited_groups=cfg.topk_group,
                                  use_grouped_mm=device.type == "cuda", load_balance_coeff=1e-3),
                 q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                 qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, attn_type="sdpa",
                 max_seq_len=args.seq, rope_theta=cfg.rope_theta)
    margs.moe_impl = "standard"  # set by its trainer from the job config
    with torch.device(device):
        model = Model(margs)
    with torch.no_grad():  # as its trainer does (it initialises after materialising the meta model)
        model.init_weights(buffer_device=device)
    with torch.no_grad():  # bf16 parameters, as FSDP's bf16 param_dtype gives its trainer; the buffers keep their
        for param in model.parameters():  # dtypes (model.to(bf16) would drop the imaginary part of the complex
            param.data = param.data.to(torch.bfloat16)  # RoPE table and count expert loads in bf16)
    model.train()
    if device.type == "cuda":
        from types import SimpleNamespace

        from torchtitan.models.llama4.infra.parallelize import apply_compile

        apply_compile(model, SimpleNamespace(backend="inductor"), ep_enabled=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    moes = [block.moe for block in model.layers.values() if block.moe_enabled]
    x, y = batch

    def step():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with torch.no_grad():  # torchtitan's expert-bias update, from the step's expert loads
            for moe in moes:
                load = moe.tokens_per_expert.float()
                delta = moe.load_balance_coeff * torch.sign(load.mean() - load)
                moe.expert_bias.add_(delta - delta.mean())
                moe.tokens_per_expert.zero_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    no_mtp = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    result = measure(step, model, device, args, flops_per_token(no_mtp, args.seq, with_mtp=False))
    result["version"] = getattr(torchtitan, "__version__", "unknown")
    if args.profile:
        result["top_kernels"] = profile(step, rows=80)
    return result


def measure(step, model, device, args, fpt: float) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, args.steps, args.warmup, device)
    tokens = args.batch * args.seq
    median = statistics.median(times)
    result = {"step_s_median": median, "step_s_all": times, "tokens_per_s": tokens / median,
              "flops_per_token": fpt, "params": sum(p.numel() for p in model.parameters())}
    result["mfu"] = result["tokens_per_s"] * fpt / H100_BF16_PEAK
    result["share_of_gemm_ceiling"] = result["tokens_per_s"] * fpt / GEMM_CEILING
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_isolated(name: str, args) -> dict | None:
    """`name` measured by a child process running this script with `--only name` (its stdout and stderr
    pass through); the child's result, or the error it died of."""
    with tempfile.TemporaryDirectory() as tmp:
        child = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--child-out", str(child),
               "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device] + (["--profile"] if args.profile else [])
        code = subprocess.run(cmd).returncode
        if not child.exists():
            return {"error": f"the child process measuring {name} exited with code {code} and no result"}
        return json.loads(child.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="eager,compile,compile+nomtp",
                   help="comma list of eager or compile, each optionally +bf16 (bf16 weights), +nomtp (no MTP), "
                        "+whole (compile the forward and loss as one graph instead of each block), +cg (each "
                        "compiled block replayed as CUDA graphs), +fce (the chunked head + cross-entropy), +bm "
                        "(AdamW with bf16 moments, one Triton kernel per parameter on the GPU) or +mw (bf16 GEMM "
                        "weights with fp32 masters in the optimizer, nanoseek/train/master_weights.py)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--no-torchtitan", action="store_true", help="skip torchtitan (also skipped if not installed)")
    p.add_argument("--profile", action="store_true", help="record the top CUDA kernels of each nanoseek variant")
    p.add_argument("--isolate", action="store_true", help="measure each peer and variant in a fresh Python process "
                   "(one's compile caches, allocator state and global flags cannot touch the next)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a child of --isolate: this one name
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)  # ... and where its result goes
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/train_throughput-<date>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = preset(args.preset)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    import transformers

    results: dict = {}
    peers: dict = {}
    record = {
        "benchmark": "train_throughput", "date": time.strftime("%Y-%m-%d"), "git_commit": source_revision(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "config": {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                   "warmup": args.warmup, "model": cfg.to_hf_dict()},
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"train_throughput-{record['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def measured(name: str, run) -> None:
        """Run one variant or peer; a failure is recorded and the run goes on; the JSON is rewritten after each
        (a run cut short by a timeout keeps what it measured)."""
        try:
            r = run()
        except Exception as e:  # noqa: BLE001 (an out-of-memory or compile failure of one variant)
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if r is not None:
            results[name] = r
            print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'step_s_all'})}", flush=True)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        for peer in ("transformers", "torchtitan"):
            base = results.get(peer, {}).get("tokens_per_s")
            for mine in results.values():
                if base and "tokens_per_s" in mine and mine is not results[peer]:
                    mine[f"speedup_vs_{peer}"] = mine["tokens_per_s"] / base
        out.write_text(json.dumps(record, indent=2) + "\n")

    def runner(name: str):
        """The measurement of one peer or variant, in this process or (--isolate) a child process."""
        if args.isolate:
            return lambda: run_isolated(name, args)
        if name == "torchtitan":
            return lambda: run_torchtitan(cfg, batch, device, args)
        if name == "transformers":
            return lambda: run_transformers(cfg, batch, device, args)
        return lambda: run_nanoseek(cfg, batch, device, args, name.removeprefix("nanoseek-"))

    names = ([] if args.no_torchtitan else ["torchtitan"]) + ([] if args.no_peer else ["transformers"])
    names += [f"nanoseek-{v}" for v in args.variants.split(",") if v]  # the peers first: a run cut short has them
    if args.only:  # a child of --isolate
        result = runner(args.only)()
        Path(args.child_out).write_text(json.dumps(result))
        return
    for name in names:
        measured(name, runner(name))
    peers = [p for p in ("transformers", "torchtitan") if "tokens_per_s" in results.get(p, {})]
    for name, r in results.items():
        if "tokens_per_s" not in r:
            print(f"{name:>22}: {r.get('error')}")
            continue
        extra = "".join(f", {r[f'speedup_vs_{peer}']:.2f}x {peer}" for peer in peers if f"speedup_vs_{peer}" in r)
        print(f"{name:>22}: {r['tokens_per_s']:>10,.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
              f"peak {r.get('peak_mem_gb', 0):5.1f} GB{extra}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
