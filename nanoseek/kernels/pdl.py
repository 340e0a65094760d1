"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the decode kernels.

A batch-1 decode step is a chain of about 200 kernels of a few microseconds each. Between two of
them the GPU idles: the next kernel is scheduled only when the previous one has finished, and its
first loads then travel to memory. With PDL (`launch_pdl=True`) a kernel may start while its
predecessor still runs. It loads at once what no recent kernel writes (its weights), then waits
(`griddepcontrol.wait`) until the predecessor has finished and its writes are visible.

Every kernel here follows one rule, `inputs_ready`: wait, and only then let the successor launch
(`griddepcontrol.launch_dependents`). So when a kernel starts, its predecessor has passed its own
wait, and the kernel before that one has finished with its writes visible. Hence what a kernel may
read before its wait: weights, and data written two or more kernels back (read through L2 with
`.cg` loads). Nothing is stored before the wait. A kernel launched without PDL (cuBLAS, Inductor's)
starts only when its predecessor has finished, as usual.

PDL is on wherever it is supported (`pdl_enabled`); there is no switch. It won at both batch sizes
measured, bench-1b decode steps on an H200 (`bench/decode_profile.py`, wall time per step, the same
code with PDL and without it, through a since-removed environment switch):
    batch 1:  568 us against 617 us without PDL     (decode_profile-2026-11-30-pdl.json, -pdl-off.json)
    batch 32: 1,314 us against 1,418 us              (decode_profile-2026-12-01-3366f60.json, -3366f60-pdl0.json)
(in `bench/results/`). Under PDL a kernel's profiled time includes its wait for the predecessor, so
profiles overstate it (their GPU time per step, 1,982 us at batch 32, exceeds the wall time).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


# griddepcontrol through Triton (3.3 and later); NVIDIA only (ROCm builds also report x.is_cuda)
_SUPPORTED = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait") and torch.version.hip is None


def pdl_enabled(x: torch.Tensor) -> bool:
    """True when kernels on x's device launch with PDL: an NVIDIA device of compute capability >= 9.0
    and a Triton with griddepcontrol."""
    return _SUPPORTED and x.is_cuda and _capability_major(x.device.index or 0) >= 9


@triton.jit
def inputs_ready(PDL: tl.constexpr):
    """Wait for the predecessor kernel's results, then allow the successor to launch (see the module
    docstring). A no-op without PDL (and under the interpreter, where PDL is False)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
