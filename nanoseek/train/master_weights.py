"""bf16 GEMM weights with their fp32 masters in the optimizer (`--train.master_weights`).

The default setting keeps every weight in fp32 and trains under bf16 autocast. Per GEMM weight and step that
moves: autocast's cast to bf16 in the forward (read 4 bytes, write 2), the cast of its bf16 gradient back
to fp32 in the backward (2 + 4), and AdamW (read weight, gradient and two moments, write three: 28 bytes):
40 bytes per parameter. Here the model holds the GEMM weights in bf16, so autocast casts nothing and the
gradients stay bf16; the optimizer keeps the fp32 master of each and, in one pass, reads the bf16 gradient,
updates master and moments and writes the next bf16 copy: 2 + 12 read, 12 + 2 written, 28 bytes.

The numbers are the default setting's: autocast's GEMMs take bf16(master) either way (the copy is rounded
to nearest, as autocast's cast is), and a weight gradient is the bf16 GEMM output, which autocast would
upcast exactly. With one micro-batch per step the kernel reads that bf16 gradient; the gradient clip then
scales it by the coefficient rounded to bf16 (exactly 1 when nothing is clipped). With several micro-batches
(`accumulate_in_fp32`, which the trainer sets for --train.grad_accum > 1) each micro-batch's bf16 gradient is
added into an fp32 buffer as it arrives (a post-accumulate-grad hook), as autocast's fp32 .grad would sum
it; the clip and the update then use those buffers (`held_gradients`), so the sum does not round in bf16.

Which weights: the linears inside the transformer blocks and the MTP modules (attention projections, dense
MLPs, shared experts, MTP's eh_proj) and the routed experts' w13 / w2. The rest stays fp32 as autocast
leaves it: embedding, norms, the router (fp32 maths by design) and the output heads (the main head is
shared with the MTP heads; two bf16 gradients would add in bf16).

Checkpoints hold the fp32 masters: `masters_in_model` puts them into the model while it is saved, and the
optimizer's state holds them for an exact resume.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from nanoseek.kernels import HAVE_TRITON
from nanoseek.model.moe import RoutedExperts

BLOCK = 4096  # elements per program

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16(x):
        """fp32 -> bf16 rounded to nearest even in integer arithmetic, so the cast is exact: the GPU's cast
        rounds so too, but Triton's CPU interpreter truncates."""
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: 0xFFFF0000
        return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _adamw_master_kernel(w_ptr, g_ptr, m_ptr, v_ptr, out_ptr, step_ptr, found_ptr, n, lr, one_minus_beta1,
                             beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, keep, WRITE_OUT: tl.constexpr,
                             BLOCK: tl.constexpr):
        """One AdamW step of the fp32 weight w (a master, or an fp32 parameter) from gradient g (bf16 or fp32),
        in torch's single-tensor order of operations; moments m, v fp32 or bf16 (fp32 maths, stored rounded to
        nearest); with WRITE_OUT the bf16 copy of the new w to out. The step count t (already advanced) and
        the skip flag found_inf are read on the device, so a skipped step costs no host sync; the bias
        corrections 1 - beta^t come from t there."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        t = tl.load(step_ptr)
        live = offs < tl.where(tl.load(found_ptr) == 0, n, 0)  # a non-finite step changes nothing
        step_size = tl.div_rn(lr, 1.0 - tl.exp2(t * log2_beta1))
        bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(t * log2_beta2))
        w = tl.load(w_ptr + offs, mask=live).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=live).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=live).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=live).to(tl.float32)
        w = w * keep
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        w = w - step_size * tl.div_rn(m, denom)
        if w_ptr.dtype.element_ty == tl.bfloat16:  # a bf16 parameter without a master: rounded once per step
            tl.store(w_ptr + offs, _to_bf16(w), mask=live)
        else:
            tl.store(w_ptr + offs, w, mask=live)
        if m_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(m_ptr + offs, _to_bf16(m), mask=live)
            tl.store(v_ptr + offs, _to_bf16(v), mask=live)
        else:
            tl.store(m_ptr + offs, m, mask=live)
            tl.store(v_ptr + offs, v, mask=live)
        if WRITE_OUT:
            tl.store(out_ptr + offs, _to_bf16(w), mask=live)


def gemm_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights that live in bf16 under `--train.master_weights` (module docstring: which and why)."""
    blocks = [*model.layers.values(), *model.mtp] if hasattr(model, "layers") else [model]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: dict[int, nn.Parameter] = {}
    for block in blocks:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("shared_head"):
                found[id(module.weight)] = module.weight
            elif isinstance(module, RoutedExperts):
                found[id(module.w13)], found[id(module.w2)] = module.w13, module.w2
    return [p for key, p in found.items() if key not in embeddings]


