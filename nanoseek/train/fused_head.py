"""The output head and its cross-entropy as one chunked operation: the (N, V) logits never exist whole.

A plain head writes logits (N, V) in bf16 (16,384 tokens x 32,000 words: 1.0 GB), the loss reads them
back in fp32, and backward writes their gradient (another 1.0 GB) before the two GEMMs that consume it.
`linear_cross_entropy` walks the N rows in chunks; per chunk it computes

    z = h_c W^T                         (C, V) in h's dtype (the head GEMM)
    loss_c = sum_rows (logsumexp(z) - z[target])              (fp32)
    g = softmax(z) - onehot(target)     (C, V), 0 on ignored rows, in h's dtype
    dh_c = g W,   dW += g^T h_c         (the two backward GEMMs, fp32 accumulation of dW)

in the forward pass, so backward only scales the stored dh (N, D) and dW (V, D) by the incoming gradient
over the count of counted rows. Peak memory holds one chunk's logits instead of all of them; the work is
the same three GEMMs plus one fused pass over each chunk (`torch.compile`d on the GPU).

The maths equals `F.cross_entropy(h @ W^T, targets)` (mean over rows whose target is not `ignore_index`)
with the logits rounded to h's dtype, as a bf16 head's are; `tests/test_fused_head.py` checks the loss and
both gradients against that reference. The gradient is computed in the forward pass; without autograd
(evaluation) only the chunked loss is.

Shapes: N rows (tokens), D hidden, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 4096  # rows per chunk: at V = 32,000, 262 MB of bf16 logits


def _chunk_loss_and_grad(z: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, ...]:
    """z (C, V) logits, targets (C,) -> (sum of the rows' CE (fp32 scalar), dCE/dz (C, V) in z's dtype)."""
    zf = z.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(zf, dim=-1)  # (C,)
    picked = zf.gather(1, safe[:, None])[:, 0]  # (C,)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    words = torch.arange(z.shape[-1], device=z.device)
    grad = torch.exp(zf - lse[:, None]) - (words[None, :] == safe[:, None]).float()  # softmax - onehot
    grad = torch.where(valid[:, None], grad, 0.0)
    return loss, grad.to(z.dtype)


_compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of (h W^T) against targets, chunk by chunk (module docstring)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk: int) -> torch.Tensor:
        N = h.shape[0]
        wc = w.to(h.dtype)  # (V, D): the head's weights in the compute dtype (a cast of fp32 master weights)
        step = _compiled_chunk if h.is_cuda else _chunk_loss_and_grad
        dh = torch.empty_like(h)  # (N, D)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # (V, D)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk):
            hc = h[s:s + chunk]  # (C, D)
            loss, g = step(hc @ wc.t(), targets[s:s + chunk], ignore_index)
            total += loss
            torch.mm(g, wc, out=dh[s:s + chunk])  # (C, D), written in place
            dw += (g.t() @ hc).float()  # rounded to h's dtype per chunk, as a bf16 head's dW is once
        count = (targets != ignore_index).sum().clamp_min(1).float()
        ctx.save_for_backward(dh, dw, count)
        ctx.w_dtype = w.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw, count = ctx.saved_tensors
        scale = grad / count
        return dh * scale.to(dh.dtype), (dw * scale).to(ctx.w_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Mean over counted rows of CE(h W^T, targets); h (..., D), w (V, D), targets (...) -> scalar.

    Under autocast h and W (fp32 master weights, and an fp32 h from an fp32 residual stream) are cast to
    the autocast dtype, as `nn.Linear` would cast them: without that cast the head's three GEMMs ran in
    fp32, 2x slower per step on the GPU. Each gradient comes back in its tensor's dtype."""
    h2, t1 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_autocast_enabled(h.device.type):
        h2 = h2.to(torch.get_autocast_dtype(h.device.type))
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return LinearCrossEntropy.apply(h2, w, t1, ignore_index, chunk)
        wc = w.to(h.dtype)  # no gradient wanted (evaluation): the chunked loss alone
        total = sum(F.cross_entropy((h2[s:s + chunk] @ wc.t()).float(), t1[s:s + chunk], ignore_index=ignore_index,
                                    reduction="sum") for s in range(0, h2.shape[0], chunk))
        return total / (t1 != ignore_index).sum().clamp_min(1)
