"""FP8 emulation (CPU): blockwise round trips, FP8 linear / grouped experts gradients, install, training."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import Transformer, preset
from nanoseek.fp8 import FP8Linear, FP8RoutedExperts, install_fp8
from nanoseek.fp8 import install as fp8_install
from nanoseek.fp8.options import WeightCache
from nanoseek.fp8.reference import (
    COL,
    FP8_MAX,
    ROW,
    TILE,
    EmulatedFP8GroupedLinear,
    EmulatedFP8Linear,
    dequantize,
    dequantize_grouped_cols,
    fake_quantize,
    quantize,
    quantize_grouped_cols,
)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these are tiny ops, and on a loaded shared CPU two threads spinning at each op's
    barrier made the emulated training steps ~10x slower (measured 1.0 s vs 0.12 s per debug-model step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


E4M3_REL = 2 ** -3  # e4m3 keeps 3 mantissa bits: a round-to-nearest error of at most 2^-4 relative, 2^-3 is safe


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("block", [ROW, COL, TILE])
def test_round_trip_with_partial_and_zero_blocks(block):
    torch.manual_seed(0)
    x = torch.randn(200, 300) * torch.logspace(-3, 3, 300)  # partial blocks both ways, wide dynamic range
    x[:, 128:256] = 0  # an all-zero column band: whole zero blocks for every block shape
    q, s = quantize(x, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (-(-200 // block[0]), -(-300 // block[1]))
    assert torch.isfinite(s).all() and (s > 0).all()
    y = dequantize(q, s, block)
    assert (y[:, 128:256] == 0).all()
    # every element within half an e4m3 step: relative 2^-4 for normals, half the subnormal step 2^-9 of the
    # block's scale for values far below the block's max (the logspace spread makes those)
    step = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:200, :300] * 2.0 ** -10
    assert ((y - x).abs() <= E4M3_REL / 2 * x.abs() + step).all()
    # the block's largest magnitude lands on 448 exactly
    assert q.float().abs().max().item() == FP8_MAX


@pytest.mark.parametrize("block", [ROW, COL, TILE])
def test_tiny_blocks_read_back_finite(block):
    """A block whose max-abs is positive but under 448 / FLT_MAX (~1.3e-36, gradients of subnormals) would
    get an infinite multiplier and turn its zeros into NaN; the amax floor keeps it finite: zeros stay
    zero and the values read back within the floor."""
    x = torch.zeros(128, 256)
    x[:, :128] = torch.randn(128, 128, generator=torch.Generator().manual_seed(0)) * 1e-38
    x[::2, :64] = 0  # zeros inside the tiny blocks (of every block shape)
    q, s = quantize(x, block)
    y = dequantize(q, s, block)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all() and torch.isfinite(y).all()
    assert (y[x == 0] == 0).all() and ((y - x).abs() <= 2.0**-100).all()


def test_partial_block_is_its_own_block():
    x = torch.ones(1, 130)
    x[0, 128:] = 1e-3  # a 2-wide last tile, scaled by its own amax, not the first tile's
    _, s = quantize(x, ROW)
    torch.testing.assert_close(s, torch.tensor([[1 / FP8_MAX, 1e-3 / FP8_MAX]]))


def test_quantize_rejects_bad_rank():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 3, 4), ROW)


def test_grouped_col_tiles_restart_at_each_group():
    x = torch.randn(300, 130)
    ends = torch.tensor([0, 100, 100, 300], dtype=torch.int32)  # an empty first and third group
    q, scales = quantize_grouped_cols(x, ends)
    assert [s.shape[0] for s in scales] == [0, 1, 0, 2]
    y = dequantize_grouped_cols(q, scales, ends)
    torch.testing.assert_close(y[100:300], fake_quantize(x[100:300], COL))
    torch.testing.assert_close(y[:100], fake_quantize(x[:100], COL))


def test_fp8_linear_three_gemms_match_the_emulation_maths():
    """The autograd function's forward and both gradients equal the quantize-then-matmul formulas."""
    torch.manual_seed(0)
    x = torch.randn(150, 200, requires_grad=True)
    w = torch.randn(260, 200, requires_grad=True)
    dy = torch.randn(150, 260)
    y = EmulatedFP8Linear.apply(x, w, torch.float32)
    y.backward(dy)
    torch.testing.assert_close(y, fake_quantize(x, ROW) @ fake_quantize(w, TILE).t())
    torch.testing.assert_close(x.grad, fake_quantize(dy, ROW) @ fake_quantize(w, TILE))
    torch.testing.assert_close(w.grad, fake_quantize(dy, COL).t() @ fake_quantize(x, COL))
    # and all three are close to full precision, within e4m3's error
    assert rel_err(y, x @ w.t()) < 0.05
    assert rel_err(x.grad, dy @ w) < 0.05
    assert rel_err(w.grad, dy.t() @ x) < 0.05
    assert w.grad.dtype == torch.float32


