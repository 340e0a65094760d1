"""One optimizer step, in pieces that pretraining, RL and SFT share.

A step is two calls: what is learned (a loss function) is separate from how the weights move.

    metrics = accumulate_gradients(model, batches, loss_fn, autocast)       # forward + backward
    metrics |= optimizer_step(model, optimizer, lr=lr, grad_clip=1.0, bias_gamma=1e-3)   # update

A loss function maps one micro-batch to a loss and what to log about it:

    loss_fn(model, batch) -> (loss, metrics)
        loss     scalar tensor: the micro-batch's mean loss, the one to backpropagate
        metrics  {name: scalar tensor}: detached figures to log (averaged over micro-batches)

`pretraining_loss` builds the one for next-token prediction with MTP and the balance loss; an RL or
SFT loss is another function of the same shape (its batch may hold masks or advantages: any tensors
in a tuple, list or dict travel to the model's device).

accumulate_gradients, per micro-batch b of n: move b to the device; loss, m = loss_fn(model, b) under
autocast; (loss / n).backward(); model.record_load() adds the micro-batch's tokens per expert to each
MoE layer's count. Gradients therefore hold the mean over micro-batches.

optimizer_step: set lr; clip the global grad norm; optimizer.step(); zero the gradients; the
aux-loss-free router update b_i += gamma * sign(mean load - load_i) per MoE layer, on the counts
since the last update (summed over data-parallel ranks by `all_reduce` first, when given).

Shapes: B micro-batch rows, S sequence, V vocabulary, D MTP depth, E routed experts, L_moe the main
model's MoE layers (MTP modules' MoE layers come after them in `model.moe_layers`).

    pretraining batch   (input_ids (B, S), targets (B, S))
    pretraining loss    CE(main) + mtp_lambda / D * sum_k CE(MTP_k) + seq_aux_alpha * sum_layers L_bal
    metrics             loss (main CE), mtp_loss (depth 1; only with MTP), balance
    optimizer_step      grad_norm, loads (L_moe, E), maxvio (), maxvio_layers (L_moe,)

Nothing here reads a tensor on the host: every figure is a device tensor, and the caller decides
when to synchronise (the trainer only at log steps). `optimizer_step(..., skip_nonfinite=True)` drops a
step whose grad norm or losses are NaN/Inf, on the device for fused AdamW (see its docstring).

`enable_activation_checkpointing` makes each block recompute its activations in backward
(torch.distributed._composable.checkpoint: forward hooks, so module names, state_dict keys and the
Hugging Face checkpoint names stay as they are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.model.moe import MoE, update_router_bias
from nanoseek.model.transformer import Transformer
from nanoseek.train.fused_head import linear_cross_entropy

Metrics = dict[str, torch.Tensor]
LossFn = Callable[[Transformer, Any], tuple[torch.Tensor, Metrics]]


# ---------------------------------------------------------------------------- losses
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits (B, S, V) against targets (B, S), computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# fused upcast + log-softmax: never materialises the fp32 logits (used when blocks are compiled)
compiled_cross_entropy = torch.compile(cross_entropy, dynamic=False)


def language_losses(model: Transformer, x: torch.Tensor, y: torch.Tensor, loss_fn=cross_entropy,
                    fused_head: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main next-token CE and one CE per MTP depth k (position i predicts token i+k+1). fused_head: each
    head and its CE as one chunked operation (`nanoseek.train.fused_head`; the logits never exist whole)."""
    use_mtp = len(model.mtp) > 0
    out = model(x, mtp_tokens=y if use_mtp else None, heads=not fused_head)
    if fused_head:
        main = linear_cross_entropy(out.hidden, model.head_weight(0), y)
        mtp = [linear_cross_entropy(h[:, :-k], model.head_weight(k), y[:, k:])
               for k, h in enumerate(out.mtp_hidden, start=1)]
        return main, mtp
    main = loss_fn(out.logits, y)
    mtp = [loss_fn(logits[:, :-k], y[:, k:]) for k, logits in enumerate(out.mtp_logits, start=1)]
    return main, mtp


