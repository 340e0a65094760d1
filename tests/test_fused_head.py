"""The chunked head + cross-entropy (nanoseek/train/fused_head.py) against the plain head and F.cross_entropy."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nanoseek import Transformer, preset
from nanoseek.train.fused_head import linear_cross_entropy


def reference(h, w, targets, ignore_index=-100):
    """The plain head: logits in h's dtype, CE in fp32 (`train.step.cross_entropy`)."""
    logits = h @ w.to(h.dtype).t()
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradients_match_the_plain_head(chunk, dtype):
    """Every chunking (one row, a ragged last chunk, one chunk for all) gives the plain head's loss and
    gradients; ignored rows count in neither the loss nor the mean."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 64, 32, 50
    h0 = torch.randn(N, D, generator=g).to(dtype)
    w0 = torch.randn(V, D, generator=g) * 0.3  # fp32 master weights, as under autocast
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    grads = []
    for fn in (reference, linear_cross_entropy):
        kw = {"chunk": chunk} if fn is linear_cross_entropy else {}
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w, targets, **kw)
        (2.5 * loss).backward()  # a scaled incoming gradient reaches both gradients
        grads.append((loss.detach(), h.grad, w.grad))
    (la, ha, wa), (lb, hb, wb) = grads
    assert wb.dtype == torch.float32 and hb.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(la, lb, rtol=tol, atol=tol)
    assert torch.allclose(ha.float(), hb.float(), rtol=tol, atol=tol)
    assert torch.allclose(wa, wb, rtol=tol, atol=tol * 2)


def test_under_autocast_the_head_computes_in_the_autocast_dtype():
    """fp32 h and W under bf16 autocast (the default training setting: fp32 residual stream and master
    weights) give the autocast head's loss and gradients: the GEMMs run in bf16 as nn.Linear's would, and
    each gradient comes back in fp32."""
    g = torch.Generator().manual_seed(1)
    N, D, V = 48, 32, 40
    h0, w0 = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    grads = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = linear_cross_entropy(h, w, targets, chunk=16)
            else:
                loss = F.cross_entropy(F.linear(h, w).float(), targets)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    (la, ha, wa), (lb, hb, wb) = grads
    assert hb.dtype == wb.dtype == torch.float32
    assert torch.allclose(la, lb, rtol=1e-3, atol=1e-3)  # both from bf16 logits
    assert torch.allclose(ha, hb, rtol=2e-2, atol=2e-3) and torch.allclose(wa, wb, rtol=2e-2, atol=2e-3)
    fp32_loss = F.cross_entropy(h0 @ w0.t(), targets)
    assert (lb - fp32_loss).abs() > 1e-6  # the bf16 GEMM, not an fp32 one (whose loss would match this)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    h = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(10, 16, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((8,), -100), chunk=3)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_fused_head_training_loss_matches_the_plain_loss():
    """A debug model's pretraining loss (main head and MTP head) with fused_head: the same losses and the
    same gradient of every parameter."""
    from nanoseek.train.step import accumulate_gradients, pretraining_loss

    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model = Transformer.from_config(preset("debug"), seed=0).train()
        assert len(model.mtp) > 0
        loss_fn = pretraining_loss(0.3, 1e-4, fused_head=fused)
        out = accumulate_gradients(model, [(x[:, :-1], x[:, 1:])], loss_fn, contextlib.nullcontext())
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    for key in ("loss", "mtp_loss", "balance"):
        assert torch.allclose(a[key], b[key], rtol=1e-6), key
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-7), name


def test_forward_without_heads_returns_the_heads_inputs():
    """heads=False: no logits; applying each head to what it returns gives the plain forward's logits."""
    model = Transformer.from_config(preset("debug"), seed=0).eval()
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x, mtp_tokens=x)
        bare = model(x, mtp_tokens=x, heads=False)
    assert bare.logits is None and not bare.mtp_logits and len(bare.mtp_hidden) == len(plain.mtp_logits)
    assert torch.allclose(bare.hidden @ model.head_weight(0).t(), plain.logits, atol=1e-5)
    for k, (h, logits) in enumerate(zip(bare.mtp_hidden, plain.mtp_logits), start=1):
        assert torch.allclose(h @ model.head_weight(k).t(), logits, atol=1e-5)


def test_compiled_chunk_matches_eager():
    """The per-chunk loss and gradient as torch.compile runs it on the GPU (here inductor on the CPU)."""
    from test_model_core import needs_inductor

    from nanoseek.train import fused_head

    needs_inductor()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(24, 40, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 40, (24,), generator=g)
    t[3] = -100
    want = fused_head._chunk_loss_and_grad(z, t, -100)
    got = fused_head._compiled_chunk(z, t, -100)
    assert torch.allclose(want[0], got[0], rtol=1e-5)
    assert got[1].dtype == torch.bfloat16 and torch.allclose(want[1].float(), got[1].float(), atol=1e-2)
    assert not got[1][3].any()


def test_without_autograd_only_the_loss_is_computed():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(20, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (20,), generator=g)
    t[0] = -100
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk=6)
    assert torch.allclose(got, reference(h, w, t), atol=1e-6)