def test_fp8_linear_saves_its_input_in_fp8():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    y = EmulatedFP8Linear.apply(x, w, torch.float32)
    saved = y.grad_fn.saved_tensors
    assert saved[0].dtype == torch.float8_e4m3fn and saved[0].shape == x.shape
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)


def test_grouped_linear_matches_per_expert_fp8_linear():
    """Each expert's rows through the grouped function = the dense FP8 linear on that group alone."""
    torch.manual_seed(0)
    E, N, K = 4, 130, 96
    ends = torch.tensor([70, 70, 260, 300], dtype=torch.int32)
    x = torch.randn(300, K, requires_grad=True)
    w = torch.randn(E, N, K, requires_grad=True)
    dy = torch.randn(300, N)
    y = EmulatedFP8GroupedLinear.apply(x, w, ends, torch.float32)
    y.backward(dy)
    bounds = [(0, 70), (70, 70), (70, 260), (260, 300)]
    for e, (s, t) in enumerate(bounds):
        xe = x.detach()[s:t].clone().requires_grad_()
        we = w.detach()[e].clone().requires_grad_()
        if t > s:
            ye = EmulatedFP8Linear.apply(xe, we, torch.float32)
            ye.backward(dy[s:t])
            torch.testing.assert_close(y[s:t], ye)
            torch.testing.assert_close(x.grad[s:t], xe.grad)
            torch.testing.assert_close(w.grad[e], we.grad)
        else:
            assert (w.grad[e] == 0).all()


def tiny_moe_cfg(**kw):
    return preset("debug", **kw)


def test_fp8_experts_close_to_high_precision_and_grads_flow():
    torch.manual_seed(0)
    cfg = tiny_moe_cfg()
    model = Transformer.from_config(cfg, seed=0).train()
    ref_experts = model.moe_layers[0].experts
    T, D = 64, cfg.hidden_size
    x = torch.randn(T, D)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts)[:cfg.num_experts_per_tok] for _ in range(T)])
    gates = torch.rand(T, cfg.num_experts_per_tok)
    x1 = x.clone().requires_grad_()
    y_ref = ref_experts.forward_looped(x1, ids, gates)
    y_ref.square().sum().backward()
    ref_grads = (x1.grad, ref_experts.w13.grad.clone(), ref_experts.w2.grad.clone())
    ref_experts.zero_grad()
    fp8 = FP8RoutedExperts.__new__(FP8RoutedExperts)
    fp8.__dict__.update(ref_experts.__dict__)
    x2 = x.clone().requires_grad_()
    y = fp8(x2, ids, gates)
    y.square().sum().backward()
    assert rel_err(y, y_ref) < 0.1  # two chained FP8 GEMMs, each a few % from fp32
    for got, want in zip((x2.grad, fp8.w13.grad, fp8.w2.grad), ref_grads):
        assert rel_err(got, want) < 0.15


def test_install_swaps_the_right_modules():
    cfg = preset("debug")
    model = Transformer.from_config(cfg, seed=0)
    before = {id(p) for p in model.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the emulation takes every shape: no fallback warning
        report = install_fp8(model)
    assert {id(p) for p in model.parameters()} == before  # same parameter objects: optimizers keep working
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in fp8_install.FP8_LINEARS and isinstance(m, nn.Linear):
            assert type(m) is FP8Linear, name
        if leaf in ("lm_head", "eh_proj") or name.endswith("gate"):
            assert type(m) in (nn.Linear,) or not isinstance(m, nn.Linear) or type(m) is not FP8Linear, name
        if name.endswith("experts") and not name.endswith("shared_experts"):
            assert type(m) is FP8RoutedExperts, name
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    assert not report["bf16"] and len(report["fp8"]) > 0


def test_gpu_backend_fallback_warns_once_listing_the_layers(monkeypatch):
    monkeypatch.setattr(fp8_install, "check_fp8_device", lambda device: None)
    model = Transformer.from_config(preset("debug", hidden_size=128, moe_intermediate_size=128,
                                           intermediate_size=256), seed=0)
    with pytest.warns(UserWarning) as record:
        report = install_fp8(model, backend="gpu")
    fp8_warnings = [w for w in record if "FP8:" in str(w.message)]
    assert len(fp8_warnings) == 1
    message = str(fp8_warnings[0].message)
    for name in report["bf16"]:
        assert name in message
    assert report["bf16"] and report["fp8"]  # e.g. kv_a (128 -> kv_lora_rank + rope) falls back
    # fallen-back layers are untouched nn.Linear; swapped ones take whole 128-blocks
    mods = dict(model.named_modules())
    for name in report["fp8"]:
        m = mods[name]
        if isinstance(m, FP8Linear):
            assert m.in_features % 128 == 0 and m.out_features % 128 == 0


def test_device_errors_name_the_device(monkeypatch):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fp8_install.check_fp8_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match="A100.*SM 8.0"):
        fp8_install.check_fp8_device(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="backend"):
        install_fp8(nn.Linear(2, 2), backend="fp4")


