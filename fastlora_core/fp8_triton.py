"""The Triton kernels behind :mod:`fastlora_core.kernels` (imported only on a GPU with Triton).

Both kernels quantise rows with one body, :func:`_quantise_row`, so the per-layer and the grouped
launch cannot drift apart: ``amax / 448`` rounded to bf16 then stored as fp32 (as torchao computes it
in the weight's dtype), and ``clamp(x / scale, -448, 448)`` rounded to nearest-even. The row is read
twice (the second pass hits L2) and written once.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _store_scaled(x, scale, ptr, mask):
    """``clamp(x / scale, -448, 448)`` rounded to e4m3, stored at ``ptr`` (every kernel here stores so)."""
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(ptr, y.to(tl.float8e4nv), mask=mask)


@triton.jit
def _row_scale(amax):
    """The row's fp32 scale from per-lane maxima: torchao's ``(bf16 amax) / 448`` computed in bf16 (fp32
    math, rounded to bf16), then ``.to(fp32)``."""
    return tl.math.div_rn(tl.max(amax, axis=0), 448.0).to(tl.bfloat16).to(tl.float32)


@triton.jit
def _quantise_row(xrow, qrow, K, BLOCK: tl.constexpr):
    """Quantise one row of ``K`` bf16 values at ``xrow`` into fp8 at ``qrow``; returns its fp32 scale."""
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(xrow + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = _row_scale(amax)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(xrow + offs, mask=offs < K, other=0.0).to(tl.float32)
        _store_scaled(x, scale, qrow + offs, offs < K)
    return scale


@triton.jit
def rowwise_fp8_quant(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    """One program per row of one matrix."""
    row = tl.program_id(0).to(tl.int64)
    scale = _quantise_row(x_ptr + row * stride_x, q_ptr + row * stride_q, K, BLOCK)
    tl.store(s_ptr + row, scale)


@triton.jit
def grouped_rowwise_fp8_quant(table_ptr, x_base, q_base, s_base, BLOCK: tl.constexpr):
    """One program per (row, matrix) of a group. Table row: offsets (in elements) of x, qdata and
    scale from the three base tensors, rows, columns. Offsets and columns are multiples of 16, so
    rows stay 16-byte aligned and the loads and stores are vectorised as in the per-layer kernel
    (whose pointers Triton checks)."""
    entry = table_ptr + tl.program_id(1) * 5
    row = tl.program_id(0).to(tl.int64)
    rows = tl.load(entry + 3)
    K = tl.multiple_of(tl.where(row < rows, tl.load(entry + 4), 0), 16)  # rows past the end: nothing
    row = tl.minimum(row, rows - 1)
    xrow = x_base + tl.multiple_of(tl.load(entry) + row * K, 16)
    qrow = q_base + tl.multiple_of(tl.load(entry + 1) + row * K, 16)
    scale = _quantise_row(xrow, qrow, K, BLOCK)
    tl.store(s_base + tl.load(entry + 2) + row, scale, mask=K > 0)


@triton.jit
def _gelu_tanh_bf16(x):
    """PyTorch's ``gelu(x, approximate="tanh")`` on a bf16 tensor: fp32 math, rounded to bf16."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return (0.5 * x * (1.0 + libdevice.tanh(inner))).to(tl.bfloat16).to(tl.float32)


@triton.jit
def gelu_cat_rowwise_fp8(a_ptr, m_ptr, q_ptr, s_ptr, KA, KM, stride_a, stride_m, stride_q,
                         BLOCK: tl.constexpr):
    """One program per row: ``cat([a, gelu_tanh(m)])`` quantised per row to fp8 with ``_quantise_row``'s
    rule, without the bf16 concatenation ever being written. Two passes over the row as in
    ``_quantise_row`` (the second from L2), the GELU computed in both: holding the whole 15360-wide
    row in registers instead was slower on an H100 (443 against 265 us, NOTES attempt 51)."""
    row = tl.program_id(0).to(tl.int64)
    arow, mrow, qrow = a_ptr + row * stride_a, m_ptr + row * stride_m, q_ptr + row * stride_q
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, KA, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(arow + offs, mask=offs < KA, other=0.0).to(tl.float32)))
    for k0 in range(0, KM, BLOCK):  # masked lanes hold gelu(0) = 0
        offs = k0 + tl.arange(0, BLOCK)
        g = _gelu_tanh_bf16(tl.load(mrow + offs, mask=offs < KM, other=0.0).to(tl.float32))
        amax = tl.maximum(amax, tl.abs(g))
    scale = _row_scale(amax)
    for k0 in range(0, KA, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        a = tl.load(arow + offs, mask=offs < KA, other=0.0).to(tl.float32)
        _store_scaled(a, scale, qrow + offs, offs < KA)
    for k0 in range(0, KM, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        g = _gelu_tanh_bf16(tl.load(mrow + offs, mask=offs < KM, other=0.0).to(tl.float32))
        _store_scaled(g, scale, qrow + KA + offs, offs < KM)
    tl.store(s_ptr + row, scale)
