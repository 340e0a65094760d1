"""Pretraining: exact resume, checkpoints that load elsewhere, errors for bad input, schedules, optimizer."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import Transformer
from nanoseek.train.config import help_text, parse_args
from nanoseek.train.master_weights import AdamWMasterWeights
from nanoseek.train.optim import lr_multiplier
from nanoseek.train.trainer import train

TINY = ["--preset", "debug", "--data.n_docs", "300", "--data.val_docs", "40", "--data.vocab_size", "300",
        "--data.seq_len", "32", "--data.difficulty_max", "3", "--train.batch_size", "4", "--train.log_every", "1",
        "--train.eval_every", "0", "--train.samples", "0", "--train.eval_problems", "0", "--train.tensorboard", "false",
        "--train.warmup_steps", "2", "--train.lr", "3e-3", "--train.keep_last", "5", "--train.bias_gamma", "0.01"]


def run(tmp: Path, *extra: str) -> dict:
    return train(parse_args([*TINY, "--train.out_dir", str(tmp), *extra]))


def train_losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["mtp_loss"]) for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("optimizer", [[], ["--train.bf16_moments", "true"],
                                       ["--train.dtype", "bf16", "--train.master_weights", "true"],
                                       ["--train.dtype", "bf16", "--train.master_weights", "true",
                                        "--train.bf16_moments", "true"],
                                       ["--train.dtype", "bf16", "--train.master_weights", "true",
                                        "--train.grad_accum", "2"]],
                         ids=["adamw", "bf16-moments", "master-weights", "master-weights-bf16-moments",
                              "master-weights-accumulated"])
def test_resume_continues_exactly(tmp_path, optimizer):
    """A run killed after its step-3 checkpoint (simulated: the later checkpoint deleted, its later metric
    records kept) resumes from the saved configuration to the same losses and weights as the run that
    went straight through; the replayed steps are logged once. Every optimizer: with bf16 moments, and with
    bf16 GEMM weights whose fp32 masters the checkpoints hold."""
    import shutil

    run(tmp_path / "straight", "--train.max_steps", "6", "--train.ckpt_every", "3", *optimizer)
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-000006")
    (tmp_path / "split" / "checkpoints" / ".step-000006.tmp-x1y2").mkdir()  # a write cut by kill -9
    train(parse_args(["--train.out_dir", str(tmp_path / "split"), "--resume"]))  # no other flag retyped
    assert not list((tmp_path / "split" / "checkpoints").glob(".step-*"))
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))  # no duplicates
    assert straight == split  # identical losses, MTP losses included
    a = nanoseek.load_pretrained(tmp_path / "straight" / "checkpoints" / "step-000006")
    b = nanoseek.load_pretrained(tmp_path / "split" / "checkpoints" / "step-000006")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    bias = a.moe_layers[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the router bias moved and was saved
    from safetensors import safe_open
    with safe_open(tmp_path / "split" / "checkpoints" / "step-000006" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    from nanoseek.train.master_weights import gemm_weights
    for w in gemm_weights(b):  # the fp32 masters were saved, not their bf16 copies (nor fp32 weights rounded)
        assert not torch.equal(w, w.to(torch.bfloat16).float())
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "step-000006" / "trainer_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split" / "checkpoints" / "step-000006" / "trainer_state.pt", weights_only=True)
    for key, moments in sa["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, sb["optimizer"]["state"][key][name]), (key, name)
            assert value.dtype == sb["optimizer"]["state"][key][name].dtype, (key, name)


def test_checkpoint_loads_in_transformers_and_learning_happens(tmp_path):
    transformers = pytest.importorskip("transformers")
    summary = run(tmp_path, "--train.max_steps", "25", "--train.eval_every", "10")
    ckpt = Path(summary["checkpoint"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "run.json"):
        assert (ckpt / name).is_file(), name
    record = json.loads((ckpt / "run.json").read_text())
    assert {"git_commit", "versions", "hardware", "config"} <= set(record)
    losses = train_losses(tmp_path)
    assert losses[25][0] < losses[1][0] - 1.0
    assert summary["val_loss"] < summary["unigram_entropy"]
    ours = nanoseek.load_pretrained(ckpt).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() < 1e-4
    for png in ("loss.png", "lr.png", "expert_load.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, "--train.max_steps", "2")
    first = tmp_path / "checkpoints" / "step-000002"
    before = (first / "model.safetensors").read_bytes()
    import nanoseek.hf

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nanoseek.hf, "save_file", disk_full)
    with pytest.raises(SystemExit, match="previous checkpoint .*step-000002 is intact"):
        run(tmp_path, "--train.max_steps", "4", "--resume")
    assert (first / "model.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="did you mean --model.hidden_size"):
        parse_args(["--model.hiden_size", "3"])
    with pytest.raises(SystemExit, match="--train.lr expects float, got 'fast'"):
        parse_args(["--train.lr", "fast"])
    with pytest.raises(SystemExit, match="unknown option '--optim.lr'"):
        parse_args(["--optim.lr", "1"])
    with pytest.raises(SystemExit, match="--train.schedule 'linear' is unknown"):
        run(tmp_path / "s", "--train.schedule", "linear")
    with pytest.raises(SystemExit, match="unknown preset"):
        parse_args(["--preset", "huge"])
    with pytest.raises(SystemExit, match="seq_len 4096 exceeds the model's max_position_embeddings=512"):
        run(tmp_path, "--data.seq_len", "4096")
    with pytest.raises(SystemExit, match="does not exist|not found|missing"):
        run(tmp_path / "x", "--data.source", str(tmp_path / "no-such-file.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit, match="empty|no text|holds 0"):
        run(tmp_path / "y", "--data.source", str(empty))
    run(tmp_path / "z", "--train.max_steps", "1")
    with pytest.raises(SystemExit, match="would change it: --model.hidden_size 96 .the run has 64"):
        run(tmp_path / "z", "--train.max_steps", "2", "--model.hidden_size", "96", "--resume")
    with pytest.raises(SystemExit, match="no checkpoint"):
        run(tmp_path / "fresh", "--resume")


def test_config_file_and_help(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('preset = "debug"\n[model]\nhidden_size = 96\n[train]\nlr = 0.01\n')
    r = parse_args(["--config", str(cfg), "--train.lr", "0.02"])
    assert r.model.hidden_size == 96 and r.train.lr == 0.02 and r.preset == "debug"
    text = help_text()
    for option in ("--model.kv_lora_rank", "--train.mtp_lambda", "--train.bias_gamma", "--data.source"):
        assert option in text


def test_user_text_data_trains(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"document {i}: " + "the cat sat on the mat. " * 5})
                                for i in range(120)))
    summary = run(tmp_path / "out", "--data.source", str(corpus), "--train.max_steps", "3", "--train.samples", "3")
    assert math.isfinite(summary["val_loss"])
    prompts = [s["prompt"] for s in summary["samples"]]  # openings of different documents, held-out first
    assert len(prompts) == 3 and len(set(prompts)) == 3
    assert prompts[:2] == ["document 118: the cat", "document 119: the cat"]  # the 2 validation documents
    assert prompts[2].startswith("document ")


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "nanoseek.cli", "train", *TINY, "--train.out_dir", str(tmp_path),
           "--train.max_steps", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if "step      2/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped by SIGTERM" in out
    ckpts = list((tmp_path / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1


def test_schedules():
    kw = dict(total=100, warmup=10, decay_frac=0.4, min_ratio=0.1)
    for schedule in ("v3", "wsd", "cosine"):
        values = [lr_multiplier(s, schedule=schedule, **kw) for s in range(100)]
        assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
        assert lr_multiplier(100, schedule=schedule, **kw) == pytest.approx(0.1)
        assert all(b <= a + 1e-12 for a, b in zip(values[10:], values[11:]))
    assert lr_multiplier(50, schedule="v3", **kw) == 1.0  # constant before the decay
    assert lr_multiplier(50, schedule="cosine", **kw) < 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(1, schedule="linear", **kw)


def bf16_moment_adamw(params, **kw) -> AdamWMasterWeights:
    """The trainer's optimizer for --train.bf16_moments: AdamW with bf16 moments, no master weights."""
    return AdamWMasterWeights(params, [], moments_dtype=torch.bfloat16, **kw)


