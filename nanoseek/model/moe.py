"""DeepSeekMoE: fine-grained routed experts, always-on shared experts, aux-loss-free balancing.

Shapes: T tokens (B*S flattened), D hidden, E routed experts, K experts per token, I expert width.

Router (V3, sigmoid / noaux_tc):
    s = sigmoid(x W_g^T)                       (T, E) fp32
    choice = s + b                             b = e_score_correction_bias, selection only
    group score = sum of the top-2 `choice` in each of n_group groups; keep topk_group groups,
    mask the rest to -inf; top-K experts by `choice`; gates = s at those experts,
    / sum (norm_topk_prob), * routed_scaling_factor.
V2 (softmax): s = softmax(logits); "greedy" top-K, or "group_limited_greedy" (group score = max).

Balancing (trainer-facing, outside autograd): each training forward leaves tokens per expert in
`last_load` (E,); the trainer adds them to `load_since_update` after each micro-batch
(`Transformer.record_load`); `update_router_bias` applies
b_i += gamma * sign(mean(load) - load_i) once per optimizer step (after an optional all-reduce of
the counts across data-parallel ranks). The complementary sequence-wise balance loss is left in
`balance_loss` (unscaled sum_i f_i P_i, averaged over sequences); the trainer multiplies alpha.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.common import MLP


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype when autocast is on: it does not reach _grouped_mm or the Triton kernels."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class Router(nn.Module):
    """Top-K expert selection; weight stays fp32 like the checkpoints' `mlp.gate.weight`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    @property
    def groups(self) -> int:
        """Expert groups that group-limited routing chooses among (1: plain top-K)."""
        return 1 if self.cfg.topk_method == "greedy" else self.cfg.n_group

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> gates (T, K) fp32, expert ids (T, K), scores s (T, E) fp32."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # routing stays fp32 under autocast
            logits = F.linear(x.float(), self.weight.float())  # (T, E)
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach()
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias
        # compiled training: ranks by comparison, which fuse with the scoring into a few kernels (inference
        # keeps torch.topk, or the engine's fused routing kernel: nanoseek/kernels/moe_routing.py)
        select = select_by_rank if torch.compiler.is_compiling() and torch.is_grad_enabled() else select_by_topk
        ids = select(choice, cfg, self.groups)  # (T, K)
        gates = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return gates * cfg.routed_scaling_factor, ids, scores


