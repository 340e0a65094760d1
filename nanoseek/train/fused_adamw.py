"""One Triton kernel per parameter for AdamW with bf16 moments (`optim.AdamWBf16Moments` on the GPU).

Per element, with fp32 maths and the moments stored in bf16 (as DeepSeek-V3 stores them):

    m = m + (1 - beta1) (g - m)                     (torch's lerp with weight 1 - beta1 < 0.5)
    v = beta2 v + (1 - beta2) g^2
    p = p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

One pass reads p, g, m, v and writes p, m, v: 20 bytes per fp32 parameter with fp32 gradients, against 28
for torch's fused AdamW with fp32 moments, and about a dozen kernels per parameter for the reference loop
(`AdamWBf16Moments._reference_step`). The bias corrections come from the step count, which the optimizer
keeps on the host, so nothing here reads the device. `tests/test_train.py` checks the kernel (on the GPU, or
under Triton's CPU interpreter) against the reference.
"""

from __future__ import annotations

import torch

from nanoseek.kernels import HAVE_TRITON

BLOCK = 4096  # elements per program

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16(x):
        """fp32 -> bf16 rounded to nearest even in integer arithmetic, so the cast is exact: the GPU's cast
        rounds so too, but Triton's CPU interpreter truncates."""
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: 0xFFFF0000
        return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _adamw_bf16_moments_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, one_minus_beta1, beta2, one_minus_beta2, eps,
                                   keep, step_size, bc2, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        p = tl.load(p_ptr + offs, mask=live).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=live).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=live).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=live).to(tl.float32)
        m = m + one_minus_beta1 * (g - m)
        v = beta2 * v + one_minus_beta2 * (g * g)
        p = p * keep
        p = p - step_size * (m / (tl.sqrt(v / bc2) + eps))
        if p_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(p_ptr + offs, _to_bf16(p), mask=live)
        else:
            tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=live)
        tl.store(m_ptr + offs, _to_bf16(m), mask=live)
        tl.store(v_ptr + offs, _to_bf16(v), mask=live)


def fused_ok(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel takes plain (not distributed) contiguous tensors of one device, where Triton runs."""
    tensors = (p.data, g, m, v)
    return (HAVE_TRITON and all(type(t) is torch.Tensor and t.is_contiguous() for t in tensors)
            and len({t.device for t in tensors}) == 1 and p.numel() == g.numel())


def adamw_bf16_moments_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: int,
                            lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of p in place (m, v bf16, updated in place); `step` is the 1-based count after it."""
    n = p.numel()  # the scalars are computed on the host in double, then rounded once, as the reference's are
    _adamw_bf16_moments_kernel[(triton.cdiv(n, BLOCK),)](
        p.data, g, m, v, n, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1**step),
        1 - beta2**step, BLOCK=BLOCK)
