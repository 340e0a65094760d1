"""Pipeline parallelism on torch.distributed.pipelining: stages cut from the layer ModuleDict.

Shapes: B rows of this rank's batch, S sequence, D hidden, M micro-batches (B/M rows each).

Placement. The main layers are cut into n_stages contiguous runs (`stage_layers`). DualPipeV and ZBV
use the V placement: pp ranks, 2 * pp stages, rank r holds stages r and 2*pp - 1 - r, so rank 0 holds
the first stage (embedding) and the last (final norm, head, MTP modules, loss) and the embedding that
the MTP modules share lives once. 1F1B: one stage per rank; the last rank keeps its own copy of
the embedding for the MTP modules, and the two copies' gradients are summed (`tie_embeddings`).

    stage 0         (input_ids; targets) -> embed -> its layers -> h          (B, S, D)
    stage i         (h; targets) -> its layers -> h
    last stage      (h; targets) -> its layers -> norm -> head -> CE + MTP CEs -> loss (1,)

Targets travel as a keyword argument, which the schedule hands to every stage (chunked like the
inputs). Each rank's model is pruned in place to what its stages hold, so `model.parameters()` is
this rank's share and the optimizer and the router-bias update see only it.

Balance loss and load counts: a stage backpropagates only what reaches its output, so a forward hook
on each MoE layer attaches alpha * L_bal to the layer's output (`AttachAux`: identity forward, the
aux gradient 1 in backward, the trick Megatron uses) and adds the layer's expert counts to
`load_since_update` (record_load's job, per micro-batch).

The schedule's OVERLAP_F_B actions (DualPipeV) run through `overlap.make_overlap_f_b`: the forward and
the backward in two threads taking turns at each all-to-all, so one micro-batch's all-to-all runs while
the other computes (`overlap=False`: one after the other, as the stock runtime does).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    OVERLAP_F_B,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleZBVZeroBubble,
)

from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer
from nanoseek.parallel.mesh import Mesh
from nanoseek.parallel.overlap import make_overlap_f_b
from nanoseek.train.step import cross_entropy

SCHEDULE_CLASSES = {"dualpipev": ScheduleDualPipeV, "zbv": ScheduleZBVZeroBubble, "1f1b": Schedule1F1B}


def stage_layers(num_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer runs, sizes differing by at most one (the extra layers go to the middle stages,
    since the first and last stages also carry the embedding and the head)."""
    if num_layers < n_stages:
        raise ValueError(f"{n_stages} pipeline stages need at least {n_stages} layers, the model has {num_layers}")
    base, extra = divmod(num_layers, n_stages)
    middle_first = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))
    sizes = [base + (s in middle_first[:extra]) for s in range(n_stages)]
    runs, start = [], 0
    for n in sizes:
        runs.append(list(range(start, start + n)))
        start += n
    return runs


def stages_of_rank(rank: int, pp: int, schedule: str) -> list[int]:
    """The stage indices a pp rank holds: (r, 2pp-1-r) in V placement, (r,) for 1F1B."""
    return [rank] if schedule == "1f1b" else [rank, 2 * pp - 1 - rank]


def default_microbatches(rows: int, n_stages: int) -> int:
    """The smallest M >= n_stages that divides the rank's rows (the V schedules need M >= stages)."""
    for m in range(n_stages, rows + 1):
        if rows % m == 0:
            return m
    raise ValueError(f"{rows} sequences per data-parallel rank cannot fill {n_stages} pipeline stages: the "
                     f"schedule needs at least {n_stages} micro-batches of >= 1 sequence; raise "
                     "--train.batch_size x --train.grad_accum or lower --parallel.pp")


