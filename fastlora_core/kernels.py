"""Optional GPU kernel for the fused fp8 swap (measured in ``benchmarks/``).

``rowwise_fp8_quant_into(x, qdata, scale)`` - per-row float8 e4m3 quantisation of a bf16 matrix,
written *into existing* tensors (the inner tensors of a torchao ``Float8Tensor`` weight), bit-identical
to ``torchao`` 0.18's torch path (``_choose_scale_float8`` + ``_quantize_affine_float8``): the scale
is ``amax/448`` rounded to bf16 (torchao computes it in the weight's dtype) then stored as fp32, and
the data is ``clamp(x_fp32 / scale, -448, 448)`` rounded to nearest-even. One read of the row from
HBM (second pass hits L2) and one write. Used by the *fused* swap (``lora/fused.py``, after a one-time
bit-exact self-check, with torchao as the fallback): requantise only the touched layers, with no new
allocation, so compiled graphs see the new values. Triton is imported lazily.
"""

from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0


# --------------------------------------------------------------------------------------------------
# Row-wise fp8 quantisation into existing storage (Triton)
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _rowwise_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _rowwise_fp8_quant(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        xrow = x_ptr + row * stride_x
        qrow = q_ptr + row * stride_q
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(xrow + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, axis=0)
        # torchao: (bf16 amax) / 448 computed in bf16 (fp32 math, rounded to bf16), then .to(fp32)
        scale = tl.math.div_rn(m, 448.0).to(tl.bfloat16).to(tl.float32)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(xrow + offs, mask=offs < K, other=0.0).to(tl.float32)
            y = tl.math.div_rn(x, scale)
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            tl.store(qrow + offs, y.to(tl.float8e4nv), mask=offs < K)

    return _rowwise_fp8_quant


def rowwise_fp8_quant_into(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantise bf16 ``x [N, K]`` per row into ``qdata [N, K] float8_e4m3fn`` and ``scale [N, 1] fp32``.

    Needs CUDA + Triton. Bit-identical to torchao 0.18 ``Float8Tensor.from_hp(x, granularity=PerRow())``
    on its torch path (verified by ``benchmarks/bench_flux.py``; re-verify on a torchao upgrade).
    """
    assert x.dim() == 2 and x.is_cuda and x.dtype == torch.bfloat16
    assert qdata.shape == x.shape and qdata.dtype == torch.float8_e4m3fn and qdata.stride(1) == 1
    assert scale.numel() == x.shape[0] and scale.dtype == torch.float32 and scale.is_contiguous()
    n, k = x.shape
    _rowwise_kernel()[(n,)](x, qdata, scale, k, x.stride(0), qdata.stride(0), BLOCK=1024, num_warps=4)
