"""Data parallelism: the global batch split over dp ranks, gradients averaged, one optimizer step.

The batch settings mean the same at every world size: one optimizer step sees batch_size x grad_accum
sequences in total. Each micro-batch of batch_size rows is split into dp equal parts, rank d taking
rows [d * b, (d + 1) * b) with b = batch_size / dp. Every loss is a mean over equally sized parts, so
the mean of the ranks' gradients is the single-process gradient of the whole batch.

Gradient reduction, two ways that give the same numbers:
    fsdp (`shard`)    FSDP2 `fully_shard` per block and on the root, the routed experts on their own
                      mesh (edp); reduce-scatter in fp32, compute in bf16 on CUDA
    replicate         an all-reduce of every gradient after backward (`sync_gradients`): the slow,
                      obviously right reference and the path without FSDP
Dense parameters average over dp. An expert's gradient already sums its ep ranks' tokens (the
all-to-all brought them), so it sums over edp and divides by dp.

`optimizer_step` clips by the global gradient norm (every rank's shards, counted once), then calls
the shared `nanoseek.train.step.optimizer_step` with its all-reduce hook: the router-load counts are
summed over the dp ranks (all ranks that see different tokens), so every rank moves the bias alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nanoseek.parallel.expert import is_expert_param
from nanoseek.parallel.mesh import Mesh
from nanoseek.train import step as train_step


# ---------------------------------------------------------------------------- the batch
def split_rows(batch: Any, index: int, parts: int) -> Any:
    """Rows [index * b, (index + 1) * b) of every tensor in the batch (tuples, lists, dicts), b = rows / parts."""
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % parts:
            raise ValueError(f"a micro-batch of {batch.shape[0]} sequences does not split over {parts} "
                             f"data-parallel ranks; make --train.batch_size a multiple of {parts}")
        b = batch.shape[0] // parts
        return batch[index * b:(index + 1) * b]
    if isinstance(batch, (tuple, list)):
        return type(batch)(split_rows(x, index, parts) for x in batch)
    if isinstance(batch, dict):
        return {k: split_rows(v, index, parts) for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------------------- FSDP2
def shard(model: nn.Module, mesh: Mesh, *, bf16: bool, reshard_after_forward: bool = True,
          ignored_params: set[nn.Parameter] | None = None) -> nn.Module:
    """FSDP2: each block (and MTP layer) a unit on the dp mesh, its routed experts a unit on the edp mesh.

    bf16: parameters gathered in bf16 for compute, gradients reduced in fp32 (MixedPrecisionPolicy).
    FSDP averages expert gradients over edp; they must be divided by dp (their ep ranks' tokens are
    already summed in), so `sync_gradients` scales them by 1 / ep afterwards (FSDP's own divide factor
    would need PREMUL_SUM, which gloo lacks).
    The routers compute in fp32 (their own unit, as the checkpoints keep them). The MTP layers' merge
    and head norm run outside their forward, so they belong to the root unit (their experts do not).
    Buffers (router bias, load counts) stay whole on every rank. `ignored_params` stay whole, their
    gradients all-reduced by `sync_gradients` (the embedding that a rank's first and last pipeline
    stages share: a parameter belongs to one FSDP root only)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    dp_mesh, edp_mesh = mesh.sub("dp"), mesh.sub("edp")
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    blocks = list(getattr(model, "layers", {}).values())
    mtp = list(getattr(model, "mtp", []))  # their merge and head norm run outside forward: root-managed
    for block in [*blocks, *mtp]:
        mlp = getattr(block, "mlp", None)
        if hasattr(mlp, "experts"):
            fully_shard(mlp.experts, mesh=edp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
            fully_shard(mlp.gate, mesh=dp_mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        if block in blocks:
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=ignored_params)
    return model


# ---------------------------------------------------------------------------- replicate
@torch.no_grad()
def sync_gradients(model: nn.Module, mesh: Mesh) -> None:
    """All-reduce the gradients FSDP does not hold: mean over the ranks that saw different tokens (dp
    for dense parameters; edp, divided by dp, for the expert shards); FSDP's expert gradients / ep."""
    lo = mesh.layout
    for name, p in model.named_parameters():
        if p.grad is not None and isinstance(p, DTensor) and lo.ep > 1 and is_expert_param(name):
            p.grad.to_local().div_(lo.ep)  # FSDP averaged over edp; the mean is over dp = edp * ep
        if p.grad is None or isinstance(p, DTensor):
            continue
        expert = is_expert_param(name) and lo.ep > 1
        if (lo.edp if expert else lo.dp) > 1:
            dist.all_reduce(p.grad, group=mesh.group("edp" if expert else "dp"))
        if lo.dp > 1:
            p.grad.div_(lo.dp)


# ---------------------------------------------------------------------------- the step
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def grad_norm(model: nn.Module, mesh: Mesh, skip: frozenset[str] = frozenset()) -> torch.Tensor:
    """The global L2 norm of all gradients: each rank's share, every distinct shard counted once.

    A plain (unsharded) parameter has copies on the ranks that replicate it (dp ranks, or edp for an
    expert shard); its square is divided by that count before the sum over all ranks. `skip`: names of
    copies counted on another rank (1F1B's second embedding). One fused norm per replication count."""
    lo = mesh.layout
    groups: dict[int, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is None or name in skip:
            continue
        copies = 1 if isinstance(p, DTensor) else (lo.edp if is_expert_param(name) and lo.ep > 1 else lo.dp)
        groups.setdefault(copies, []).append(_local(p.grad))
    total = torch.zeros((), device=mesh.device, dtype=torch.float32)
    for copies, grads in groups.items():
        norms = torch.stack(torch._foreach_norm(grads)).float()  # (n,)
        total += norms.pow(2).sum() / copies
    if lo.world > 1:
        dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_gradients(model: nn.Module, mesh: Mesh, max_norm: float, skip: frozenset[str] = frozenset()) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / global norm); returns the norm before clipping."""
    norm = grad_norm(model, mesh, skip)
    if max_norm > 0:
        grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
        train_step.scale_by_dtype(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def load_all_reduce(mesh: Mesh) -> Callable[[torch.Tensor], None] | None:
    """The router-load hook: sum the (layers, E) counts over the dp ranks (None when dp = 1)."""
    if mesh.layout.dp == 1:
        return None
    group = mesh.group("dp")
    return lambda loads: dist.all_reduce(loads, group=group)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh, *, lr: float, grad_clip: float,
                   bias_gamma: float, skip: frozenset[str] = frozenset(),
                   skip_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """The shared optimizer step with two hooks: the global-norm clip and the router-load all-reduce.
    skip_nonfinite: a step whose global grad norm is NaN/Inf changes nothing, on every rank alike."""
    return train_step.optimizer_step(model, optimizer, lr=lr, grad_clip=grad_clip, bias_gamma=bias_gamma,
                                     skip_nonfinite=skip_nonfinite,
                                     all_reduce=load_all_reduce(mesh),
                                     clip=lambda max_norm: clip_gradients(model, mesh, max_norm, skip))
