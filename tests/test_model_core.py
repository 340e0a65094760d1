"""Fast paths against their references, gradients, balance machinery, configs."""

from __future__ import annotations

import pytest
import torch

from nanoseek import ModelConfig, Transformer, preset
from nanoseek.config import PRESETS
from nanoseek.model.moe import max_violation, sequence_balance_loss, update_router_bias

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def needs_inductor() -> None:
    """Skip unless torch.compile's default backend works here (it needs a C++ toolchain on the CPU)."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")


def tiny(**overrides) -> Transformer:
    return Transformer.from_config(preset("debug", **overrides), seed=0).eval()


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_scaling": YARN},
                                       {"rope_interleave": False}])
def test_absorbed_decode_matches_expanded(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits  # expanded causal attention over the whole sequence
        cache = model.new_cache(batch_size=2, max_len=32)
        pre = model(ids[:, :12], cache=cache).logits  # prefill (expanded), fills the latent cache
        steps = [pre]
        for p in range(12, 20):  # one token at a time through the absorbed path
            pos = torch.full((2, 1), p)
            steps.append(model(ids[:, p:p + 1], positions=pos, cache=cache, kv_len=p + 1).logits)
        chunk = model(ids[:, 12:20], positions=torch.arange(12, 20).expand(2, 8), cache=cache,
                      kv_len=32).logits  # several absorbed queries at once, stale tail masked
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert (chunk - full[:, 12:]).abs().max() < 1e-5


def test_cache_is_latent_only():
    cfg = preset("bench-1b")
    model = Transformer(preset("debug"))
    cache = model.new_cache(1, 8, dtype=torch.bfloat16)
    per_layer = cache.bytes_per_token() // (model.config.num_hidden_layers + model.config.num_nextn_predict_layers)
    assert per_layer == 2 * (model.config.kv_lora_rank + model.config.qk_rope_head_dim)
    expanded = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert expanded / (cfg.kv_lora_rank + cfg.qk_rope_head_dim) > 4


def test_compiled_decode_shares_one_graph_across_layers():
    """Each attention layer works on its own layer's cache view, so compiled blocks carry no layer number:
    prefill + one decode step compile as many graphs for 4 MoE layers as for 2 (not one set per layer),
    write every layer's entries where the eager model does and give the same logits. A whole cache handed
    to a layer is refused."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 512, (2, 6))

    def run(layers: int, compile_blocks: bool):
        cfg = preset("debug", num_hidden_layers=layers, first_k_dense_replace=1, num_nextn_predict_layers=0)
        model = Transformer.from_config(cfg, seed=0).eval()
        if compile_blocks:
            for block in model.layers.values():
                block.compile(dynamic=False, backend="aot_eager")
        cache = model.new_cache(2, 16)
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            model(ids, cache=cache)  # prefill 0..5
            logits = model(ids[:, -1:], positions=torch.full((2, 1), 6), cache=cache, kv_len=7).logits
        return logits, cache, counters["stats"]["unique_graphs"], model

    _, _, graphs_2_moe, _ = run(3, True)
    logits, cache, graphs_4_moe, _ = run(5, True)
    want, want_cache, _, eager = run(5, False)
    assert graphs_4_moe == graphs_2_moe > 0
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(cache.data, want_cache.data)
    assert (want_cache.data[:, :, :7] != 0).flatten(2).any(-1).all()  # every layer and row written
    cos, sin = eager.rope(torch.full((2, 1), 7), torch.float32)
    with pytest.raises(ValueError, match="cache.layer"):
        eager.layers["1"].self_attn(torch.randn(2, 1, eager.config.hidden_size), cos, sin, want_cache,
                                    torch.full((2, 1), 7))


def test_logits_at_selects_one_position_per_row():
    """`logits_at` (a prefill's last prompt positions) gives those rows of the full logits."""
    model = Transformer.from_config(preset("debug"), seed=0).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    at = torch.tensor([6, 0, 3])
    with torch.no_grad():
        full = model(ids).logits
        some = model(ids, logits_at=at).logits
    assert some.shape == (3, 1, model.config.vocab_size)
    torch.testing.assert_close(some[:, 0], full[torch.arange(3), at], rtol=1e-5, atol=1e-5)


