"""Checkpoint parity with `transformers` (the arbiter of numerics) and checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch

import nanoseek
from nanoseek import Transformer, preset
from nanoseek.hf import CheckpointError, checkpoint_files

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, qk_nope_head_dim=12,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
            first_k_dense_replace=1, max_position_embeddings=128)

V3_CASES = {
    "q_lora-groups-4-2": dict(q_lora_rank=20, n_group=4, topk_group=2),
    "no_q_lora-1-group": dict(q_lora_rank=None, n_group=1, topk_group=1),
    "groups-2-1-yarn": dict(q_lora_rank=20, n_group=2, topk_group=1, rope_scaling=YARN),
    "no_interleave-yarn": dict(q_lora_rank=20, n_group=4, topk_group=3, rope_interleave=False, rope_scaling=YARN),
    "two_shared-no_norm": dict(q_lora_rank=None, n_group=2, topk_group=2, n_shared_experts=2,
                               norm_topk_prob=False, routed_scaling_factor=1.5),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every weight and the router bias non-trivial values (norm weights included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.is_floating_point() and "inv_freq" not in name and t.dim() >= 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def hf_model(model_type: str, overrides: dict, seed: int = 0):
    kw = {**TINY, **overrides}
    if model_type == "deepseek_v3":
        rope_scaling = kw.pop("rope_scaling", None)
        cfg = transformers.DeepseekV3Config(**kw, rope_scaling=rope_scaling)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**kw)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    randomize_(model, seed)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_v3_logits_match_transformers(tmp_path, case):
    ref = hf_model("deepseek_v3", V3_CASES[case])
    sharded = case.startswith("groups")
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    if sharded:
        assert len(checkpoint_files(tmp_path)) > 1
    ours = nanoseek.load_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, ref(ids).logits) <= 1e-4


@pytest.mark.parametrize("overrides", [
    dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy"),
    dict(q_lora_rank=20, n_group=4, topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=2.0,
         rope_scaling=YARN),
], ids=["greedy", "group_limited-yarn"])
def test_v2_logits_match_transformers(tmp_path, overrides):
    overrides = dict(overrides)
    rope_scaling = overrides.pop("rope_scaling", None)
    ref = hf_model("deepseek_v2", {**overrides, "rope_scaling": rope_scaling} if rope_scaling else overrides)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours.config.model_type == "deepseek_v2" and ours.config.scoring_func == "softmax"
    ids = torch.randint(0, TINY["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, ref(ids).logits) <= 1e-4


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    ref = hf_model("deepseek_v3", V3_CASES["q_lora-groups-4-2"]).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours.embed_tokens.weight.dtype == torch.float32
    # the same bf16-rounded weights, computed in fp32 (rope buffers rebuilt by from_pretrained)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, ref(ids).logits) <= 1e-4


@pytest.mark.parametrize("case", ["q_lora-groups-4-2", "no_interleave-yarn"])
def test_round_trip_through_transformers(tmp_path, case):
    overrides = {k: v for k, v in V3_CASES[case].items()}
    ours = Transformer.from_config(preset("debug", **{**TINY, **overrides}), seed=0)
    randomize_(ours, 5)
    nanoseek.save_pretrained(ours.eval(), tmp_path / "ckpt", max_shard_size="30KB")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, ref(ids).logits) <= 1e-4


def test_mtp_save_load_is_bit_exact(tmp_path):
    ours = Transformer.from_config(preset("debug", num_nextn_predict_layers=2), seed=0).eval()
    randomize_(ours, 6)
    nanoseek.save_pretrained(ours, tmp_path / "a", dtype=torch.float32)
    keys = {k for ks in checkpoint_files(tmp_path / "a").values() for k in ks}
    L = ours.config.num_hidden_layers
    for k in range(2):
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.3.up_proj.weight"):
            assert f"model.layers.{L + k}.{name}" in keys
    back = nanoseek.load_pretrained(tmp_path / "a").eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = ours(ids, mtp_tokens=ids), back(ids, mtp_tokens=ids)
    assert torch.equal(a.logits, b.logits)
    assert len(b.mtp_logits) == 2
    for x, y in zip(a.mtp_logits, b.mtp_logits):
        assert torch.equal(x, y)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_untied_mtp_copies_are_kept(tmp_path):
    ours = Transformer.from_config(preset("debug"), seed=0).eval()
    nanoseek.save_pretrained(ours, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    L = ours.config.num_hidden_layers
    state[f"model.layers.{L}.shared_head.head.weight"] += 1.0
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = nanoseek.load_pretrained(tmp_path)
    assert back.mtp[0].shared_head.head is not None
    assert torch.equal(back.mtp[0].shared_head.head.weight, ours.lm_head.weight + 1.0)


def test_fp8_block_scaled_weights_are_dequantised(tmp_path):
    ours = Transformer.from_config(preset("debug", hidden_size=160, q_lora_rank=144), seed=0)
    nanoseek.save_pretrained(ours, tmp_path, dtype=torch.bfloat16)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_a_proj.weight"  # (144, 160): partial 128-blocks on both axes
    w = state[name].float()
    scale = torch.tensor([[0.5, 2.0], [0.25, 4.0]])
    full = scale.repeat_interleave(128, 0)[:144].repeat_interleave(128, 1)[:, :160]
    state[name] = (w / full).to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = scale
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = nanoseek.load_pretrained(tmp_path, dtype=torch.float32)
    expected = state[name].float() * full
    assert torch.equal(back.layers["0"].self_attn.q_a_proj.weight, expected)
    assert (expected - w).abs().max() <= 0.07 * w.abs().max()  # e4m3 rounding only


def test_bad_checkpoints_name_the_problem(tmp_path):
    ours = Transformer.from_config(preset("debug"), seed=0)
    nanoseek.save_pretrained(ours, tmp_path / "ok")
    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError, match="config.json"):
        nanoseek.load_pretrained(tmp_path / "nothing-here")
    state = load_file(tmp_path / "ok" / "model.safetensors")

    def variant(name: str, change) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
        s = dict(state)
        change(s, d)
        save_file(s, d / "model.safetensors", metadata={"format": "pt"})
        return str(d)

    missing = variant("missing", lambda s, d: s.pop("model.layers.1.mlp.experts.2.down_proj.weight"))
    with pytest.raises(CheckpointError, match="lacks weights.*layers.1.mlp.experts.w2"):
        nanoseek.load_pretrained(missing)
    extra = variant("extra", lambda s, d: s.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected key 'model.layers.0.self_attn.bogus.weight'"):
        nanoseek.load_pretrained(extra)
    shape = variant("shape", lambda s, d: s.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(3,\)"):
        nanoseek.load_pretrained(shape)

    def bad_config(d, **changes):
        cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    d = tmp_path / "mt"
    d.mkdir()
    bad_config(d, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama' is unsupported"):
        nanoseek.load_pretrained(d)
    bad_config(d, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu' is unsupported"):
        nanoseek.load_pretrained(d)
    bad_config(d, frobnicate=3)
    with pytest.raises(ValueError, match="field 'frobnicate'"):
        nanoseek.load_pretrained(d)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors only"):
        nanoseek.load_pretrained(tmp_path / "pickle")


def test_save_is_atomic_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ours = Transformer.from_config(preset("debug"), seed=0)
    nanoseek.save_pretrained(ours, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    import nanoseek.hf as hf

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        nanoseek.save_pretrained(ours, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    monkeypatch.undo()
    nanoseek.save_pretrained(ours, tmp_path / "ckpt")  # overwriting keeps non-weight files
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
