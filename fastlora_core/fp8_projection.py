"""The single-stream block's output projection with its fp8 input made in one kernel (decision 44).

Why: a Flux single block ends with ``proj_out(cat([attention, gelu(mlp)]))``, a 15360-wide input. With
torchao's fp8 linears the compiled block quantises that input in two inductor kernels (the row maxima,
then the scaled cast), each recomputing the GELU over the 4608 x 12288 MLP output: 8.8 of the ~93 ms
of kernel time in one forward on the H200 (benchmarks/NOTES.md, "Profile of one fp8 forward"), about
232 us per block where one pass over the bytes takes ~55 us.

How: ``fastlora::gelu_cat_fp8`` (a custom op, opaque to ``torch.compile``) reads the attention output and
the MLP's pre-activation once per row, applies the tanh GELU, and writes the row's fp8 data and scale
(:func:`.fp8_triton.gelu_cat_rowwise_fp8`); :func:`project` then calls ``torch._scaled_mm`` with the
layer's own fp8 weight exactly as torchao does for a row-wise ``Float8Tensor`` (its ``torch`` kernel
choice), so the fused LoRA strategy's in-place requantisation is seen as before. The quantisation rule
is torchao's (``amax / 448`` rounded to bf16, then ``clamp(x / scale)`` to e4m3) applied to the
bf16-rounded GELU, i.e. what eager torchao computes; :func:`reference` is that rule in torch, used on
devices without Triton and by the tests.

Where: :func:`install` sets the :attr:`~.runtime.flux.FluxSingleTransformerBlock.out_projection` slot of
FastLoRA's own single blocks when their ``proj_out`` holds a row-wise fp8 weight that torchao would
run with its ``torch`` kernel (no MSLK), the MLP's activation is the tanh GELU and the device is a CUDA
GPU with Triton. A block whose ``proj_out`` is replaced later (the ``adapter`` strategy's LoRA layer)
falls back to the plain path at trace time. The function in the slot is part of each block's
saved-graph key (:mod:`.precompile` digests its file).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from . import triton_key
from .custom_ops import register_once
from .kernels import FP8_MAX

logger = logging.getLogger(__name__)


def reference(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat([attn, gelu_tanh(mlp)], -1)`` quantised per row as torchao does: the fp8 data ``[..., Ka + Km]``
    and the float32 scales ``[rows, 1]`` (rows = every dimension but the last, flattened)."""
    h = torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1)
    scale = (h.abs().amax(dim=-1, keepdim=True) / FP8_MAX).to(torch.float32)
    q = (h.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(-1, 1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


#: The kernel's launch: elements per loop step and warps per row (``benchmarks/bench_projection.py``
#: sweeps both; RESULTS.md has the numbers behind this choice).
LAUNCH = {"BLOCK": 1024, "num_warps": 8}


def _run(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ka, km = attn.shape[-1], mlp.shape[-1]
    if attn.device.type != "cuda" or attn.dtype != torch.bfloat16 or mlp.dtype != torch.bfloat16:
        return reference(attn, mlp)
    from . import fp8_triton

    a, m = _rows(attn), _rows(mlp)
    q = torch.empty((*attn.shape[:-1], ka + km), dtype=torch.float8_e4m3fn, device=attn.device)
    scale = torch.empty((a.shape[0], 1), dtype=torch.float32, device=attn.device)
    if a.shape[0]:
        with torch.cuda.device(attn.device):
            fp8_triton.gelu_cat_rowwise_fp8[(a.shape[0],)](a, m, q, scale, ka, km, a.stride(0), m.stride(0),
                                                           ka + km, **LAUNCH)
    return q, scale


def _fake(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = attn.numel() // attn.shape[-1]
    return (attn.new_empty((*attn.shape[:-1], attn.shape[-1] + mlp.shape[-1]), dtype=torch.float8_e4m3fn),
            attn.new_empty((rows, 1), dtype=torch.float32))


gelu_cat_fp8 = register_once("gelu_cat_fp8", _run, _fake)


def project(linear: torch.nn.Linear, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """``linear(cat([attn, gelu_tanh(mlp)], -1))`` for a row-wise fp8 ``linear`` (:func:`why_not`),
    its input quantised by :data:`gelu_cat_fp8`; the GEMM is the one torchao runs for that weight."""
    weight: Any = linear.weight  # a torchao Float8Tensor: qdata [out, in], scale [out, 1], mm_config
    q, scale = gelu_cat_fp8(attn, mlp)
    out = torch._scaled_mm(q.reshape(-1, q.shape[-1]), weight.qdata.t(), scale_a=scale,
                           scale_b=weight.scale.t(), bias=linear.bias, out_dtype=attn.dtype,
                           use_fast_accum=weight.mm_config.use_fast_accum)
    return out.reshape(*attn.shape[:-1], out.shape[-1])


def why_not(linear: torch.nn.Module, activation: torch.nn.Module) -> str | None:
    """Why :func:`project` cannot stand in for ``linear(cat([attn, activation(mlp)]))``, or None."""
    try:
        from torchao.quantization import Float8Tensor, PerRow
        from torchao.quantization.quantize_.common import KernelPreference
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import _is_mslk_available
    except ImportError:  # another torchao layout: its fp8 linears are not the ones this replicates
        return "torchao's Float8Tensor API not found"
    if type(linear) is not torch.nn.Linear:
        return f"proj_out is a {type(linear).__name__}"
    if not (isinstance(activation, torch.nn.GELU) and activation.approximate == "tanh"):
        return "the MLP activation is not the tanh GELU"
    w = linear.weight
    if not isinstance(w, Float8Tensor):
        return "proj_out's weight is not a torchao Float8Tensor"
    kw = w.act_quant_kwargs
    if (w.qdata.dtype != torch.float8_e4m3fn or list(w.block_size) != [1, w.shape[1]] or w.mm_config is None
            or getattr(w.mm_config, "pad_inner_dim", False) or w.dtype != torch.bfloat16 or kw is None
            or kw.float8_dtype != torch.float8_e4m3fn or not isinstance(kw.granularity, PerRow)
            or kw.hp_value_lb is not None or kw.hp_value_ub is not None):
        return "proj_out is not row-wise e4m3 with dynamic row-wise e4m3 activations"
    if KernelPreference.MSLK in (w.kernel_preference, kw.kernel_preference) or (
            KernelPreference.AUTO in (w.kernel_preference, kw.kernel_preference) and _is_mslk_available()):
        return "torchao would run this layer with MSLK kernels"
    return None


_kernel_ok: dict[torch.device, bool] = {}


def kernel_ok(device: torch.device) -> bool:
    """Whether the Triton kernel gives :func:`reference`'s answer bit for bit on ``device`` (checked once
    per GPU and process on rows whose widths are not multiples of the kernel's block, one row's
    maximum in each part; the engine runs it while its loader waits for a read, decision 42). A kernel
    that does not (another Triton, another GPU's arithmetic) is left out, never trusted."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _kernel_ok:
        triton_key.wait()  # decision 52: the key being hashed beside the loader, not hashed twice
        try:
            g = torch.Generator(device=device).manual_seed(0)
            attn = (torch.randn(9, 1104, device=device, generator=g) * 3).bfloat16()
            mlp = (torch.randn(9, 2064, device=device, generator=g) * 2).bfloat16()
            attn[2, 5], mlp[4, 100] = 300.0, 250.0
            q, scale = _run(attn, mlp)
            ref_q, ref_scale = reference(attn, mlp)
            ok = torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
            if not ok:
                logger.warning("the fused fp8 projection kernel differs from torchao's rule on %s; the single "
                               "blocks' projection stays torchao's", device)
        except Exception as exc:  # a Triton that cannot build the kernel here
            logger.warning("the fused fp8 projection kernel failed on %s (%s: %s); the single blocks' "
                           "projection stays torchao's", device, type(exc).__name__, exc)
            ok = False
        _kernel_ok[device] = ok
    return _kernel_ok[device]


def install(transformer: torch.nn.Module, device: torch.device, check_kernel: bool = True) -> int:
    """Set the ``out_projection`` slot of every eligible single block of FastLoRA's own transformer on
    a CUDA ``device`` with Triton whose kernel passes :func:`kernel_ok`; returns how many blocks got it
    (0 elsewhere, logged why). ``check_kernel=False`` skips that check (it builds and runs the kernel):
    decision 47's specimen, which only has to fingerprint as the serving process's blocks will, takes
    the check's usual answer; where the serving process's check fails, its blocks fingerprint without
    the slot and the worker's graph is not the one they look for (cancelled, compiled there)."""
    blocks = [b for b in getattr(transformer, "single_transformer_blocks", ()) if hasattr(b, "out_projection")]
    if not blocks:
        return 0
    if device.type != "cuda":
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.info("single blocks' output projection left to torchao: no Triton")
        return 0
    if check_kernel and not kernel_ok(device):
        return 0
    done = 0
    for block in blocks:
        why = why_not(block.proj_out, block.act_mlp)
        if why is None:
            block.out_projection = project
            done += 1
        elif not done:
            logger.info("single blocks' output projection left to torchao: %s", why)
            return 0
    logger.info("single blocks' output projection: fp8 input in one kernel (%d blocks)", done)
    return done
