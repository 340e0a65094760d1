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
gather's backward) and the backward of combine is a dispatch.

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


# ---------------------------------------------------------------------------- the collective
class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """x (sum(in_splits), ...) -> (sum(out_splits), ...); in_splits[r] rows go to rank r."""
    return AllToAll.apply(x, out_splits, in_splits, group)


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


def dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int, group) -> tuple[torch.Tensor, DispatchPlan]:
    """x (T, D), ids (T, K) global expert ids -> rows (R, D) for this rank's experts (expert-major), plan."""
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

    def forward(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        rows, plan = dispatch(x, ids, self.num_experts, self.group)
        y = local_experts(rows, self.w13, self.w2, plan)
        return weighted_sum(combine(y, plan, self.group), gates).to(x.dtype)


def install(model: nn.Module, group: dist.ProcessGroup) -> int:
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
        new = adopt(ExpertParallelExperts, module)
        new.group, new.first = group, rank * El
        with torch.no_grad():
            new.w13 = nn.Parameter(module.w13[rank * El:(rank + 1) * El].clone())
            new.w2 = nn.Parameter(module.w2[rank * El:(rank + 1) * El].clone())
        return new

    return replace_modules(model, swap)


def is_expert_param(name: str) -> bool:
    """Parameters that live on one ep rank only (the routed experts' stacks)."""
    return name.endswith("experts.w13") or name.endswith("experts.w2")
