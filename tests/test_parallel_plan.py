"""`nanoseek plan` (nanoseek/parallel/plan.py): pure arithmetic, checked against known figures."""

import pytest

from nanoseek.config import preset
from nanoseek.parallel.plan import Cluster, a2a_bytes_per_token_layer, bubble, main, param_counts, plan

V3 = dict(gpus=2048, gpus_per_node=8, pp=16, ep=64, seq=4096, global_batch=15360, micro_batch=1, tflops=400,
          sharding="zero1", bf16_moments=True)


def test_param_counts_match_deepseek_v3():
    n = param_counts(preset("v3-671b"))
    assert abs(n["total"] - 685e9) / 685e9 < 0.01  # 671B main model + 14B MTP module (V3 report)
    assert 36e9 < n["active"] < 39e9  # 37B activated per token (+ the MTP module's)


def test_bubble_formulas():
    F, B, W = 1.0, 1.0, 0.5
    assert bubble("1f1b", 4, F, B, W) == 3 * (F + B + W)
    assert bubble("zbv", 4, F, B, W) == 3 * (F + B - 2 * W)
    assert bubble("dualpipev", 4, F, B, W) == 1 * ((F + B) + B - 3 * W)
    assert bubble("dualpipev", 1, F, B, W) == 0.0
    with pytest.raises(ValueError, match="unknown"):
        bubble("gpipe", 4, F, B, W)


def test_all_to_all_traffic_and_node_limited_routing():
    cfg = preset("v3-671b")
    one_node = a2a_bytes_per_token_layer(cfg, Cluster(gpus=8, ep=8))
    assert one_node["ib_bytes_per_pair"] == 0 and one_node["copies_off_rank"] == pytest.approx(8 * 7 / 8)
    wide = a2a_bytes_per_token_layer(cfg, Cluster(gpus=64, ep=64))
    limited = a2a_bytes_per_token_layer(cfg, Cluster(gpus=64, ep=64, node_limit=4))
    assert 0 < limited["ib_bytes_node_limited"] < wide["ib_bytes_node_limited"] <= wide["ib_bytes_per_pair"]
    assert limited["remote_nodes_limited"] <= 3
    bf16 = a2a_bytes_per_token_layer(cfg, Cluster(gpus=8, ep=8, fp8_dispatch=False))
    assert bf16["bytes_off_rank"] > one_node["bytes_off_rank"]  # FP8 dispatch halves the dispatch bytes


def test_v3_layout_estimate_is_near_the_published_throughput():
    p = plan(preset("v3-671b"), Cluster(**V3, schedule="dualpipev", node_limit=4))
    assert (p["dp"], p["edp"]) == (128, 2)
    assert 1000 < p["tokens_per_s_per_gpu"] < 2500  # published: about 1,540 tokens/s per H800
    q = plan(preset("v3-671b"), Cluster(**V3, schedule="1f1b"))
    assert q["bubble_frac"] > p["bubble_frac"] and q["tokens_per_s_per_gpu"] < p["tokens_per_s_per_gpu"]
    with pytest.raises(ValueError, match="must divide"):
        plan(preset("v3-671b"), Cluster(gpus=48, pp=16, ep=64))


def test_cli(capsys):
    assert main(["--preset", "bench-1b", "--gpus", "8", "--ep", "8", "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s per GPU" in out and "memory/GPU" in out


def test_node_limited_routing_caps_the_nodes_a_token_reaches():
    import torch

    from nanoseek.model.moe import Router
    from nanoseek.parallel.expert import routing_traffic

    # 64 experts on ep 16 ranks, 4 per node: 4 nodes. n_group = nodes makes group-limited routing node-limited.
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    free = Router(preset("debug", hidden_size=32, n_routed_experts=64, num_experts_per_tok=8, n_group=1,
                         topk_group=1, topk_method="noaux_tc"))
    limited = Router(preset("debug", hidden_size=32, n_routed_experts=64, num_experts_per_tok=8, n_group=4,
                            topk_group=2, topk_method="noaux_tc"))
    torch.nn.init.normal_(free.weight)
    limited.weight.data.copy_(free.weight)
    t_free = routing_traffic(free(x)[1], 64, 16, 4)
    t_lim = routing_traffic(limited(x)[1], 64, 16, 4)
    assert t_free["pairs_off_rank"] == pytest.approx(t_lim["pairs_off_rank"], rel=0.1)  # ~K (ep-1)/ep both
    # every token reaches at most topk_group = 2 nodes (so at most 2 remote ones); free routing reaches ~3 of 3
    assert t_lim["remote_nodes"] <= 2 and t_lim["remote_nodes"] < 0.7 * t_free["remote_nodes"]


def test_scaling_bench_reads_comm_overlap_and_idle_time_from_a_trace(tmp_path):
    """bench/parallel_scaling.py's profile maths on a hand-made trace: compute kernels at [0, 10) and
    [20, 30) us, an NCCL all-to-all at [5, 25) us: 20 us of comm, 10 of it under compute; busy 30 of 60 us."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "parallel_scaling.py"
    spec = importlib.util.spec_from_file_location("parallel_scaling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    kernel = [{"cat": "kernel", "name": "sm90_gemm", "ts": 0, "dur": 10},
              {"cat": "kernel", "name": "ncclDevKernel_AllToAll_RING", "ts": 5, "dur": 20},
              {"cat": "kernel", "name": "triton_fused", "ts": 20, "dur": 10},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 60}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": kernel}))
    stats = bench.kernel_stats(str(trace), steps=1, step_s=60e-6)
    assert stats["comm_ms"] == pytest.approx(0.020)
    assert stats["comm_ms_by_kind"] == {"alltoall": pytest.approx(0.020)}
    assert stats["hidden"] == pytest.approx(0.5)
    assert stats["busy"] == pytest.approx(0.5)
    assert bench.union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert bench.overlap_length([(0, 10)], [(2, 4), (3, 5), (8, 12)]) == 5