def test_bf16_moment_adamw_tracks_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ours = bf16_moment_adamw([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(64, 32)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert ours.state[b]["exp_avg"].dtype == torch.bfloat16
    assert (a - b).abs().max() < 2e-3
    assert (a - b).abs().max() < 0.05 * (a.detach() - a.detach().mean()).abs().mean()


def test_bf16_moment_adamw_resumes_exactly():
    """Two steps in one go against a step, a state_dict round trip into a fresh optimizer, and a step: the same
    weights bit for bit, and the moments still bf16 after the load (torch casts loaded state to the
    parameter's dtype)."""
    g = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(6, 5, generator=g), [torch.randn(6, 5, generator=g) for _ in range(2)]

    def optimizer(p):
        return bf16_moment_adamw([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=False)

    straight = torch.nn.Parameter(w0.clone())
    opt = optimizer(straight)
    for gr in grads:
        straight.grad = gr.clone()
        opt.step()
    resumed = torch.nn.Parameter(w0.clone())
    first = optimizer(resumed)
    resumed.grad = grads[0].clone()
    first.step()
    second = optimizer(resumed)
    second.load_state_dict(first.state_dict())
    assert all(second.state[resumed][k].dtype == torch.bfloat16 for k in ("exp_avg", "exp_avg_sq"))
    resumed.grad = grads[1].clone()
    second.step()
    assert torch.equal(straight, resumed)
    assert torch.equal(opt.state[straight]["exp_avg_sq"], second.state[resumed]["exp_avg_sq"])


def one_debug_step(prepare) -> tuple[dict, dict]:
    """One train_step of a fresh debug model (after `prepare(model)`) on a fixed batch."""
    from nanoseek import preset
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.step import train_step

    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    model = Transformer.from_config(preset("debug"), seed=0).train()
    prepare(model)
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    out = train_step(model, opt, [(x[:, :-1], x[:, 1:])], lr=1e-3, autocast=contextlib.nullcontext(),
                     grad_clip=1.0, mtp_lambda=0.3, seq_aux_alpha=1e-4, bias_gamma=1e-3)
    return out, model.state_dict()


def test_activation_checkpointing_gives_the_same_step():
    from nanoseek.train.step import enable_activation_checkpointing

    a, sa = one_debug_step(lambda model: None)
    b, sb = one_debug_step(enable_activation_checkpointing)
    assert torch.allclose(a["loss"], b["loss"]) and torch.equal(a["loads"], b["loads"])  # loads not doubled
    for name in sa:
        assert torch.allclose(sa[name], sb[name], atol=1e-6), name


def test_compiled_cross_entropy_matches_plain():
    from nanoseek.train.step import compiled_cross_entropy, cross_entropy

    logits = torch.randn(2, 8, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 8))
    want = cross_entropy(logits, targets)
    (g_want,) = torch.autograd.grad(want, logits)
    try:
        got = compiled_cross_entropy(logits, targets)
    except Exception as e:  # no working C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
    (g_got,) = torch.autograd.grad(got, logits)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(g_got.float(), g_want.float(), atol=1e-3)


def test_compiled_blocks_trace_on_cpu():
    """Dynamo + fake tensors go through every block (aot_eager: no C++ toolchain needed)."""

    def compile_blocks(model):
        for block in [*model.layers.values(), *model.mtp]:
            block.compile(backend="aot_eager")

    def checkpoint_and_compile(model):
        from nanoseek.train.step import enable_activation_checkpointing

        enable_activation_checkpointing(model)  # as the trainer does: hooks first, then compile
        compile_blocks(model)

    plain, _ = one_debug_step(lambda model: None)
    compiled, _ = one_debug_step(compile_blocks)
    assert torch.allclose(plain["loss"], compiled["loss"], atol=1e-5)
    both, _ = one_debug_step(checkpoint_and_compile)
    assert torch.allclose(plain["loss"], both["loss"], atol=1e-5) and torch.equal(plain["loads"], both["loads"])


def debug_model_and_batches(seed: int = 0, optimizer=None):
    """A fresh debug model, its AdamW (or `optimizer(params)`) and two (4, 32) micro-batches."""
    from nanoseek import preset
    from nanoseek.train.optim import build_optimizer

    model = Transformer.from_config(preset("debug"), seed=0).train()
    opt = optimizer(model.parameters()) if optimizer else build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    x = torch.randint(0, 512, (2, 4, 33), generator=torch.Generator().manual_seed(seed))
    return model, opt, [(b[:, :-1], b[:, 1:]) for b in x]


def test_split_step_equals_train_step():
    from nanoseek.train.step import accumulate_gradients, optimizer_step, pretraining_loss, train_step

    a, opt_a, _ = debug_model_and_batches()
    b, opt_b, _ = debug_model_and_batches()
    for step in range(2):
        _, _, batches = debug_model_and_batches(seed=step)
        want = train_step(a, opt_a, batches, lr=1e-3, autocast=contextlib.nullcontext(), grad_clip=1.0,
                          mtp_lambda=0.3, seq_aux_alpha=1e-2, bias_gamma=1e-2)
        got = accumulate_gradients(b, batches, pretraining_loss(0.3, 1e-2), contextlib.nullcontext())
        got |= optimizer_step(b, opt_b, lr=1e-3, grad_clip=1.0, bias_gamma=1e-2)
        assert list(got) == list(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_all_reduce_hook_feeds_the_bias_update():
    from nanoseek.train.step import accumulate_gradients, optimizer_step, pretraining_loss

    def step(all_reduce=None):
        model, opt, batches = debug_model_and_batches()
        accumulate_gradients(model, batches, pretraining_loss(0.3, 1e-2), contextlib.nullcontext())
        out = optimizer_step(model, opt, lr=1e-3, grad_clip=1.0, bias_gamma=1e-2, all_reduce=all_reduce)
        return model, out

    seen = []

    def equalize(loads):  # stands in for a sum over ranks that came out perfectly balanced
        seen.append(loads.clone())
        loads.fill_(1.0)

    plain, out = step()
    assert out["maxvio"] > 0 and any(m.gate.e_score_correction_bias.any() for m in plain.moe_layers)
    model, out = step(equalize)
    n_main = sum(hasattr(block.mlp, "gate") for block in model.layers.values())
    assert len(seen) == 1 and seen[0].shape == (len(model.moe_layers), model.config.n_routed_experts)
    assert seen[0].sum() > 0  # it was given this step's counts
    assert out["loads"].shape == (n_main, model.config.n_routed_experts)
    assert torch.equal(out["loads"], torch.ones_like(out["loads"]))  # the reduced counts are reported
    assert out["maxvio"] == 0 and not out["maxvio_layers"].any()
    for m in model.moe_layers:  # equal loads: no bias moves, and the counts start again from zero
        assert not m.gate.e_score_correction_bias.any() and not m.load_since_update.any()


def test_grad_clip_zero_reports_the_norm_without_clipping():
    from nanoseek.train.step import accumulate_gradients, optimizer_step, pretraining_loss

    class Recorder(torch.optim.Optimizer):  # keeps the gradients it is stepped with, moves nothing
        def __init__(self, params):
            super().__init__(list(params), {"lr": 0.0})

        def step(self, closure=None):
            self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]

    model, opt, batches = debug_model_and_batches(optimizer=Recorder)

    def step(grad_clip):  # lr 0 and gamma 0: the model never changes, so each step has the same gradients
        accumulate_gradients(model, batches, pretraining_loss(0.3, 1e-2), contextlib.nullcontext())
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        out = optimizer_step(model, opt, lr=0.0, grad_clip=grad_clip, bias_gamma=0.0)
        assert all(p.grad is None for p in model.parameters())
        return grads, out["grad_norm"], opt.grads

    grads, norm, stepped = step(0.0)
    assert torch.allclose(norm, torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert norm > 0.5
    assert all(torch.equal(a, b) for a, b in zip(stepped, grads, strict=True))  # not clipped
    _, clipped_norm, stepped = step(0.5)
    assert torch.equal(clipped_norm, norm)  # the norm before clipping
    assert all(torch.allclose(a, b * (0.5 / (norm + 1e-6))) for a, b in zip(stepped, grads, strict=True))


def test_activation_checkpointing_keeps_names_and_checkpoints(tmp_path):
    from nanoseek import preset
    from nanoseek.hf import hf_state_dict
    from nanoseek.train.checkpoint import load_checkpoint, save_checkpoint
    from nanoseek.train.step import enable_activation_checkpointing

    plain = Transformer.from_config(preset("debug"), seed=0).train()
    model = Transformer.from_config(preset("debug"), seed=0).train()
    enable_activation_checkpointing(model)
    enable_activation_checkpointing(model)  # a second call changes nothing
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(hf_state_dict(model)) == list(hf_state_dict(plain))  # the checkpoint's names
    for block in [*model.layers.values(), *model.mtp]:
        assert "forward" not in vars(block)
    assert callable(model.mtp[0].merge) and model.mtp[0].shared_head.norm is not None
    assert model.mtp[0].embed_tokens is None

    path = save_checkpoint(tmp_path, 1, model, {"step": 1}, None, {}, keep_last=1)
    other = Transformer.from_config(preset("debug"), seed=1)
    assert load_checkpoint(path, other) == {"step": 1}
    for (name, x), y in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(x, y), name

    ids = torch.randint(0, 512, (2, 16))

    def saved_outside_checkpoints(m) -> int:
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
            m(ids, mtp_tokens=ids)
        return len(packed)

    assert saved_outside_checkpoints(model) < saved_outside_checkpoints(plain) / 2  # blocks keep no activations


def test_data_kinds_restricts_the_synthetic_corpus(tmp_path):
    """--data.kinds countdown: a Countdown-only corpus (its own cache key); the default key is the one data
    caches had before the option existed (so old run directories keep their cached shards)."""
    import dataclasses
    import hashlib

    from nanoseek.train.config import DataConfig
    from nanoseek.train.trainer import prepare_data

    cfg = DataConfig(n_docs=40, val_docs=4, vocab_size=300, seq_len=16, kinds="countdown")
    data = prepare_data(cfg, tmp_path, log=lambda *_: None)
    key = data.train_dir.parent.name
    default = DataConfig(n_docs=40, val_docs=4, vocab_size=300, seq_len=16)
    old_key = hashlib.sha256(json.dumps({k: v for k, v in dataclasses.asdict(default).items() if k != "kinds"},
                                        sort_keys=True).encode()).hexdigest()[:12]
    assert key != old_key
    assert prepare_data(default, tmp_path, log=lambda *_: None).train_dir.parent.name == old_key
    from nanoseek.data.corpus import synthetic_corpus

    only = synthetic_corpus(40, 0, (1, 3), 0.5, 0.15, kinds=cfg.kind_list())
    mixed = synthetic_corpus(40, 0, (1, 3), 0.5, 0.15, kinds=default.kind_list())
    assert all("the numbers" in d for d in only)  # every Countdown prompt phrasing names "the numbers"
    assert not all("the numbers" in d for d in mixed)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch_and_keeps_foreach_fast_route(max_norm):
    """fp32 gradients: exactly torch's clip_grad_norm_. bf16 gradients: within bf16 rounding of it, and each
    `_foreach_mul_` gets a coefficient of its tensors' dtype (the condition of ATen's multi-tensor route;
    an fp32 coefficient sends bf16 gradients to one slow kernel per tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nanoseek.train.step import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (4, 4, 4)]
    base = [torch.randn(s, generator=g) for s in shapes]

    def params(dtype):
        ps = [torch.nn.Parameter(b.to(dtype)) for b in base]
        for p in ps:
            p.grad = p.detach().clone() * 3
        return ps

    want, got = params(torch.float32), params(torch.float32)
    n_want = torch.nn.utils.clip_grad_norm_(want, max_norm)
    n_got = clip_grad_norm(got, max_norm)
    assert torch.equal(n_want, n_got)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(want, got))

    class Calls(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._foreach_mul_:
                self.seen.append((args[0][0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    mixed = params(torch.bfloat16) + params(torch.float32)
    reference = params(torch.bfloat16) + params(torch.float32)
    torch.nn.utils.clip_grad_norm_(reference, max_norm)
    with Calls() as calls:
        clip_grad_norm(mixed, max_norm)
    assert sorted(calls.seen, key=str) == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    for a, b in zip(reference, mixed):
        assert torch.allclose(a.grad.float(), b.grad.float(), rtol=8e-3), a.dtype


def test_master_weights_refuse_settings_whose_numbers_they_cannot_match(tmp_path):
    """--train.master_weights without bf16 autocast, or with FP8: a clear stop naming the fix."""
    with pytest.raises(SystemExit, match="needs bf16 autocast"):
        run(tmp_path / "a", "--train.master_weights", "true", "--train.max_steps", "1")
    with pytest.raises(SystemExit, match="FP8 quantizes"):
        run(tmp_path / "b", "--train.dtype", "fp8", "--train.master_weights", "true", "--train.max_steps", "1")


def test_master_weights_auto_turns_on_only_where_it_gives_the_default_numbers(tmp_path):
    """--train.master_weights is 'auto' by default: on for bf16 autocast on a GPU in one process without FP8,
    off elsewhere; an explicit value is kept, and the decided value is what run.json saves."""
    from nanoseek.train.trainer import resolve_master_weights
    auto = parse_args([]).train
    assert auto.master_weights is None and parse_args(["--train.master_weights", "auto"]).train.master_weights is None
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read
    assert resolve_master_weights(auto, True, gpu, parallel=False).master_weights is True
    assert resolve_master_weights(auto, True, cpu, parallel=False).master_weights is False
    assert resolve_master_weights(auto, False, gpu, parallel=False).master_weights is False
    assert resolve_master_weights(auto, True, gpu, parallel=True).master_weights is False
    fp8 = parse_args(["--train.dtype", "fp8"]).train
    assert resolve_master_weights(fp8, True, gpu, parallel=False).master_weights is False
    off = parse_args(["--train.master_weights", "false"]).train
    assert resolve_master_weights(off, True, gpu, parallel=False).master_weights is False
    with pytest.raises(SystemExit, match="expects auto, true or false, got 'maybe'"):
        parse_args(["--train.master_weights", "maybe"])
    summary = run(tmp_path, "--train.max_steps", "1", "--train.ckpt_every", "1")
    saved = json.loads(next((tmp_path / "checkpoints").glob("step-*/run.json")).read_text())
    assert saved["config"]["train"]["master_weights"] is False, summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_default_gpu_run_holds_fp32_masters_and_resumes(tmp_path):
    """On a GPU the defaults (bf16 autocast, master weights 'auto') train with bf16 GEMM weights and fp32
    masters: run.json saves the decided value, the checkpoint holds fp32 weights, and --resume continues."""
    run(tmp_path, "--train.device", "cuda", "--train.max_steps", "2", "--train.ckpt_every", "2")
    saved = json.loads((tmp_path / "checkpoints" / "step-000002" / "run.json").read_text())
    assert saved["config"]["train"]["master_weights"] is True
    train(parse_args(["--train.out_dir", str(tmp_path), "--resume", "--train.max_steps", "4"]))
    losses = train_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v[0]) for v in losses.values())
    model = nanoseek.load_pretrained(tmp_path / "checkpoints" / "step-000004")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_end_of_run_evaluation_fits_a_small_context(tmp_path):
    """The held-out evaluation's completions are capped to what the context leaves after the prompts (this
    tiny tokenizer makes 300-token prompts against a 512-token context and 256 new tokens): no failure at the
    end of a run."""
    summary = run(tmp_path, "--train.max_steps", "1", "--train.eval_problems", "2")
    assert summary["heldout"]["n"] == 2


def test_fp8_parts_flag_names_the_parts(tmp_path):
    """--train.fp8_parts with an unknown part stops with the list of parts."""
    with pytest.raises(SystemExit, match="attention"):
        run(tmp_path, "--train.dtype", "fp8", "--train.fp8_parts", "attention,router", "--train.max_steps", "1")
