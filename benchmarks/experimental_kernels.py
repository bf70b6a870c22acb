"""Benchmark-only GPU kernels (not used by the engine; kept here, not in ``fastlora_core``).

1. ``merge_requant_(weight, master, down, up, scratch)`` - the whole fused per-layer fp8 update of the
   reference implementation in ``bench_flux.py`` (``FusedSwapper``); the engine's own version is
   ``FusedStrategy._write`` + ``fastlora_core.kernels.rowwise_fp8_quant_into``.

FP8 attention through cuDNN, once here, is in the pack now (``fastlora_core.fp8_attention``, the
engine's ``attention="cudnn_fp8"``).
"""

from __future__ import annotations

import torch

from fastlora_core.kernels import rowwise_fp8_quant_into


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