def select_by_topk(choice: torch.Tensor, cfg: ModelConfig, groups: int) -> torch.Tensor:
    """choice (T, E) -> the K chosen expert ids (T, K), best first (the reference; torch.topk calls)."""
    if groups > 1:
        grouped = choice.view(-1, groups, cfg.n_routed_experts // groups)  # (T, G, E/G)
        if cfg.topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
        else:
            group_score = grouped.amax(dim=-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    return choice.topk(cfg.num_experts_per_tok, dim=-1).indices


def descending_rank(v: torch.Tensor) -> torch.Tensor:
    """v (..., N) -> rank (..., N): how many entries beat each one (larger, or equal at a lower index), so
    rank < k marks a top-k. Comparisons and a sum: no sort, and it fuses under torch.compile."""
    n = v.shape[-1]
    index = torch.arange(n, device=v.device)
    other, this = v.unsqueeze(-2), v.unsqueeze(-1)  # [..., i, j] compares entry j against entry i
    beats = (other > this) | ((other == this) & (index < index[:, None]))
    return beats.sum(dim=-1)


def select_by_rank(choice: torch.Tensor, cfg: ModelConfig, groups: int) -> torch.Tensor:
    """`select_by_topk` without torch.topk, for compiled code: the same experts (ties: the lower index),
    as (T, K) ids in ascending order. Memory O(T E^2) if run eagerly; compiled, the comparisons fuse."""
    T, E, K = choice.shape[0], cfg.n_routed_experts, cfg.num_experts_per_tok
    if groups > 1:
        grouped = choice.view(T, groups, E // groups)  # (T, G, E/G)
        if cfg.topk_method == "noaux_tc":  # sum of the two best in each group
            group_score = torch.where(descending_rank(grouped) < 2, grouped, 0.0).sum(dim=-1)  # (T, G)
        else:
            group_score = grouped.amax(dim=-1)
        keep = descending_rank(group_score) < cfg.topk_group  # (T, G)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    chosen = descending_rank(choice) < K  # (T, E), K per row
    slot = torch.where(chosen, chosen.int().cumsum(dim=-1) - 1, K).clamp(max=K)  # (T, E): 0..K-1 if chosen, K else
    experts = torch.arange(E, device=choice.device).expand(T, E)
    return torch.zeros(T, K + 1, dtype=torch.long, device=choice.device).scatter_(1, slot.long(), experts)[:, :K]


class SortRows(torch.autograd.Function):
    """x (T, D) -> xs (T*K, D), sorted row r = x[order[r] // K]: each token copied to its K sorted rows.

    Backward without atomics: grad_x[t] = sum_k grad_xs[unsort[t*K + k]], a gather and a K-term sum (fp32
    accumulation). Autograd's own backward of the indexing is an index_add of bf16 rows with K collisions
    per token: 9.6 ms of a 96 ms bench-1b step on the H100 (bench/train_throughput.py --profile)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, unsort: torch.Tensor, K: int) -> torch.Tensor:
        ctx.save_for_backward(unsort)
        ctx.K = K
        return x.index_select(0, order // K)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (unsort,) = ctx.saved_tensors
        per_token = grad.index_select(0, unsort).view(-1, ctx.K, grad.shape[-1])  # (T, K, D)
        return per_token.sum(dim=1, dtype=torch.float32).to(grad.dtype), None, None, None


class UnsortRows(torch.autograd.Function):
    """ys (T*K, D) in sorted order -> y (T*K, D) in (token, slot) order: y[j] = ys[unsort[j]]. A permutation,
    so its backward is the inverse gather grad_ys[r] = grad_y[order[r]] (no scatter, no zero fill)."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, order: torch.Tensor, unsort: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return ys.index_select(0, unsort)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked: w13 (E, 2I, D) = [gate ; up], w2 (E, D, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts, self.width = E, I
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))

    def grouped_mm_ok(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm runs bf16 on Hopper+ GPUs and fp32 on the CPU."""
        if not hasattr(torch, "_grouped_mm"):
            return False
        if x.is_cuda:
            return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
        # the CPU kernel takes fp32, but torch.compile's shape rules for _grouped_mm accept bf16 only
        return x.dtype == torch.float32 and not torch.compiler.is_compiling()

    def forward(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x (T, D), ids/gates (T, K) -> sum_k gates[t, k] * expert_{ids[t, k]}(x[t])  (T, D)."""
        x = autocast_input(x)
        if 2 * ids.numel() <= self.num_experts:  # a few tokens (decode): cheaper to fetch their experts
            return self.forward_gathered(x, ids, gates)
        if self.grouped_mm_ok(x):
            return self.forward_grouped(x, ids, gates)
        return self.forward_looped(x, ids, gates)

    def forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Sort the T*K (token, expert) pairs by expert and run two grouped GEMMs; no host sync."""
        T, K = ids.shape
        flat = ids.flatten()  # (T*K,)
        order = stable_argsort(flat, self.num_experts)  # sorted row r holds pair order[r]
        # (E,) end row per expert: the sorted ids' count up to each expert (no atomics, unlike a scatter-add
        # histogram into E bins: 30 us per layer of a batch-32, 512-token prefill on the H200)
        experts = torch.arange(self.num_experts, device=flat.device, dtype=flat.dtype)
        offsets = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        xs = SortRows.apply(x, order, unsort, K)  # (T*K, D) token of each sorted row
        h = torch._grouped_mm(xs, self.w13.transpose(1, 2).to(x.dtype), offs=offsets)  # (T*K, 2I)
        gate, up = h.split(self.width, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2).to(x.dtype), offs=offsets)  # (T*K, D)
        y = UnsortRows.apply(y, order, unsort).view(T, K, -1)  # back to (token, slot) order
        # (T, D) = sum_k gate_k * y_k. Compiled (and in inference) a product and a K-term sum in fp32: one
        # fused kernel with the gather, no (T, K, D) intermediate. Eager training keeps the batched product
        # (T,1,K) x (T,K,D): it saves y in bf16 for backward where the fp32 product would keep an fp32 copy
        # (T tiny mat-vecs: 245 us per layer in a batch-32 prefill on the H200).
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1)
        return (y.float() * gates[..., None]).sum(1).to(x.dtype)

    def forward_gathered(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Gather the weights of each (token, expert) pair and run batched mat-vecs: few kernels and
        no empty expert groups, for decode steps where T*K is below the expert count."""
        T, K = ids.shape
        flat = ids.flatten()  # (T*K,)
        xs = x.repeat_interleave(K, dim=0)[:, :, None]  # (T*K, D, 1)
        h = torch.bmm(self.w13[flat].to(x.dtype), xs)[..., 0]  # (T*K, 2I)
        gate, up = h.split(self.width, dim=-1)
        y = torch.bmm(self.w2[flat].to(x.dtype), (F.silu(gate) * up)[:, :, None])[..., 0]  # (T*K, D)
        return torch.bmm(gates.to(y.dtype).unsqueeze(1), y.view(T, K, -1)).squeeze(1)  # (T, D)

    def forward_looped(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Reference: one plain SwiGLU per expert over the tokens routed to it."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            token, slot = (ids == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.w13[e].to(x.dtype)).split(self.width, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e].to(x.dtype))
            out.index_add_(0, token, y * gates[token, slot, None])
        return out.to(x.dtype)


class MoE(nn.Module):
    """Routed experts + shared experts, with balance statistics for the trainer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        # tokens per expert since the last bias update (training only), and in the last forward
        self.register_buffer("load_since_update", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.last_load: torch.Tensor | None = None
        self.last_ids: torch.Tensor | None = None  # (T, K) expert ids of the last training forward
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) -> routed experts + shared experts (B, S, D)."""
        B, S, D = x.shape
        flat = x.reshape(B * S, D)
        gates, ids, scores = self.gate(flat)
        out = self.experts(flat, ids, gates).view(B, S, D)
        if self.training:  # balance statistics are for the trainer only
            with torch.no_grad():  # recomputation (activation checkpointing) rewrites the same counts
                self.last_load = expert_counts(ids.flatten(), self.cfg.n_routed_experts).float()
                self.last_ids = ids  # for a caller that recounts over some tokens only (RL: not the padding)
            if torch.is_grad_enabled():
                self.balance_loss = sequence_balance_loss(scores.view(B, S, -1), ids.view(B, S, -1))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


@torch.library.custom_op("nanoseek::stable_argsort", mutates_args=())
def stable_argsort(x: torch.Tensor, bound: int) -> torch.Tensor:
    """x.argsort(stable=True) for integers 0 <= x < bound, opaque to torch.compile so that the sort is
    aten's (a radix sort) rather than inductor's generated one-block sort (37 us per layer for just the
    192 ids of a batch-32 decode step, in `decode_profile` results). The keys are sorted in the narrowest
    integer type that holds the bound: a radix sort makes one pass per key byte, so expert ids below 256
    take one pass instead of int64's eight (547 us over the 11 MoE layers of a batch-32, 512-token
    prefill on the H200 with int64 keys)."""
    if bound <= 256:
        x = x.to(torch.uint8)
    elif bound <= 2**15:
        x = x.to(torch.int16)
    return x.argsort(stable=True)


@stable_argsort.register_fake
def _(x: torch.Tensor, bound: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.long)


def expert_counts(ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Occurrences of each expert id (E,), without bincount's host sync on CUDA; with `weights` (like ids),
    their sum per expert instead (0/1 weights count a subset of the entries)."""
    if weights is None:
        weights = torch.ones_like(ids)
    return torch.zeros(num_experts, dtype=weights.dtype, device=ids.device).scatter_add_(0, ids, weights)


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    scores (B, S, E) router affinities s, ids (B, S, K) selected experts.
    f_i = E / (K S) * #tokens of the sequence routed to i;  P_i = mean_t s_{i,t} / sum_j s_{j,t}.
    """
    B, S, E = scores.shape
    K = ids.shape[-1]
    hits = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, ids.reshape(B, S * K), torch.ones(B, S * K, device=scores.device))
    f = hits * E / (K * S)  # (B, E), no gradient
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return (f * p).sum(dim=-1).mean()


@torch.no_grad()
def update_router_bias(moe_layers: list[MoE], gamma: float,
                       all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Aux-loss-free balancing step: b_i += gamma * sign(mean load - load_i) per MoE layer.

    Uses the tokens counted since the last call (`load_since_update`), then resets them.
    `all_reduce` (e.g. `torch.distributed.all_reduce`) sums the counts over data-parallel ranks
    first. Returns each layer's MaxVio over those counts (a tensor: reading it is the caller's sync).
    """
    if not moe_layers:
        return torch.zeros(0)
    loads = torch.stack([m.load_since_update for m in moe_layers])  # (L_moe, E)
    if all_reduce is not None:
        all_reduce(loads)
    maxvio = max_violation(loads)
    # all layers at once (a handful of kernels, not a handful per layer: host time of every step)
    biased = [i for i, m in enumerate(moe_layers) if m.gate.e_score_correction_bias is not None]
    if gamma and biased:
        moves = gamma * torch.sign(loads.mean(dim=-1, keepdim=True) - loads)  # (L_moe, E)
        rows = moves.unbind(0)  # (not moves[biased]: indexing with a Python list copies it to the device, a sync)
        torch._foreach_add_([moe_layers[i].gate.e_score_correction_bias for i in biased], [rows[i] for i in biased])
    torch._foreach_zero_([m.load_since_update for m in moe_layers])
    return maxvio


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean(load) - 1 along the last dim (0 for perfect balance)."""
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.amax(dim=-1) / mean.clamp_min(1e-9) - 1, torch.zeros_like(mean))
