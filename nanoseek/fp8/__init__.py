"""Blockwise FP8 mixed-precision training (DeepSeek-V3 recipe): `install_fp8(model)` swaps the model's
linears and routed experts for FP8 ones. `reference.py` is the emulation (any device), `gpu.py` the
Triton / `torch._scaled_mm` fast path. See docs/fp8.md."""

from nanoseek.fp8.install import FP8Linear, FP8RoutedExperts, install_fp8

__all__ = ["FP8Linear", "FP8RoutedExperts", "install_fp8"]