class AdamWMasterWeights(torch.optim.Optimizer):
    """AdamW (torch's maths) that casts `low_precision` parameters to bf16 at construction and keeps their
    fp32 masters in its state ("master"); the other parameters are updated in place (fp32 maths; a bf16
    parameter rounded once per step). Moments in `moments_dtype` (fp32, or bf16 as DeepSeek-V3 keeps them;
    fp32 maths either way): with no low-precision parameters this is the trainer's AdamW with bf16 moments
    (`--train.bf16_moments`). On CUDA each parameter is one Triton kernel; elsewhere (or `fused=False`) the
    same update in torch ops.

    It takes `found_inf` as torch's fused AdamW does (`optimizer_step(skip_nonfinite=True)` sets it): a step
    whose flag is nonzero moves no weight, moment or step count. With the kernels the flag and the step
    counts stay on the device (no host sync); the reference path reads the flag on the host."""

    _step_supports_amp_scaling = True  # optimizer_step hands over found_inf instead of syncing on it

    def __init__(self, params, low_precision: list[nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 fused: bool | None = None, moments_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused  # None: the kernel for CUDA tensors; True: also elsewhere (Triton's interpreter)
        self.moments_dtype = moments_dtype
        members = {id(p) for group in self.param_groups for p in group["params"]}
        for p in low_precision:
            if id(p) not in members:
                raise ValueError("AdamWMasterWeights: a low-precision parameter is not among the optimized ones")
            if p.dtype != torch.float32:
                raise ValueError(f"AdamWMasterWeights: parameters start in fp32 (their masters), got {p.dtype}")
            self.state[p]["master"] = p.detach().clone()
            p.data = p.data.to(torch.bfloat16)
        self._low = {id(p) for p in low_precision}
        self._incoming: dict[int, dict[str, torch.Tensor]] = {}  # between the two load_state_dict hooks
        self._incoming_order: list[int] = []
        self.accumulate_in_fp32 = False  # fold each micro-batch's bf16 gradient into an fp32 buffer
        self._held: dict[nn.Parameter, torch.Tensor] = {}  # those buffers, until zero_grad
        for p in low_precision:
            p.register_post_accumulate_grad_hook(self._fold)
        self.register_load_state_dict_pre_hook(AdamWMasterWeights._keep_fp32_state)
        self.register_load_state_dict_post_hook(AdamWMasterWeights._restore_fp32_state)

    @torch.no_grad()
    def _fold(self, p: nn.Parameter) -> None:
        """After a backward wrote p.grad (bf16): with accumulate_in_fp32, add it into p's fp32 buffer and free it."""
        if not self.accumulate_in_fp32 or p.grad is None:
            return
        held = self._held.get(p)
        if held is None:
            self._held[p] = p.grad.float()
        else:
            held.add_(p.grad)
        p.grad = None

    def held_gradients(self) -> dict[nn.Parameter, torch.Tensor]:
        """{parameter: its fp32 gradient buffer} of this step (the clip's norm and scaling must see them)."""
        return dict(self._held)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._held = {}

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)  # set by optimizer_step(skip_nonfinite=True), or absent
        host_skip: bool | None = None  # the flag read on the host, once, if a reference update needs it
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (flag, 1 - flag)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = self._held.get(p, p.grad)  # an fp32 buffer (accumulate_in_fp32), or p's own gradient
                if grad is None:
                    continue
                state = self.state[p]
                low = "master" in state  # a bf16 weight: the update acts on its master and writes p
                w = state["master"] if low else p.data  # the fp32 weight the update acts on
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(w, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(w, dtype=self.moments_dtype)
                m, v, out = state["exp_avg"], state["exp_avg_sq"], (p.data if low else None)
                args = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"])
                use_kernel = self.fused if self.fused is not None else p.is_cuda
                tensors = (w, grad, m, v) + ((out,) if out is not None else ())
                if use_kernel and HAVE_TRITON and all(type(x) is torch.Tensor and x.is_contiguous() for x in tensors):
                    if state["step"].device != p.device:  # the count lives where the kernel reads it
                        state["step"] = state["step"].to(p.device)
                    if p.device not in on_device:  # once per step and device
                        flag = (found_inf if found_inf is not None else _no_skip(p.device)).to(p.device, torch.float32)
                        on_device[p.device] = (flag, 1 - flag)
                    flag, advance = on_device[p.device]
                    state["step"].add_(advance)
                    _kernel_step(w, grad, m, v, out, state["step"], flag, **args)
                    continue
                if found_inf is not None and host_skip is None:
                    host_skip = bool(found_inf.item())  # a host read (free on the CPU)
                if host_skip:
                    continue
                state["step"] += 1
                _reference_step(w, grad, m, v, step=int(state["step"].item()), **args)
                if out is not None:
                    out.copy_(w)

    @staticmethod
    def _keep_fp32_state(optimizer: AdamWMasterWeights, state_dict: dict) -> None:
        """Before `load_state_dict`: torch casts loaded state to each parameter's dtype, which would round the
        masters and moments of the bf16 parameters to bf16; keep the loaded fp32 tensors aside."""
        optimizer._incoming = {idx: {k: v for k, v in s.items() if k != "step" and torch.is_tensor(v)}
                               for idx, s in state_dict["state"].items()}
        optimizer._incoming_order = [i for g in state_dict["param_groups"] for i in g["params"]]

    @staticmethod
    def _restore_fp32_state(optimizer: AdamWMasterWeights) -> None:
        """After `load_state_dict`: the fp32 masters and moments back, and each bf16 weight set from its master."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for idx, p in zip(optimizer._incoming_order, params):
            saved = optimizer._incoming.get(idx, {})
            state = optimizer.state[p]
            for key, value in saved.items():
                state[key] = value.to(device=p.device)
            if "master" in state:
                p.data.copy_(state["master"])
            elif id(p) in optimizer._low:
                raise ValueError("the saved optimizer state holds no fp32 master weights (it was saved without "
                                 "master weights); continue it without --train.master_weights")
        optimizer._incoming, optimizer._incoming_order = {}, []


def _reference_step(w: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: int, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch's single-tensor AdamW on the weight w from grad (any float dtype), in fp32: w and the moments m, v
    fp32 (updated in place) or bf16 (the same maths in fp32, each stored rounded once)."""
    g = grad.float()
    wf, mf, vf = (t if t.dtype == torch.float32 else t.float() for t in (w, m, v))
    wf.mul_(1 - lr * weight_decay)
    mf.lerp_(g, 1 - beta1)
    vf.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (vf.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    wf.addcdiv_(mf, denom, value=-lr / (1 - beta1**step))
    for low, high in ((w, wf), (m, mf), (v, vf)):
        if low is not high:
            low.copy_(high)


_NO_SKIP: dict[torch.device, torch.Tensor] = {}


def _no_skip(device: torch.device) -> torch.Tensor:
    """A zero flag on `device` (kept: one per device), for steps without found_inf."""
    if device not in _NO_SKIP:
        _NO_SKIP[device] = torch.zeros((), dtype=torch.float32, device=device)
    return _NO_SKIP[device]


def _kernel_step(w: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                 step: torch.Tensor, found: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """The kernel over w; step (0-dim fp32, advanced already) and found (0-dim) on w's device."""
    n = w.numel()  # the scalars in double on the host, rounded once, as the reference's are
    _adamw_master_kernel[(triton.cdiv(n, BLOCK),)](
        w, grad, m, v, out if out is not None else w, step, found, n, lr, 1 - beta1, beta2, 1 - beta2,
        math.log2(beta1), math.log2(beta2), eps, 1 - lr * weight_decay, WRITE_OUT=out is not None, BLOCK=BLOCK)


@contextlib.contextmanager
def masters_in_model(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """While open, each bf16 weight of an `AdamWMasterWeights` holds its fp32 master (no copy: the tensors are
    swapped), so a checkpoint written meanwhile stores the masters; any other optimizer: nothing changes."""
    swapped = []
    if isinstance(optimizer, AdamWMasterWeights):
        for p, state in optimizer.state.items():
            if "master" in state:
                swapped.append((p, p.data))
                p.data = state["master"]
    try:
        yield
    finally:
        for p, low in swapped:
            p.data = low
