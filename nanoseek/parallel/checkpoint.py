"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and a Hugging Face export on rank 0.

    out_dir/checkpoints/step-000500/
        dcp/                    every rank writes its own shards (model + optimizer), in parallel
        trainer_state.pt        step, loader position, RNG (rank 0; the same on every rank)
        run.json

Every tensor is saved under its global name and shape, so a checkpoint loads into another layout
(other pp, dp, ep, with or without FSDP): FSDP parameters are DTensors already; an expert shard (El
rows of E on each ep rank) is saved as a DTensor sharded over the ep mesh, and so are the optimizer
states of that parameter; parameters replicated over dp are written once. DCP reads back whatever
slice each rank holds in the new layout.

`export_hf` gathers the full model on rank 0 (FSDP shards, expert shards over ep, pipeline stages over
pp) and writes the usual HF-format directory there (`nanoseek.hf.save_pretrained`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Shard

from nanoseek.parallel.expert import is_expert_param
from nanoseek.parallel.mesh import Mesh

STATE_FILE = "trainer_state.pt"


def _globalise(sd: dict[str, Any], mesh: Mesh, prefix: str = "", fsdp1: dict | None = None) -> dict[str, Any]:
    """A copy of the (nested) state dict with each expert shard (a plain tensor of El rows) viewed as a
    DTensor over the ep mesh: the model's and the optimizer's per-parameter states (which carry the
    parameter's name). The dicts are new (the optimizer's own state is not touched); tensors are shared.
    An FSDP expert DTensor (Shard(0) over edp) becomes Shard(0) over ep then edp (recorded in `fsdp1`)."""
    if mesh.layout.ep == 1:
        return sd
    out: dict[str, Any] = {}
    for key, value in sd.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            value = _globalise(value, mesh, f"{name}.", fsdp1)
            out[key] = value
            continue
        if isinstance(value, DTensor) and _expert_key(name):  # FSDP over edp: Shard(0) over ep, then edp
            local = value.to_local()
            if fsdp1 is not None:
                fsdp1[name] = (value.device_mesh, value.placements, value.shape, value.stride())
            shape = (value.shape[0] * mesh.layout.ep, *value.shape[1:])
            value = DTensor.from_local(local, mesh.ep_edp, [Shard(0), Shard(0)], run_check=False, shape=shape,
                                       stride=torch.empty(shape, device="meta").stride())
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and _expert_key(name):
            value = DTensor.from_local(value, mesh.sub("ep"), [Shard(0)], run_check=False)
        out[key] = value
    return out


def _expert_key(name: str) -> bool:
    """A model key `...experts.w13` or an optimizer state key `state.<...experts.w13>.exp_avg`."""
    return any(is_expert_param(part) for part in (name, name.rsplit(".", 1)[0]))


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh,
         trainer_state: dict[str, Any]) -> Path:
    """Write model and optimizer shards from every rank, and the trainer state from rank 0."""
    path = Path(path)
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": _globalise(model_sd, mesh), "optim": _globalise(optim_sd, mesh)}
    dcp.save(state, checkpoint_id=str(path / "dcp"))
    if dist.get_rank() == 0:
        torch.save(trainer_state, path / STATE_FILE)
    dist.barrier()
    return path


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh) -> dict[str, Any]:
    """Read the shards this rank holds (in any layout) into model and optimizer; returns the trainer state."""
    path = Path(path)
    if not (path / "dcp").is_dir():
        raise SystemExit(f"nanoseek train: {path} holds no sharded checkpoint (no dcp/); parallel runs resume "
                         "from checkpoints written by parallel runs")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    fsdp1: dict = {}
    state = {"model": _globalise(model_sd, mesh, fsdp1=fsdp1), "optim": _globalise(optim_sd, mesh, fsdp1=fsdp1)}
    dcp.load(state, checkpoint_id=str(path / "dcp"))  # in place: wrapped expert shards share storage
    set_state_dict(model, optimizer, model_state_dict=_localise(state["model"], fsdp1),
                   optim_state_dict=_localise(state["optim"], fsdp1))
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def _localise(sd: dict[str, Any], fsdp1: dict, prefix: str = "") -> dict[str, Any]:
    """Undo `_globalise`: ep-mesh DTensors back to their local shards, FSDP's back to DTensors over edp."""
    out = {}
    for key, value in sd.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _localise(value, fsdp1, f"{name}.")
        elif isinstance(value, DTensor) and value.device_mesh.mesh_dim_names in (("ep",), ("ep_", "edp_")):
            local = value.to_local()
            if name in fsdp1:  # back to FSDP's DTensor over edp
                emesh, placements, shape, stride = fsdp1[name]
                local = DTensor.from_local(local, emesh, placements, run_check=False, shape=shape, stride=stride)
            out[key] = local
        else:
            out[key] = value
    return out


def full_state_dict(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict (CPU, fp32) on global rank 0; None elsewhere. Collective."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if is_expert_param(name) and mesh.layout.ep > 1:  # (El, ...) per ep rank -> (E, ...)
            parts = [torch.empty_like(t) for _ in range(mesh.layout.ep)]
            dist.all_gather(parts, t.contiguous(), group=mesh.group("ep"))
            t = torch.cat(parts)
        out[name] = t.detach().float().cpu()
    if mesh.layout.pp > 1:  # each pp rank holds other layers: collect them on pp rank 0
        gathered: list[Any] = [None] * mesh.layout.pp
        dist.all_gather_object(gathered, out, group=mesh.group("pp"))
        out = {k: v for part in gathered for k, v in part.items()}
    return out if dist.get_rank() == 0 else None


def export_hf(model: nn.Module, mesh: Mesh, config, out_dir: str | Path) -> Path | None:
    """Gather the full model and write it in HF format on rank 0 (returns the path there)."""
    from nanoseek.hf import save_pretrained
    from nanoseek.model.transformer import Transformer

    sd = full_state_dict(model, mesh)
    if sd is None:
        return None
    full = Transformer.from_config(config, device="cpu")
    missing, unexpected = full.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "inv_freq" not in k]:
        raise RuntimeError(f"export_hf: the gathered state does not fit the model (missing {missing}, "
                           f"unexpected {unexpected})")
    save_pretrained(full, Path(out_dir), dtype=torch.float32)
    return Path(out_dir)
