"""FP8 on the GPU: the dense paths (`torch._scaled_mm`, Triton) and the installed model against the emulation.

Tolerances: the GPU quantizers reproduce the emulation's e4m3 values (checked exactly in
tests/test_fp8_kernels.py), so the dense GEMMs differ from the emulation only by fp32 summation order
and the bf16 outputs _scaled_mm returns (2^-8 relative): 2% relative error (Frobenius) is the bound.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.fp8 import FP8Linear, FP8RoutedExperts, install_fp8
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("gemm", ["scaled_mm", "triton"])
@pytest.mark.parametrize("M,K,N", [(300, 256, 384), (2048, 1024, 512), (128, 512, 1536)])
def test_dense_gpu_matches_emulation(M, K, N, gemm, monkeypatch):
    from nanoseek.fp8 import gpu
    from nanoseek.fp8.gpu import fp8_linear
    from nanoseek.fp8.reference import fp8_linear_emulated
    monkeypatch.setattr(gpu, "DENSE_GEMM", gemm)  # "scaled_mm" fails here if this torch lacks blockwise scales
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * K ** -0.5
    dy = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    outs = []
    for fn in (fp8_linear, fp8_linear_emulated):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, torch.bfloat16)
        y.backward(dy)
        outs.append((y, xi.grad, wi.grad))
    names = ("y", "dx", "dw")
    for name, got, want in zip(names, *outs):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel(got, want) < 0.02, (name, rel(got, want))
    # and within FP8's error of the bf16 product
    assert rel(outs[0][0], x.float() @ w.t()) < 0.06


def test_dense_saves_fp8_for_backward():
    from nanoseek.fp8.gpu import fp8_linear
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 512, device="cuda", requires_grad=True)
    y = fp8_linear(x, w, torch.bfloat16)
    saved = y.grad_fn.next_functions[0][0].saved_tensors  # y is a view of FP8LinearGPU's output
    assert all(t.dtype in (torch.float8_e4m3fn, torch.float32) for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float8_e4m3fn) == 2 * 256 * 512


def gpu_cfg():
    # every FP8 layer a multiple of 128 except kv_a (hidden -> kv_lora_rank + rope): it falls back
    return preset("debug", hidden_size=256, intermediate_size=512, moe_intermediate_size=128, q_lora_rank=256,
                  kv_lora_rank=128, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=64,
                  qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1)


def test_installed_model_trains_close_to_bf16():
    torch.manual_seed(0)
    cfg = gpu_cfg()
    tokens = torch.randint(0, cfg.vocab_size, (4, 129), device="cuda")
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    losses = {}
    for dtype in ("bf16", "fp8"):
        model = Transformer.from_config(cfg, device="cuda", seed=0).train()
        if dtype == "fp8":
            with pytest.warns(UserWarning, match="kv_a_proj_with_mqa"):
                report = install_fp8(model)
            kinds = {type(m) for m in model.modules()}
            assert FP8Linear in kinds and FP8RoutedExperts in kinds and report["bf16"]
        opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.0, False)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        losses[dtype] = [float(train_step(model, opt, batch, lr=1e-3, autocast=autocast, grad_clip=1.0, mtp_lambda=0.3,
                                          seq_aux_alpha=1e-4, bias_gamma=1e-3)["loss"]) for _ in range(8)]
    bf16, fp8 = torch.tensor(losses["bf16"]), torch.tensor(losses["fp8"])
    assert torch.isfinite(fp8).all() and fp8[-1] < fp8[0]
    assert ((fp8 - bf16).abs() / bf16).max() < 0.02, (losses)


def test_installed_experts_match_emulated_install():
    """The GPU-installed model's gradients against the same model installed with the emulation, measured
    against FP8's own distance from BF16. Through three layers with routing, a rounding difference anywhere
    flips e4m3 values and expert choices downstream, so neither distance is small (H100, 2026-12-06: GPU to
    emulation 4-34% per parameter, emulation to BF16 5-41%, BF16 to fp32 1-16%). On average over the
    parameters the GPU install must be nearer the emulation than BF16 is, and no parameter more than 1.5x
    as far (a router's gradient, which follows the expert choices, came out at 1.1x in one H100 run). A
    wiring error (a wrong operand, scale or transpose) lands near 100% and beyond."""
    torch.manual_seed(0)
    cfg = gpu_cfg()
    tokens = torch.randint(0, cfg.vocab_size, (2, 128), device="cuda")
    grads = {}
    for backend in ("gpu", "emulate", "bf16"):
        model = Transformer.from_config(cfg, device="cuda", seed=0).train()
        if backend != "bf16":
            with pytest.warns(UserWarning) if backend == "gpu" else contextlib.nullcontext():
                install_fp8(model, backend=backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens).logits
        logits.float().square().mean().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ratios = {}
    for name, g in grads["gpu"].items():
        fp8_error = max(rel(grads["emulate"][name], grads["bf16"][name]), 0.02)
        ratios[name] = rel(g, grads["emulate"][name]) / fp8_error
    assert max(ratios.values()) < 1.5 and sum(ratios.values()) / len(ratios) < 1.0, ratios


def test_weight_cache_and_swiglu_recompute_match_the_plain_gpu_path():
    """install_fp8(cache_weights, recompute_swiglu) on the GPU backend: two optimizer steps of two micro-batches
    against the plain install. The FP8 kernels are deterministic, but the embedding and the experts' gather
    backward add with atomics, so the bound is float-reordering sized; the cache quantizes once per step."""
    from nanoseek.fp8.options import WeightCache
    from nanoseek.train.step import accumulate_gradients, optimizer_step, pretraining_loss
    cfg = gpu_cfg()
    tokens = torch.randint(0, cfg.vocab_size, (4, 2, 129), device="cuda", generator=torch.Generator("cuda"))
    micro = [(t[:, :-1], t[:, 1:]) for t in tokens]
    runs = {}
    for options in (False, True):
        model = Transformer.from_config(cfg, device="cuda", seed=0).train()
        with pytest.warns(UserWarning, match="kv_a_proj_with_mqa"):
            install_fp8(model, cache_weights=options, recompute_swiglu=options)
        opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.0, False)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        losses = []
        for step in range(2):
            out = accumulate_gradients(model, micro[2 * step:2 * step + 2], pretraining_loss(0.3, 1e-4), autocast)
            losses.append(float(out["loss"]))
            optimizer_step(model, opt, lr=1e-3, grad_clip=1.0, bias_gamma=1e-3)
        caches = [c for m in model.modules() for c in vars(m).values() if isinstance(c, WeightCache)]
        runs[options] = (losses, [p.detach().clone() for p in model.parameters()], caches)
    (l0, p0, _), (l1, p1, caches) = runs[False], runs[True]
    assert caches and {c.quantizations for c in caches} == {2}
    assert max(abs(a - b) / a for a, b in zip(l0, l1)) < 1e-3, (l0, l1)
    assert max(rel(a, b) for a, b in zip(p1, p0)) < 1e-3
