"""Record the CPU R1-Zero demo (pretraining, then GRPO, then held-out accuracy before/after) in bench/results/.

    python bench/r1_zero_demo.py                         # runs `nanoseek rl --preset demo` on runs/demo
    python bench/r1_zero_demo.py --from-run runs/demo-rl # records a finished `nanoseek rl` run instead

Writes bench/results/r1_zero_demo-<date>.json: minutes and steps of RL, held-out greedy accuracy before and
after with 95% Wilson intervals, overall and by task kind, the change in points, the run record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-run", default=None, help="a finished `nanoseek rl` run directory (holds summary.json)")
    p.add_argument("--out", default=None)
    args, rest = p.parse_known_args()
    if args.from_run:
        run_dir = Path(args.from_run)
    else:
        from nanoseek.rl.config import parse_args
        from nanoseek.rl.trainer import rl_train

        run = parse_args(["--preset", "demo", *rest])
        rl_train(run)
        run_dir = Path(run.train.out_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    before, after = summary["evals"][0], summary["evals"][-1]
    kinds = {k: {"before": before["by_kind"][k], "after": v,
                 "points": 100 * (v["accuracy"] - before["by_kind"][k]["accuracy"])}
             for k, v in after["by_kind"].items()}
    record = {"benchmark": "r1_zero_demo", "date": time.strftime("%Y-%m-%d"), "command": "nanoseek rl --preset demo",
              "hardware": run["hardware"], "versions": run["versions"], "git_commit": run["git_commit"],
              "base_checkpoint": summary["ckpt"], "rl_steps": summary["step"], "rl_minutes": summary["minutes"],
              "eval_seconds": [before["seconds"], after["seconds"]], "n": after["n"],
              "before": {"accuracy": before["accuracy"], "ci95": before["ci95"], "format": before["format"]},
              "after": {"accuracy": after["accuracy"], "ci95": after["ci95"], "format": after["format"]},
              "points": 100 * (after["accuracy"] - before["accuracy"]), "by_kind": kinds, "config": run["config"]}
    out = Path(args.out or Path(__file__).parent / "results" / f"r1_zero_demo-{record['date']}.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"held-out {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
          f"({record['points']:+.1f} points, n={after['n']}) in {summary['step']} RL steps; wrote {out}")


if __name__ == "__main__":
    main()
