"""The device mesh: pipeline (pp) x data (dp) ranks, with expert parallelism (ep) taken out of dp.

    world = pp * dp                      every rank holds one pipeline stage pair and sees its own tokens
    dp    = edp * ep                     ep ranks share their tokens' experts; edp replicas of each expert

Mesh dimensions (torchtitan's layout: ep borrows ranks from data parallelism, it adds none):

    ("pp", "edp", "ep")    the 3-D mesh, rank = (pp_idx * edp + edp_idx) * ep + ep_idx
    "dp"  = flatten(edp, ep)   the ranks that see different tokens: dense-parameter FSDP, loss mean,
                               router-load all-reduce
    "edp"                      expert-parameter FSDP (each expert has edp copies before sharding)
    "ep"                       the all-to-all group of dispatch and combine

Sizes left out (0) are derived: pp defaults to 1, ep to 1, dp to world // pp. NCCL on CUDA, gloo on
the CPU; NVLink multicast (NVLS) is switched off in every environment this module starts
(`NCCL_NVLS_ENABLE=0`), since the lent machines do not support it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # also for anything torchrun or a test starts after import


@dataclass(frozen=True)
class Layout:
    """Parallel sizes; `resolve` checks them and fills in the derived ones."""

    world: int
    pp: int = 1
    dp: int = 1
    ep: int = 1

    @property
    def edp(self) -> int:
        """Replicas of each expert (data parallelism left over for the experts)."""
        return self.dp // self.ep

    @classmethod
    def resolve(cls, world: int, pp: int = 0, dp: int = 0, ep: int = 0) -> Layout:
        """Sizes (0 = derive) -> a checked Layout. Raises ValueError naming the bad size and the fix."""
        if world < 1:
            raise ValueError(f"world size {world} must be at least 1")
        for name, v in (("pp", pp), ("dp", dp), ("ep", ep)):
            if v < 0:
                raise ValueError(f"--parallel.{name} {v} must be >= 1 (or 0 to derive it)")
        pp = pp or (world // dp if dp else 1)
        if world % pp:
            raise ValueError(f"--parallel.pp {pp} does not divide the world size {world}; choose a divisor")
        dp = dp or world // pp
        ep = ep or 1
        if pp * dp != world:
            raise ValueError(f"--parallel.pp {pp} x --parallel.dp {dp} = {pp * dp}, but the world size is {world}; "
                             f"the sizes must multiply to the number of processes (e.g. --parallel.dp {world // pp})")
        if dp % ep:
            raise ValueError(f"--parallel.ep {ep} must divide --parallel.dp {dp}: expert parallelism is taken "
                             "out of the data-parallel ranks (choose ep among the divisors of dp)")
        return cls(world, pp, dp, ep)

    def check_model(self, n_routed_experts: int, num_layers: int, stages_per_rank: int) -> None:
        """The model must split evenly: experts over ep ranks, layers over pp * stages_per_rank stages."""
        if n_routed_experts and n_routed_experts % self.ep:
            raise ValueError(f"--parallel.ep {self.ep} must divide the model's n_routed_experts "
                             f"{n_routed_experts}; choose an ep that divides it")
        stages = self.pp * stages_per_rank
        if self.pp > 1 and num_layers < stages:
            raise ValueError(f"{stages} pipeline stages need at least {stages} layers; the model has {num_layers} "
                             "(lower --parallel.pp or use more layers)")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, timeout_s: float = 600.0) -> None:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    `timeout_s` bounds every collective: a rank that dies makes the others fail within it rather than
    hang (see `nanoseek.parallel.faults`)."""
    if dist.is_initialized():
        return
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


@dataclass
class Mesh:
    """The DeviceMesh and its named sub-meshes for one rank."""

    layout: Layout
    mesh: DeviceMesh  # ("pp", "edp", "ep")
    device: torch.device
    dp_mesh: DeviceMesh  # flatten("edp", "ep")
    ep_edp: DeviceMesh  # ("ep_", "edp_"): the global layout of FSDP-sharded expert stacks (checkpoints)

    @classmethod
    def build(cls, layout: Layout, device: torch.device) -> Mesh:
        if not dist.is_initialized():
            raise RuntimeError("Mesh.build needs torch.distributed initialised (init_process_group first)")
        if dist.get_world_size() != layout.world:
            raise ValueError(f"the layout is for {layout.world} processes, but {dist.get_world_size()} run; "
                             "start as many processes as pp x dp")
        mesh = init_device_mesh(device.type, (layout.pp, layout.edp, layout.ep), mesh_dim_names=("pp", "edp", "ep"))
        flat = mesh["edp", "ep"]._flatten("dp")
        # the same ranks as (pp, ep, edp): an FSDP-sharded expert stack is Shard(0) over ep, then over edp
        ranks = torch.arange(layout.world).view(layout.pp, layout.edp, layout.ep).transpose(1, 2)
        ep_edp = DeviceMesh(device.type, ranks, mesh_dim_names=("pp_", "ep_", "edp_"))["ep_", "edp_"]
        return cls(layout, mesh, device, flat, ep_edp)

    def sub(self, name: str) -> DeviceMesh:
        return self.dp_mesh if name == "dp" else self.mesh[name]

    def group(self, name: str) -> dist.ProcessGroup:
        return self.sub(name).get_group()

    def rank_in(self, name: str) -> int:
        return self.sub(name).get_local_rank()

    def describe(self) -> str:
        lo = self.layout
        return (f"mesh: world {lo.world} = pp {lo.pp} x dp {lo.dp} (dp = edp {lo.edp} x ep {lo.ep}); "
                f"rank {dist.get_rank()} at pp {self.rank_in('pp')}, dp {self.rank_in('dp')}, ep {self.rank_in('ep')}")
