"""Triton fast paths against their PyTorch references.

Runs on a CUDA GPU, or on the CPU through Triton's interpreter when the environment sets
TRITON_INTERPRET=1 (before Triton is imported); skipped otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch

from nanoseek import preset
from nanoseek.kernels import HAVE_TRITON
from nanoseek.model.moe import RoutedExperts, Router

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="needs CUDA")]),
           pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1"))]
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")

ROUTERS = {
    "v3 groups 8/4": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4),
    "v3 256 experts": dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4),
    "v3 one group": dict(n_routed_experts=32, num_experts_per_tok=4, n_group=1, topk_group=1),
    "v2 greedy": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1,
                      topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, n_routed_experts=64,
                      num_experts_per_tok=6),
    "v2 group-limited": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                             n_group=4, topk_group=2, norm_topk_prob=False, n_routed_experts=32,
                             num_experts_per_tok=3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_kernel_matches_router(device, name):
    from nanoseek.kernels.moe_decode import route

    cfg = preset("debug", **ROUTERS[name])
    router = Router(cfg).to(device)
    torch.manual_seed(0)
    router.weight.data.normal_(0, 0.5)
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(7, cfg.hidden_size, device=device)
    with torch.no_grad():
        gates_ref, ids_ref, _ = router(x)
        logits = torch.nn.functional.linear(x, router.weight)
        gates, ids = route(logits, router.e_score_correction_bias, cfg.num_experts_per_tok, router.groups,
                           cfg.topk_group, cfg.scoring_func == "sigmoid", cfg.topk_method == "noaux_tc",
                           cfg.norm_topk_prob, cfg.routed_scaling_factor)
    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)
    order, order_ref = ids.argsort(-1), ids_ref.argsort(-1)
    torch.testing.assert_close(gates.gather(1, order), gates_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 3, 5, 33])
def test_experts_kernel_matches_looped(device, tokens):
    from nanoseek.kernels.moe_decode import experts

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = preset("debug", hidden_size=160, moe_intermediate_size=48, n_routed_experts=16, num_experts_per_tok=4)
    moe = RoutedExperts(cfg).to(device)
    torch.manual_seed(1)
    moe.w13.data.normal_(0, 0.1)
    moe.w2.data.normal_(0, 0.1)
    moe.to(dtype)
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(16, device=device)[:4] for _ in range(tokens)])
    gates = torch.rand(tokens, 4, device=device)
    with torch.no_grad():
        ref = moe.forward_looped(x, ids, gates)
        out = experts(x, ids, gates, moe.w13, moe.w2).sum(1).to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
