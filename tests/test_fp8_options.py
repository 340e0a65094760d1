"""FP8 options against the plain path (CPU emulation): the per-step weight cache and SwiGLU recompute give
bitwise the same losses, gradients and weights; the cache quantizes once per optimizer step; recompute
stores less for backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nanoseek import Transformer, preset
from nanoseek.fp8 import install_fp8
from nanoseek.fp8.options import SwiGLU, WeightCache, clear_weight_caches
from nanoseek.train.optim import build_optimizer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared CPU (see tests/test_fp8.py)
    yield
    torch.set_num_threads(threads)


CFG = dict(num_hidden_layers=2, num_nextn_predict_layers=0)  # one dense layer, one MoE layer


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 512, (2, 17), generator=g) for _ in range(n)]
    return [(t[:, :-1], t[:, 1:]) for t in ids]


def loss_of(model, batch, autocast) -> torch.Tensor:
    x, y = batch
    with autocast:
        logits = model(x).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def caches(model) -> list[WeightCache]:
    return [c for m in model.modules() for c in (getattr(m, "weight_cache", None), getattr(m, "w13_cache", None),
                                                 getattr(m, "w2_cache", None)) if isinstance(c, WeightCache)]


@pytest.mark.parametrize("fused", [False, True])
def test_weight_cache_matches_uncached_over_accumulation_and_steps(fused):
    """2 optimizer steps of 3 micro-batches: identical losses, gradients and weights; one quantization per
    weight per step (a stale cache after the step would change step 2's numbers). fused: torch's fused AdamW
    (the trainer's on CUDA), which writes the weights without bumping their version counters."""
    runs = {}
    for cached in (False, True):
        model = Transformer.from_config(preset("debug", **CFG), seed=0).train()
        install_fp8(model, backend="emulate", cache_weights=cached)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True) if fused
               else build_optimizer(model, 1e-2, (0.9, 0.95), 1e-8, 0.1))
        losses, grads = [], []
        data = batches(6)
        for step in range(2):
            for batch in data[3 * step:3 * step + 3]:
                loss = loss_of(model, batch, contextlib.nullcontext())
                (loss / 3).backward()
                losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[cached] = (losses, grads, [p.detach().clone() for p in model.parameters()], caches(model))
    (l0, g0, p0, c0), (l1, g1, p1, c1) = runs[False], runs[True]
    assert not c0 and len(c1) > 10
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    for s0, s1 in zip(g0, g1):
        assert len(s0) == len(s1) and all(torch.equal(a, b) for a, b in zip(s0, s1))
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert {c.quantizations for c in c1} == {2}  # once per optimizer step, not per micro-batch


