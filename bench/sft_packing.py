"""SFT step throughput: packed rows with document-causal attention vs the same rows causal vs padding.

    python bench/sft_packing.py                        # one GPU: bench-1b, rows of 2048, batch 8, bf16 autocast
    python bench/sft_packing.py --preset debug --batch 2 --seq 64 --device cpu --steps 2 --warmup 1   # smoke

Documents: lengths uniform in [seq/16, seq/2] tokens, the second half of each an assistant reply (the
loss mask). Variants, one SFT optimizer step each (accumulate_gradients + optimizer_step with the SFT
loss, as `nanoseek sft` runs it), sharing one model and optimizer, alternated step by step:

    packed   rows packed best-fit, DocumentMLA with the (B, 1, S, S) SDPA mask   (sft's default, the reference)
    flex     the same rows, FlexAttention's block mask, compiled (--sft.attention flex; CUDA only)
    causal   the same rows, plain causal attention (documents leak: a speed bound, not a correct choice)
    padded   one document per row, padded to the batch's longest row, plain causal (--sft.pack false)

Reported: ms per step and real (non-padding) tokens per second; padding processes fewer documents per
step, so tokens/s is the fair comparison. Medians of CUDA-event times; the JSON lands in
bench/results/sft_packing-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.sft.data import Document, collate, pack_rows  # noqa: E402
from nanoseek.sft.loss import sft_loss  # noqa: E402
from nanoseek.sft.masking import install_document_masking  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from nanoseek.train.step import accumulate_gradients, optimizer_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq", type=int, default=2048, help="positions per packed row")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="result JSON path (default bench/results/...)")
    args = p.parse_args()

    device = torch.device(args.device)
    cfg = preset(args.preset)
    model = Transformer.from_config(cfg, device=device, seed=0).train()
    doc_mask = install_document_masking(model)
    flex_model = None
    if device.type == "cuda":  # the same weights and optimizer, a second module tree whose MLAs use flex
        from nanoseek.model.swap import shared_copy
        from nanoseek.sft.masking import DocumentMLA

        flex_model = shared_copy(model)
        flex_mask = None
        for m in flex_model.modules():
            if isinstance(m, DocumentMLA):
                flex_mask = flex_mask or type(doc_mask)("flex")
                m.doc_mask = flex_mask
    optimizer = build_optimizer(model, 1e-5, (0.9, 0.95), 1e-8, 0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    rng = random.Random(0)
    docs = []
    while sum(len(d.ids) - 1 for d in docs) < args.batch * args.seq * 1.2:
        n = rng.randint(max(4, args.seq // 16), args.seq // 2 + 1)
        docs.append(Document([rng.randrange(2, cfg.vocab_size) for _ in range(n)], [0] * (n // 2) + [1] * (n - n // 2),
                             len(docs)))
    rows = pack_rows(docs, args.seq)[:args.batch]
    packed = collate(rows, pad_id=0, packed=True)
    padded_docs = [[d] for d in sorted(docs, key=lambda d: -len(d.ids))[:args.batch]]
    variants = {
        "packed": (packed, doc_mask),
        **({"flex": (packed, flex_mask)} if flex_model is not None else {}),
        "causal": ({k: v for k, v in packed.items() if k != "doc_ids"}, None),
        "padded": (collate(padded_docs, pad_id=0, packed=False), None),
    }
    in_rows = int((packed["doc_ids"] >= 0).sum())
    real = {"packed": in_rows, "flex": in_rows, "causal": in_rows,
            "padded": sum(len(r[0].ids) - 1 for r in padded_docs)}

    def step(name: str) -> None:
        batch, mask = variants[name]
        if mask is None:
            doc_mask.set(None)
        loss_fn = sft_loss(mask, 0.3, 1e-4, mtp=False)
        out = accumulate_gradients(flex_model if name == "flex" else model, [batch], loss_fn, autocast)
        optimizer_step(model, optimizer, lr=1e-5, grad_clip=1.0, bias_gamma=1e-3)
        assert torch.isfinite(out["loss"]), name

    def timed(name: str) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(name)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        step(name)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for name in variants:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name in variants:
            times[name].append(timed(name))

    figures = {}
    for name, t in times.items():
        med = statistics.median(t)
        figures[name] = {"median_s": med, "real_tok_s": real[name] / med, "real_tokens": real[name],
                         "shape": list(variants[name][0]["input_ids"].shape), "times_s": t}
        print(f"{name:>7}: {1e3 * med:8.2f} ms/step, {real[name] / med:12,.0f} real tok/s "
              f"({real[name]} real tokens in {tuple(variants[name][0]['input_ids'].shape)})")
    ratios = {"packed_over_causal_time": figures["packed"]["median_s"] / figures["causal"]["median_s"],
              **({"flex_over_packed_time": figures["flex"]["median_s"] / figures["packed"]["median_s"]}
                 if "flex" in figures else {}),
              "packed_over_padded_tok_s": figures["packed"]["real_tok_s"] / figures["padded"]["real_tok_s"]}
    print(f"document mask cost: {ratios['packed_over_causal_time']:.3f}x the causal step time; packed / padded "
          f"real tokens/s: {ratios['packed_over_padded_tok_s']:.2f}x"
          + (f"; flex / sdpa mask step time: {ratios['flex_over_packed_time']:.3f}x" if "flex" in figures else ""))
    record = {
        "date": time.strftime("%Y-%m-%d"), "bench": "sft_packing",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                   "warmup": args.warmup, "documents": len(docs), "autocast_bf16": device.type == "cuda"},
        "figures": figures, **ratios,
    }
    default = Path(__file__).parent / "results" / f"sft_packing-{record['date']}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