def test_grouped_experts_match_looped():
    model = tiny()
    moe = model.moe_layers[0]
    x = torch.randn(40, model.config.hidden_size)
    gates, ids, _ = moe.gate(x)
    gates = gates.detach()
    grouped = moe.experts.forward_grouped(x, ids, gates)  # training's combine (batched product)
    looped = moe.experts.forward_looped(x, ids, gates)
    assert (grouped - looped).abs().max() < 1e-6
    with torch.no_grad():  # inference's combine (fp32 gated sum)
        assert (moe.experts.forward_grouped(x, ids, gates) - looped).abs().max() < 1e-6
    gathered = moe.experts.forward_gathered(x[:3], ids[:3], gates[:3])  # the decode path
    assert (gathered - looped[:3]).abs().max() < 1e-6
    # gradients agree too (the grouped path's row gathers have gather-only backwards: SortRows, UnsortRows)
    def grads(forward):
        xg, gg = x.clone().requires_grad_(), gates.clone().requires_grad_()
        forward(xg, ids, gg).square().sum().backward()
        out = [xg.grad, gg.grad, moe.experts.w13.grad, moe.experts.w2.grad]
        moe.experts.zero_grad(set_to_none=True)
        return out

    for a, b in zip(grads(moe.experts.forward_grouped), grads(moe.experts.forward_looped)):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


def test_row_gathers_trace_in_one_graph_with_their_backward():
    """SortRows/UnsortRows (the grouped experts' permutations) compile without a graph break, and the
    compiled forward and backward equal eager indexing's."""
    from nanoseek.model.moe import SortRows, UnsortRows

    T, K, D = 12, 3, 8
    ids = torch.randint(0, 4, (T * K,), generator=torch.Generator().manual_seed(0))
    order = ids.argsort(stable=True)
    unsort = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    weights = torch.randn(T * K, D)

    def ours(x):
        return (UnsortRows.apply(SortRows.apply(x, order, unsort, K) * weights[order], order, unsort)).square().sum()

    def plain(x):
        return (x[order // K] * weights[order])[unsort].square().sum()

    needs_inductor()
    x0 = torch.randn(T, D)
    grads = []
    for fn in (plain, torch.compile(ours, fullgraph=True)):  # fullgraph: a graph break fails the test
        x = x0.clone().requires_grad_()
        fn(x).backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("bound", [64, 256, 3000, 40000])
def test_stable_argsort_narrow_keys_match_int64(bound):
    """The MoE's sort of expert ids in a narrower key type (uint8 below 256, int16 below 2^15) gives
    int64's stable order, ties (repeated ids) included."""
    from nanoseek.model.moe import stable_argsort

    x = torch.randint(0, bound, (5000,), generator=torch.Generator().manual_seed(bound))
    x[:50] = bound - 1  # the largest id, repeated: a tie run at the top of the range
    assert torch.equal(stable_argsort(x, bound), x.argsort(stable=True))


def test_router_groups_mask_to_minus_inf():
    model = tiny(n_group=4, topk_group=1, num_experts_per_tok=2)
    router = model.moe_layers[0].gate
    x = torch.randn(64, model.config.hidden_size)
    # strongly negative bias: a 0-masking bug would pick masked experts; -inf masking never does
    router.e_score_correction_bias.fill_(-5.0)
    _, ids, _ = router(x)
    groups = ids // (model.config.n_routed_experts // model.config.n_group)
    assert (groups == groups[:, :1]).all()  # all of a token's experts come from its one kept group


@pytest.mark.parametrize("overrides", [{}, {"topk_method": "group_limited_greedy", "scoring_func": "softmax"},
                                       {"topk_method": "greedy", "scoring_func": "softmax", "n_group": 1,
                                        "topk_group": 1}, {"n_routed_experts": 32, "n_group": 8, "topk_group": 3}])
def test_select_by_rank_matches_topk(overrides):
    """Compiled routing ranks experts by comparisons (no torch.topk); it must choose the same experts as
    the topk reference. With ties (values rounded to a coarse grid), topk's choice is unspecified: there
    the reference is a stable descending sort, which breaks ties towards the lower index as the ranks do."""
    from nanoseek.model.moe import descending_rank, select_by_rank, select_by_topk

    model = tiny(**overrides)
    router, cfg = model.moe_layers[0].gate, model.config
    G, E, K = router.groups, cfg.n_routed_experts, cfg.num_experts_per_tok

    def first(v, k):  # indices of the k largest, ties to the lower index
        return v.sort(dim=-1, descending=True, stable=True).indices[..., :k]

    def stable_reference(choice):
        if G > 1:
            grouped = choice.view(-1, G, E // G)
            if cfg.topk_method == "noaux_tc":
                score = grouped.gather(-1, first(grouped, 2)).sum(-1)
            else:
                score = grouped.amax(-1)
            keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, first(score, cfg.topk_group), True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        return first(choice, K).sort(dim=-1).values

    g = torch.Generator().manual_seed(0)
    for coarse in (False, True):
        choice = torch.rand(512, E, generator=g)
        if coarse:
            choice = (choice * 8).round() / 8
        got = select_by_rank(choice, cfg, G)
        assert torch.equal(got, got.sort(dim=-1).values)  # ascending ids
        assert torch.equal(got, stable_reference(choice))
        if not coarse:
            assert torch.equal(got, select_by_topk(choice, cfg, G).sort(dim=-1).values)
    v = torch.tensor([[0.5, 0.9, 0.5, float("-inf"), 0.1]])
    assert descending_rank(v).tolist() == [[1, 0, 2, 4, 3]]


def test_compiled_router_chooses_like_eager():
    """The router in compiled training (inductor; the rank path) against eager (torch.topk)."""
    model = tiny()
    router = model.moe_layers[0].gate
    x = torch.randn(256, model.config.hidden_size, requires_grad=True)  # a training forward
    gates, ids, _ = router(x)
    needs_inductor()
    c_gates, c_ids, _ = torch.compile(router, fullgraph=True)(x)
    order = ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), c_ids)
    assert torch.allclose(gates.gather(1, order), c_gates, atol=1e-6)


def test_bias_changes_selection_not_gates():
    model = tiny()
    router = model.moe_layers[0].gate
    x = torch.randn(16, model.config.hidden_size)
    gates0, ids0, scores = router(x)
    router.e_score_correction_bias[3] = 10.0  # expert 3 now always selected
    gates1, ids1, _ = router(x)
    assert (ids1 == 3).any(dim=1).all()
    expected = scores.gather(1, ids1)
    expected = expected / expected.sum(-1, keepdim=True) * model.config.routed_scaling_factor
    assert torch.allclose(gates1, expected)


def test_gradients_reach_every_weight_but_not_router_bias():
    model = tiny().train()
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, mtp_tokens=ids)
    loss = out.logits.square().mean() + sum(l.square().mean() for l in out.mtp_logits) + model.balance_loss()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for m in model.moe_layers:
        assert not m.gate.e_score_correction_bias.requires_grad
        assert m.gate.e_score_correction_bias.grad is None


