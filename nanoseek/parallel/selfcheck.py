"""Multi-process checks against a single-process run; the tests spawn them, a GPU node runs them by torchrun.

    torchrun --nproc_per_node 2 -m nanoseek.parallel.selfcheck dispatch
    torchrun --nproc_per_node 4 -m nanoseek.parallel.selfcheck train --pp 2 --ep 2 --schedule dualpipev
    torchrun --nproc_per_node 2 -m nanoseek.parallel.selfcheck train --ep 2 --fsdp 1
    torchrun --nproc_per_node 4 -m nanoseek.parallel.selfcheck overlap --pp 2 --ep 2 --fsdp 1

`train`: every rank builds the same tiny model (same seed) twice. The reference copy runs the shared
single-process step (`train.step`) on the whole global batch; the other is wrapped (expert parallel,
FSDP2 or gradient all-reduce, pipeline) and runs its share. After each step the check compares the
loss (1e-6 relative), every gradient this rank holds (1e-5; sharded ones gathered) and the router
biases (equal after the update). A mismatch raises AssertionError naming the tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanoseek.config import preset
from nanoseek.model.transformer import Transformer
from nanoseek.parallel import expert as ep_
from nanoseek.parallel.mesh import Layout, init_process_group
from nanoseek.parallel.runtime import Parallel
from nanoseek.train import step as train_step


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def tiny_config(layers: int = 4):
    """The debug preset, deep enough for 4 pipeline stages, every MoE feature on."""
    return preset("debug", num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=8, n_group=4,
                  topk_group=2, num_experts_per_tok=2)


# ---------------------------------------------------------------------------- dispatch / combine
def check_dispatch(tokens: int = 13, hidden: int = 8, experts: int = 8, k: int = 3) -> None:
    """Round trip exact; the rows each rank receives are the pairs routed to its experts; the backward of
    dispatch equals a combine (and the other way round)."""
    device = _device()
    init_process_group(device, 60)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    torch.manual_seed(100 + rank)
    T = tokens + rank  # uneven token counts per rank
    x = torch.randn(T, hidden, device=device)
    ids = torch.stack([torch.randperm(experts, device=device)[:k] for _ in range(T)])  # (T, K) distinct
    rows, plan = ep_.dispatch(x, ids, experts, group)
    # 1. the round trip is exact
    back = ep_.combine(rows, plan, group)  # (T, K, D)
    assert torch.equal(back, x[:, None].expand(T, k, hidden)), "dispatch + combine is not the identity"
    # 2. rows received = every rank's pairs for my experts, expert-major, source rank and token order within
    El = experts // world
    xs = [torch.zeros(tokens + r, hidden, device=device) for r in range(world)]
    idss = [torch.zeros(tokens + r, k, dtype=ids.dtype, device=device) for r in range(world)]
    for r in range(world):  # uneven sizes: broadcast each rank's tensors
        xs[r].copy_(x) if r == rank else None
        idss[r].copy_(ids) if r == rank else None
        dist.broadcast(xs[r], r)
        dist.broadcast(idss[r], r)
    expected = []
    for e in range(rank * El, (rank + 1) * El):
        for r in range(world):
            t = (idss[r] == e).nonzero()[:, 0]  # tokens of rank r routed to e (each at most once)
            expected.append(xs[r][t])
    assert torch.equal(rows, torch.cat(expected)), "dispatch delivered the wrong rows"
    # 3. autograd: grad of <w, dispatch(x)> is combine(w) summed over slots; grad of <v, combine(y)> is dispatch(v)
    xg = x.clone().requires_grad_(True)
    w = torch.randn_like(rows)
    rows_g, plan_g = ep_.dispatch(xg, ids, experts, group)
    (rows_g * w).sum().backward()
    torch.testing.assert_close(xg.grad, ep_.combine(w, plan_g, group).sum(1), rtol=1e-6, atol=1e-6)
    y = rows.clone().requires_grad_(True)
    v = torch.randn(T, k, hidden, device=device)
    (ep_.combine(y, plan, group) * v).sum().backward()
    # dispatch of the per-slot gradients: pair (t, k) carries v[t, k]
    sent = v.reshape(T * k, hidden)[plan.order]
    recv = ep_.all_to_all(sent, plan.out_splits, plan.in_splits, group)[plan.local_order]
    assert torch.equal(y.grad, recv), "combine's backward is not a dispatch"
    # 4. FP8 dispatch: each row within e4m3's rounding of its tile's scale; the backward is the exact combine
    if hidden % 4 == 0:
        block = hidden // 2
        xf = x.clone().requires_grad_(True)
        rows8, plan8 = ep_.dispatch(xf, ids, experts, group, fp8_block=block)
        tiles = rows.view(rows.shape[0], 2, block)
        bound = tiles.abs().amax(-1, keepdim=True) / 8  # 3 mantissa bits: relative step 2^-3 of the tile max
        err = (rows8 - rows).view_as(tiles).abs()
        assert bool((err <= bound + 1e-12).all()), "FP8 dispatch error above e4m3's rounding"
        assert 0 < err.max() , "FP8 dispatch did not quantize"
        (rows8 * w).sum().backward()
        assert torch.equal(xf.grad, xg.grad), "FP8 dispatch's backward is not the plain combine"
    dist.barrier()


# ---------------------------------------------------------------------------- training
def _batches(cfg, steps: int, accum: int, batch: int, seq: int, device) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        mbs = []
        for _ in range(accum):
            t = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
            mbs.append((t[:, :-1].to(device), t[:, 1:].to(device)))
        out.append(mbs)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def compare_grads(model, ref, layout: Layout, ep_rank: int, atol: float = 1e-5) -> int:
    """Every gradient this rank holds against the reference's (expert shards against their rows)."""
    ref_params = dict(ref.named_parameters())
    n, bad = 0, []
    for name, p in model.named_parameters():
        g = _full(p.grad) if p.grad is not None else None
        r = ref_params[name].grad
        if g is None or r is None:
            assert (g is None) == (r is None or not r.abs().sum()), f"{name}: gradient present on one side only"
            continue
        if ep_.is_expert_param(name) and layout.ep > 1:
            El = r.shape[0] // layout.ep
            r = r[ep_rank * El:(ep_rank + 1) * El]
        if not torch.allclose(g.float(), r.float(), rtol=1e-4, atol=atol):
            err = (g.float() - r.float()).abs().max().item()
            bad.append(f"{name} (max error {err:.2e}, |grad| {g.float().norm():.4e} vs {r.float().norm():.4e})")
        n += 1
    if bad:
        raise AssertionError(f"rank {dist.get_rank()}: {len(bad)} of {n} gradients differ: " + "; ".join(bad))
    return n


