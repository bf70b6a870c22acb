"""Benchmark-only GPU kernels (not used by the engine; kept here, not in ``fastlora_core``).

1. ``merge_requant_(weight, master, down, up, scratch)`` - the whole fused per-layer fp8 update of the
   reference implementation in ``bench_flux.py`` (``FusedSwapper``); the engine's own version is
   ``FusedStrategy._write`` + ``fastlora_core.kernels.rowwise_fp8_quant_into``.
2. ``fp8_sdpa(q, k, v)`` - FP8 attention through cuDNN's fused SDPA (frontend package
   ``nvidia-cudnn-frontend``), wrapped as the ``torch.library`` custom op ``fastlora::cudnn_fp8_sdpa`` so
   ``torch.compile(fullgraph=True)`` keeps it as one opaque call. q/k/v are bf16 ``[B, S, H, D]`` (the
   diffusers attention-dispatch layout); they are scaled per tensor to e4m3 (the scaling is plain torch,
   so inductor fuses it into the RoPE kernel), the output is bf16 ``[B, S, H, D]``.
   Measured 2026-11-29 (cuDNN 9.19, frontend 1.32): refused on Hopper ("bf16 output only on Blackwell";
   the SM90 python engine needs nvidia-cutlass-dsl). ``out_fp8=True`` asks for an e4m3 output instead
   (scaled by ``1 / descale_v``: attention output is a convex combination of V's rows, so it cannot
   exceed V's absolute maximum) and dequantises it in plain torch: the form Hopper's engine takes.
"""

from __future__ import annotations

import math

import torch

from fastlora_core.kernels import FP8_MAX, rowwise_fp8_quant_into


def merge_requant_(weight: torch.Tensor, master: torch.Tensor, down: torch.Tensor | None,
                   up: torch.Tensor | None, scratch: torch.Tensor, use_triton: bool = True) -> None:
    """In place: ``weight <- quant(master + up @ down)`` (``up`` already holds strength * alpha / r).

    ``weight`` is a torchao Float8Tensor (per-row) parameter; ``master`` the bf16 original; ``scratch``
    a bf16 buffer with at least ``master.numel()`` elements. ``down``/``up`` None restores the master.
    """
    out_f, in_f = master.shape
    buf = scratch[: out_f * in_f].view(out_f, in_f)
    if down is None:
        buf.copy_(master)
    else:
        torch.addmm(master, up, down, out=buf)
    names = weight.__tensor_flatten__()[0]
    qdata, sc = getattr(weight, names[0]), getattr(weight, names[1])
    if use_triton:
        rowwise_fp8_quant_into(buf, qdata, sc.view(-1))
    else:
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

        fresh = Float8Tensor.from_hp(buf, granularity=PerRow())
        qdata.copy_(fresh.qdata)
        sc.copy_(fresh.scale.view_as(sc))


# --------------------------------------------------------------------------------------------------
# 2. FP8 attention through cuDNN (custom op)
# --------------------------------------------------------------------------------------------------
_CUDNN_STATE: dict = {}


def cudnn_fp8_available() -> bool:
    try:
        import cudnn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def _cudnn_graph(b: int, h: int, s: int, d: int, attn_scale: float, out_fp8: bool = False):
    import cudnn

    key = (b, h, s, d, attn_scale, out_fp8, torch.cuda.current_device())
    g = _CUDNN_STATE.get(key)
    if g is not None:
        return g
    if "handle" not in _CUDNN_STATE:
        _CUDNN_STATE["handle"] = cudnn.create_handle()
    handle = _CUDNN_STATE["handle"]
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3,
                          intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    stride = (s * h * d, d, h * d, 1)  # BSHD memory, BHSD logical dims
    q = graph.tensor(uid=0, dim=(b, h, s, d), stride=stride, data_type=cudnn.data_type.FP8_E4M3)
    k = graph.tensor(uid=1, dim=(b, h, s, d), stride=stride, data_type=cudnn.data_type.FP8_E4M3)
    v = graph.tensor(uid=2, dim=(b, h, s, d), stride=stride, data_type=cudnn.data_type.FP8_E4M3)

    def scalar(uid):
        return graph.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)

    dq, dk, dv, ds, ss, so = scalar(5), scalar(6), scalar(7), scalar(8), scalar(9), scalar(10)
    o, _stats, _amax_s, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds, scale_s=ss, scale_o=so,
        generate_stats=False, attn_scale=attn_scale, use_causal_mask=False)
    o_type = cudnn.data_type.FP8_E4M3 if out_fp8 else cudnn.data_type.BFLOAT16
    o.set_uid(3).set_output(True).set_dim((b, h, s, d)).set_stride(stride).set_data_type(o_type)
    amax_o.set_uid(12).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(
        cudnn.data_type.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    dev = torch.device("cuda", torch.cuda.current_device())
    consts = {
        "s_scale": torch.full((1, 1, 1, 1), FP8_MAX, dtype=torch.float32, device=dev),
        "s_descale": torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, dtype=torch.float32, device=dev),
        "amax_o": torch.empty((1, 1, 1, 1), dtype=torch.float32, device=dev),
        "ws": torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=dev),
    }
    g = (graph, consts)
    _CUDNN_STATE[key] = g
    return g


@torch.library.custom_op("fastlora::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor,
                   dk: torch.Tensor, dv: torch.Tensor, o_scale: torch.Tensor, attn_scale: float,
                   out_fp8: bool) -> torch.Tensor:
    """``[B, S, H, D]`` e4m3 q/k/v with their per-tensor descales -> attention, bf16 or (``out_fp8``)
    e4m3 multiplied by ``o_scale``."""
    import cudnn

    b, s, h, d = q8.shape
    graph, c = _cudnn_graph(b, h, s, d, attn_scale, out_fp8)
    out = torch.empty(q8.shape, dtype=torch.float8_e4m3fn if out_fp8 else torch.bfloat16, device=q8.device)
    handle = _CUDNN_STATE["handle"]
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    pack = {0: q8.contiguous(), 1: k8.contiguous(), 2: v8.contiguous(), 5: dq, 6: dk, 7: dv,
            8: c["s_descale"], 9: c["s_scale"], 10: o_scale, 3: out, 12: c["amax_o"]}
    graph.execute(pack, c["ws"], handle=handle)
    return out


@cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, dq, dk, dv, o_scale, attn_scale, out_fp8):
    return torch.empty(q8.shape, dtype=torch.float8_e4m3fn if out_fp8 else torch.bfloat16, device=q8.device)


def _to_fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax().float().clamp(min=1e-6)
    scale = FP8_MAX / amax
    x8 = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, (1.0 / scale).reshape(1, 1, 1, 1)


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_scale: float | None = None,
             out_fp8: bool = True) -> torch.Tensor:
    """bf16 ``[B, S, H, D]`` q/k/v -> bf16 ``[B, S, H, D]`` through cuDNN FP8 attention.

    ``out_fp8`` (Hopper): cuDNN writes e4m3 scaled by ``1 / descale_v``, which keeps every output
    element within e4m3's range, and the result is multiplied back by ``descale_v`` here."""
    if attn_scale is None:
        attn_scale = 1.0 / math.sqrt(q.shape[-1])
    q8, dq = _to_fp8_per_tensor(q)
    k8, dk = _to_fp8_per_tensor(k)
    v8, dv = _to_fp8_per_tensor(v)
    o_scale = 1.0 / dv if out_fp8 else torch.ones_like(dv)
    out = cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, o_scale, float(attn_scale), out_fp8)
    return (out.float() * dv).to(q.dtype) if out_fp8 else out