def test_balance_loss_and_bias_update():
    scores = torch.rand(2, 6, 4)
    ids = torch.tensor([[[0, 1]] * 6, [[2, 3]] * 6])
    loss = sequence_balance_loss(scores, ids)
    s = scores / scores.sum(-1, keepdim=True)
    f = torch.zeros(2, 4)
    f[0, :2] = 4 / (2 * 6) * 6
    f[1, 2:] = 4 / (2 * 6) * 6
    assert torch.allclose(loss, (f * s.mean(1)).sum(-1).mean())

    model = tiny().train()
    moe = model.moe_layers
    ids = torch.randint(0, 512, (2, 16))
    model(ids, mtp_tokens=ids)
    model.record_load()
    loads = [m.load_since_update.clone() for m in moe]
    assert all(load.sum() == 2 * 16 * model.config.num_experts_per_tok for load in loads)
    calls = []
    maxvio = update_router_bias(moe, gamma=0.01, all_reduce=lambda t: calls.append(t.shape))
    assert calls == [(len(moe), model.config.n_routed_experts)]
    for m, load, mv in zip(moe, loads, maxvio.tolist()):
        assert torch.allclose(m.gate.e_score_correction_bias, 0.01 * torch.sign(load.mean() - load))
        assert abs(mv - (load.max() / load.mean() - 1).item()) < 1e-6
        assert m.load_since_update.sum() == 0
    assert max_violation(torch.ones(5)).item() == 0


def test_meta_device_build_and_presets():
    for name in PRESETS:
        with torch.device("meta"):
            model = Transformer(preset(name))
        assert all(p.is_meta for p in model.parameters())
    model = Transformer.from_config(preset("debug"), seed=1)
    again = Transformer.from_config(preset("debug"), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_parameter_counts_of_presets():
    def count(cfg: ModelConfig) -> tuple[float, float]:
        with torch.device("meta"):
            model = Transformer(cfg)
        total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
        experts = sum(p.numel() for n, p in model.named_parameters()
                      if "experts.w" in n and not n.startswith("mtp."))
        n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
        active = total - experts + experts // cfg.n_routed_experts * cfg.num_experts_per_tok
        active -= cfg.vocab_size * cfg.hidden_size  # embedding is not a matmul
        assert n_moe > 0
        return total / 1e9, active / 1e9

    total, active = count(preset("v3-671b"))
    assert 670 < total < 672.5 and 36 < active < 38
    total, active = count(preset("v2-lite"))
    assert 15.5 < total < 16 and 2.2 < active < 2.6
    total, _ = count(preset("bench-1b"))
    assert 1.1 < total < 1.4


def test_config_validation_and_hf_round_trip():
    with pytest.raises(ValueError, match="n_group.*must divide"):
        preset("debug", n_group=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("nope")
    cfg = preset("debug", rope_scaling=YARN)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    v2 = preset("v2-lite")
    assert ModelConfig.from_hf_dict(v2.to_hf_dict()) == v2
