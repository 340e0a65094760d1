"""SFT at demo scale on the CPU: a fresh student learns the R1 format from worked solutions, packed vs padded.

    python bench/sft_demo.py                          # 2 CPU cores: a few minutes
    python bench/sft_demo.py --examples 400 --eval 40  # quicker

The data stands in for a teacher's rejection-sampled outputs: procedurally generated 1-2 digit arithmetic
problems (nanoseek.data.tasks, train split) with correct R1-format solutions, as prompt/completion JSONL. A
byte-level BPE is trained on them (its chat template is the R1 one). Two `nanoseek sft` runs of the
same fresh student (demo preset, --layers layers) over the same data and epochs:

    packed   --sft.pack true   (rows of --seq positions, document-causal attention)
    padded   --sft.pack false  (one document per row)

Each is then scored on held-out problems (never in the data) with greedy decoding through the engine:
accuracy (the task's verifier), format rate (<think>...</think> <answer>...</answer>), mean length.
Results: bench/results/sft_demo-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import load_pretrained  # noqa: E402
from nanoseek.data.tasks import format_ok, r1_prompt, render, sample_problems, verify  # noqa: E402
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from nanoseek.sft.config import parse_args  # noqa: E402
from nanoseek.sft.data import pack_rows, parse_example, render_all  # noqa: E402
from nanoseek.sft.loop import sft  # noqa: E402
from nanoseek.train.evaluate import greedy_complete  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402

KINDS = ("add", "sub", "mul")  # 1-2 digit arithmetic: short worked solutions, learnable in minutes


def score(ckpt: Path, n: int, seed: int) -> dict:
    model = load_pretrained(ckpt, dtype=torch.float32).eval()
    tok = load_tokenizer(ckpt)
    problems = sample_problems(n, seed, KINDS, (1, 2), split="heldout", unique=True)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p.prompt}]) for p in problems]
    assert prompts[0] == r1_prompt(problems[0].prompt)  # the chat template is the R1 prompt
    texts = greedy_complete(model, tok, prompts, 160, stop="</answer>")
    return {"accuracy": sum(verify(p, t) for p, t in zip(problems, texts)) / n,
            "format_rate": sum(format_ok(t) for t in texts) / n,
            "mean_tokens": sum(len(tok.encode(t)) for t in texts) / n, "n": n,
            "example": {"prompt": problems[0].prompt, "completion": texts[0]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1500)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval", type=int, default=100, help="held-out problems scored per run")
    p.add_argument("--ckpt", default="", help="fine-tune this checkpoint (e.g. a `nanoseek train` demo run) instead "
                   "of a fresh student; its tokenizer is used and the base is scored too")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)

    root = Path(tempfile.mkdtemp(prefix="sft_demo-"))
    problems = sample_problems(args.examples, 0, KINDS, (1, 2), split="train")
    rng = random.Random(0)
    pairs = [(q.prompt, render(q, "r1", rng)) for q in problems]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": c}) + "\n" for q, c in pairs))
    if args.ckpt:
        model_args, tok_dir = ["--ckpt", args.ckpt], Path(args.ckpt)
    else:
        train_tokenizer([f"{r1_prompt(q)} {c}" for q, c in pairs], 1024, root / "tok")
        tok_dir = root / "tok"
        model_args = ["--preset", "demo", "--model.num_hidden_layers", str(args.layers), "--tokenizer", str(tok_dir)]
    # the same tokens per optimizer step in both runs: padded batches hold as many documents as packed rows do
    docs, _ = render_all(load_tokenizer(tok_dir), [(i, parse_example(json.dumps({"prompt": q, "completion": c})))
                                                    for i, (q, c) in enumerate(pairs)], data, args.seq)
    per_row = len(docs) / len(pack_rows(docs, args.seq))
    record = {"date": time.strftime("%Y-%m-%d"), "bench": "sft_demo", "device": platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "config": {**vars(args), "documents_per_packed_row": per_row}, "runs": {}}
    if args.ckpt:
        record["runs"]["base"] = score(Path(args.ckpt), args.eval, 1)
        print(f"base: held-out accuracy {100 * record['runs']['base']['accuracy']:.0f}%, format "
              f"{100 * record['runs']['base']['format_rate']:.0f}%")
    for name, pack, batch in (("packed", "true", args.batch), ("padded", "false", round(args.batch * per_row))):
        out = root / name
        t0 = time.time()
        summary = sft(parse_args([
            *model_args, "--data", str(data), "--sft.pack", pack, "--sft.seq_len", str(args.seq),
            "--sft.epochs", str(args.epochs), "--train.batch_size", str(batch), "--train.lr", str(args.lr),
            "--train.warmup_steps", "10", "--train.device", "cpu", "--train.log_every", "10",
            "--train.tensorboard", "false", "--train.out_dir", str(out)]))
        minutes = (time.time() - t0) / 60
        train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        result = {"steps": summary["step"], "batch": batch, "train_minutes": minutes, "final_loss": train[-1]["loss"],
                  "median_tok_s": sorted(r["tok_s"] for r in train)[len(train) // 2],
                  **score(Path(summary["checkpoint"]), args.eval, 1)}
        record["runs"][name] = result
        print(f"{name}: {result['steps']} steps in {minutes:.1f} min, loss {result['final_loss']:.3f}, held-out "
              f"accuracy {100 * result['accuracy']:.0f}%, format {100 * result['format_rate']:.0f}%, "
              f"{result['mean_tokens']:.0f} tokens")
    default = Path(__file__).parent / "results" / f"sft_demo-{record['date']}.json"
    path = Path(args.out) if args.out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
