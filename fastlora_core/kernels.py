"""Optional GPU kernels for the fused fp8 swap (measured in ``benchmarks/``).

``rowwise_fp8_quant_into(x, qdata, scale)`` - per-row float8 e4m3 quantisation of a bf16 matrix,
written *into existing* tensors (the inner tensors of a torchao ``Float8Tensor`` weight), bit-identical
to ``torchao`` 0.18's torch path (``_choose_scale_float8`` + ``_quantize_affine_float8``): the scale
is ``amax/448`` rounded to bf16 (torchao computes it in the weight's dtype) then stored as fp32, and
the data is ``clamp(x_fp32 / scale, -448, 448)`` rounded to nearest-even. One read of the row from
HBM (second pass hits L2) and one write. Used by the *fused* swap (``lora/fused.py``, after a one-time
bit-exact self-check, with torchao as the fallback): requantise only the touched layers, with no new
allocation, so compiled graphs see the new values. Triton is imported lazily.

``grouped_rowwise_fp8_quant(group)`` - the same quantisation for many matrices in one launch
(:class:`QuantGroup`). A swap of 418 layers launched from Python one kernel per layer; on a host
with a slow CPU that, not the GPU, set the swap's time (65.7 ms per layer against 36.5 ms grouped
on the H200 host of NOTES attempt 38; equal on a fast host, where the GPU's work sets it).
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


@functools.lru_cache(maxsize=1)
def _grouped_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _grouped_rowwise_fp8_quant(table_ptr, x_base, q_base, s_base, BLOCK: tl.constexpr):
        # table row: offsets (in elements) of x, qdata and scale from the three base tensors, rows,
        # columns. Offsets and columns are multiples of 16, so rows stay 16-byte aligned and the
        # loads and stores are vectorised as in the per-layer kernel (whose pointers Triton checks).
        entry = table_ptr + tl.program_id(1) * 5
        row = tl.program_id(0).to(tl.int64)
        rows = tl.load(entry + 3)
        K = tl.multiple_of(tl.where(row < rows, tl.load(entry + 4), 0), 16)  # rows past the end: nothing
        row = tl.minimum(row, rows - 1)
        xrow = x_base + tl.multiple_of(tl.load(entry) + row * K, 16)
        qrow = q_base + tl.multiple_of(tl.load(entry + 1) + row * K, 16)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(xrow + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, axis=0)
        # the same arithmetic as _rowwise_fp8_quant (bit-identical to torchao)
        scale = tl.math.div_rn(m, 448.0).to(tl.bfloat16).to(tl.float32)
        tl.store(s_base + tl.load(entry + 2) + row, scale, mask=K > 0)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(xrow + offs, mask=offs < K, other=0.0).to(tl.float32)
            y = tl.math.div_rn(x, scale)
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            tl.store(qrow + offs, y.to(tl.float8e4nv), mask=offs < K)

    return _grouped_rowwise_fp8_quant


class QuantGroup:
    """Matrices that :func:`grouped_rowwise_fp8_quant` quantises in one launch: each a bf16 ``x [N, K]``
    and the ``qdata`` / flat ``scale`` to write (the arguments of :func:`rowwise_fp8_quant_into`),
    all contiguous on one CUDA device, every ``x`` inside one buffer ``x_base``. The table holds
    offsets: from ``x_base`` (passed again at each launch, so the group does not keep it alive) and
    from the first matrix's ``qdata`` / ``scale`` (which must stay alive and unmoved)."""

    def __init__(self, x_base: torch.Tensor, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.q_base, self.s_base = items[0][1], items[0][2]
        rows = []
        for x, qdata, scale in items:
            assert groupable(x, qdata, scale), "not a groupable matrix (see groupable)"
            rows.append((_offset(x, x_base), _offset(qdata, self.q_base), _offset(scale, self.s_base),
                         int(x.shape[0]), int(x.shape[1])))
        assert all(r[0] % 16 == 0 and r[1] % 16 == 0 for r in rows), "matrices not 16-element aligned"
        self.x_extent = max(r[0] + r[3] * r[4] for r in rows)  # elements of x_base it reads
        self.table = torch.tensor(rows, dtype=torch.int64).to(x_base.device)
        self.max_rows = max(r[3] for r in rows)


def groupable(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether a matrix can join a :class:`QuantGroup`: the per-layer kernel's types, contiguous,
    a width that is a multiple of 16 and its data 16-byte aligned (checked again per group)."""
    return (x.dim() == 2 and x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous()
            and qdata.shape == x.shape and qdata.dtype == torch.float8_e4m3fn and qdata.is_contiguous()
            and scale.numel() == x.shape[0] and scale.dtype == torch.float32 and scale.is_contiguous()
            and x.shape[1] % 16 == 0 and x.data_ptr() % 32 == 0 and qdata.data_ptr() % 16 == 0)


def _offset(t: torch.Tensor, base: torch.Tensor) -> int:
    """``t``'s distance from ``base`` in elements (same dtype; may be negative)."""
    delta = t.data_ptr() - base.data_ptr()
    assert delta % t.element_size() == 0
    return delta // t.element_size()


def grouped_rowwise_fp8_quant(group: QuantGroup, x_base: torch.Tensor) -> None:
    """Quantise every matrix of ``group`` in one launch, on the current stream (bit-identical to
    :func:`rowwise_fp8_quant_into` on each); ``x_base``: the buffer holding them, as when the group
    was made (the same layout, possibly a new allocation)."""
    assert x_base.dtype == torch.bfloat16 and x_base.is_contiguous() and x_base.data_ptr() % 32 == 0
    assert x_base.numel() >= group.x_extent
    _grouped_kernel()[(group.max_rows, group.table.shape[0])](group.table, x_base, group.q_base, group.s_base,
                                                               BLOCK=1024, num_warps=4)


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
