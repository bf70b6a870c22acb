"""The single block's output projection, torchao's compiled path against the one-kernel input (decision 44).

    python -m benchmarks.bench_projection --out DIR

Flux's single block at 1024x1024 (4608 tokens): ``proj_out(cat([attention 3072, gelu_tanh(mlp 12288)]))``
with a row-wise fp8 ``proj_out`` (15360 -> 3072, torchao's engine config), each form compiled as the
blocks are (``fullgraph=True``). Reports the median time of each form (CUDA events, 100 calls after
warm-up, ``bench_fp8_attention.time_ms``), the kernel alone, and the relative L2 distance between the two forms' outputs. Then sweeps the
kernel's launch (elements per loop step x warps; ``fp8_projection.LAUNCH`` is the one the pack uses):
each launch's time and whether its output is the default launch's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4608)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torchao.quantization import quantize_

    from benchmarks.bench_fp8_attention import time_ms
    from fastlora_core import fp8_projection
    from fastlora_core.optimize import torchao_config

    torch.manual_seed(0)
    dev = torch.device("cuda")
    linear = torch.nn.Linear(15360, 3072).to(dev, torch.bfloat16)
    quantize_(linear, torchao_config("fp8"))
    attn = torch.randn(1, a.tokens, 3072, device=dev, dtype=torch.bfloat16)
    mlp = torch.randn(1, a.tokens, 12288, device=dev, dtype=torch.bfloat16) * 2

    def plain(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return linear(torch.cat([x, F.gelu(m, approximate="tanh")], dim=2))

    def fused(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return fp8_projection.project(linear, x, m)

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        return round(time_ms(fn, 100) * 1000, 1)  # us

    res: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tokens": a.tokens}
    with torch.inference_mode():
        why = fp8_projection.why_not(linear, torch.nn.GELU(approximate="tanh"))
        res["eligible"] = why or "yes"
        cp, cf = torch.compile(plain, fullgraph=True), torch.compile(fused, fullgraph=True)
        out_p, out_f = cp(attn, mlp), cf(attn, mlp)
        res["rel_l2_fused_vs_plain"] = float((out_f.float() - out_p.float()).norm() / out_p.float().norm())
        eager = plain(attn, mlp)
        res["rel_l2_plain_compiled_vs_eager"] = float((out_p.float() - eager.float()).norm() / eager.float().norm())
        res["rel_l2_fused_vs_eager"] = float((out_f.float() - eager.float()).norm() / eager.float().norm())
        res["plain_compiled_us"] = timed(lambda: cp(attn, mlp))
        res["fused_compiled_us"] = timed(lambda: cf(attn, mlp))
        res["kernel_alone_us"] = timed(lambda: fp8_projection.gelu_cat_fp8(attn, mlp))
        q, s = fp8_projection.gelu_cat_fp8(attn, mlp)
        w = linear.weight
        res["gemm_alone_us"] = timed(lambda: torch._scaled_mm(q.view(-1, 15360), w.qdata.t(), scale_a=s,
                                                              scale_b=w.scale.t(), bias=linear.bias,
                                                              out_dtype=torch.bfloat16, use_fast_accum=True))
        res["launch"] = dict(fp8_projection.LAUNCH)
        res["sweep"] = _sweep(attn, mlp, q, s, timed)
    res["saved_per_forward_ms_38_blocks"] = round((res["plain_compiled_us"] - res["fused_compiled_us"]) * 38 / 1000, 2)  # type: ignore[operator]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "projection.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1), flush=True)


def _sweep(attn, mlp, q_ref, s_ref, timed) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    """Every launch of the kernel in the grid: its median time and its equality with the default's output."""
    import torch

    from fastlora_core import fp8_triton

    a, m = attn.reshape(-1, attn.shape[-1]), mlp.reshape(-1, mlp.shape[-1])
    ka, km = a.shape[1], m.shape[1]
    q = torch.empty_like(q_ref)
    s = torch.empty_like(s_ref)
    rows = []
    for block in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8, 16):
            def launch(block: int = block, warps: int = warps) -> None:
                fp8_triton.gelu_cat_rowwise_fp8[(a.shape[0],)](a, m, q, s, ka, km, a.stride(0), m.stride(0),
                                                               ka + km, BLOCK=block, num_warps=warps)
            us = timed(launch)
            same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
            rows.append({"BLOCK": block, "num_warps": warps, "us": us, "same_as_default": same})
    return rows


if __name__ == "__main__":
    main()
