"""`install_fp8(model)`: swap the model's GEMM-heavy linears for blockwise-FP8 ones, from outside.

Swapped (all three GEMMs in e4m3, master weights stay fp32): the attention projections (q/q_a/q_b,
kv_a, kv_b, o), the dense MLPs, the shared experts and the routed experts. Left alone (BF16 under
autocast, or FP32): embedding, lm_head, the MoE router, norms, the attention core (SDPA), MTP's
projection `eh_proj`.

Backends:
    "emulate"  the CPU/any-device emulation (`reference.py`): every shape, slow; tests and CPU training.
    "gpu"      Triton quantization + `torch._scaled_mm` (dense) + Triton grouped GEMM (experts); needs
               a CUDA GPU of compute capability >= 8.9 and in/out features that are multiples of 128.
               Layers with other shapes stay in BF16 (one warning lists them), or with
               pad_partial_blocks=True linears run on operands zero-padded to whole blocks.
    "auto"     "gpu" when the model's parameters are on a CUDA device, else "emulate".

Options (nanoseek/fp8/options.py): `cache_weights` quantizes each weight once per optimizer step rather than
once per micro-batch (worth it with gradient accumulation); `recompute_swiglu` recomputes silu(gate) in
backward in the dense MLPs, shared and routed experts instead of storing it.

FP8 is a training recipe: without autograd (validation loss, sampling, the inference engine's copy of
the model) the swapped modules compute their reference maths in BF16/FP32, as a BF16 run would.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.fp8.options import WeightCache, swiglu
from nanoseek.fp8.reference import fp8_grouped_emulated, fp8_linear_emulated, quantize_experts, quantize_linear_weight
from nanoseek.model.common import MLP
from nanoseek.model.moe import RoutedExperts, SortRows, UnsortRows, stable_argsort
from nanoseek.model.swap import adopt, replace_modules

BACKENDS = ("auto", "emulate", "gpu")
# the linears FP8 takes, by their attribute name in the model, per part: MLA, and the MLPs / shared experts
ATTENTION_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
FP8_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
PARTS = ("attention", "mlp", "experts")  # what `install_fp8(parts=...)` may swap (the routed experts last)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would return: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FP8Linear(nn.Linear):
    """nn.Linear (no bias) whose forward, input-gradient and weight-gradient GEMMs run on blockwise e4m3."""

    backend: str = "emulate"
    weight_cache: WeightCache | None = None  # set by install_fp8(cache_weights=True)
    pad_blocks: bool = False  # set by install_fp8(pad_partial_blocks=True) where a dimension is not a 128-multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N); without autograd (evaluation, generation) the reference nn.Linear."""
        if not torch.is_grad_enabled():
            return super().forward(x)
        out_dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            if self.backend == "gpu":
                from nanoseek.fp8.gpu import fp8_linear as linear
                from nanoseek.fp8.gpu import quantize_dense_weight as quantize
            else:
                linear, quantize = fp8_linear_emulated, quantize_linear_weight
            if self.pad_blocks:
                return self._padded(x, linear, quantize, out_dtype)
            wq = self.weight_cache.get(self.weight, quantize) if self.weight_cache is not None else None
            return linear(x, self.weight, out_dtype, wq)

    def _padded(self, x, linear, quantize, out_dtype) -> torch.Tensor:
        """The GEMMs on W zero-padded to whole 128-blocks (N, K) -> (Np, Kp) and x to (..., Kp). A partial
        block is a smaller block: the zeros raise no block's max-abs and add only zero products, so this is
        the same maths (the emulation pads its blocks the same way); the gradients are sliced back."""
        N, K = self.weight.shape
        pn, pk = -N % 128, -K % 128

        def pad_w(w: torch.Tensor) -> torch.Tensor:
            return F.pad(w, (0, pk, 0, pn))  # (Np, Kp)
        wq = None
        if self.weight_cache is not None:
            wq = self.weight_cache.get(self.weight, lambda w: quantize(pad_w(w)))
        y = linear(F.pad(x, (0, pk)) if pk else x, pad_w(self.weight), out_dtype, wq)  # (..., Np)
        return y[..., :N] if pn else y


class FP8RoutedExperts(RoutedExperts):
    """Routed experts through two FP8 grouped GEMMs (w13 then w2) over rows sorted by expert."""

    backend: str = "emulate"
    recompute_swiglu: bool = False
    w13_cache: WeightCache | None = None  # both set by install_fp8(cache_weights=True)
    w2_cache: WeightCache | None = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x (T, D), ids/gates (T, K) -> sum_k gates[t, k] * expert_{ids[t, k]}(x[t])  (T, D); without autograd
        (evaluation, generation) the reference experts."""
        if not torch.is_grad_enabled():
            return super().forward(x, ids, gates)
        T, K = ids.shape
        out_dtype = _out_dtype(x)
        flat = ids.flatten()  # (T*K,)
        order = stable_argsort(flat, self.num_experts)
        experts = torch.arange(self.num_experts, device=flat.device, dtype=flat.dtype)
        ends = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)  # (E,) end row per expert
        if self.backend == "gpu":
            from nanoseek.fp8.gpu import expert_tiles, fp8_grouped_linear
            from nanoseek.fp8.gpu import quantize_expert_weights as quantize
            tiles = expert_tiles(ends, T * K)  # one tile table for both GEMMs (the same rows)

            def grouped(x, w, ends, out_dtype, wq):
                return fp8_grouped_linear(x, w, ends, out_dtype, wq, tiles)
        else:
            grouped, quantize = fp8_grouped_emulated, quantize_experts
        with torch.autocast(x.device.type, enabled=False):
            q13 = self.w13_cache.get(self.w13, quantize) if self.w13_cache is not None else None
            q2 = self.w2_cache.get(self.w2, quantize) if self.w2_cache is not None else None
            unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            xs = SortRows.apply(x, order, unsort, K)  # (T*K, D); its backward gathers (no atomics)
            h = grouped(xs, self.w13, ends, out_dtype, q13)  # (T*K, 2I)
            gate, up = h.split(self.width, dim=-1)
            y = grouped(swiglu(gate, up, self.recompute_swiglu), self.w2, ends, out_dtype, q2)  # (T*K, D)
            y = UnsortRows.apply(y, order, unsort).view(T, K, -1)
            return torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1)  # (T, D)


class FP8MLP(MLP):
    """The SwiGLU MLP (dense layers, shared experts) with silu(gate) recomputed in backward (its linears are
    swapped on their own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), recompute=True))


