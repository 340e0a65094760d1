"""DualPipeV's overlapped forward and backward: one micro-batch's all-to-all hidden behind the other's compute.

DualPipeV pairs, in its steady state, the forward of micro-batch i on one stage with the backward of
micro-batch j on the other stage of the same rank (the schedule's OVERLAP_F_B action). The two are
independent, so while one waits on an expert-parallel all-to-all the other can compute. That is
DeepSeek's DualPipe idea; torchtitan's DualPipe-EP does it with two threads taking turns.

Here too: `overlap_f_b` (registered as the schedule's custom OVERLAP_F_B function) runs the forward in
one thread and the backward in another, and a `Baton` lets exactly one of them run Python at a time.
At every all-to-all (`expert.AllToAll`, in forward and in backward) the holder starts the collective
with async_op=True, passes the baton, and waits on the handle only when the baton comes back:

    F thread:  attn/gate ... dispatch a2a start | pass ........................ | wait, experts ...
    B thread:              (waiting)            | expert/attn grads ... a2a start| pass ...

Because turns change only at all-to-alls and every rank of an ep group runs the same stages, every rank
issues its collectives in the same order (collectives must match across ranks): the interleaving is
deterministic. What is hidden: with NCCL, the other thread's kernels queue on the compute stream while
the all-to-all runs on NCCL's stream; with gloo, the all-to-all runs in gloo's worker threads while the
other Python thread computes on the CPU. Not hidden: dispatch's count exchange and its host sync (the
split sizes), which the holder does synchronously before its row all-to-all.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD, _Action, _wait_batch_p2p

_ACTIVE: Baton | None = None  # set while an overlapped action runs


class Baton:
    """Two participants (0: forward, 1: backward) taking turns; only the holder runs."""

    def __init__(self, timeout_s: float = 600.0):
        self.cv = threading.Condition()
        self.turn = 0
        self.done = [False, False]
        self.switches = 0  # turns handed over (the tests check the overlap path ran)
        self.timeout_s = timeout_s

    def _wait_for(self, me: int) -> None:
        if not self.cv.wait_for(lambda: self.turn == me, timeout=self.timeout_s):
            raise RuntimeError(f"overlapped forward/backward: participant {me} waited {self.timeout_s}s for its "
                               "turn (the other is stuck in a collective; a peer rank probably failed)")

    def start(self, me: int) -> None:
        with self.cv:
            self._wait_for(me)

    def switch(self) -> None:
        """Called by the holder after starting a collective: let the other run until it yields back."""
        with self.cv:
            me = self.turn
            if self.done[1 - me]:
                return
            self.turn = 1 - me
            self.switches += 1
            self.cv.notify_all()
            self._wait_for(me)

    def finish(self, me: int) -> None:
        with self.cv:
            self.done[me] = True
            self.turn = 1 - me
            self.cv.notify_all()


def active() -> Baton | None:
    return _ACTIVE


def exchange(pairs: list[tuple[torch.Tensor, torch.Tensor]], out_splits: list[int], in_splits: list[int],
             group) -> None:
    """all_to_all_single(out, inp, out_splits, in_splits) for each (out, inp); inside an overlapped action
    the collectives are started asynchronously and the baton passes while they run."""
    baton = _ACTIVE
    if baton is None:
        for out, inp in pairs:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        return
    works = [dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
             for out, inp in pairs]
    baton.switch()
    for w in works:
        w.wait()


def _run_forward(schedule, stages: dict, a: _Action, ctx) -> None:
    """What the schedule runtime does for a FORWARD action (wait for the input, forward, loss, hand on)."""
    stage, mb = stages[a.stage_index], a.microbatch_index
    if not stage.is_first and a.stage_index - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((a.stage_index, mb)))
    out = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
    schedule._maybe_compute_loss(stage, out, ctx.target_mbs, mb)
    if a.stage_index + 1 in stages:  # V placement: the next stage is on this rank (no send)
        stages[a.stage_index + 1].set_local_fwd_input(out, mb)


def _run_backward(schedule, stages: dict, a: _Action) -> None:
    """What the schedule runtime does for a FULL_BACKWARD action."""
    stage, mb = stages[a.stage_index], a.microbatch_index
    if not stage.is_last and a.stage_index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((a.stage_index, mb)))
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[a.stage_index] += 1
    last = schedule.backward_counter[a.stage_index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if a.stage_index - 1 in stages:
        stages[a.stage_index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def make_overlap_f_b(device: torch.device, timeout_s: float = 600.0, stats: dict | None = None):
    """The custom OVERLAP_F_B function for `schedule.register_custom_function(OVERLAP_F_B, fn)`.

    stats (optional) collects {"actions": overlapped actions run, "switches": baton hand-overs}."""

    def overlap_f_b(action: _Action, ctx) -> None:
        global _ACTIVE
        schedule = ctx.schedule_ref
        subs = action.sub_actions or ()
        kinds = [s.computation_type for s in subs]
        if kinds != [FORWARD, FULL_BACKWARD]:
            raise ValueError(f"OVERLAP_F_B expects (FORWARD, FULL_BACKWARD) sub-actions, got {kinds}")
        stages = {s.stage_index: s for s in schedule._stages}
        for s in subs:
            schedule._assert_unsharded(stages[s.stage_index])
        # autocast and the current device are per thread: carry the caller's into the workers
        dev = device.type
        amp = (torch.autocast(dev, dtype=torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev)
               else nullcontext())
        grad = torch.is_grad_enabled()
        baton = Baton(timeout_s)
        errors: list[BaseException | None] = [None, None]

        def work(me: int) -> None:
            try:
                baton.start(me)
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                with torch.set_grad_enabled(grad):
                    if me == 0:
                        with amp:
                            _run_forward(schedule, stages, subs[0], ctx)
                    else:
                        _run_backward(schedule, stages, subs[1])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors[me] = e
            finally:
                baton.finish(me)

        threads = [threading.Thread(target=work, args=(i,), name=f"overlap-{'fb'[i]}") for i in (0, 1)]
        _ACTIVE = baton
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            _ACTIVE = None
        if stats is not None:
            stats["actions"] = stats.get("actions", 0) + 1
            stats["switches"] = stats.get("switches", 0) + baton.switches
        for e in errors:
            if e is not None:
                raise e

    return overlap_f_b