class AttachAux(torch.autograd.Function):
    """y = x in forward; in backward the scalar `aux` receives gradient 1, so an auxiliary loss computed
    inside a stage reaches its parameters without travelling to the last stage."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_ones(ctx.aux_shape, dtype=torch.float32)


class JoinInput(torch.autograd.Function):
    """y = x, with the stage input h as a second (gradient-free) argument. The zero-bubble weight pass
    (`stage_backward_weight`) finds a stage's weights through graph nodes reachable from the stage
    inputs; the MTP modules' embedding of the targets starts at a weight, not at the input, and would be
    skipped (its gradient lost) without this join."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class Stage(nn.Module):
    """One pipeline stage: a run of the model's blocks, plus the embedding (first) or the head and loss (last).

    The blocks and modules are the model's own (registered here too, so the stage's parameters are the
    model's); the model itself is held outside the module registry for rope and mtp_forward."""

    def __init__(self, model: Transformer, index: int, n_stages: int, layer_ids: list[int]):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.index, self.is_first, self.is_last = index, index == 0, index == n_stages - 1
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        if self.is_first:
            self.embed_tokens = model.embed_tokens
        if self.is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
            if len(model.mtp):
                self.mtp_embed = model.embed_tokens
        self.mtp_lambda = 0.0
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # not the stage's shape inference (a forward under no_grad)
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """x: input_ids (B, S) on the first stage, else h (B, S, D); targets (B, S)."""
        model = self.model
        h = self.embed_tokens(x) if self.is_first else x
        B, S = targets.shape
        pos = torch.arange(S, device=targets.device).expand(B, S)
        cos, sin = model.rope(pos, h.dtype)
        for block in self.layers.values():
            h = block(h, cos, sin)
        if not self.is_last:
            return h
        hidden = self.norm(h)
        main = cross_entropy(self.lm_head(hidden), targets)
        loss = main
        self._add("loss", main)
        mtp = []
        h_prev = hidden
        for k, layer in enumerate(self.mtp, start=1):  # Transformer.mtp_forward, with the embedding tied in
            shifted = F.pad(targets[:, k - 1:], (0, k - 1))  # (B, S)
            embed = self.mtp_embed if layer.embed_tokens is None else layer.embed_tokens
            head = self.lm_head if layer.shared_head.head is None else layer.shared_head.head
            emb = JoinInput.apply(embed(shifted), x)  # (B, S, D)
            h_prev = layer(layer.merge(h_prev, emb), cos, sin)
            logits = head(layer.shared_head.norm(h_prev))
            mtp.append(cross_entropy(logits[:, :-k], targets[:, k:]))
        if mtp:
            loss = loss + self.mtp_lambda / len(mtp) * torch.stack(mtp).sum()
            self._add("mtp_loss", mtp[0])
        return loss.reshape(1)


