"""bf16 GEMM weights with fp32 masters (nanoseek/train/master_weights.py) against the default setting."""

from __future__ import annotations

import os

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.train.master_weights import AdamWMasterWeights, gemm_weights, masters_in_model
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import train_step


def debug_model() -> Transformer:
    return Transformer.from_config(preset("debug"), seed=0).train()


def test_gemm_weights_are_the_blocks_linears_and_experts():
    """Attention projections, MLPs, experts and MTP's eh_proj; never the embedding, norms, router or heads."""
    model = debug_model()
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = sorted(names[id(p)] for p in gemm_weights(model))
    assert chosen and all(n.startswith(("layers.", "mtp.")) for n in chosen)
    assert any(n.endswith("experts.w13") for n in chosen) and any(n.endswith("eh_proj.weight") for n in chosen)
    assert any(n.endswith("q_a_proj.weight") or n.endswith("q_proj.weight") for n in chosen)
    for n in chosen:
        assert not any(k in n for k in ("norm", "gate.weight", "embed", "lm_head", "shared_head")), n


def run_steps(master_weights: bool, steps: int = 3, micro: int = 1, grad_clip: float = 1e9):
    """A debug model trained `steps` steps of `micro` micro-batches under CPU bf16 autocast (by default no
    clipping engaged)."""
    model = debug_model()
    opt = build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1, master_weights=master_weights)
    if master_weights:
        opt.accumulate_in_fp32 = micro > 1
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        xs = [torch.randint(0, model.config.vocab_size, (2, 17), generator=g) for _ in range(micro)]
        m = train_step(model, opt, [(x[:, :-1], x[:, 1:]) for x in xs], lr=3e-3,
                       autocast=torch.autocast("cpu", torch.bfloat16), grad_clip=grad_clip, mtp_lambda=0.3,
                       seq_aux_alpha=1e-4, bias_gamma=1e-3)
        losses.append((m["loss"].item(), m["grad_norm"].item()))
    return model, opt, losses


def test_master_weights_compute_the_default_settings_numbers():
    """Three steps with fp32 weights under bf16 autocast (torch's AdamW) and with bf16 GEMM weights and fp32
    masters: the same losses and, after the last step, the same fp32 weights (the masters)."""
    ref, _, ref_losses = run_steps(False)
    model, opt, losses = run_steps(True)
    assert [loss for loss, _ in losses] == [loss for loss, _ in ref_losses]
    # the norm of bf16 gradients is summed from per-tensor norms rounded to bf16: close, not equal
    assert all(abs(a - b) < 1e-3 * b for (_, a), (_, b) in zip(losses, ref_losses))
    low = {id(p) for p in gemm_weights(model)}
    with masters_in_model(opt):
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert b.dtype == torch.float32, name
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=name)
    for p in model.parameters():  # outside the context: the bf16 copies of the masters
        if id(p) in low:
            assert p.dtype == torch.bfloat16 and torch.equal(p, opt.state[p]["master"].to(torch.bfloat16))


def test_accumulated_micro_batches_sum_in_fp32_as_the_default_setting_does():
    """Two micro-batches per step with the clip engaged: each bf16 gradient is added into an fp32 buffer, so the
    sums, the norm, the clipped gradients and the updates are the default setting's (fp32 .grad under
    autocast): the same losses and gradient norms, and the same fp32 weights."""
    ref, _, ref_losses = run_steps(False, micro=2, grad_clip=0.05)
    model, opt, losses = run_steps(True, micro=2, grad_clip=0.05)
    assert losses == ref_losses and all(norm > 0.05 for _, norm in losses)  # every step clipped
    with masters_in_model(opt):
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=name)
    assert not opt.held_gradients()  # the buffers go with zero_grad


