"""Test set-up shared by every file: without a GPU, Triton kernels run under Triton's CPU
interpreter (set before anything imports Triton), so `tests/test_kernels.py` checks them on the CPU too."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