def check_train(pp: int = 1, ep: int = 1, schedule: str = "dualpipev", fsdp: bool = False, steps: int = 2,
                accum: int = 2, batch: int = 4, seq: int = 16, microbatches: int = 0, mtp_lambda: float = 0.3,
                overlap: bool = True, ep_experts: bool = False) -> list[torch.Tensor]:
    """Returns the losses of the wrapped model, one per step. ep_experts: install the expert-parallel
    experts even with ep 1 (their all-to-alls then run on a 1-rank group: the overlap's turn points)."""
    device = _device()
    par = Parallel.setup(device, pp=pp, ep=ep, schedule=schedule, fsdp=fsdp, microbatches=microbatches,
                         timeout_s=120, overlap=overlap)
    lo = par.layout
    cfg = tiny_config()
    alpha, gamma, lr, clip = 0.01, 0.01, 0.1, 0.5
    ref = Transformer.from_config(cfg, device=device, seed=0).train()
    model = Transformer.from_config(cfg, device=device, seed=0).train()
    if ep_experts and lo.ep == 1:
        ep_.install(model, par.mesh.group("ep"))
    model = par.wrap(model)
    losses = []
    # SGD: Adam's first step moves every weight by about lr * sign(g), which turns rounding-level gradient
    # differences (another summation order) into lr-sized weight differences at the next step
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.1)
    loss_fn = train_step.pretraining_loss(mtp_lambda, alpha)
    ep_rank = par.mesh.rank_in("ep")
    null = contextlib.nullcontext()
    for i, batches in enumerate(_batches(cfg, steps, accum, batch, seq, device)):
        want = train_step.accumulate_gradients(ref, batches, loss_fn, null)
        got = par.accumulate_gradients(model, batches, loss_fn, null, mtp_lambda=mtp_lambda, seq_aux_alpha=alpha)
        losses.append(got["loss"])
        for key in ("loss", "mtp_loss"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0,
                                       msg=lambda m, i=i, key=key: f"step {i} {key}: {m}")
        try:
            n = compare_grads(model, ref, lo, ep_rank)
        except AssertionError as e:
            raise AssertionError(f"step {i}: {e}") from None
        assert n > 0, "no gradients compared"
        want |= train_step.optimizer_step(ref, ref_opt, lr=lr, grad_clip=clip, bias_gamma=gamma)
        got |= par.optimizer_step(model, opt, lr=lr, grad_clip=clip, bias_gamma=gamma)
        torch.testing.assert_close(got["grad_norm"], want["grad_norm"], rtol=1e-5, atol=0)
        ref_bias = {n: b for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias")}
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                assert torch.equal(b, ref_bias[name]), f"step {i}: router bias {name} differs"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():  # the weights after the last step
        r = ref_params[name].detach()
        if ep_.is_expert_param(name) and lo.ep > 1:
            r = r[ep_rank * (r.shape[0] // lo.ep):(ep_rank + 1) * (r.shape[0] // lo.ep)]
        torch.testing.assert_close(_full(p.detach()), r, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"weight {name} after {steps} steps: {m}")
    if par.pipe is not None and schedule == "dualpipev" and overlap and (lo.ep > 1 or ep_experts):
        stats = par.pipe.overlap_stats  # the overlapped path ran and took turns at the all-to-alls
        assert stats.get("actions", 0) > 0 and stats.get("switches", 0) > 0, f"no overlapped actions ran: {stats}"
    if dist.get_rank() == 0:
        print(f"selfcheck train ok: {lo}, schedule {schedule}, fsdp {fsdp}, overlap {overlap}, {steps} steps")
    dist.barrier()
    return losses


def check_overlap(pp: int = 2, ep: int = 1, steps: int = 2, batch: int = 4, **kw) -> None:
    """DualPipeV with the overlapped OVERLAP_F_B == without it == one process (check_train does the
    latter for each; here the two pipelined runs' losses to 1e-6). With ep 1 the expert-parallel experts
    are installed on a 1-rank group, so the turn-taking runs on 2 processes."""
    kw = {"steps": steps, "batch": batch, "accum": 2, "seq": 8, "microbatches": 8} | kw
    with_ = check_train(pp=pp, ep=ep, overlap=True, ep_experts=True, **kw)
    without = check_train(pp=pp, ep=ep, overlap=False, ep_experts=True, **kw)
    for i, (a, b) in enumerate(zip(with_, without)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m, i=i: f"step {i} overlap vs not: {m}")


def check_resume(path: str, ep: int = 2, pp: int = 1, load_ep: int = 1, load_pp: int = 1, fsdp: bool = False) -> None:
    """Train 1 step, save (sharded), train a 2nd step; a fresh model that loads the checkpoint takes the
    same 2nd step: bit-identical in the same layout, to 1e-6 in another (load_ep, load_pp)."""
    from nanoseek.parallel import checkpoint as ckpt

    device = _device()
    cfg = tiny_config()
    batches = _batches(cfg, 2, 2, 4, 8, device)
    loss_fn = train_step.pretraining_loss(0.3, 0.01)

    def build(ep_: int, pp_: int, seed: int):
        par = Parallel.setup(device, pp=pp_, ep=ep_, fsdp=fsdp, timeout_s=120)
        model = par.wrap(Transformer.from_config(cfg, device=device, seed=seed).train())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return par, model, opt

    def step(par, model, opt, b):
        out = par.accumulate_gradients(model, b, loss_fn, mtp_lambda=0.3, seq_aux_alpha=0.01)
        out |= par.optimizer_step(model, opt, lr=1e-2, grad_clip=1.0, bias_gamma=0.01)
        return out["loss"]

    par, model, opt = build(ep, pp, 0)
    step(par, model, opt, batches[0])
    ckpt.save(path, model, opt, par.mesh, {"step": 1})
    want = step(par, model, opt, batches[1])
    want_sd = ckpt.full_state_dict(model, par.mesh)
    for same in (True, False):
        par2, model2, opt2 = build(ep, pp, 1) if same else build(load_ep, load_pp, 1)
        assert ckpt.load(path, model2, opt2, par2.mesh)["step"] == 1
        got = step(par2, model2, opt2, batches[1])
        got_sd = ckpt.full_state_dict(model2, par2.mesh)
        if same:
            assert torch.equal(got, want), f"resumed loss {got} != {want}"
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        if want_sd is not None:
            for k, v in want_sd.items():
                if same:
                    assert torch.equal(got_sd[k], v), f"{k} differs after resuming"
                else:
                    torch.testing.assert_close(got_sd[k], v, rtol=1e-5, atol=1e-5)
    dist.barrier()


def check_suite(ckpt_dir: str) -> None:
    """The 2-process checks in one process group (one start-up for the tests): dispatch/combine,
    expert parallel + FSDP2, DualPipeV, sharded resume (ep 2 -> ep 2 exact, ep 2 -> pp 2)."""
    check_dispatch()
    check_train(pp=1, ep=2, fsdp=True, steps=2, accum=2, batch=4, seq=8)
    check_overlap(pp=2, ep=1)  # DualPipeV pp 2, overlapped and not
    check_resume(ckpt_dir, ep=2, pp=1, load_ep=1, load_pp=2)


def check_suite4(ckpt_dir: str) -> None:
    """The 4-process checks: pp 2 x ep 2 DualPipeV with FSDP2 over dp, the all-to-alls overlapped and not;
    ZBV pp 2 x dp 2 with FSDP2 (split backward); FSDP2 with dp 4 = edp 2 x ep 2; its sharded checkpoint
    resumed exactly and loaded into pp 2 x dp 2."""
    check_overlap(pp=2, ep=2, steps=1, batch=8, fsdp=True)
    check_train(pp=2, ep=1, schedule="zbv", fsdp=True, steps=1, accum=2, batch=4, seq=8)
    check_train(pp=1, ep=2, fsdp=True, steps=2, accum=2, batch=4, seq=8)
    check_resume(ckpt_dir, ep=2, pp=1, load_ep=1, load_pp=2, fsdp=True)


def check_one_gpu() -> None:
    """World size 1 on a GPU (NCCL): dispatch/combine through a 1-rank all-to-all, the parallel step vs
    the plain one, and the same with a pipeline-free FSDP-less bf16-free layout (what one GPU allows)."""
    check_dispatch(tokens=64, hidden=128, experts=8, k=2)
    check_train(pp=1, ep=1, fsdp=True, steps=2, accum=2, batch=4, seq=32)


def check_dead_rank(dead: int = 1) -> None:
    """Rank `dead` exits without a word in the middle of training; the others must fail, not hang."""
    device = _device()
    init_process_group(device, 30)
    dist.barrier()
    if dist.get_rank() == dead:
        os._exit(3)
    x = torch.ones(4, device=device)
    for _ in range(100):  # a rank blocked in a collective with a dead peer
        dist.all_reduce(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["dispatch", "train", "overlap"])
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--schedule", default="dualpipev")
    ap.add_argument("--fsdp", type=int, default=0)
    a = ap.parse_args(argv)
    if a.what == "dispatch":
        check_dispatch()
    elif a.what == "overlap":  # DualPipeV overlapped vs not vs one process (needs pp 2, ep >= 1)
        check_overlap(a.pp, a.ep, steps=1, batch=8 * a.ep, fsdp=bool(a.fsdp))
    else:
        check_train(a.pp, a.ep, a.schedule, bool(a.fsdp))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
