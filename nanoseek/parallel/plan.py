"""`nanoseek plan`: memory, pipeline bubble, all-to-all traffic and step time of a layout, on paper.

    nanoseek plan --preset v3-671b --gpus 2048 --gpus-per-node 8 --pp 16 --ep 64 --schedule dualpipev \\
        --seq 4096 --global-batch 15360 --micro-batch 1 --tflops 400 --node-limit 4
    nanoseek plan --preset bench-1b --gpus 8 --ep 8

Estimates (all per GPU; formulas in docs/parallel.md):
    parameters    dense / pp / (dp if sharded), experts / pp / ep / (edp if sharded); layers split evenly
    training state  bytes per parameter: weights + gradients + AdamW moments (sharded by FSDP, or by
                  ZeRO-1 for the optimizer only: --sharding)
    activations   per token and layer from the saved tensors of MLA and the MoE (bf16), times the
                  micro-batches in flight: 1F1B pp, ZBV and DualPipeV pp + 1 (chunks of L / 2pp layers)
    bubble        (arXiv:2401.10241; DeepSeek-V3 Table 2) 1F1B (pp-1)(F+B); ZB1P/ZBV (pp-1)(F+B-2W);
                  DualPipe(V) (pp/2-1)(F&B+B-3W),
                  with F, B (input grad) = F, W = F per chunk and micro-batch, F&B = F + B
    all-to-all    dispatch (FP8 with 1x128 scales, or bf16) + combine (bf16) per token and MoE layer, forward
                  and backward; uniform routing: K (ep-1)/ep copies leave the rank; across nodes, one copy
                  per (token, expert) pair, or with node-limited routing one per node and at most M nodes
    step time     compute / tflops + bubble + the all-to-all time not hidden (DualPipe hides it behind the
                  other micro-batch's compute; 1F1B and ZBV expose it)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from nanoseek.config import PRESETS, ModelConfig


@dataclass
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    pp: int = 1
    ep: int = 1
    schedule: str = "dualpipev"
    seq: int = 4096
    global_batch: int = 0  # sequences per step (0: one micro-batch per dp rank and micro-batch slot)
    micro_batch: int = 1  # sequences per micro-batch
    microbatches: int = 0  # per dp rank and step (0: global_batch / dp / micro_batch)
    tflops: float = 400.0  # achieved dense TFLOP/s per GPU
    nvlink_gbs: float = 160.0  # intranode all-to-all bandwidth per GPU (GB/s; DeepEP on H800: ~153)
    ib_gbs: float = 40.0  # internode all-to-all bandwidth per GPU (GB/s; DeepEP: 40-58)
    node_limit: int = 0  # M: nodes a token's experts may span (0: no limit)
    fp8_dispatch: bool = True
    sharding: str = "fsdp"  # "fsdp" (weights, grads, optimizer over dp) | "zero1" (optimizer) | "none"
    bf16_moments: bool = False

    @property
    def dp(self) -> int:
        return self.gpus // self.pp


def param_counts(cfg: ModelConfig) -> dict[str, float]:
    """Dense (replicated over ep) and routed-expert parameters, whole model incl. MTP; active per token."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q = (D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
         if cfg.q_lora_rank else D * H * cfg.qk_head_dim)
    attn = (q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
            + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D + 2 * D)
    expert = 3 * D * cfg.moe_intermediate_size
    moe_dense = cfg.n_routed_experts * D + cfg.n_shared_experts * expert
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) + cfg.num_nextn_predict_layers
    n_dense = cfg.num_hidden_layers - (n_moe - cfg.num_nextn_predict_layers)
    mtp_extra = cfg.num_nextn_predict_layers * (2 * D * D + 3 * D)
    embed = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2) + D
    dense = (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * attn + n_dense * 3 * D * cfg.intermediate_size \
        + n_moe * moe_dense + mtp_extra + embed
    experts = n_moe * cfg.n_routed_experts * expert
    active = dense - cfg.vocab_size * D + n_moe * cfg.num_experts_per_tok * expert  # the embedding is a lookup
    return {"dense": dense, "experts": experts, "total": dense + experts, "active": active, "moe_layers": n_moe,
            "layers": cfg.num_hidden_layers + cfg.num_nextn_predict_layers}


def activation_bytes_per_token_layer(cfg: ModelConfig) -> float:
    """bf16 tensors an MLA + MoE layer keeps for backward, per token (flash attention: out + log-sum-exp)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    attn = (2 * D + (cfg.q_lora_rank or 0) + H * cfg.qk_head_dim + cfg.kv_lora_rank + cfg.qk_rope_head_dim
            + H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.qk_head_dim + 2 * H * cfg.v_head_dim)
    Im = cfg.moe_intermediate_size
    moe = 2 * D + cfg.num_experts_per_tok * (D + 3 * Im) + cfg.n_shared_experts * 3 * Im + D
    return 2 * (attn + moe) + 4 * cfg.n_routed_experts + 2 * H  # + fp32 router scores, fp32 lse


def bubble(schedule: str, pp: int, F: float, B: float, W: float) -> float:
    """Idle time per rank and step from the zero-bubble and DualPipe papers (F, B, W per chunk and micro-batch)."""
    if pp == 1:
        return 0.0
    if schedule == "1f1b":
        return (pp - 1) * (F + B + W)  # 1F1B's B is the whole backward (input + weight grads)
    if schedule == "zbv":
        return max(0.0, (pp - 1) * (F + B - 2 * W))
    if schedule == "dualpipev":
        return max(0.0, (pp / 2 - 1) * ((F + B) + B - 3 * W))
    raise ValueError(f"schedule {schedule!r} is unknown; use dualpipev, zbv or 1f1b")


def a2a_bytes_per_token_layer(cfg: ModelConfig, c: Cluster) -> dict[str, float]:
    """Bytes one token sends per MoE layer in one forward (dispatch + combine), uniform routing."""
    K, D = cfg.num_experts_per_tok, cfg.hidden_size
    dispatch_b = D * (1 + 4 / 128) if c.fp8_dispatch else 2 * D  # FP8 values + one fp32 scale per 128
    combine_b = 2 * D
    off_rank = K * (c.ep - 1) / c.ep  # expected copies leaving the rank
    nodes = max(1, math.ceil(c.ep / c.gpus_per_node))  # nodes the ep group spans
    per_node = min(c.ep, c.gpus_per_node)
    pairs_remote = K * (c.ep - per_node) / c.ep if nodes > 1 else 0.0  # (token, expert) pairs off the node
    # distinct remote nodes a token reaches: (N-1)(1 - (1-1/N)^K); with node-limited routing at most M - 1
    distinct = (nodes - 1) * (1 - (1 - 1 / nodes) ** K) if nodes > 1 else 0.0
    limited = min(distinct, max(0, c.node_limit - 1)) if c.node_limit else distinct
    return {"copies_off_rank": off_rank, "bytes_off_rank": off_rank * (dispatch_b + combine_b),
            "ib_bytes_per_pair": pairs_remote * (dispatch_b + combine_b),
            "ib_bytes_node_limited": limited * (dispatch_b + combine_b),
            "remote_nodes": distinct, "remote_nodes_limited": limited}


def plan(cfg: ModelConfig, c: Cluster) -> dict[str, float]:
    """All the figures `nanoseek plan` prints, as a dict."""
    if c.gpus % c.pp or c.dp % c.ep:
        raise ValueError(f"gpus {c.gpus} must be pp {c.pp} x dp, and ep {c.ep} must divide dp {c.dp}")
    from nanoseek.train.metrics import flops_per_token

    n = param_counts(cfg)
    dp, edp = c.dp, c.dp // c.ep
    stages_per_rank = 1 if c.schedule == "1f1b" else 2
    # -- memory
    dense_gpu = n["dense"] / c.pp
    expert_gpu = n["experts"] / c.pp / c.ep
    opt_bytes = 4 + (4 if c.bf16_moments else 8)  # fp32 master + moments
    shard_dense, shard_exp = (dp, edp) if c.sharding == "fsdp" else (1, 1)
    opt_dense, opt_exp = (dp, edp) if c.sharding in ("fsdp", "zero1") else (1, 1)
    weights = 4 * (dense_gpu / shard_dense + expert_gpu / shard_exp)
    grads = 4 * (dense_gpu / shard_dense + expert_gpu / shard_exp)
    optim = opt_bytes * (dense_gpu / opt_dense + expert_gpu / opt_exp)
    act_mb_layer = activation_bytes_per_token_layer(cfg) * c.micro_batch * c.seq
    layers_per_chunk = n["layers"] / (c.pp * stages_per_rank)
    in_flight = c.pp if c.schedule == "1f1b" else c.pp + 1
    acts = in_flight * act_mb_layer * layers_per_chunk
    # -- compute
    fpt = flops_per_token(cfg, c.seq, with_mtp=cfg.num_nextn_predict_layers > 0)
    tokens_mb = c.micro_batch * c.seq
    global_batch = c.global_batch or dp * c.micro_batch * max(c.microbatches, stages_per_rank * c.pp)
    m = c.microbatches or max(1, global_batch // (dp * c.micro_batch))
    chunk_flops = fpt * tokens_mb / (c.pp * stages_per_rank)  # forward + backward of one chunk
    F = chunk_flops / 3 / (c.tflops * 1e12)
    B = W = F
    compute = m * stages_per_rank * (F + B + W)
    idle = bubble(c.schedule, c.pp, F, B, W)
    # -- all-to-all per MoE layer and micro-batch (forward and backward)
    a2a = a2a_bytes_per_token_layer(cfg, c)
    nvl = tokens_mb * a2a["bytes_off_rank"] * 2 / (c.nvlink_gbs * 1e9)
    ib_key = "ib_bytes_node_limited" if c.node_limit else "ib_bytes_per_pair"
    ib = tokens_mb * a2a[ib_key] * 2 / (c.ib_gbs * 1e9)
    comm_layer = max(nvl, ib)  # the slower link sets the pace
    moe_layers_rank = n["moe_layers"] / c.pp
    comm = m * moe_layers_rank * comm_layer
    layer_compute = fpt * tokens_mb / n["layers"] / (c.tflops * 1e12)
    exposed = max(0.0, comm - compute) if c.schedule == "dualpipev" else comm
    step = compute + idle + exposed
    return {
        "dp": dp, "edp": edp, "microbatches": m, "global_batch": global_batch,
        "params_total_B": n["total"] / 1e9, "params_active_B": n["active"] / 1e9,
        "params_per_gpu_B": (dense_gpu + expert_gpu) / 1e9,
        "mem_weights_GB": weights / 1e9, "mem_grads_GB": grads / 1e9, "mem_optimizer_GB": optim / 1e9,
        "mem_activations_GB": acts / 1e9, "mem_total_GB": (weights + grads + optim + acts) / 1e9,
        "flops_per_token": fpt, "chunk_F_ms": F * 1e3, "bubble_ms": idle * 1e3, "compute_ms": compute * 1e3,
        "bubble_frac": idle / (compute + idle),
        "a2a_copies_off_rank": a2a["copies_off_rank"], "a2a_bytes_per_token_layer": a2a["bytes_off_rank"],
        "ib_bytes_per_token_layer": a2a["ib_bytes_per_pair"],
        "ib_bytes_per_token_layer_node_limited": a2a["ib_bytes_node_limited"],
        "ib_saved_by_node_limit": 1 - a2a["ib_bytes_node_limited"] / a2a["ib_bytes_per_pair"]
        if a2a["ib_bytes_per_pair"] else 0.0,
        "compute_to_comm": layer_compute / comm_layer if comm_layer else math.inf,
        "comm_ms": comm * 1e3, "exposed_comm_ms": exposed * 1e3, "step_s": step,
        "tokens_per_s_per_gpu": global_batch * c.seq / step / c.gpus,
    }


def format_plan(name: str, c: Cluster, p: dict[str, float]) -> str:
    lines = [f"{name} on {c.gpus} GPUs ({c.gpus_per_node}/node): pp {c.pp} x dp {p['dp']:.0f} (ep {c.ep}, edp "
             f"{p['edp']:.0f}), {c.schedule}, {p['microbatches']:.0f} micro-batches of {c.micro_batch} x {c.seq}",
             f"  parameters   {p['params_total_B']:.1f}B total, {p['params_active_B']:.1f}B active; "
             f"{p['params_per_gpu_B']:.2f}B per GPU before sharding",
             f"  memory/GPU   weights {p['mem_weights_GB']:.1f} GB, grads {p['mem_grads_GB']:.1f} GB, optimizer "
             f"{p['mem_optimizer_GB']:.1f} GB, activations {p['mem_activations_GB']:.1f} GB = "
             f"{p['mem_total_GB']:.1f} GB ({c.sharding})",
             f"  pipeline     chunk F {p['chunk_F_ms']:.1f} ms; bubble {p['bubble_ms']:.0f} ms of "
             f"{p['compute_ms']:.0f} ms compute ({100 * p['bubble_frac']:.1f}%)",
             f"  all-to-all   {p['a2a_copies_off_rank']:.2f} copies/token leave the rank, "
             f"{p['a2a_bytes_per_token_layer'] / 1e3:.1f} kB/token/layer; across nodes "
             f"{p['ib_bytes_per_token_layer'] / 1e3:.1f} kB per pair, "
             f"{p['ib_bytes_per_token_layer_node_limited'] / 1e3:.1f} kB node-limited "
             f"({100 * p['ib_saved_by_node_limit']:.0f}% saved)",
             f"  ratio        MoE-layer compute / all-to-all = {p['compute_to_comm']:.2f}; all-to-all "
             f"{p['comm_ms']:.0f} ms/step, exposed {p['exposed_comm_ms']:.0f} ms",
             f"  step         {p['step_s']:.2f} s for {p['global_batch']:.0f} sequences: "
             f"{p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nanoseek plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v3-671b", choices=sorted(PRESETS))
    defaults = Cluster(gpus=1)
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    a = ap.parse_args(argv)
    c = Cluster(**{k: getattr(a, k) for k in vars(defaults)})
    cfg = ModelConfig(**PRESETS[a.preset])
    try:
        print(format_plan(a.preset, c, plan(cfg, c)))
    except ValueError as e:
        raise SystemExit(f"nanoseek plan: {e}") from None
    return 0
