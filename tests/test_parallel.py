"""Parallelism on torch.distributed (nanoseek/parallel): sizes and placement on one process; dispatch,
expert parallelism with FSDP2, DualPipeV and pipeline x expert parallelism against a single-process run
in 2 and 4 gloo processes (`nanoseek.parallel.selfcheck` holds the checks; each rank builds the
single-process reference itself); a dead rank ends the run with an error naming it."""

import time

import pytest
import torch

from nanoseek.parallel.launch import spawn
from nanoseek.parallel.mesh import Layout
from nanoseek.parallel.overlap import Baton
from nanoseek.parallel.pipeline import AttachAux, default_microbatches, stage_layers, stages_of_rank


def test_layout_derives_sizes_and_names_bad_ones():
    assert Layout.resolve(8) == Layout(8, pp=1, dp=8, ep=1)
    lo = Layout.resolve(8, pp=2, ep=2)
    assert (lo.pp, lo.dp, lo.ep, lo.edp) == (2, 4, 2, 2)
    assert Layout.resolve(4, dp=2) == Layout(4, pp=2, dp=2, ep=1)
    with pytest.raises(ValueError, match="multiply"):
        Layout.resolve(8, pp=2, dp=2)
    with pytest.raises(ValueError, match="divide --parallel.dp"):
        Layout.resolve(4, ep=3)
    with pytest.raises(ValueError, match="does not divide the world"):
        Layout.resolve(6, pp=4)
    with pytest.raises(ValueError, match="n_routed_experts"):
        Layout.resolve(4, ep=4).check_model(6, 4, 1)


def test_stage_placement():
    assert stage_layers(4, 4) == [[0], [1], [2], [3]]
    runs = stage_layers(6, 4)  # extra layers go to the middle stages first
    assert [len(r) for r in runs] == [1, 2, 2, 1]
    assert [len(r) for r in stage_layers(7, 4)] == [2, 2, 2, 1]
    assert sum(runs, []) == list(range(6))
    assert stages_of_rank(0, 2, "dualpipev") == [0, 3] and stages_of_rank(1, 2, "zbv") == [1, 2]
    assert stages_of_rank(1, 2, "1f1b") == [1]
    assert default_microbatches(8, 4) == 4 and default_microbatches(6, 4) == 6
    with pytest.raises(ValueError, match="pipeline stages"):
        default_microbatches(3, 4)
    with pytest.raises(ValueError, match="at least"):
        stage_layers(3, 4)


def test_attach_aux_gives_the_aux_loss_gradient_one():
    x = torch.randn(3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    aux = (w ** 2).sum() * 0.5
    (AttachAux.apply(x * 2, aux).sum()).backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    torch.testing.assert_close(w.grad, w.detach() * 0.5 * 2)


def test_baton_alternates_at_each_switch_and_lets_the_survivor_finish():
    import threading

    baton, seen = Baton(timeout_s=10), []

    def run(me: int, steps: list[str]) -> None:
        baton.start(me)
        for i, s in enumerate(steps):
            seen.append(s)
            if i < len(steps) - 1:
                baton.switch()  # as after starting an all-to-all
        baton.finish(me)

    threads = [threading.Thread(target=run, args=(0, ["f1", "f2", "f3", "f4"])),
               threading.Thread(target=run, args=(1, ["b1", "b2"]))]
    for t in reversed(threads):  # start order must not matter: the forward always goes first
        t.start()
    for t in threads:
        t.join(10)
    assert seen == ["f1", "b1", "f2", "b2", "f3", "f4"]
    assert baton.switches == 3  # f1->b1, b1->f2, f2->b2; then the backward is done and f runs on


@pytest.mark.multiprocess
def test_dispatch_expert_fsdp_dualpipev_and_resume_match_one_process(tmp_path):
    # one process group for: dispatch/combine exact; ep 2 + FSDP2 and DualPipeV pp 2 (its OVERLAP_F_B
    # overlapped and not) vs one process
    # (loss 1e-6, gradients 1e-5, router biases equal, weights after 2 steps); a sharded checkpoint saved
    # with ep 2 resumes bit-exactly with ep 2 and to 1e-6 with pp 2
    spawn("nanoseek.parallel.selfcheck:check_suite", 2, (str(tmp_path / "ckpt"),), timeout_s=300)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_four_processes_pipeline_x_expert_and_fsdp_over_edp_match_one_process(tmp_path):
    # DualPipeV pp 2 x ep 2 + FSDP2 (overlapped and not); ZBV pp 2 x dp 2 + FSDP2; FSDP2 with dp 4 =
    # edp 2 x ep 2; its checkpoint resumed exactly and in pp 2 x dp 2
    spawn("nanoseek.parallel.selfcheck:check_suite4", 4, (str(tmp_path / "ckpt"),), timeout_s=400)


@pytest.mark.multiprocess
def test_a_dead_rank_ends_the_run_with_its_name():
    t0 = time.time()
    with pytest.raises(RuntimeError, match=r"exit codes \{.*1: 3"):
        spawn("nanoseek.parallel.selfcheck:check_dead_rank", 2, (1,), timeout_s=90, grace_s=40)
    assert time.time() - t0 < 90


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parallel_path_on_one_gpu_matches_the_plain_step():
    spawn("nanoseek.parallel.selfcheck:check_one_gpu", 1, timeout_s=300)