def test_fp8_linear_under_autocast_returns_bf16_and_fp32_master_grads():
    lin = nn.Linear(256, 128, bias=False)
    assert install_fp8(nn.Sequential()) == {"fp8": [], "bf16": []}  # nothing to swap
    m = nn.Module()
    m.o_proj = lin
    install_fp8(m)
    x = torch.randn(4, 8, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m.o_proj(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 8, 128)
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = F.linear(x.detach(), lin.weight.detach())
    assert rel_err(y, ref) < 0.06


def test_debug_preset_trains_with_train_dtype_fp8(tmp_path, monkeypatch):
    """8 steps of 2 micro-batches (so the per-step weight cache is on) of a 2-layer debug model learn, with
    V3's BF16 AdamW moments and the SwiGLU recompute."""
    from nanoseek.train.config import parse_args
    from nanoseek.train.trainer import train
    args = ["--preset", "debug", "--data.n_docs", "200", "--data.val_docs", "20", "--data.vocab_size", "300",
            "--data.seq_len", "32", "--data.difficulty_max", "3", "--train.batch_size", "2", "--train.log_every",
            "1", "--train.eval_every", "0", "--train.samples", "0", "--train.eval_problems", "0",
            "--train.tensorboard", "false", "--train.warmup_steps", "2", "--train.lr", "3e-3",
            "--train.max_steps", "8", "--train.grad_accum", "2", "--model.num_hidden_layers", "2",
            "--train.dtype", "fp8", "--train.bf16_moments", "true", "--train.fp8_recompute_swiglu", "true",
            "--train.out_dir", str(tmp_path)]
    calls, quantized = [], []
    get = WeightCache.get

    def counting_get(self, w, fn):
        calls.append(1)
        return get(self, w, lambda t: quantized.append(1) or fn(t))
    monkeypatch.setattr(WeightCache, "get", counting_get)
    train(parse_args(args))
    assert quantized and len(calls) == 2 * len(quantized)  # each weight quantized once per 2 micro-batches
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2  # it learns


def test_without_autograd_the_reference_maths_runs():
    """Evaluation and generation (no autograd) use the reference modules' maths, exactly."""
    torch.manual_seed(0)
    model = Transformer.from_config(preset("debug"), seed=0)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
        install_fp8(model)
        got = model(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(model(ids).logits.detach(), want)  # with autograd: FP8


def test_install_takes_the_parts_asked_for():
    """parts= swaps only the attention projections, the MLP / shared-expert linears or the routed experts; an
    unknown part is an error that lists the parts."""
    from nanoseek import Transformer, preset
    from nanoseek.fp8 import install_fp8
    from nanoseek.fp8.install import ATTENTION_LINEARS, MLP_LINEARS, FP8Linear, FP8RoutedExperts

    for parts in [("attention",), ("mlp",), ("experts",), ("attention", "mlp")]:
        model = Transformer.from_config(preset("debug"), seed=0)
        install_fp8(model, backend="emulate", parts=parts)
        for name, m in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ATTENTION_LINEARS:
                assert isinstance(m, FP8Linear) == ("attention" in parts), name
            elif leaf in MLP_LINEARS:
                assert isinstance(m, FP8Linear) == ("mlp" in parts), name
            elif name.endswith(".experts"):
                assert isinstance(m, FP8RoutedExperts) == ("experts" in parts), name
    with pytest.raises(ValueError, match="attention"):
        install_fp8(Transformer.from_config(preset("debug"), seed=0), backend="emulate", parts=("router",))
