"""End-of-run plots of an RL run from its metrics.jsonl and evals.jsonl (matplotlib, PNG):

    rl_reward.png      reward, accuracy and format rate per step
    rl_length.png      mean and max response length, truncation rate, reflection-marker rate
    rl_entropy_kl.png  policy entropy and k3 KL to the reference
    rl_heldout.png     held-out greedy accuracy by kind/difficulty, first evaluation vs last
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.train.metrics import read_metrics


def plot_rl(out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    train = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "train"]
    paths: list[Path] = []

    def series(ax, keys: list[str], title: str, ylabel: str) -> None:
        for key in keys:
            rows = [r for r in train if key in r and r[key] is not None]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key, lw=1.2)
        ax.set(xlabel="RL step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()

    def save(fig, name: str) -> None:
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)

    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        series(ax, ["reward", "accuracy", "format_rate"], "reward and accuracy (rollouts)", "mean over responses")
        save(fig, "rl_reward.png")
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        series(a1, ["response_len", "response_len_max"], "response length", "tokens")
        series(a2, ["truncated", "reflection"], "truncation and reflection markers", "share of responses")
        save(fig, "rl_length.png")
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        series(a1, ["entropy"], "policy entropy (response tokens)", "nats/token")
        series(a2, ["kl", "clip_low", "clip_high"], "KL to the reference (k3) and clip fractions", "")
        save(fig, "rl_entropy_kl.png")
    evals_file = out_dir / "evals.jsonl"
    evals = [json.loads(line) for line in evals_file.read_text().splitlines()] if evals_file.is_file() else []
    if evals:
        first, last = evals[0], evals[-1]
        keys = list(last["by_difficulty"])
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(keys) + 2), 4))
        xs = range(len(keys))
        for offset, ev, label in ((-0.2, first, f"step {first['step']}"), (0.2, last, f"step {last['step']}")):
            acc = [100 * ev["by_difficulty"].get(k, {"accuracy": 0})["accuracy"] for k in keys]
            ax.bar([x + offset for x in xs], acc, width=0.4, label=label)
        ax.set_xticks(list(xs), keys, rotation=45, ha="right")
        ax.set(ylabel="greedy pass@1 (%)", title="held-out accuracy by kind/difficulty")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        save(fig, "rl_heldout.png")
    return paths