@dataclass
class Pipeline:
    """This rank's stages, the schedule and how to run one optimizer step's batch through it."""

    mesh: Mesh
    schedule_name: str
    microbatches: int
    parts: list[Stage]
    n_stages: int
    tie_embeddings: bool = False  # 1F1B with MTP: embedding copies on the first and last rank
    alpha: list[float] = field(default_factory=lambda: [0.0])
    act_dtype: torch.dtype = torch.float32  # the residual stream between stages (the embedding's dtype)
    overlap: bool = True  # DualPipeV: run OVERLAP_F_B's forward and backward interleaved (overlap.py)
    overlap_stats: dict = field(default_factory=dict)  # {"actions", "switches"} of the overlapped actions
    _schedules: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model: Transformer, mesh: Mesh, schedule: str, microbatches: int = 0,
              overlap: bool = True) -> Pipeline:
        pp, rank = mesh.layout.pp, mesh.rank_in("pp")
        act_dtype = model.embed_tokens.weight.dtype
        n_stages = pp if schedule == "1f1b" else 2 * pp
        runs = stage_layers(model.config.num_hidden_layers, n_stages)
        mine = stages_of_rank(rank, pp, schedule)
        parts = [Stage(model, s, n_stages, runs[s]) for s in mine]
        keep = {str(i) for s in mine for i in runs[s]}
        for name in list(model.layers.keys()):  # prune the model to this rank's share
            if name not in keep:
                del model.layers[name]
        holds_first = any(p.is_first for p in parts)
        holds_last = any(p.is_last for p in parts)
        if not holds_last:
            model.norm, model.lm_head, model.mtp = None, None, nn.ModuleList()
        if not holds_first and not (holds_last and len(model.mtp)):
            model.embed_tokens = None
        pipe = cls(mesh, schedule, microbatches, parts, n_stages,
                   tie_embeddings=schedule == "1f1b" and model.config.num_nextn_predict_layers > 0,
                   act_dtype=act_dtype, overlap=overlap)
        for part in parts:
            for m in part.modules():
                if isinstance(m, MoE):
                    m.register_forward_hook(pipe._moe_hook(part))
        return pipe

    def _moe_hook(self, part: Stage):
        alpha = self.alpha

        def hook(module: MoE, args, output: torch.Tensor) -> torch.Tensor | None:
            if not (module.training and torch.is_grad_enabled()):
                return None
            if module.last_load is not None:  # record_load, per micro-batch
                module.load_since_update += module.last_load
                module.last_load = None
            if module.balance_loss is None:
                return None
            part._add("balance", module.balance_loss)
            aux, module.balance_loss = module.balance_loss * alpha[0], None
            return AttachAux.apply(output, aux)

        return hook

    def _schedule(self, microbatches: int, rows: int, seq: int):
        """Stages with their shapes given (static metadata: no extra forward to infer them)."""
        group = self.mesh.group("pp")
        device = self.mesh.device
        b, D = rows // microbatches, self.parts[0].model.config.hidden_size
        h = torch.empty(b, seq, D, dtype=self.act_dtype, device="meta", requires_grad=True)

        def stage(p: Stage) -> PipelineStage:
            inputs = torch.empty(b, seq, dtype=torch.long, device="meta") if p.is_first else h
            outputs = torch.empty(1, device="meta", requires_grad=True) if p.is_last else h
            return PipelineStage(p, p.index, self.n_stages, device, input_args=inputs, output_args=outputs,
                                 group=group)

        stages = [stage(p) for p in self.parts]
        cls = SCHEDULE_CLASSES[self.schedule_name]
        # the last stage outputs its loss; / M as accumulate_gradients does. The schedule's own grad scaling
        # (scale_grads) is off: it divides each stage's parameters at that stage's end, twice for the
        # embedding that the first and last stages share.
        loss_fn = lambda out, target: out.sum() / microbatches  # noqa: E731
        if self.schedule_name == "1f1b":
            return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
        sched = cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
        if self.schedule_name == "dualpipev" and self.overlap:
            sched.register_custom_function(OVERLAP_F_B, make_overlap_f_b(device, stats=self.overlap_stats))
        return sched

    def run(self, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast: contextlib.AbstractContextManager,
            *, mtp_lambda: float, seq_aux_alpha: float) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's rows (all micro-batches of the step, concatenated) through
        the schedule; returns loss, mtp_loss, balance averaged over micro-batches (same on every pp rank)."""
        x = torch.cat([b[0] for b in batches]).to(self.mesh.device)  # (B, S)
        y = torch.cat([b[1] for b in batches]).to(self.mesh.device)
        m = self.microbatches or default_microbatches(x.shape[0], self.n_stages)
        if x.shape[0] % m or m < self.n_stages:
            raise ValueError(f"--parallel.microbatches {m} must divide the {x.shape[0]} sequences per data-parallel "
                             f"rank and be at least the {self.n_stages} pipeline stages")
        self.alpha[0] = seq_aux_alpha / m  # the balance loss's weight in the micro-batch loss / M
        for p in self.parts:
            p.mtp_lambda, p.sums = mtp_lambda, {}
        key = (m, tuple(x.shape))
        if key not in self._schedules:  # stages keep buffers sized by the micro-batch shape
            self._schedules[key] = self._schedule(m, *x.shape)
        schedule = self._schedules[key]
        with autocast:
            args = (x,) if any(p.is_first for p in self.parts) else ()
            schedule.step(*args, target=y, targets=y)
        if self.tie_embeddings:
            self._sum_embedding_grads()
        names = ("loss", "mtp_loss", "balance")
        sums = torch.zeros(len(names), device=self.mesh.device)
        for p in self.parts:
            for i, n in enumerate(names):
                if n in p.sums:
                    sums[i] += p.sums[n]
        dist.all_reduce(sums, group=self.mesh.group("pp"))  # loss terms live on one rank, balance on all
        out = {n: sums[i] / m for i, n in enumerate(names)}
        if not self.parts[0].model.config.num_nextn_predict_layers:
            out.pop("mtp_loss")
        return out

    def _sum_embedding_grads(self) -> None:
        """1F1B with MTP: sum the gradients of the embedding copies on the first and last pp ranks."""
        model = self.parts[0].model
        emb = model.embed_tokens
        if emb is not None and emb.weight.grad is not None:
            g = emb.weight.grad
        else:
            g = torch.zeros(model.config.vocab_size, model.config.hidden_size, device=self.mesh.device)
        dist.all_reduce(g, group=self.mesh.group("pp"))