def test_state_dict_round_trip_resumes_exactly():
    """One step, the optimizer's state into a fresh model + optimizer (fp32 weights rounded to bf16 there),
    one more step: the same as two steps straight; masters and moments stay fp32 through the load."""
    straight, sopt, _ = run_steps(True, steps=2)
    first, fopt, _ = run_steps(True, steps=1)
    model = debug_model()
    with torch.no_grad():  # what load_checkpoint does: the saved (master) weights into the model
        with masters_in_model(fopt):
            state = {k: v.clone() for k, v in first.state_dict().items()}
        model.load_state_dict(state)
    opt = build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1, master_weights=True)
    opt.load_state_dict(fopt.state_dict())
    for p in gemm_weights(model):
        assert all(opt.state[p][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, model.config.vocab_size, (2, 17), generator=g) for _ in range(2)]
    train_step(model, opt, [(xs[1][:, :-1], xs[1][:, 1:])], lr=3e-3, autocast=torch.autocast("cpu", torch.bfloat16),
               grad_clip=1e9, mtp_lambda=0.3, seq_aux_alpha=1e-4, bias_gamma=1e-3)
    for (name, a), b in zip(straight.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(gemm_weights(straight), gemm_weights(model)):
        assert torch.equal(sopt.state[a]["master"], opt.state[b]["master"])


DEVICES = [pytest.param("cuda", marks=[pytest.mark.gpu,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
           pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="needs Triton's interpreter (TRITON_INTERPRET=1)"))]


def kernel_and_reference(device: str, dtype: torch.dtype, masters: bool, moments: torch.dtype):
    """Two parameters (a ragged last block; the first with weight decay) stepped four times by the torch-op
    reference and by the Triton kernel from the same start: ((ref params, ref opt), (kernel params, opt))."""
    from nanoseek.kernels import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("needs Triton")
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(70, 33, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(b.shape, generator=g) for b in base] for _ in range(4)]
    runs = []
    for fused in (False, True):
        ps = [torch.nn.Parameter(b.to(device=device, dtype=dtype).clone()) for b in base]  # both from base
        opt = AdamWMasterWeights([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}],
                                 ps[:1] if masters else [], lr=3e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused,
                                 moments_dtype=moments)
        for step_grads in grads:
            for p, gr in zip(ps, step_grads):
                p.grad = gr.to(device=device, dtype=p.dtype)
            opt.step()
        runs.append((ps, opt))
    return runs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_reference(device, moments):
    """A bf16 weight with its master and an fp32 one, fp32 or bf16 moments: masters within fp32 rounding (bf16
    moments: a flipped rounding of a moment moves its weight by a bf16 step of the update), each bf16 copy
    the master rounded to nearest."""
    (ref, ref_opt), (got, got_opt) = kernel_and_reference(device, torch.float32, True, moments)
    tol = 1e-5 if moments == torch.float32 else 1e-3
    torch.testing.assert_close(got_opt.state[got[0]]["master"], ref_opt.state[ref[0]]["master"], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], got_opt.state[got[0]]["master"].to(torch.bfloat16))
    for key in ("exp_avg", "exp_avg_sq"):
        assert got_opt.state[got[0]][key].dtype == moments
        torch.testing.assert_close(got_opt.state[got[0]][key].float(), ref_opt.state[ref[0]][key].float(),
                                   rtol=1e-5 if moments == torch.float32 else 2**-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_moment_kernel_matches_the_reference(device, dtype):
    """--train.bf16_moments (no masters; fp32 or bf16 weights, gradients of their dtype): weights within fp32
    rounding or a few bf16 steps, moments within two bf16 steps (a flipped rounding, from the GPU's fused
    multiply-adds or the device-side bias corrections, carries into the next step)."""
    (ref, ref_opt), (got, got_opt) = kernel_and_reference(device, dtype, False, torch.bfloat16)
    for a, b in zip(ref, got):
        tol = 1e-6 if dtype == torch.float32 else 2 ** -5
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = ref_opt.state[a][key].float(), got_opt.state[b][key].float()
            assert got_opt.state[b][key].dtype == torch.bfloat16
            assert torch.allclose(x, y, rtol=2 ** -6, atol=1e-12), key
        assert ref_opt.state[a]["step"].item() == got_opt.state[b]["step"].item() == 4


def test_masters_in_model_swaps_and_restores():
    model = debug_model()
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, master_weights=True)
    w = gemm_weights(model)[0]
    low = w.data.data_ptr()
    with masters_in_model(opt):  # the master's storage itself, not a copy
        assert w.dtype == torch.float32 and w.data_ptr() == opt.state[w]["master"].data_ptr()
    assert w.data_ptr() == low and w.dtype == torch.bfloat16