def gpu_shape_ok(in_features: int, out_features: int) -> bool:
    """The GPU kernels take whole 128-blocks along both weight dimensions."""
    return in_features % 128 == 0 and out_features % 128 == 0


def check_fp8_device(device: torch.device) -> None:
    """Raise unless `device` is a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)."""
    if device.type != "cuda":
        raise ValueError(f"the FP8 'gpu' backend needs a CUDA device, the model is on {device}; "
                         "move it to CUDA first or use backend='emulate'")
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("the FP8 'gpu' backend needs Triton (pip install triton); it is not installed")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"FP8 training needs a GPU of compute capability >= 8.9 (Ada, Hopper or newer); "
                           f"{device} is {name} (SM {major}.{minor}). Train with --train.dtype bf16 instead")


def parse_parts(spec: str) -> tuple[str, ...]:
    """'attention,mlp' -> ("attention", "mlp"): the trainers' --train.fp8_parts (install_fp8 checks the names)."""
    return tuple(part.strip() for part in spec.split(",") if part.strip())


def install_fp8(model: nn.Module, backend: str = "auto", cache_weights: bool = False,
                recompute_swiglu: bool = False, pad_partial_blocks: bool = False,
                parts: tuple[str, ...] = PARTS) -> dict[str, list[str]]:
    """Swap the FP8-eligible linears and routed experts of `model` in place (same parameter objects).

    parts: which of the attention projections ("attention"), the dense-MLP and shared-expert linears ("mlp")
    and the routed experts ("experts") run in FP8 (default all; the rest stays as BF16 would run it).

    cache_weights: quantize each weight once per optimizer step (reused over gradient-accumulation
    micro-batches, 1-2 bytes per weight kept between steps); recompute_swiglu: recompute silu(gate) in
    backward (MLPs and experts); pad_partial_blocks: on the GPU, run a linear whose in/out features are not
    multiples of 128 on zero-padded operands instead of leaving it in BF16 (routed experts still fall
    back). Returns {"fp8": swapped names, "bf16": names left in high precision
    because of their shape}; MLPs swapped for recompute are not listed."""
    if backend not in BACKENDS:
        raise ValueError(f"install_fp8: backend {backend!r} is unknown; use one of {BACKENDS}")
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"install_fp8: parts {tuple(parts)!r}: choose one or more of {PARTS}")
    linears = (ATTENTION_LINEARS if "attention" in parts else ()) + (MLP_LINEARS if "mlp" in parts else ())
    device = next(model.parameters(), torch.empty(0)).device
    if backend == "auto":
        backend = "gpu" if device.type == "cuda" else "emulate"
    if backend == "gpu":
        check_fp8_device(device)
    swapped: list[str] = []
    fallback: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and leaf in linears:
            if module.bias is not None:
                fallback.append(f"{name} (has a bias)")
                return None
            partial = backend == "gpu" and not gpu_shape_ok(module.in_features, module.out_features)
            if partial and not pad_partial_blocks:
                fallback.append(f"{name} ({module.in_features}->{module.out_features})")
                return None
            new = adopt(FP8Linear, module)
            new.pad_blocks = partial
            new.weight_cache = WeightCache() if cache_weights else None
        elif type(module) is MLP:
            return adopt(FP8MLP, module) if recompute_swiglu and "mlp" in parts else None
        elif type(module) is RoutedExperts and "experts" in parts:
            D, I = module.w2.shape[1], module.width
            if backend == "gpu" and not gpu_shape_ok(D, I):
                fallback.append(f"{name} (experts {D}->{I})")
                return None
            new = adopt(FP8RoutedExperts, module)
            new.recompute_swiglu = recompute_swiglu
            new.w13_cache, new.w2_cache = (WeightCache(), WeightCache()) if cache_weights else (None, None)
        else:
            return None
        new.backend = backend
        swapped.append(name)
        return new

    replace_modules(model, swap)
    if fallback:
        warnings.warn(f"FP8: {len(fallback)} layer(s) stay in BF16, their shapes do not fit the FP8 kernels' "
                      f"128-blocks: {', '.join(fallback)}", stacklevel=2)
    return {"fp8": swapped, "bf16": fallback}
