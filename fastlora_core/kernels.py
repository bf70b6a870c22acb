"""Optional GPU kernels for the fused fp8 swap (measured in ``benchmarks/``).

``rowwise_fp8_quant_into(x, qdata, scale)`` - per-row float8 e4m3 quantisation of a bf16 matrix,
written *into existing* tensors (the inner tensors of a torchao ``Float8Tensor`` weight), bit-identical
to ``torchao`` 0.18's torch path (``_choose_scale_float8`` + ``_quantize_affine_float8``): the scale
is ``amax/448`` rounded to bf16 (torchao computes it in the weight's dtype) then stored as fp32, and
the data is ``clamp(x_fp32 / scale, -448, 448)`` rounded to nearest-even. One read of the row from
HBM (second pass hits L2) and one write. Used by the *fused* swap (``lora/fused.py``, after a one-time
bit-exact self-check, with torchao as the fallback): requantise only the touched layers, with no new
allocation, so compiled graphs see the new values. The kernels themselves are in :mod:`.fp8_triton`,
imported on first use.

``grouped_rowwise_fp8_quant(group)`` - the same quantisation for many matrices in one launch
(:class:`QuantGroup`). A swap of 418 layers launched from Python one kernel per layer; on a host
with a slow CPU that, not the GPU, set the swap's time (65.7 ms per layer against 36.5 ms grouped
on the H200 host of NOTES attempt 38; equal on a fast host, where the GPU's work sets it).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0


# --------------------------------------------------------------------------------------------------
# Row-wise fp8 quantisation into existing storage (Triton)
# --------------------------------------------------------------------------------------------------
def _kernels():
    """The Triton kernels (:mod:`.fp8_triton`), imported on first use: CPU-only installs have no Triton."""
    from . import fp8_triton

    return fp8_triton


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
    launch = _kernels().grouped_rowwise_fp8_quant[(group.max_rows, group.table.shape[0])]
    launch(group.table, x_base, group.q_base, group.s_base, BLOCK=1024, num_warps=4)


def rowwise_fp8_quant_into(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantise bf16 ``x [N, K]`` per row into ``qdata [N, K] float8_e4m3fn`` and ``scale [N, 1] fp32``.

    Needs CUDA + Triton. Bit-identical to torchao 0.18 ``Float8Tensor.from_hp(x, granularity=PerRow())``
    on its torch path (verified by ``benchmarks/bench_flux.py``; re-verify on a torchao upgrade).
    """
    assert x.dim() == 2 and x.is_cuda and x.dtype == torch.bfloat16
    assert qdata.shape == x.shape and qdata.dtype == torch.float8_e4m3fn and qdata.stride(1) == 1
    assert scale.numel() == x.shape[0] and scale.dtype == torch.float32 and scale.is_contiguous()
    n, k = x.shape
    _kernels().rowwise_fp8_quant[(n,)](x, qdata, scale, k, x.stride(0), qdata.stride(0), BLOCK=1024, num_warps=4)
