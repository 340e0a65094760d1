"""CUDA paths against their CPU/fp32 references (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_grouped_mm_bf16_matches_looped():
    model = Transformer.from_config(preset("debug", hidden_size=128, moe_intermediate_size=64), device="cuda",
                                    seed=0)
    experts = model.moe_layers[0].experts
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    gates, ids, _ = model.moe_layers[0].gate(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert experts.grouped_mm_ok(x)
        grouped = experts.forward_grouped(x, ids, gates.detach())
        looped = experts.forward_looped(x, ids, gates.detach())
        gathered = experts.forward_gathered(x[:2], ids[:2], gates[:2].detach())  # decode path
    assert (grouped.float() - looped.float()).abs().max() < 2e-2 * looped.float().abs().max()
    assert (gathered.float() - looped[:2].float()).abs().max() < 2e-2 * looped.float().abs().max()


def test_compiled_expert_combine_matches_eager_with_gradients():
    """Compiled training combines the experts' outputs with one fused gather + fp32 weighted sum; eager
    training keeps the batched (T,1,K) x (T,K,D) product. Same output, same gradients (bf16 tolerance)."""
    model = Transformer.from_config(preset("debug", hidden_size=128, moe_intermediate_size=64), device="cuda",
                                    seed=0)
    experts = model.moe_layers[0].experts.to(torch.bfloat16)
    x0 = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
    gates0, ids, _ = model.moe_layers[0].gate(x0.float())

    def run(fn):
        x, gates = x0.clone().requires_grad_(), gates0.detach().clone().requires_grad_()
        out = fn(x, ids, gates)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        grads = [x.grad, gates.grad, experts.w13.grad, experts.w2.grad]
        experts.zero_grad(set_to_none=True)
        return [out, *grads]

    eager = run(experts.forward_grouped)
    compiled = run(torch.compile(experts.forward_grouped, fullgraph=True))
    for name, a, b in zip(("out", "x", "gates", "w13", "w2"), eager, compiled):
        err = (a.float() - b.float()).abs().max()
        assert err <= 2e-2 * a.float().abs().max(), (name, err)


def test_cuda_logits_match_cpu():
    cpu = Transformer.from_config(preset("debug"), seed=0).eval()
    gpu = Transformer.from_config(preset("debug"), device="cuda", seed=0).eval()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        want = cpu(ids).logits
        fp32 = gpu(ids.cuda()).logits.cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(ids.cuda()).logits.float().cpu()
    assert (fp32 - want).abs().max() < 1e-4
    # bf16 rounding (and the rare routing flip it causes) stays small on average
    assert (bf16 - want).abs().mean() < 0.03 * want.abs().mean()


def test_absorbed_matches_expanded_on_cuda():
    model = Transformer.from_config(preset("debug"), device="cuda", seed=0).eval()
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 32)
        model(ids[:, :16], cache=cache)
        tail = model(ids[:, 16:], positions=torch.arange(16, 24, device="cuda").expand(2, 8), cache=cache,
                     kv_len=24).logits
    assert (tail - full[:, 16:]).abs().max() < 1e-3


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_train_step_on_cuda_learns(compile_blocks):
    model = Transformer.from_config(preset("debug"), device="cuda", seed=0).train()
    if compile_blocks:
        for block in [*model.layers.values(), *model.mtp]:
            block.compile()
    optimizer = build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1)
    x = torch.randint(0, 512, (4, 65), device="cuda")
    batch = (x[:, :-1], x[:, 1:])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    losses = [float(train_step(model, optimizer, [batch], lr=3e-3, autocast=autocast, grad_clip=1.0,
                               mtp_lambda=0.3, seq_aux_alpha=1e-4, bias_gamma=1e-3)["loss"]) for _ in range(30)]
    assert losses[-1] < losses[0] - 1.0
