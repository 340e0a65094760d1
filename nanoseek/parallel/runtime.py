"""The parallel training step: what the trainer calls instead of the single-device pieces.

    par = Parallel.setup(device, pp=P, dp=D, ep=E, schedule="dualpipev", microbatches=M)
    model = par.wrap(model)                              # expert parallelism, FSDP2, pipeline stages
    metrics = par.accumulate_gradients(model, batches, loss_fn, autocast)  # my share of the global batch
    metrics |= par.optimizer_step(model, optimizer, lr=..., grad_clip=..., bias_gamma=...)

`batches` are the global step's micro-batches (batch_size rows each, the same on every rank, as the
single-process trainer reads them); each rank takes its rows (`data.split_rows`). Without a pipeline,
the shared `train.step.accumulate_gradients` runs on those rows; with one, the pipeline schedule
runs all of them as its micro-batches (`pipeline.py`). Metrics come back averaged over the dp ranks
and, with a pipeline, broadcast from the rank holding the loss, so every rank logs the same figures.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.parallel import data as dp_
from nanoseek.parallel import expert as ep_
from nanoseek.parallel.mesh import Layout, Mesh, init_process_group
from nanoseek.train import step as train_step

SCHEDULES = ("dualpipev", "zbv", "1f1b")


@dataclass
class Parallel:
    mesh: Mesh
    schedule: str = "dualpipev"
    microbatches: int = 0  # 0: derived (pipeline.default_microbatches)
    fsdp: bool = True
    bf16: bool = False
    fp8_dispatch: bool = False
    overlap: bool = True  # DualPipeV: overlap one micro-batch's all-to-all with the other's compute
    pipe: Any = None  # pipeline.Pipeline once wrapped with pp > 1

    @classmethod
    def setup(cls, device: torch.device, *, pp: int = 0, dp: int = 0, ep: int = 0, schedule: str = "dualpipev",
              microbatches: int = 0, fsdp: bool = True, bf16: bool = False, timeout_s: float = 600.0,
              fp8_dispatch: bool = False, overlap: bool = True) -> Parallel:
        """Initialise torch.distributed from torchrun's environment (a 1-process group without one)
        and build the mesh."""
        if schedule not in SCHEDULES:
            raise ValueError(f"--parallel.schedule {schedule!r} is unknown; use one of {SCHEDULES}")
        if "RANK" not in os.environ:  # plain `python -m nanoseek train --parallel.enable ...`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            from nanoseek.parallel.launch import free_port

            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if device.type == "cuda" and device.index is None:  # this process's GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        init_process_group(device, timeout_s)
        layout = Layout.resolve(dist.get_world_size(), pp, dp, ep)
        return cls(Mesh.build(layout, device), schedule, microbatches, fsdp, bf16, fp8_dispatch, overlap)

    @property
    def layout(self) -> Layout:
        return self.mesh.layout

    @property
    def is_logger(self) -> bool:
        """The rank that prints and writes the run's files."""
        return dist.get_rank() == 0

    # ------------------------------------------------------------------ wrapping
    def wrap(self, model: nn.Module) -> nn.Module:
        """Expert parallelism, then pipeline stages, then FSDP2 (or gradient all-reduce)."""
        cfg = model.config
        lo = self.layout
        lo.check_model(cfg.n_routed_experts, cfg.num_hidden_layers, 1 if self.schedule == "1f1b" else 2)
        if lo.ep > 1:
            ep_.install(model, self.mesh.group("ep"), fp8_block=128 if self.fp8_dispatch else 0)
        if lo.pp > 1:
            from nanoseek.parallel.pipeline import Pipeline

            self.pipe = Pipeline.build(model, self.mesh, self.schedule, self.microbatches, overlap=self.overlap)
            if self.fsdp and lo.dp > 1:
                shared = {p for part in self.pipe.parts for n, p in part.named_parameters() if "embed" in n}
                for part in self.pipe.parts:  # each stage an FSDP root: the schedule then defers the
                    # gradient reduce-scatter to its last backward (REDUCE_GRAD), after the weight passes.
                    # No reshard after forward (torchtitan's choice with pp too): with the V schedules a
                    # unit resharded between micro-batches loses one micro-batch's gradient (checked)
                    dp_.shard(part, self.mesh, bf16=self.bf16, ignored_params=shared, reshard_after_forward=False)
            return model
        if self.fsdp and lo.dp > 1:
            dp_.shard(model, self.mesh, bf16=self.bf16)
        return model

    # ------------------------------------------------------------------ the step
    def local_batches(self, batches: list[Any]) -> list[Any]:
        d = self.mesh.rank_in("dp")
        return [dp_.split_rows(b, d, self.layout.dp) for b in batches]

    def accumulate_gradients(self, model: nn.Module, batches: list[Any], loss_fn: train_step.LossFn,
                             autocast: contextlib.AbstractContextManager | None = None,
                             *, mtp_lambda: float = 0.0, seq_aux_alpha: float = 0.0) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's rows of every micro-batch; gradients end reduced.

        With a pipeline the loss is built from (mtp_lambda, seq_aux_alpha) on the last stage instead of
        `loss_fn` (the pipeline's stages compute it piece by piece)."""
        autocast = autocast or contextlib.nullcontext()
        local = self.local_batches(batches)
        if self.pipe is not None:
            metrics = self.pipe.run(local, autocast, mtp_lambda=mtp_lambda, seq_aux_alpha=seq_aux_alpha)
        else:
            metrics = train_step.accumulate_gradients(model, local, loss_fn, autocast)
        dp_.sync_gradients(model, self.mesh)  # the parameters FSDP does not hold (all, without FSDP)
        return self.average(metrics)

    def average(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar metrics averaged over the dp ranks (one all-reduce)."""
        if self.layout.dp == 1 or not metrics:
            return metrics
        names = sorted(metrics)
        stacked = torch.stack([metrics[n].float().reshape(()) for n in names])
        dist.all_reduce(stacked, group=self.mesh.group("dp"))
        return {n: v for n, v in zip(names, stacked / self.layout.dp)}

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr: float, grad_clip: float,
                       bias_gamma: float, skip_nonfinite: bool = False) -> dict[str, torch.Tensor]:
        skip = frozenset()
        if self.pipe is not None and self.pipe.tie_embeddings and not any(p.is_first for p in self.pipe.parts):
            skip = frozenset({"embed_tokens.weight"})  # the first rank's copy is the one counted
        return dp_.optimizer_step(model, optimizer, self.mesh, lr=lr, grad_clip=grad_clip, bias_gamma=bias_gamma,
                                  skip=skip, skip_nonfinite=skip_nonfinite)

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (one all-reduce), so that all ranks take the same branch."""
        t = torch.tensor([0 if flag else 1], device=self.mesh.device)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def first(self, fn):
        """fn() on rank 0, then on the others (for work that caches files: data preparation)."""
        if self.is_logger:
            out = fn()
            dist.barrier()
            return out
        dist.barrier()
        return fn()

    def log_dir(self, out_dir):
        """Metrics files: the run directory on rank 0, a subdirectory on the others."""
        from pathlib import Path

        return Path(out_dir) if self.is_logger else Path(out_dir) / "ranks" / f"rank{dist.get_rank()}"

    def save(self, out_dir, step: int, model: nn.Module, optimizer, state: dict, record: dict,
             keep_last: int):
        """A sharded checkpoint, atomic and checksummed like the single-process one: every rank writes its
        shards into one temporary directory; rank 0 adds run.json, the manifest, and renames it into place."""
        import json
        from pathlib import Path

        from nanoseek.parallel import checkpoint as ckpt
        from nanoseek.train.checkpoint import prune_checkpoints, publish_checkpoint

        root = Path(out_dir) / "checkpoints"
        final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp-sharded"
        ckpt.save(tmp, model, optimizer, self.mesh, state)
        if self.is_logger:
            (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
            publish_checkpoint(tmp, final, step, fmt="nanoseek-sharded-checkpoint-1")
            prune_checkpoints(out_dir, final, keep_last)
        dist.barrier()
        return final

    def load(self, path, model: nn.Module, optimizer) -> dict:
        from nanoseek.parallel import checkpoint as ckpt

        return ckpt.load(path, model, optimizer, self.mesh)

    def export(self, model: nn.Module, config, out_dir, tokenizer_dir):
        """The final model in HF format under out_dir/hf, gathered on rank 0."""
        from pathlib import Path

        from nanoseek.hf import copy_tokenizer_files
        from nanoseek.parallel import checkpoint as ckpt

        path = ckpt.export_hf(model, self.mesh, config, Path(out_dir) / "hf")
        if path is not None:
            copy_tokenizer_files(tokenizer_dir, path)
        return path

    def agree_stop(self, time_up: bool, stop_signal: list[str]) -> bool:
        """Whether to leave the training loop: any rank hit the time limit or got a signal (one all-reduce,
        so every rank stops at the same step). A signal seen elsewhere is added to `stop_signal`."""
        flags = torch.tensor([float(time_up), float(bool(stop_signal))], device=self.mesh.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1] > 0 and not stop_signal:
            stop_signal.append("a signal on another rank")
        if flags[0] > 0 and not stop_signal:
            print("time limit reached on some rank; all ranks stop here")
        return bool(flags.max() > 0)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- the trainer's hooks
def from_config(pc, tc, device: torch.device) -> tuple[Parallel | None, torch.device]:
    """`nanoseek train`'s entry: None (the plain trainer) unless torchrun started several processes or
    --parallel.enable is set. Picks this process's GPU (LOCAL_RANK) and the compute dtype."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not pc.enable:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    try:
        par = Parallel.setup(device, pp=pc.pp, dp=pc.dp, ep=pc.ep, schedule=pc.schedule,
                             microbatches=pc.microbatches, fsdp=pc.fsdp, bf16=bf16, timeout_s=pc.timeout_s,
                             fp8_dispatch=pc.fp8_dispatch, overlap=pc.overlap)
    except ValueError as e:
        raise SystemExit(f"nanoseek train: {e}") from None
    if tc.batch_size % par.layout.dp:
        raise SystemExit(f"nanoseek train: --train.batch_size {tc.batch_size} must be a multiple of the "
                         f"{par.layout.dp} data-parallel ranks (each takes batch_size / dp sequences of every "
                         "micro-batch, so a step trains on the same batch at every world size)")
    if tc.compile and par.layout.pp > 1:
        raise SystemExit("nanoseek train: --train.compile with --parallel.pp > 1 is not supported (pipeline "
                         "stages must not be compiled modules)")
    if not par.is_logger:  # one rank prints; the others' figures are the same (averaged over ranks)
        import sys

        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    print(par.mesh.describe())
    return par, device

