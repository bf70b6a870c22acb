"""FP8 attention on Hopper through cuDNN (issue 13 item 3): kernel time and error at Flux's shape.

    python -m benchmarks.bench_fp8_attention --out FILE.json [--iters 50]

Flux.1-dev at 1024x1024 attends over 4608 tokens (512 text + 4096 image), 24 heads of 128. For q/k/v
``[1, 4608, 24, 128]`` bf16 this times, with CUDA events (median of ``--iters`` after a warm-up):

- ``sdpa_bf16``: ``F.scaled_dot_product_attention`` as the engine calls it (cuDNN's bf16 kernel on the
  H200);
- ``cudnn_fp8``: cuDNN's fused FP8 attention (``fastlora_core.fp8_attention``, e4m3 output: a bf16
  output is Blackwell-only, refused on the H200 on 2026-11-29 and 2026-12-04), the kernel alone on
  pre-quantised inputs and the whole call (per-tensor quantisation of q, k, v and the output's
  dequantisation in eager torch; compiled, inductor fuses those into the neighbouring kernels).
  Timed from the host, one call at a time, the kernel's number includes the frontend's per-call host
  work (~0.4 ms); inside the compiled model the GPU's own time is in ``bench_loop``'s profile.
  ``host_us_per_call``: host time per call queued back to back, for SDPA, the custom op (the
  frontend's ordered execute) and the frontend's dict form.

Error: relative L2 distance and cosine similarity against float32 attention for the ``CASES`` below,
next to the bf16 kernel's own error. Needs ``nvidia-cudnn-frontend`` (carried as a wheel) and an SM90+ GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHAPE = (1, 4608, 24, 128)  # [B, S, H, D], diffusers' attention-dispatch layout


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention, head by head (the whole score matrix in float32 is 2 GB per 24 heads)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    scale = q.shape[-1] ** -0.5
    for h in range(q.shape[2]):
        qh, kh, vh = (t[:, :, h].float() for t in (q, k, v))
        out[:, :, h] = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1) @ vh
    return out


def error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    o, r = out.float().flatten(), ref.flatten()
    return {"rel_l2": round(float((o - r).norm() / r.norm()), 5),
            "cosine": round(float(F.cosine_similarity(o, r, dim=0)), 6)}


def time_ms(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return round(sorted(times)[len(times) // 2], 4)


#: Inputs: standard normal q/k/v; q and k three times larger (a peakier softmax, as trained models
#: have); and v with four of its 128 channels 20 times larger (outlier channels: one per-tensor scale
#: for V and for the output leaves the other channels fewer of e4m3's levels).
CASES = ("normal", "qk_x3", "v_outliers")


def inputs(case: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (torch.randn(SHAPE, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if case == "qk_x3":
        q, k = q * 3, k * 3
    elif case == "v_outliers":
        v[..., :4] *= 20
    return q, k, v


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call when calls are queued back to back (the GPU catches up after)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return round(host / calls * 1e6, 1)


def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, iters: int) -> dict[str, Any]:
    """One case: the bf16 kernel, then cuDNN FP8 attention."""
    from fastlora_core.fp8_attention import (
        _cudnn_graph,
        _handles,
        cudnn_fp8_sdpa,
        fp8_sdpa,
        to_fp8_per_tensor,
    )

    ref = reference(q, k, v)
    flops = 4 * SHAPE[0] * SHAPE[2] * SHAPE[1] ** 2 * SHAPE[3]
    ms = time_ms(lambda: attention_bf16(q, k, v), iters)
    row: dict[str, Any] = {"sdpa_bf16": {"ms": ms, "tflops": round(flops / ms / 1e9, 1),
                                         **error(attention_bf16(q, k, v), ref)}}
    q8, dq = to_fp8_per_tensor(q)
    k8, dk = to_fp8_per_tensor(k)
    v8, dv = to_fp8_per_tensor(v)
    scale = SHAPE[3] ** -0.5
    try:
        kernel = time_ms(lambda: cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, 1.0 / dv, scale), iters)
        whole = time_ms(lambda: fp8_sdpa(q, k, v), iters)
        row["cudnn_fp8"] = {"kernel_ms": kernel, "kernel_tflops": round(flops / kernel / 1e9, 1),
                            "eager_with_quantisation_ms": whole, **error(fp8_sdpa(q, k, v), ref)}
        graph, c = _cudnn_graph(SHAPE[0], SHAPE[2], SHAPE[1], SHAPE[3], scale, q.device)
        out = torch.empty(q8.shape, dtype=torch.float8_e4m3fn, device=q.device)
        pack = {0: q8, 1: k8, 2: v8, 5: dq, 6: dk, 7: dv, 8: c["s_descale"], 9: c["s_scale"], 10: 1.0 / dv, 3: out,
                12: c["amax_o"]}
        row["host_us_per_call"] = {
            "sdpa_bf16": host_us(lambda: attention_bf16(q, k, v)),
            "cudnn_fp8_op": host_us(lambda: cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, 1.0 / dv, scale)),
            "cudnn_fp8_execute_dict": host_us(lambda: graph.execute(pack, c["workspace"], handle=_handles[q.device.index])),
        }
    except Exception as exc:  # noqa: BLE001 - a refusal is a result here
        row["cudnn_fp8"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "torch_cudnn": torch.backends.cudnn.version(), "shape_bshd": SHAPE}
    try:
        import cudnn

        res["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
        res["cudnn_backend"] = cudnn.backend_version()
    except Exception as exc:  # noqa: BLE001 - recorded; the bf16 rows are still measured
        res["cudnn_import_error"] = repr(exc)
    out = Path(a.out)
    g = torch.Generator(device="cuda").manual_seed(0)
    for case in CASES:
        res[case] = measure(*inputs(case, g), a.iters)
        out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
