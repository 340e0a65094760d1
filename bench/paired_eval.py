"""Two checkpoints scored by `nanoseek eval` on the same problems, compared problem by problem.

    nanoseek eval --ckpt runs/demo    --tasks countdown --difficulty 3 --n 300 --k 8 --temperature 0.6 \\
        --top-p 0.95 --max-new-tokens 160 --out base.json
    nanoseek eval --ckpt runs/demo-rl ... --out rl.json
    python bench/paired_eval.py base.json rl.json --out bench/results/r1_zero_demo-r1-eval-<date>.json

For greedy pass@1 and for sampled pass@1 (the mean accuracy of the k samples; at temperature 0.6 and top-p
0.95 that is how DeepSeek-R1's evaluations report pass@1), the mean per-problem difference in points with a
95% bootstrap interval over the problems (4,000 resamples, seed 0): the two runs share every problem, so the
paired interval is much narrower than two independent ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_timing import source_revision  # noqa: E402

FIELDS = ("pass@1", "pass@1_ci95", "sampled_acc", "format_rate", "mean_length_tokens")


def paired(before: dict, after: dict, key: str, resamples: int = 4000) -> dict:
    """Mean of after - before over shared problems (points) and its 95% bootstrap interval."""
    a = {r["uid"]: r[key] for r in before["per_problem"]}
    b = {r["uid"]: r[key] for r in after["per_problem"]}
    shared = [u for u in a if u in b]
    if not shared:
        raise SystemExit("paired_eval: the two evaluations share no problem (same --tasks/--difficulty/--n/--seed?)")
    d = [b[u] - a[u] for u in shared]
    rng = random.Random(0)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(resamples))
    return {"points": 100 * sum(d) / len(d), "ci95_points": [100 * means[int(0.025 * resamples)],
                                                             100 * means[int(0.975 * resamples) - 1]],
            "problems": len(shared)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="`nanoseek eval --out` JSON of the first checkpoint")
    p.add_argument("after", help="the same evaluation of the second")
    p.add_argument("--what", default="", help="a sentence on what was compared, kept in the record")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    before, after = (json.loads(Path(f).read_text()) for f in (args.before, args.after))
    if "per_problem" not in before or "per_problem" not in after:
        raise SystemExit("paired_eval: an evaluation has no per-problem results; rerun it with this `nanoseek eval`")
    import torch

    record = {"benchmark": "paired_eval", "date": time.strftime("%Y-%m-%d"), "what": args.what,
              "commit": source_revision(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "before": {k: before.get(k) for k in FIELDS}, "after": {k: after.get(k) for k in FIELDS},
              "paired": {"greedy_pass@1": paired(before, after, "pass@1")}}
    if "sampled_acc" in before["per_problem"][0] and "sampled_acc" in after["per_problem"][0]:
        record["paired"]["sampled_pass@1"] = paired(before, after, "sampled_acc")
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for name, r in record["paired"].items():
        print(f"{name}: {r['points']:+.1f} points [{r['ci95_points'][0]:+.1f}, {r['ci95_points'][1]:+.1f}] "
              f"on {r['problems']} shared problems")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
