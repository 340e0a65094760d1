"""Observability: model FLOPs and MFU, JSONL + TensorBoard metrics, and the end-of-run plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nanoseek.config import ModelConfig

H100_BF16_PEAK = 989e12  # dense BF16 datasheet peak of H100/H200 SXM, the MFU denominator peers quote


def active_matmul_params(cfg: ModelConfig, with_mtp: bool) -> int:
    """Weights a token passes through in matmuls (attention, dense/shared/top-k experts, router,
    lm_head, MTP modules when trained); the embedding lookup is not a matmul."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q = D * H * cfg.qk_head_dim if cfg.q_lora_rank is None else \
        D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    attn = (q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D)
    dense = 3 * D * cfg.intermediate_size
    moe = 3 * D * cfg.moe_intermediate_size * (cfg.n_shared_experts + cfg.num_experts_per_tok) \
        + D * cfg.n_routed_experts
    per_layer = [attn + (moe if cfg.is_moe_layer(i) else dense) for i in range(cfg.num_hidden_layers)]
    total = sum(per_layer) + D * cfg.vocab_size
    if with_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            layer = cfg.num_hidden_layers + k
            total += 2 * D * D + attn + (moe if cfg.is_moe_layer(layer) else dense) + D * cfg.vocab_size
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool) -> float:
    """Training FLOPs per token: 6 N_active + 3 L H (qk_head_dim + v_head_dim) S (causal attention)."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    attention = 3 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6 * active_matmul_params(cfg, with_mtp) + attention


class MetricsLogger:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None):
        """purge_step: a resumed run's first step; TensorBoard drops the interrupted run's events from
        there on (metrics.jsonl is cut by `nanoseek.train.resume.truncate_metrics`)."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)
            except ImportError:  # tensorboard is a declared dependency; tolerate stripped installs
                self.writer = None

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def step_metrics(out: dict[str, Any], *, steps: int, elapsed: float, tokens: float, lr: float,
                 flops_per_tok: float, device: Any, skipped_steps: int) -> dict[str, Any]:
    """The dense per-interval record every training loop logs: the step's scalars from the split training
    step (`out`), the router's per-layer max violation, lr, tokens/s over the interval (`tokens` trained in
    its `steps` steps), seconds per step, MFU and peak memory (GPU allocator, or the process's RSS on CPU)."""
    import resource

    import torch

    metrics = {k: float(v) for k, v in out.items() if v.dim() == 0 and k != "finite"}
    metrics["maxvio_layers"] = [round(v, 4) for v in out["maxvio_layers"].tolist()]
    tok_s = tokens / elapsed
    metrics.update(lr=lr, tok_s=tok_s, step_s=elapsed / steps, skipped_steps=int(skipped_steps))
    if device.type == "cuda":
        metrics["mfu"] = tok_s * flops_per_tok / H100_BF16_PEAK
        metrics["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        metrics["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: str | Path, load_history: list[tuple[int, np.ndarray]], out_dir: str | Path) -> list[Path]:
    """loss.png (train/validation/MTP), lr.png, expert_load.png (layers x experts over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if any("mtp_loss" in r for r in train):
        ax.plot([r["step"] for r in train if "mtp_loss" in r], [r["mtp_loss"] for r in train if "mtp_loss" in r],
                label="train MTP (depth 1)", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token, log scale)", title="loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    ax.grid(alpha=0.3)
    paths.append(out_dir / "lr.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    if load_history:
        steps = [s for s, _ in load_history]
        loads = np.stack([lo for _, lo in load_history])  # (time, layers, experts), fraction of tokens
        n_layers = loads.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.6 * n_layers + 0.6), squeeze=False, sharex=True)
        for i in range(n_layers):
            ax = axes[i, 0]
            im = ax.imshow(loads[:, i].T, aspect="auto", cmap="viridis", interpolation="nearest",
                           extent=(steps[0], steps[-1], loads.shape[2] - 0.5, -0.5))
            ax.set_ylabel(f"MoE {i}\nexpert")
            fig.colorbar(im, ax=ax, pad=0.01, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load per MoE layer over training (1 = perfectly balanced)")
        paths.append(out_dir / "expert_load.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths
