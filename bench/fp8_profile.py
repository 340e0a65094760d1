"""Where the FP8 time goes: each quantizer and GEMM of one dense linear and of the routed experts, timed alone
(median of `triton.testing.do_bench`), next to BF16, so a slow stage shows by name.

    python bench/fp8_profile.py [--out fp8_profile.json]     # a CUDA GPU with FP8 (SM >= 9.0 for _scaled_mm)

Stages per dense linear (x (M, K) bf16, W (N, K) fp32): the forward quantizes x (1x128 + transposed 128x1,
one pass) and W (128x128 + transposed copy), then one GEMM; the backward quantizes dy the same way, then
dgrad and wgrad GEMMs. Routed experts (64, top-6): the same per grouped GEMM, plus the 128x1 quantization
of each expert's rows (`quantize_group_cols`). Bytes moved are given for the quantizers (GB/s against the
card's copy bandwidth, measured here as a device-to-device copy) and TFLOP/s for the GEMMs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.fp8 import gpu  # noqa: E402
from nanoseek.fp8 import kernels as K  # noqa: E402


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    import triton
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def dense(M: int, Kd: int, N: int, out: dict) -> None:
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, Kd, device="cuda") * Kd ** -0.5
    backend, pad = gpu.dense_backend(x.device)
    qx, sx, qxt, sxt = K.quantize_act(x, True)
    qw, qwt, sw, swt = K.quantize_weight(w, pad_rows_to=pad)
    qg, sg, qgt, sgt = K.quantize_act(dy, True)
    r: dict = {"backend": backend}
    r["quant_x_ms"] = bench(lambda: K.quantize_act(x, True))
    r["quant_x_GBps"] = (M * Kd * 2 + 2 * M * Kd) / r["quant_x_ms"] / 1e6
    r["quant_w_ms"] = bench(lambda: K.quantize_weight(w, pad_rows_to=pad))
    r["quant_dy_ms"] = bench(lambda: K.quantize_act(dy, True))
    r["quant_dy_GBps"] = (M * N * 2 + 2 * M * N) / r["quant_dy_ms"] / 1e6
    for strip in (32, 128):  # the two walks of a tile the search chooses between, 8 warps each
        r[f"quant_x_ms_strip{strip}"] = bench(lambda strip=strip: K.quantize_act(x, True, strip))
        r[f"quant_dy_ms_strip{strip}"] = bench(lambda strip=strip: K.quantize_act(dy, True, strip))
    f = 2.0 * M * Kd * N
    if backend.startswith("scaled_mm"):
        r["fwd_gemm_ms"] = bench(lambda: gpu._mm(backend, qx, qw.t(), sx.t(), gpu._tile_scales(sw)))
        r["dgrad_gemm_ms"] = bench(lambda: gpu._mm(backend, qg, qwt.t(), sg.t(), gpu._tile_scales(swt)))
        r["wgrad_gemm_ms"] = bench(lambda: gpu._mm(backend, qgt, qxt.t(), sgt.t(), sxt.t(), b_tiles=False))
    ends, tiles = gpu._one_group(M, x.device)
    r["triton_fwd_gemm_ms"] = bench(lambda: K.grouped_gemm(qx, sx, qw[None], sw[None], tiles, ends, M))
    r["triton_wgrad_gemm_ms"] = bench(lambda: K.grouped_wgrad(qgt, sgt, qxt, sxt, tiles, 1))
    for k in list(r):
        if k.endswith("gemm_ms"):
            r[k.replace("_ms", "_tflops")] = f / r[k] / 1e9
    xb, wb = x.clone().requires_grad_(), w.detach().to(torch.bfloat16).requires_grad_()
    r["bf16_fwd_ms"] = bench(lambda: F.linear(xb.detach(), wb.detach()))
    y = F.linear(xb, wb)
    r["bf16_fwd_bwd_ms"] = bench(lambda: F.linear(xb, wb).backward(dy))
    w32 = w.clone().requires_grad_()
    r["fp8_fwd_bwd_ms"] = bench(lambda: gpu.fp8_linear(xb, w32, torch.bfloat16).backward(dy))
    del y
    out[f"dense {Kd}->{N}"] = r
    print(f"dense {Kd}->{N}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.items()), flush=True)


def experts(T: int, D: int, I: int, out: dict, E: int = 64, topk: int = 6) -> None:
    R = T * topk
    ids = torch.rand(T, E, device="cuda").topk(topk, dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    xs = torch.randn(R, D, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(R, I, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, D, device="cuda") * D ** -0.5
    w2 = torch.randn(E, D, I, device="cuda") * I ** -0.5
    r: dict = {}
    r["tile_table_ms"] = bench(lambda: K.tile_table(ends, R))
    tiles = K.tile_table(ends, R)
    r["quant_rows_x_ms"] = bench(lambda: K.quantize_act(xs, False))
    r["quant_cols_x_ms"] = bench(lambda: K.quantize_group_cols(xs, tiles))
    r["quant_rows_and_cols_x_ms"] = bench(lambda: K.quantize_group_cols(xs, tiles, with_rows=True))  # one pass
    for strip in (32, 128):  # the two walks of a tile the search chooses between, 8 warps each
        r[f"quant_rows_and_cols_x_ms_strip{strip}"] = bench(
            lambda strip=strip: K.quantize_group_cols(xs, tiles, with_rows=True, strip=strip))
    r["quant_w13_ms"] = bench(lambda: K.quantize_weight(w13))
    r["quant_w2_ms"] = bench(lambda: K.quantize_weight(w2))
    qx, sx = K.quantize_act(xs, False)
    qh, sh = K.quantize_act(h, False)
    qw13, qw13t, sw13, sw13t = K.quantize_weight(w13)
    qw2, qw2t, sw2, sw2t = K.quantize_weight(w2)
    r["w13_fwd_ms"] = bench(lambda: K.grouped_gemm(qx, sx, qw13, sw13, tiles, ends, R))
    r["w2_fwd_ms"] = bench(lambda: K.grouped_gemm(qh, sh, qw2, sw2, tiles, ends, R))
    r["w2_dgrad_ms"] = bench(lambda: K.grouped_gemm(qx, sx, qw2t, sw2t, tiles, ends, R))  # (R, D) x (D -> I)
    qxt, sxt = K.quantize_group_cols(xs, tiles)
    qht, sht = K.quantize_group_cols(h, tiles)
    r["w2_wgrad_ms"] = bench(lambda: K.grouped_wgrad(qxt, sxt, qht, sht, tiles, E))  # dW2 (E, D, I)
    f13, f2 = 2.0 * R * D * 2 * I, 2.0 * R * D * I
    r["w13_fwd_tflops"] = f13 / r["w13_fwd_ms"] / 1e9
    r["w2_fwd_tflops"] = f2 / r["w2_fwd_ms"] / 1e9
    r["w2_dgrad_tflops"] = f2 / r["w2_dgrad_ms"] / 1e9
    r["w2_wgrad_tflops"] = f2 / r["w2_wgrad_ms"] / 1e9
    offs = ends
    b13 = w13.to(torch.bfloat16).transpose(1, 2)  # (E, D, 2I)
    r["bf16_w13_fwd_ms"] = bench(lambda: torch._grouped_mm(xs, b13, offs=offs))
    r["bf16_w13_fwd_tflops"] = f13 / r["bf16_w13_fwd_ms"] / 1e9
    for name, kern in (("grouped_gemm", K._grouped_gemm_kernel), ("grouped_wgrad", K._grouped_wgrad_kernel)):
        cache = getattr(kern, "cache", {})
        r[f"{name}_configs"] = {str(k): str(v) for k, v in cache.items()}
    out[f"experts {E}x {D}->{I} top-{topk}"] = r
    print(f"experts {D}->{I}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in r.items()), flush=True)


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB device-to-device copy, bytes read plus written: the quantizers' ceiling."""
    a = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--out", default="fp8_profile.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_profile: needs a CUDA GPU; there is none here")
    import triton
    out: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}}
    out["copy_GBps"] = copy_bandwidth()
    backend, pad = gpu.dense_backend(torch.device("cuda"))
    out["dense_backend"], out["scale_pad"], out["probe_errors"] = backend, pad, gpu.PROBE_ERRORS
    print(json.dumps({k: out[k] for k in ("device", "copy_GBps", "dense_backend", "scale_pad", "probe_errors")}))
    for Kd, N in ((2048, 5632), (7168, 18432)):
        dense(args.tokens, Kd, N, out)
        Path(args.out).write_text(json.dumps(out, indent=1))
    for D, I in ((2048, 1408),):
        experts(args.tokens, D, I, out)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