ADAMW_HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanoseek.train import master_weights

cases = [
    (master_weights._adamw_master_kernel,
     {"w_ptr": "*fp32", "g_ptr": "*bf16", "m_ptr": "*fp32", "v_ptr": "*fp32", "out_ptr": "*bf16", "step_ptr": "*fp32",
      "found_ptr": "*fp32", "n": "i32", "lr": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
      "one_minus_beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32", "eps": "fp32", "keep": "fp32",
      "WRITE_OUT": "constexpr", "BLOCK": "constexpr"},
     {"WRITE_OUT": True, "BLOCK": 4096}),
    (master_weights._adamw_master_kernel,  # a bf16 weight without a master, bf16 moments
     {"w_ptr": "*bf16", "g_ptr": "*bf16", "m_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "step_ptr": "*fp32",
      "found_ptr": "*fp32", "n": "i32", "lr": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
      "one_minus_beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32", "eps": "fp32", "keep": "fp32",
      "WRITE_OUT": "constexpr", "BLOCK": "constexpr"},
     {"WRITE_OUT": False, "BLOCK": 4096}),
]
for fn, signature, constexprs in cases:
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
print("compiled", len(cases))
"""


def test_adamw_kernels_compile_for_hopper(tmp_path):
    """The AdamW kernel (two specializations) compiled to sm_90 cubins on the CPU (the interpreter runs it as
    Python and would not catch what only the compiler rejects)."""
    from nanoseek.kernels import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("needs Triton")
    from test_fp8_kernels import compile_for_hopper

    compile_for_hopper(ADAMW_HOPPER_COMPILE, tmp_path, "compiled 2")


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel on the CPU needs Triton's interpreter"))])
def test_a_flagged_step_changes_nothing(fused):
    """optimizer_step(skip_nonfinite=True) hands over found_inf: a flagged step moves no weight, master, moment
    or step count (the kernel reads the flag on the device), and the run continues as if it never happened."""
    from nanoseek.kernels import HAVE_TRITON

    if fused and not HAVE_TRITON:
        pytest.skip("needs Triton")
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(40, 8, generator=g), torch.randn(8, generator=g)]
    grads = [[torch.randn(b.shape, generator=g) for b in base] for _ in range(3)]

    def run(steps):
        """(gradients, found_inf or None) per step -> the parameters and the optimizer."""
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        opt = AdamWMasterWeights([{"params": ps}], ps[:1], lr=1e-2, weight_decay=0.1, fused=fused)
        for step_grads, flag in steps:
            for p, gr in zip(ps, step_grads):
                p.grad = gr.to(p.dtype)
            if flag is not None:
                opt.found_inf = torch.tensor(flag)
            opt.step()
            opt.__dict__.pop("found_inf", None)
        return ps, opt

    flagged, f_opt = run([(grads[0], 0.0), (grads[1], 1.0), (grads[2], None)])
    plain, p_opt = run([(grads[0], None), (grads[2], None)])  # the flagged step never happened
    for x, y in zip(flagged, plain):
        assert torch.equal(x, y)
    for key in ("master", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(f_opt.state[flagged[0]][key], p_opt.state[plain[0]][key]), key
    assert f_opt.state[flagged[1]]["step"].item() == 2


def test_a_state_without_masters_is_refused():
    """Loading an optimizer state saved without master weights (torch's AdamW) would leave the bf16 weights
    with no fp32 masters: an error that names the fix."""
    model = debug_model()
    plain = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    plain.step()
    fresh = debug_model()
    opt = build_optimizer(fresh, 1e-3, (0.9, 0.95), 1e-8, 0.1, master_weights=True)
    with pytest.raises(ValueError, match="without --train.master_weights"):
        opt.load_state_dict(plain.state_dict())
