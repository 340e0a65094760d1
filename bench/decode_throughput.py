"""Decode throughput: nanoseek's engine against transformers `generate` on the same weights.

    python bench/decode_throughput.py                                   # one H200, bench-1b, batch 1 and 32
    python bench/decode_throughput.py --spec-ckpt runs/demo/checkpoints/step-000500   # + MTP speculation
    python bench/decode_throughput.py --preset debug --batches 1,2 --prompt-len 16 --new 8 --device cpu  # smoke

Workload (per batch size B): B random prompts of `--prompt-len` tokens, greedy, exactly `--new`
new tokens each (EOS ignored); tokens/s = B * new / wall time of the whole call, prefill included,
median of `--repeats` calls after one warm-up call (which captures CUDA graphs / compiles);
transformers the median of `--peer-repeats` calls after its own warm-up. Both sides use the same
bf16 random weights (`bench-1b`, saved once and loaded by transformers). The record names the
host's CPU: the peer is bound by host Python here, so its speed follows the lent machine.
Also reported: the latent cache's bytes per token against an expanded per-head K/V cache, and at
batch 1 the share of the memory-bandwidth bound (weights + cache bytes read per token at the
measured ~4.3 TB/s). With `--spec-ckpt` (a checkpoint from `nanoseek train`, with its MTP module):
MTP speculative acceptance and speed-up against plain decoding on held-out task prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek
from bench.kernel_timing import source_revision  # noqa: E402
from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.infer.engine import Engine, cache_bytes_per_token  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402

HBM_BANDWIDTH = 4.3e12  # measured device-to-device copy rate of the lent H200 (bytes/s)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, repeats: int, device: torch.device) -> list[float]:
    fn()  # warm-up: graph capture, compilation, allocator
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bytes_per_decoded_token(model: Transformer, context: int) -> float:
    """Weights a batch-1 decode step reads (routed experts: only the top-k) plus the cache."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(("mtp.", "embed_tokens")):
            continue
        nbytes = p.numel() * p.element_size()
        if "experts.w" in name:
            nbytes = nbytes * cfg.num_experts_per_tok // cfg.n_routed_experts
        total += nbytes
    cache = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context * 2
    return total + cache


def run_nanoseek(model, prompts, args, device, variant: str) -> dict:
    B = len(prompts)
    engine = Engine(model, None, max_batch_size=B, max_len=args.prompt_len + args.new + 8,
                    cuda_graph="graph" in variant, compile="compile" in variant)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new, ignore_eos=True)
    outputs = []

    def call():
        outputs[:] = engine.generate(prompts, params)

    times = time_calls(call, args.repeats, device)
    median = statistics.median(times)
    return {"seconds": times, "tokens_per_s": B * args.new / median,
            "first_output": outputs[0].token_ids[:16]}


def run_transformers(ckpt: Path, prompts, args, device) -> tuple[dict, object]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").to(device).eval()
    ids = torch.tensor(prompts, device=device)
    out = {}

    def call():
        with torch.no_grad():
            out["ids"] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                        min_new_tokens=args.new, do_sample=False)

    times = time_calls(call, args.peer_repeats, device)
    median = statistics.median(times)
    result = {"seconds": times, "tokens_per_s": len(prompts) * args.new / median,
              "experts_implementation": getattr(model.config, "_experts_implementation", None),
              "first_output": out["ids"][0, args.prompt_len: args.prompt_len + 16].tolist()}
    return result, out


