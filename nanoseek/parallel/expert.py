"""Expert parallelism: the routed experts split over the ep ranks, tokens moved by all-to-all.

Shapes: T local tokens, K experts per token, D hidden, E routed experts, ep ranks, El = E / ep local
experts (rank r holds experts r*El .. (r+1)*El - 1), P = T*K (token, expert) pairs, R pairs received.

    dispatch(x (T, D), ids (T, K)) -> rows (R, D) grouped by local expert, plan
        1. sort the P pairs by expert id: experts are contiguous per rank, so the sort groups by rank too
        2. counts per expert (E,) -> all_to_all_single -> recv (ep, El): pairs from each source rank
        3. the split sizes go to the host (the one sync of a layer), then all_to_all_single of the rows
        4. on the device, permute the received rows from (source, expert) order to expert-major order
    experts:  grouped GEMMs over the local experts' row ranges (offsets = cumsum of recv.sum(0))
    combine(y (R, D), plan) -> (T, K, D): the reverse permutation and all-to-all; the gate-weighted sum
        over the K slots (T, D) = sum_k gate[t, k] * y[t, k] is `weighted_sum`.

Autograd: `AllToAll` is one function whose backward is the all-to-all with the splits swapped, so
the backward of dispatch is a combine (rows flow home and the K copies of a token add up in the
gather's backward) and the backward of combine is a dispatch. Inside DualPipeV's overlapped
forward/backward (`overlap.py`) every row all-to-all starts asynchronously and hands the turn to the
other micro-batch while it runs.

`install(model, ep_group)` swaps every `RoutedExperts` for an `ExpertParallelExperts` holding only its
El experts (`swap.replace_modules` + `adopt`); routing, shared experts and balance statistics stay the
model's own maths on each rank's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import RoutedExperts, autocast_input, expert_counts, stable_argsort
from nanoseek.model.swap import adopt, replace_modules
from nanoseek.parallel.overlap import exchange


# ---------------------------------------------------------------------------- the collective
class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        exchange([(out, x.contiguous())], out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        exchange([(back, grad.contiguous())], in_splits, out_splits, ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """x (sum(in_splits), ...) -> (sum(out_splits), ...); in_splits[r] rows go to rank r."""
    return AllToAll.apply(x, out_splits, in_splits, group)


FP8_MAX = 448.0  # largest float8_e4m3fn


def quantize_rows(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) -> (q (N, D) float8_e4m3fn, scales (N, D / block) fp32), one scale per 1 x block tile:
    x ~= q * scale (the V3 recipe's activation tiles)."""
    N, D = x.shape
    if D % block:
        raise ValueError(f"FP8 dispatch needs the hidden size ({D}) to be a multiple of its {block}-wide tiles")
    tiles = x.float().view(N, D // block, block)
    scales = tiles.abs().amax(-1).clamp_min(1e-12) / FP8_MAX  # (N, D / block)
    q = (tiles / scales[..., None]).to(torch.float8_e4m3fn).view(N, D)
    return q, scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N, D = q.shape
    return (q.float().view(N, scales.shape[1], -1) * scales[..., None]).view(N, D).to(dtype)


class AllToAllFP8(torch.autograd.Function):
    """Dispatch in FP8: quantize the rows in 1 x 128 tiles, send values (1 byte) and scales, dequantize on
    arrival. Backward (a combine) sends the gradients back unquantized; the rounding is straight-through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, block: int) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        q, scales = quantize_rows(x, block)
        q_out = torch.empty((sum(out_splits), x.shape[1]), dtype=torch.uint8, device=x.device)
        s_out = scales.new_empty((sum(out_splits), scales.shape[1]))
        exchange([(q_out, q.view(torch.uint8)), (s_out, scales)], out_splits, in_splits, group)
        return dequantize_rows(q_out.view(torch.float8_e4m3fn), s_out, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        exchange([(back, grad.contiguous())], in_splits, out_splits, ctx.group)
        return back, None, None, None, None


# ---------------------------------------------------------------------------- dispatch and combine
@dataclass
class DispatchPlan:
    """What combine needs to send each row home, and the local experts' row ranges."""

    order: torch.Tensor  # (P,) sorted position -> pair index (t*K + k)
    in_splits: list[int]  # (ep,) pairs sent to each rank
    out_splits: list[int]  # (ep,) pairs received from each rank
    local_order: torch.Tensor  # (R,) expert-major row -> received row
    offsets: torch.Tensor  # (El,) int32 end row of each local expert (for torch._grouped_mm)
    tokens_per_expert: torch.Tensor  # (El,) rows per local expert
    shape: tuple[int, int]  # (T, K)


def dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int, group,
             fp8_block: int = 0) -> tuple[torch.Tensor, DispatchPlan]:
    """x (T, D), ids (T, K) global expert ids -> rows (R, D) for this rank's experts (expert-major), plan.

    fp8_block > 0: the rows travel in FP8 with one scale per 1 x fp8_block tile (128 in V3)."""
    ep = dist.get_world_size(group)
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts do not split over {ep} expert-parallel ranks")
    El = num_experts // ep
    T, K = ids.shape
    flat = ids.flatten()  # (P,)
    order = stable_argsort(flat, num_experts)  # (P,) grouped by expert, hence by destination rank
    counts = expert_counts(flat, num_experts)  # (E,) pairs per expert
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)  # (ep * El,): from rank s, its pairs for my experts
    recv = recv.view(ep, El)
    splits = torch.cat([counts.view(ep, El).sum(1), recv.sum(1)]).tolist()  # the host sync
    in_splits, out_splits = splits[:ep], splits[ep:]
    if fp8_block:
        rows = AllToAllFP8.apply(x[order // K], out_splits, in_splits, group, fp8_block)
    else:
        rows = all_to_all(x[order // K], out_splits, in_splits, group)  # (R, D) ordered (source, expert)
    R = rows.shape[0]
    expert_of_row = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep), recv.flatten(),
                                            output_size=R)  # (R,)
    local_order = stable_argsort(expert_of_row, El)
    per_expert = recv.sum(0)  # (El,)
    plan = DispatchPlan(order, in_splits, out_splits, local_order, per_expert.cumsum(0).to(torch.int32),
                        per_expert, (T, K))
    return rows[local_order], plan


def combine(y: torch.Tensor, plan: DispatchPlan, group) -> torch.Tensor:
    """y (R, D) expert outputs in dispatch's row order -> (T, K, D): each pair's output at its slot."""
    T, K = plan.shape
    received = torch.empty_like(y).index_copy(0, plan.local_order, y)  # back to (source, expert) order
    home = all_to_all(received, plan.in_splits, plan.out_splits, group)  # (P, D) in sorted pair order
    slots = torch.empty_like(home).index_copy(0, plan.order, home)  # (P, D) in pair order t*K + k
    return slots.view(T, K, -1)


def weighted_sum(slots: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """slots (T, K, D), gates (T, K) -> (T, D) = sum_k gates[t, k] * slots[t, k] (as RoutedExperts does)."""
    return torch.bmm(gates.to(slots.dtype).unsqueeze(1), slots).squeeze(1)


# ---------------------------------------------------------------------------- the local experts
def local_experts(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """rows (R, D) expert-major -> (R, D): grouped GEMMs where supported, else one SwiGLU per expert."""
    width = w2.shape[-1]
    if RoutedExperts.grouped_mm_ok(None, rows) and rows.shape[0] > 0:  # type: ignore[arg-type]
        h = torch._grouped_mm(rows, w13.transpose(1, 2).to(rows.dtype), offs=plan.offsets)  # (R, 2I)
        gate, up = h.split(width, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2).to(rows.dtype), offs=plan.offsets)
    return local_experts_looped(rows, w13, w2, plan.tokens_per_expert.tolist())


def local_experts_looped(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Reference: plain SwiGLU per local expert over its contiguous row range."""
    width, outs = w2.shape[-1], []
    for e, chunk in enumerate(rows.split(sizes)):
        gate, up = F.linear(chunk, w13[e].to(rows.dtype)).split(width, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w2[e].to(rows.dtype)))
    return torch.cat(outs) if outs else rows.new_zeros(rows.shape)


class ExpertParallelExperts(RoutedExperts):
    """RoutedExperts holding experts [first, first + El) of this ep rank; same forward signature.

    forward(x (T, D), ids (T, K) global ids, gates (T, K)) -> (T, D), the same sum as the reference but
    with every pair computed on the rank that owns its expert."""

    group: dist.ProcessGroup
    first: int
    fp8_block: int = 0  # > 0: FP8 dispatch with 1 x fp8_block scales (combine stays in the compute dtype)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        rows, plan = dispatch(x, ids, self.num_experts, self.group, self.fp8_block)
        y = local_experts(rows, self.w13, self.w2, plan)
        return weighted_sum(combine(y, plan, self.group), gates).to(x.dtype)


def install(model: nn.Module, group: dist.ProcessGroup, fp8_block: int = 0) -> int:
    """Swap every RoutedExperts of `model` for its expert-parallel shard on `group`. Returns the count.

    Rank r keeps experts r*El..(r+1)*El-1 (copies of those rows of w13 and w2; the full stacks are
    dropped). Parameter names stay `...experts.w13` / `.w2`, with El rows instead of E."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is not RoutedExperts:
            return None
        if module.num_experts % ep:
            raise ValueError(f"{name}: {module.num_experts} experts do not split over ep={ep} ranks; "
                             "choose --parallel.ep among the divisors of n_routed_experts")
        El = module.num_experts // ep
        if fp8_block and module.w13.shape[-1] % fp8_block:
            raise ValueError(f"--parallel.fp8_dispatch needs the hidden size ({module.w13.shape[-1]}) to be a "
                             f"multiple of {fp8_block} (the 1 x {fp8_block} scale tiles); switch it off")
        new = adopt(ExpertParallelExperts, module)
        new.group, new.first, new.fp8_block = group, rank * El, fp8_block
        with torch.no_grad():
            new.w13 = nn.Parameter(module.w13[rank * El:(rank + 1) * El].clone())
            new.w2 = nn.Parameter(module.w2[rank * El:(rank + 1) * El].clone())
        return new

    return replace_modules(model, swap)


def is_expert_param(name: str) -> bool:
    """Parameters that live on one ep rank only (the routed experts' stacks)."""
    return name.endswith("experts.w13") or name.endswith("experts.w2")


# ---------------------------------------------------------------------------- traffic
@torch.no_grad()
def routing_traffic(ids: torch.Tensor, num_experts: int, ep: int, ranks_per_node: int,
                    rank: int = 0) -> dict[str, float]:
    """What a rank's routing (ids (T, K)) sends, per token: (token, expert) pairs leaving the rank and
    the node (what `dispatch` sends: one row per pair), and the distinct remote nodes a token reaches
    (what a per-node deduplicating dispatch would send across nodes).

    Node-limited routing is the model's group-limited routing with one expert group per node of the
    ep group: --model.n_group = ep / ranks_per_node and --model.topk_group = M caps the nodes per token."""
    T = ids.shape[0]
    El = num_experts // ep
    dest = ids // El  # (T, K) destination rank in the ep group
    node = dest // ranks_per_node
    home = rank // ranks_per_node
    n_nodes = max(1, ep // ranks_per_node)
    hit = torch.zeros(T, n_nodes, dtype=torch.bool, device=ids.device).scatter_(1, node, True)  # (T, nodes)
    hit[:, home] = False
    return {"pairs_off_rank": float((dest != rank).sum()) / T, "pairs_off_node": float((node != home).sum()) / T,
            "remote_nodes": float(hit.sum()) / T}
