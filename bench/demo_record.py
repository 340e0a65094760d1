"""Record the embedded demo's outcome (the figures quoted in README.md) in bench/results/.

    python bench/demo_record.py                      # runs `nanoseek train` (the demo) in runs/demo-record
    python bench/demo_record.py --from-run runs/demo # records a finished `make demo` run instead

Writes bench/results/demo-<date>.json: wall time, steps, validation loss against the corpus's
unigram entropy, held-out accuracy per task kind, and the run record (config, git commit,
versions, hardware) that `nanoseek train` keeps next to its checkpoints.
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
    p.add_argument("--from-run", default=None, help="a finished demo run directory (holds summary.json)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.from_run:
        run_dir = Path(args.from_run)
    else:
        from nanoseek.train.config import parse_args
        from nanoseek.train.trainer import train

        run_dir = Path("runs/demo-record")
        train(parse_args(["--train.out_dir", str(run_dir)]))
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise SystemExit(f"{summary_file} not found: pass the out_dir of a finished `nanoseek train` run")
    summary = json.loads(summary_file.read_text())
    run = json.loads((run_dir / "run.json").read_text())
    record = {"benchmark": "demo", "date": time.strftime("%Y-%m-%d"), "command": "make demo (nanoseek train)",
              "hardware": run["hardware"], "versions": run["versions"], "git_commit": run["git_commit"],
              "minutes_training": summary["minutes"], "steps": summary["step"], "val_loss": summary["val_loss"],
              "unigram_entropy": summary["unigram_entropy"], "heldout": summary.get("heldout"),
              "config": run["config"]}
    out = Path(args.out or Path(__file__).parent / "results" / f"demo-{record['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"val loss {record['val_loss']:.4f} (unigram entropy {record['unigram_entropy']:.4f}); "
          f"held-out accuracy {100 * (record['heldout'] or {}).get('accuracy', 0):.1f}%; wrote {out}")


if __name__ == "__main__":
    main()
