"""Optional Triton fast paths. Each has a plain-PyTorch reference in `nanoseek.model` and a test
that the two agree (`tests/test_kernels*.py`); callers check `triton_available(x)` first and
fall back to the reference where Triton or a GPU is missing."""

from __future__ import annotations

import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def triton_available(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on x's device (a CUDA GPU with Triton installed)."""
    return HAVE_TRITON and x.is_cuda