def profile_decode(model, prompt: list[int], device, steps: int = 16) -> dict:
    """Kernels per plain (eager, batch 1) decode step and where their time goes."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, None, max_batch_size=1, max_len=len(prompt) + 2 * steps)
    few = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_new_tokens=steps + 1, ignore_eos=True)
    engine.generate([prompt], many)  # warm-up
    counts = {}
    for name, params in (("prefill", few), ("prefill+decode", many)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate([prompt], params)
            torch.cuda.synchronize()
        counts[name] = [(e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
    base = {k: (c, t) for k, c, t in counts["prefill"]}
    per_step = []
    for k, c, t in counts["prefill+decode"]:
        c0, t0 = base.get(k, (0, 0.0))
        if c > c0:
            per_step.append({"kernel": k[:100], "calls_per_step": (c - c0) / steps, "us_per_step": (t - t0) / steps})
    per_step.sort(key=lambda r: -r["us_per_step"])
    result = {"kernels_per_step": sum(r["calls_per_step"] for r in per_step),
              "gpu_us_per_step": sum(r["us_per_step"] for r in per_step), "top": per_step[:15]}
    print(f"eager decode step: {result['kernels_per_step']:.0f} kernels, {result['gpu_us_per_step']:.0f} us GPU time",
          flush=True)
    return result


def speculative(ckpt: str, args, device) -> dict:
    """MTP speculation (K = 1 and 2 drafts per step) against plain decoding on the checkpoint, batch 1
    and 8, greedy: on CUDA both in bf16 on the fast path (compiled blocks, CUDA-graphed steps and
    prefills), elsewhere eager fp32."""
    from nanoseek.data.tasks import r1_prompt, sample_problems
    from nanoseek.data.tokenizer import load_tokenizer

    fast = device.type == "cuda"
    tok = load_tokenizer(ckpt)
    model = nanoseek.load_pretrained(ckpt, dtype=torch.bfloat16 if fast else torch.float32, device=device)
    prompts = [r1_prompt(p.prompt) for p in sample_problems(8, 7, difficulty_range=(1, 3), split="heldout")]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new)
    result = {"checkpoint": ckpt, "prompts": len(prompts), "dtype": str(model.embed_tokens.weight.dtype),
              "cuda_graph": fast, "compile": fast}
    for batch in (1, 8):
        # compiling changes the model's blocks in place: once, with the first engine
        plain = Engine(model, tok, max_batch_size=batch, cuda_graph=fast, compile=fast and batch == 1)
        t_plain = statistics.median(time_calls(lambda e=plain: e.generate(prompts, params), args.repeats, device))
        a = plain.generate(prompts, params)
        for k in (1, 2):
            spec = Engine(model, tok, max_batch_size=batch, speculative=k, cuda_graph=fast)
            t_spec = statistics.median(time_calls(lambda e=spec: e.generate(prompts, params), args.repeats, device))
            b = spec.generate(prompts, params)
            stats = spec.last_stats
            result[f"batch{batch}_k{k}"] = {
                "identical_greedy_output": [x.token_ids for x in a] == [y.token_ids for y in b],
                "acceptance": stats.acceptance, "tokens_per_forward": stats.tokens_per_forward,
                "plain_tokens_per_s": plain.last_stats.new_tokens / t_plain,
                "speculative_tokens_per_s": stats.new_tokens / t_spec, "speedup": t_plain / t_spec}
            print(f"speculative batch {batch} K={k}: {json.dumps(result[f'batch{batch}_k{k}'])}", flush=True)
    return result


def save(record: dict, out: Path) -> None:
    """Write the record so far (a crash late in the run keeps the figures already measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


def host_cpu() -> dict:
    """The host's CPU model and core count: transformers `generate` is bound by host Python at these
    sizes, so its speed (the ratio's denominator) follows the host."""
    model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="eager,graph,compile+graph", help="comma list: eager, graph, compile+graph")
    p.add_argument("--peer-repeats", type=int, default=3, help="timed transformers calls (median)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--spec-ckpt", default=None, help="a nanoseek-trained checkpoint (with MTP) for speculation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset(args.preset)
    model = Transformer.from_config(cfg, device=device, dtype=dtype, seed=0).eval()
    latent, expanded = cache_bytes_per_token(cfg, torch.bfloat16)
    record = {"benchmark": "decode_throughput", "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
              "host_cpu": host_cpu(),
              "revision": source_revision(),
              "config": {"preset": args.preset, "prompt_len": args.prompt_len, "new_tokens": args.new,
                         "repeats": args.repeats, "peer_repeats": args.peer_repeats, "dtype": str(dtype),
                         "greedy": True},
              "kv_cache_bytes_per_token_bf16": {"latent": latent, "expanded_per_head_kv": expanded,
                                                "ratio": expanded / latent},
              "results": {}}
    tmp = Path(tempfile.mkdtemp())
    if not args.no_peer:
        nanoseek.save_pretrained(model, tmp / "ckpt")
        import transformers

        record["versions"]["transformers"] = transformers.__version__
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_throughput-{record['date']}.json")
    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = {B: torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist() for B in batches}
    results = record["results"] = {f"batch{B}": {} for B in batches}
    # variant-major: compiling changes the model's blocks in place, so compiled variants come last
    for variant in [v for v in args.variants.split(",") if v]:
        for B in batches:
            r = results[f"batch{B}"][f"nanoseek-{variant}"] = run_nanoseek(model, prompts[B], args, device, variant)
            print(f"batch {B} nanoseek-{variant}: {r['tokens_per_s']:,.1f} tok/s", flush=True)
            save(record, out)
        if variant == "eager" and device.type == "cuda":
            record["eager_decode_profile"] = profile_decode(model, prompts[batches[0]][0], device)
    for B in batches:
        res = results[f"batch{B}"]
        if not args.no_peer:
            res["transformers"], _ = run_transformers(tmp / "ckpt", prompts[B], args, device)
            peer = res["transformers"]["tokens_per_s"]
            print(f"batch {B} transformers: {peer:,.1f} tok/s", flush=True)
            save(record, out)
            for name, r in res.items():
                if name != "transformers":
                    r["speedup_vs_transformers"] = r["tokens_per_s"] / peer
                    r["same_first_tokens_as_transformers"] = r["first_output"] == res["transformers"]["first_output"]
        if B == 1:
            per_token = bytes_per_decoded_token(model, args.prompt_len + args.new // 2)
            for r in res.values():
                r["share_of_bandwidth_bound"] = r["tokens_per_s"] * per_token / HBM_BANDWIDTH
            res["bytes_read_per_token"] = per_token
    if args.spec_ckpt:
        record["speculative"] = speculative(args.spec_ckpt, args, device)
    save(record, out)
    for batch, res in record["results"].items():
        for name, r in res.items():
            if isinstance(r, dict):
                extra = f"  {r['speedup_vs_transformers']:.1f}x transformers" if "speedup_vs_transformers" in r else ""
                bw = f"  {100 * r['share_of_bandwidth_bound']:.1f}% of bandwidth bound" \
                    if "share_of_bandwidth_bound" in r else ""
                print(f"{batch:>8} {name:>24}: {r['tokens_per_s']:>10,.1f} tok/s{extra}{bw}")
    print(f"KV cache per token (bf16): latent {latent:,} B vs expanded {expanded:,} B ({expanded / latent:.1f}x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
