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

DEV = "cuda"  # a CPU check of the bookkeeping sets "cpu" (Triton interpreter, an emulated GEMM)


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    import triton
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def dense(M: int, Kd: int, N: int, out: dict) -> None:
    x = torch.randn(M, Kd, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(N, Kd, device=DEV) * Kd ** -0.5
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
    ids = torch.rand(T, E, device=DEV).topk(topk, dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    xs = torch.randn(R, D, device=DEV, dtype=torch.bfloat16)
    h = torch.randn(R, I, device=DEV, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, D, device=DEV) * D ** -0.5
    w2 = torch.randn(E, D, I, device=DEV) * I ** -0.5
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


def experts_loop(T: int, D: int, I: int, out: dict, E: int = 64, topk: int = 6) -> None:
    """The routed experts' GEMMs as one cuBLAS blockwise `_scaled_mm` per expert (a host loop over E experts),
    against the Triton grouped GEMMs and BF16 `_grouped_mm` on the same rows. Per expert: rows s..e of the
    sorted x with their 1x128 scales laid out (K/128, M_e) (what cuBLAS's outer-dim-major check wants; built
    once here), the expert's 128x128 weight scales, and for the weight gradient the expert's slice of the
    128x1 tile columns (`quantize_group_cols`). `*_sync_ms` adds the host read of the expert sizes."""
    backend, pad = gpu.dense_backend(torch.device(DEV))
    if not backend.startswith("scaled_mm"):
        out["experts_loop"] = {"skipped": f"dense backend is {backend}"}
        return
    R = T * topk
    ids = torch.rand(T, E, device=DEV).topk(topk, dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    sizes = counts.tolist()
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    n_tiles = [K.cdiv(n, K.BLOCK) for n in sizes]
    first = [0]
    for n in n_tiles[:-1]:
        first.append(first[-1] + n)
    xs = torch.randn(R, D, device=DEV, dtype=torch.bfloat16)
    h = torch.randn(R, I, device=DEV, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, D, device=DEV) * D ** -0.5
    w2 = torch.randn(E, D, I, device=DEV) * I ** -0.5
    tiles = K.tile_table(ends, R)
    qx, sx = K.quantize_act(xs, False)  # (Rp, D), (D/128, Rp)
    qh, sh = K.quantize_act(h, False)
    qw13, _, sw13, _ = K.quantize_weight(w13, pad_rows_to=pad)
    qw2, qw2t, sw2, sw2t = K.quantize_weight(w2, pad_rows_to=pad)
    qxt, sxt = K.quantize_group_cols(xs, tiles)  # (D, T*128), (T, D)
    qht, sht = K.quantize_group_cols(h, tiles)
    r: dict = {"backend": backend, "sizes_min_max": [min(sizes), max(sizes)]}

    def padded_rows(q, sc):
        """Each expert's rows and 1x128 scales as its own (Mp_e, K) / (K/128, Mp_e) tensors, Mp_e = M_e rounded
        up to 128 (zero rows, unit scales): the layout the dense route hands cuBLAS."""
        rows, scales = [], []
        for s, n in zip(starts, sizes):
            mp = K.cdiv(n, K.BLOCK) * K.BLOCK
            qe = torch.zeros(mp, q.shape[1], dtype=torch.uint8, device=DEV).view(q.dtype)
            qe[:n] = q[s:s + n]
            se = torch.ones(sc.shape[0], mp, device=DEV)
            se[:, :n] = sc[:, s:s + n]
            rows.append(qe)
            scales.append(se)
        return rows, scales

    xe, sxe = padded_rows(qx, sx)
    he, she = padded_rows(qh, sh)
    sx_raw = [sx[:, s:s + n].contiguous() for s, n in zip(starts, sizes)]  # (D/128, M_e) each, unpadded

    def fwd(rows, scales, qw, sw):  # y_e = x_e W_e^T, one GEMM per expert; -> [(Mp_e, N)]
        return [gpu._mm(backend, rows[e], qw[e].t(), scales[e].t(), gpu._tile_scales(sw[e]))
                for e in range(E) if sizes[e]]

    def fwd_unpadded(q, s_e, qw, sw):  # the same on the raw M_e-row slices
        return [gpu._mm(backend, q[s:s + n], qw[e].t(), s_e[e].t(), gpu._tile_scales(sw[e]))
                for e, (s, n) in enumerate(zip(starts, sizes)) if n]

    cols_a = [qxt[:, 128 * t:128 * (t + n)].contiguous() for t, n in zip(first, n_tiles)]
    cols_b = [qht[:, 128 * t:128 * (t + n)].contiguous() for t, n in zip(first, n_tiles)]

    def wgrad():  # dW_e = a_e^T b_e over the expert's 128-padded tokens, a (D, Tp_e), b (I, Tp_e)
        return [gpu._mm(backend, cols_a[e], cols_b[e].t(), sxt[t:t + n].t(), sht[t:t + n].t(), b_tiles=False)
                for e, (t, n) in enumerate(zip(first, n_tiles)) if n]

    def wgrad_strided():  # the same on strided column slices of the tile columns
        return [gpu._mm(backend, qxt[:, 128 * t:128 * (t + n)], qht[:, 128 * t:128 * (t + n)].t(),
                        sxt[t:t + n].t(), sht[t:t + n].t(), b_tiles=False)
                for t, n in zip(first, n_tiles) if n]

    def synced(fn):
        def run():
            counts.tolist()
            return fn()
        return run

    f13, f2 = 2.0 * R * D * 2 * I, 2.0 * R * D * I
    cases = {"w13_fwd": (lambda: fwd(xe, sxe, qw13, sw13), f13),
             "w13_fwd_unpadded": (lambda: fwd_unpadded(qx, sx_raw, qw13, sw13), f13),
             "w2_fwd": (lambda: fwd(he, she, qw2, sw2), f2),
             "w2_dgrad": (lambda: fwd(xe, sxe, qw2t, sw2t), f2),
             "w2_wgrad": (wgrad, f2),
             "w2_wgrad_strided": (wgrad_strided, f2)}
    for name, (fn, flops) in cases.items():
        try:
            fn()
            if DEV == "cuda":
                torch.cuda.synchronize()  # a launch error surfaces here, inside the try
        except (RuntimeError, ValueError, TypeError) as e:
            r[f"loop_{name}_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            continue
        r[f"loop_{name}_ms"] = bench(fn)
        r[f"loop_{name}_sync_ms"] = bench(synced(fn))
        r[f"loop_{name}_tflops"] = flops / r[f"loop_{name}_ms"] / 1e9
    try:
        y_loop = torch.cat([y[:n] for y, n in zip(fwd(xe, sxe, qw13, sw13), [n for n in sizes if n])])
        qw13_1, _, sw13_1, _ = K.quantize_weight(w13)  # the Triton GEMM's unpadded scale rows
        y_tri = K.grouped_gemm(qx, sx, qw13_1, sw13_1, tiles, ends, R)
        r["loop_vs_triton_w13_rel_diff"] = float((y_loop.float() - y_tri.float()).norm() / y_tri.float().norm())
        dw_tri = K.grouped_wgrad(qxt, sxt, qht, sht, tiles, E)
        dw_tri = torch.cat([dw_tri[e] for e in range(E) if sizes[e]])
        r["loop_vs_triton_w2_wgrad_rel_diff"] = float((torch.cat(wgrad()).float() - dw_tri).norm() / dw_tri.norm())
    except (RuntimeError, ValueError, TypeError) as e:
        r["check_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    out[f"experts_loop {E}x {D}->{I} top-{topk}"] = r
    print(f"experts_loop {D}->{I}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in r.items()), flush=True)


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB device-to-device copy, bytes read plus written: the quantizers' ceiling."""
    a = torch.empty(2**28, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    return 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--out", default="fp8_profile.json")
    p.add_argument("--only-experts", action="store_true", help="skip the dense linears")
    p.add_argument("--experts-loop", action="store_true",
                   help="also time the experts as one cuBLAS blockwise GEMM per expert")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_profile: needs a CUDA GPU; there is none here")
    import triton
    out: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}}
    out["copy_GBps"] = copy_bandwidth()
    backend, pad = gpu.dense_backend(torch.device(DEV))
    out["dense_backend"], out["scale_pad"], out["probe_errors"] = backend, pad, gpu.PROBE_ERRORS
    print(json.dumps({k: out[k] for k in ("device", "copy_GBps", "dense_backend", "scale_pad", "probe_errors")}))
    for Kd, N in () if args.only_experts else ((2048, 5632), (7168, 18432)):
        dense(args.tokens, Kd, N, out)
        Path(args.out).write_text(json.dumps(out, indent=1))
    for D, I in ((2048, 1408),):
        experts(args.tokens, D, I, out)
        Path(args.out).write_text(json.dumps(out, indent=1))
        if args.experts_loop:
            experts_loop(args.tokens, D, I, out)
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
