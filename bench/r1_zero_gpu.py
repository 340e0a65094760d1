"""R1-Zero on one GPU (issue 17): pretrain a base for <= 8 minutes, then pure GRPO for <= 8 minutes, on two
bases, and record held-out Countdown accuracy before/after (greedy pass@1 and pass@8), response length,
format rate and reflection-marker frequency.

    python bench/r1_zero_gpu.py --stage pretrain --base a     # (a) default corpus            ~8.5 min
    python bench/r1_zero_gpu.py --stage rl --base a           #     GRPO on Countdown 3-4      ~9 min
    python bench/r1_zero_gpu.py --stage pretrain --base b     # (b) no R1-template documents (--data.r1_share 0)
    python bench/r1_zero_gpu.py --stage rl --base b
    python bench/r1_zero_gpu.py --stage record                # bench/results/r1_zero_gpu-<date>.json + plots
    python bench/r1_zero_gpu.py --stage both --base a --pretrain-minutes 4 --rl-minutes 3.5   # one command
    python bench/r1_zero_gpu.py --stage more-rl --base a --rl-minutes 5   # resume the RL run for 5 more minutes

Each stage fits one 10-minute device command; run directories are runs/r1zero-{a,b}{,-rl} (kept between
commands on a warm machine). Targets: (a) >= +20 points on held-out Countdown; (b) format rate from near 0
to >= 90% and an accuracy gain.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a ~46M-parameter V3-shaped model (MLA, 16 routed experts top-2 + 1 shared, MTP) over the 1024-token BPE
MODEL = ["--model.hidden_size", "384", "--model.num_hidden_layers", "8", "--model.num_attention_heads", "6",
         "--model.num_key_value_heads", "6", "--model.intermediate_size", "1536", "--model.moe_intermediate_size",
         "256", "--model.n_routed_experts", "16", "--model.num_experts_per_tok", "2", "--model.n_group", "4",
         "--model.topk_group", "2", "--model.q_lora_rank", "192", "--model.kv_lora_rank", "128",
         "--model.qk_nope_head_dim", "48", "--model.qk_rope_head_dim", "16", "--model.v_head_dim", "48",
         "--model.max_position_embeddings", "1024"]
PRETRAIN = ["--preset", "demo", *MODEL, "--data.n_docs", "200000", "--data.difficulty_max", "4",
            "--data.seq_len", "512", "--train.batch_size", "64", "--train.max_steps", "6000",
            "--train.lr", "2e-3", "--train.warmup_steps", "100", "--train.compile", "true",
            "--train.time_limit_min", "8", "--train.eval_every", "500", "--train.ckpt_every", "1000",
            "--train.eval_problems", "0"]
RL = ["--prompts.kinds", "countdown", "--prompts.difficulty_min", "3", "--prompts.difficulty_max", "4",
      "--prompts.eval_problems", "512", "--prompts.pass_k", "8", "--prompts.eval_every", "50",
      "--rl.group_size", "16", "--rl.prompts_per_step", "32", "--rl.max_new_tokens", "384",
      "--rl.micro_batch_size", "64", "--rl.beta", "0", "--rl.aggregation", "token", "--rl.eps_high", "0.28",
      "--rl.dynamic_sampling", "true", "--rl.max_draws", "3", "--train.lr", "1e-4", "--train.max_steps", "1000",
      "--train.time_limit_min", "7", "--train.ckpt_every", "0", "--train.samples_every", "10",
      "--train.log_every", "5", "--reward.format", "0.1"]


def nanoseek(*args: str) -> None:
    cmd = [sys.executable, "-m", "nanoseek.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def sessions_of(rl: Path) -> list[dict]:
    """The RL invocations of a run directory so far: [{steps, minutes}] (a run made before the record was
    kept counts as one invocation, from its summary.json)."""
    if (rl / "bench_sessions.json").is_file():
        return json.loads((rl / "bench_sessions.json").read_text())
    summary = json.loads((rl / "summary.json").read_text())
    return [{"steps": summary["step"], "minutes": summary["minutes"]}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("pretrain", "rl", "both", "more-rl", "record"), required=True,
                   help="both: pretrain then RL in one command (with shorter limits, one device call per base); "
                        "more-rl: resume the RL run exactly (`nanoseek rl --resume`) for --rl-minutes more")
    p.add_argument("--base", choices=("a", "b"), default="a")
    p.add_argument("--pretrain-minutes", type=float, default=8.0, help="pretraining time limit (issue: <= 8)")
    p.add_argument("--rl-minutes", type=float, default=7.0, help="GRPO time limit, evaluations excluded (<= 8)")
    p.add_argument("--out", default=None, help="record JSON (default bench/results/r1_zero_gpu-<date>.json)")
    args = p.parse_args()
    runs = ROOT / "runs"
    base, rl = runs / f"r1zero-{args.base}", runs / f"r1zero-{args.base}-rl"
    if args.stage in ("pretrain", "both"):
        extra = ["--data.r1_share", "0"] if args.base == "b" else []
        nanoseek("train", *PRETRAIN, *extra, "--train.time_limit_min", str(args.pretrain_minutes),
                 "--train.out_dir", str(base))
    if args.stage in ("rl", "both", "more-rl"):
        if args.stage != "more-rl":
            shutil.rmtree(rl, ignore_errors=True)
        resume = ["--resume"] if args.stage == "more-rl" else []
        done = sessions_of(rl) if resume else []
        nanoseek("rl", "--ckpt", str(base), *RL, "--train.time_limit_min", str(args.rl_minutes),
                 "--train.out_dir", str(rl), *resume)
        # each invocation's RL minutes (a resumed run's summary.json counts only its own)
        summary = json.loads((rl / "summary.json").read_text())
        sessions = rl / "bench_sessions.json"
        sessions.write_text(json.dumps(done + [{"steps": summary["step"], "minutes": summary["minutes"]}]) + "\n")
    if args.stage in ("record", "both", "more-rl"):
        record = {"benchmark": "r1_zero_gpu", "date": time.strftime("%Y-%m-%d"), "pretrain": PRETRAIN, "rl": RL,
                  "last_invocation": {"stage": args.stage, "pretrain_minutes": args.pretrain_minutes,
                                      "rl_minutes": args.rl_minutes}}
        for b in ("a", "b"):
            run_dir = runs / f"r1zero-{b}-rl"
            if not (run_dir / "summary.json").is_file():
                record[b] = {"missing": f"{run_dir}/summary.json"}
                continue
            summary = json.loads((run_dir / "summary.json").read_text())
            train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in train if r["kind"] == "train"]
            evals = [json.loads(x) for x in (run_dir / "evals.jsonl").read_text().splitlines()]  # across resumes
            before, after = evals[0], evals[-1]
            sessions = sessions_of(run_dir)
            run_json = json.loads((run_dir / "run.json").read_text())
            base_summary = runs / f"r1zero-{b}" / "summary.json"  # the pretraining actually done
            pretrained = json.loads(base_summary.read_text()) if base_summary.is_file() else {}
            record[b] = {"pretraining": {"steps": pretrained.get("step"), "minutes": pretrained.get("minutes")},
                         "steps": summary["step"], "minutes": sum(x["minutes"] for x in sessions),
                         "sessions": sessions, "evals_by_step": {e["step"]: e["accuracy"] for e in evals},
                         "before": {k: before[k] for k in ("accuracy", "ci95", "format", "by_difficulty")}
                         | {"pass_8": before.get("pass_k", {}).get("accuracy")},
                         "after": {k: after[k] for k in ("accuracy", "ci95", "format", "by_difficulty")}
                         | {"pass_8": after.get("pass_k", {}).get("accuracy")},
                         "response_len_mean_over_steps": sum(r["response_len"] for r in train) / max(len(train), 1),
                         "response_len_first_last": [train[0]["response_len"], train[-1]["response_len"]],
                         "format_rate_first_last": [train[0]["format_rate"], train[-1]["format_rate"]],
                         "reflection_first_last": [train[0]["reflection"], train[-1]["reflection"]],
                         "run": {k: run_json[k] for k in ("hardware", "versions", "git_commit") if k in run_json},
                         "plots": summary.get("plots", [])}
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"r1_zero_gpu-{record['date']}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        for b in ("a", "b"):
            if b in record and "before" in record[b]:
                plots = out.parent / f"r1_zero_gpu-{record['date']}-{b}"
                plots.mkdir(exist_ok=True)
                for png in record[b]["plots"]:
                    shutil.copy2(png, plots / Path(png).name)
        print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