def pretraining_loss(mtp_lambda: float, seq_aux_alpha: float, ce=cross_entropy, fused_head: bool = False) -> LossFn:
    """The pretraining loss of (input_ids, targets) (B, S) micro-batches:
    CE(main) + mtp_lambda / D * sum_k CE(MTP_k) + seq_aux_alpha * model.balance_loss().

    `ce(logits (B, S, V), targets (B, S))` is the per-token loss (`compiled_cross_entropy` with compiled
    blocks); `fused_head` replaces the heads and `ce` by `linear_cross_entropy`. Metrics: loss (main CE),
    mtp_loss (depth 1, only when the model has MTP), balance.
    """

    def loss_fn(model: Transformer, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        x, y = batch
        main, mtp = language_losses(model, x, y, ce, fused_head)
        balance = model.balance_loss()
        loss = main + seq_aux_alpha * balance
        metrics = {"loss": main.detach()}
        if mtp:
            loss = loss + mtp_lambda / len(mtp) * torch.stack(mtp).sum()
            metrics["mtp_loss"] = mtp[0].detach()
        metrics["balance"] = balance.detach()
        return loss, metrics

    return loss_fn


# ---------------------------------------------------------------------------- the step
def clip_grad_norm(parameters, max_norm: float, held: dict | None = None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm), scaling each dtype's gradients in one foreach kernel.

    torch's version multiplies every gradient by an fp32 coefficient; `_foreach_mul_` takes its multi-tensor
    fast route only when the coefficient has the tensors' dtype, so bf16 gradients fell back to one slow
    broadcast kernel per parameter (169 kernels, 5.3 ms of a 96 ms `bench-1b` step with bf16 weights on the
    H100, `bench/results/train_throughput-2026-12-06-h100-levers-faf43f3-profile.json`). Here the coefficient
    min(1, max_norm / (norm + 1e-6)) is cast to each group's dtype first: fp32 gradients are scaled exactly
    as torch scales them; bf16 ones by the coefficient rounded to bf16 (exactly 1 when nothing is clipped).
    `held` {parameter: gradient}: gradients held outside `.grad` (an optimizer's fp32 accumulation buffers),
    taken in the parameter's place. Returns the total norm before clipping (a device tensor; no host sync)."""
    grads = gradients(parameters, held)
    norm = torch.nn.utils.get_total_norm(grads)
    if grads:
        scale_by_dtype(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def gradients(parameters, held: dict | None = None) -> list[torch.Tensor]:
    """Each parameter's gradient in parameter order: its held buffer if `held` has one, else `.grad` (if any)."""
    held = held or {}
    return [g for g in (held.get(p, p.grad) for p in parameters) if g is not None]


def scale_by_dtype(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """tensors *= coef in place, one `_foreach_mul_` per (device, dtype) with coef cast to it (the fast route)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, dtype), group in groups.items():
        torch._foreach_mul_(group, coef.to(device=device, dtype=dtype))


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch's tensors (in tuples, lists and dicts, nested) on device, copied without a sync."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def accumulate_gradients(model: Transformer, batches: Sequence[Any], loss_fn: LossFn,
                         autocast: contextlib.AbstractContextManager) -> Metrics:
    """Forward and backward of each micro-batch; gradients add up to the mean over micro-batches.

    Runs `loss_fn(model, batch)` under `autocast`, backpropagates loss / len(batches) and records
    each MoE layer's expert load. Returns the metrics averaged over the micro-batches (device tensors).
    """
    if not batches:
        raise ValueError("accumulate_gradients: no micro-batches")
    device = next(model.parameters()).device
    n = len(batches)
    sums: Metrics = {}
    for batch in batches:
        batch = to_device(batch, device)
        with autocast:
            loss, metrics = loss_fn(model, batch)
        (loss / n).backward()
        model.record_load()
        for name, value in metrics.items():
            if name not in sums:
                sums[name] = torch.zeros((), device=device)
            sums[name] += value.detach() / n
    return sums


def optimizer_step(model: Transformer, optimizer: torch.optim.Optimizer, *, lr: float, grad_clip: float,
                   bias_gamma: float, all_reduce: Callable[[torch.Tensor], None] | None = None,
                   skip_nonfinite: bool = False, also_finite: Sequence[torch.Tensor] = (),
                   clip: Callable[[float], torch.Tensor] | None = None) -> Metrics:
    """Clip, step, zero the gradients, then the router-bias update of every MoE layer.

    grad_clip <= 0: no clipping (grad_norm is still reported). `all_reduce(loads)` (optional) sums the
    (layers, E) expert counts in place over data-parallel ranks before the bias moves. Returns device
    tensors: grad_norm (before clipping), loads (L_moe, E) of the main model's MoE layers as the
    update used them, maxvio (their largest MaxVio) and maxvio_layers (L_moe,).

    skip_nonfinite: a step whose grad norm (or any tensor in `also_finite`, e.g. the losses) is NaN/Inf
    changes nothing: no weight, moment, step count or router bias moves (the step's expert counts are
    dropped). The check stays on the device where the optimizer takes torch's `found_inf` (fused
    AdamW; the trainer's optimizer on CUDA); other optimizers read the flag on the host (free on the
    CPU). Also returns `finite` (bool device tensor: the step was applied).

    `clip(grad_clip) -> norm` (optional) replaces the local clip: parallel training passes one that
    takes the norm over every rank's gradient shards (`nanoseek.parallel.data.clip_gradients`).
    """
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    held = optimizer.held_gradients() if hasattr(optimizer, "held_gradients") else None  # master weights' sums
    if clip is not None:  # parallel: the global norm over all ranks' shards (nanoseek/parallel/data.py)
        grad_norm = clip(grad_clip)
    elif grad_clip > 0:
        grad_norm = clip_grad_norm(model.parameters(), grad_clip, held)
    else:
        grad_norm = torch.nn.utils.get_total_norm(gradients(model.parameters(), held))
    out = {"grad_norm": grad_norm}
    if skip_nonfinite:
        finite = torch.stack([torch.isfinite(t.detach().float()).all() for t in (grad_norm, *also_finite)]).all()
        out["finite"] = finite
        if getattr(optimizer, "_step_supports_amp_scaling", False):  # skips on the device, exactly
            optimizer.found_inf = (~finite).float()
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif bool(finite):  # a host sync: only for optimizers without found_inf (free on the CPU)
            optimizer.step()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    n_main = sum(isinstance(m, MoE) for m in model.layers.modules())  # first in model.moe_layers
    counted: list[torch.Tensor] = []

    def reduce(loads: torch.Tensor) -> None:  # (all MoE layers, E), a fresh stack of the counts
        if all_reduce is not None:
            all_reduce(loads)
        if skip_nonfinite:  # zero counts: sign(0 - 0) = 0, no bias moves on a skipped step
            loads.mul_(out["finite"])
        counted.append(loads)

    maxvio = update_router_bias(model.moe_layers, bias_gamma, reduce)
    if n_main:
        out["loads"] = counted[0][:n_main]
    out["maxvio"] = maxvio[:n_main].max() if n_main else torch.zeros((), device=device)
    out["maxvio_layers"] = maxvio[:n_main]
    return out


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
               *, lr: float, autocast: contextlib.AbstractContextManager, grad_clip: float, mtp_lambda: float,
               seq_aux_alpha: float, bias_gamma: float, loss_fn=cross_entropy, fused_head: bool = False) -> Metrics:
    """One pretraining step over micro-batches [(input_ids, targets) (B, S)]; no host syncs.

    `loss_fn` is the per-token CE, `fused_head` the chunked head + CE instead (see `pretraining_loss`).
    Returns device tensors: loss (main CE), mtp_loss (depth 1), balance, grad_norm, loads (L_moe, E), maxvio
    and maxvio_layers.
    """
    loss = pretraining_loss(mtp_lambda, seq_aux_alpha, loss_fn, fused_head)
    metrics = accumulate_gradients(model, batches, loss, autocast)
    return metrics | optimizer_step(model, optimizer, lr=lr, grad_clip=grad_clip, bias_gamma=bias_gamma)


def compile_blocks(model: Transformer, mode: str | None = None) -> None:
    """torch.compile each block (main layers and MTP modules) in place: the training commands' and benches'
    compiled setting. Names and state_dict keys are unchanged; a new input shape recompiles a block (the
    second one with dynamic shapes). mode: torch.compile's (None: the default; "reduce-overhead" replays each
    block's forward and backward as CUDA graphs, whose caller marks each step with
    `torch.compiler.cudagraph_mark_step_begin()`)."""
    for block in [*model.layers.values(), *model.mtp]:
        block.compile(mode=mode)


# ---------------------------------------------------------------------------- memory
def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations (main layers and MTP modules) in backward.

    PyTorch's composable checkpoint (non-reentrant) hooks each block's forward: no wrapper module, so
    names, state_dict keys and checkpoints are unchanged, and `block.compile()` afterwards compiles the
    hooked call. Recomputation rewrites each MoE layer's `last_load` with the same counts (not added
    twice). Calling it again leaves checkpointed blocks as they are.
    """
    from torch.distributed._composable import checkpoint

    for block in [*model.layers.values(), *model.mtp]:
        if checkpoint.state(block) is None:
            checkpoint(block)