def test_weight_cache_follows_in_place_writes_and_clear():
    model = Transformer.from_config(preset("debug", **CFG), seed=0).train()
    install_fp8(model, backend="emulate", cache_weights=True)
    batch = batches(1)[0]
    want = loss_of(model, batch, contextlib.nullcontext()).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an in-place write bumps the version: the next forward re-quantizes
    changed = loss_of(model, batch, contextlib.nullcontext()).detach()
    fresh = Transformer.from_config(preset("debug", **CFG), seed=0).train()
    install_fp8(fresh, backend="emulate")
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    assert torch.equal(changed, loss_of(fresh, batch, contextlib.nullcontext()).detach())
    assert not torch.equal(changed, want)
    # writes through .data are invisible to the version counter: clear_weight_caches drops the copies
    assert clear_weight_caches(model) == len(caches(model)) > 0
    assert all(c.value is None for c in caches(model))
    assert torch.equal(loss_of(model, batch, contextlib.nullcontext()).detach(), changed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_recompute_is_bitwise_the_stored_path(dtype):
    torch.manual_seed(0)
    g, u, da = (torch.randn(37, 96).to(dtype) * 3 for _ in range(3))
    outs = []
    for fn in (lambda a, b: F.silu(a) * b, SwiGLU.apply):
        gi, ui = g.clone().requires_grad_(), u.clone().requires_grad_()
        y = fn(gi, ui)
        y.backward(da)
        outs.append((y, gi.grad, ui.grad))
    for got, want in zip(outs[1], outs[0]):
        assert got.dtype == dtype and torch.equal(got, want)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while fn() runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_swiglu_recompute_model_matches_and_saves_less(autocast):
    """Dense MLP, shared and routed experts with silu(gate) recomputed: the same logits and gradients, bit
    for bit, and less kept for backward."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    batch = batches(1)[0]
    runs = {}
    for recompute in (False, True):
        model = Transformer.from_config(preset("debug", **CFG), seed=0).train()
        install_fp8(model, backend="emulate", recompute_swiglu=recompute)
        loss, nbytes = saved_bytes(lambda m=model: loss_of(m, batch, ctx))
        loss.backward()
        runs[recompute] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                           nbytes, model)
    (l0, g0, b0, _), (l1, g1, b1, m1) = runs[False], runs[True]
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    kinds = {type(m).__name__ for m in m1.modules()}
    assert {"FP8MLP", "FP8RoutedExperts"} <= kinds
    assert b1 < b0, (b1, b0)


def padded_pair(N: int, K: int, cache: bool):
    """Two FP8Linear (emulated) holding the same weight (N, K): plain, and through zero-padded 128-blocks."""
    from torch import nn
    outs = []
    torch.manual_seed(0)
    w = torch.randn(N, K) * K ** -0.5
    for pad in (False, True):
        m = nn.Module()
        m.o_proj = nn.Linear(K, N, bias=False)
        with torch.no_grad():
            m.o_proj.weight.copy_(w)
        install_fp8(m, backend="emulate", cache_weights=cache)
        m.o_proj.pad_blocks = pad
        outs.append(m.o_proj)
    return outs


@pytest.mark.parametrize("cache", [False, True])
def test_zero_padded_blocks_compute_the_partial_block_maths(cache):
    """W (576, 200) and x (.., 200) padded to (640, 256): the same products and gradients as the partial-block
    emulation (up to fp32 summation order: the padded matmuls sum extra exact zeros)."""
    plain, padded = padded_pair(576, 200, cache)
    x = torch.randn(3, 50, 200) * torch.logspace(1, -3, 200)  # a small last block: a non-zero pad would show
    dy = torch.randn(3, 50, 576)
    outs = []
    for lin in (plain, padded):
        xi = x.clone().requires_grad_()
        for _ in range(2 if cache else 1):  # with the cache: a second micro-batch reuses the padded copy
            y = lin(xi)
            y.backward(dy)
        outs.append((y, xi.grad, lin.weight.grad))
    for got, want in zip(outs[1], outs[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_install_pads_partial_linears_on_the_gpu_backend_when_asked(monkeypatch):
    import warnings

    from nanoseek.fp8 import install as fp8_install
    monkeypatch.setattr(fp8_install, "check_fp8_device", lambda device: None)
    cfg = preset("debug", hidden_size=128, moe_intermediate_size=128, intermediate_size=256)
    model = Transformer.from_config(cfg, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back: no warning
        report = install_fp8(model, backend="gpu", pad_partial_blocks=True)
    assert not report["bf16"]
    mods = dict(model.named_modules())
    padded = {n for n in report["fp8"] if getattr(mods[n], "pad_blocks", False)}
    partial = {n for n in report["fp8"] if isinstance(mods[n], torch.nn.Linear)
               and (mods[n].in_features % 128 or mods[n].out_features % 128)}
    assert padded == partial and any("kv_a_proj_with_mqa" in n for n in padded)
    assert not any("mlp" in n for n in padded)  # 128 -> 256 -> 128: whole blocks, not padded


def test_fp8_training_step_compiles_on_the_cpu():
    """`--train.dtype fp8 --train.compile true` on the CPU: the emulated FP8 calls stay out of inductor's graphs
    (its C++ backend cannot fuse float8 arithmetic: "Promotion for Float8 Types is not supported"), and a step
    through compiled blocks gives the eager FP8 step's loss and gradients."""
    from test_model_core import needs_inductor

    from nanoseek.train.step import accumulate_gradients, compile_blocks, pretraining_loss

    needs_inductor()
    models = []
    for compiled in (False, True):
        model = Transformer.from_config(preset("debug", **CFG), seed=0).train()
        install_fp8(model, backend="emulate")
        if compiled:
            compile_blocks(model)
        models.append(model)
    loss_fn = pretraining_loss(0.3, 1e-4)
    out = [accumulate_gradients(m, batches(1), loss_fn, contextlib.nullcontext()) for m in models]
    assert torch.allclose(out[0]["loss"], out[1]["loss"], atol=1e-5)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
