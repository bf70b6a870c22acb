"""Fp8 linears whose input is a tanh GELU's output, made in one kernel (decisions 44 and 48).

Why: a Flux single block ends with ``proj_out(cat([attention, gelu(mlp)]))``, a 15360-wide input, and
each double block's two feed-forwards end with ``net[2](gelu(net[0].proj(x)))``, a 12288-wide one. With
torchao's fp8 linears the compiled block quantises such an input in two inductor kernels (the row
maxima, then the scaled cast), each recomputing the GELU over the pre-activation: 8.8 of the ~93 ms of
kernel time in one forward on the H200 for the single blocks alone (benchmarks/NOTES.md, "Profile of
one fp8 forward"), about 232 us per block where one pass over the bytes takes ~55 us.

How: ``fastlora::gelu_cat_fp8`` (single blocks) and ``fastlora::gelu_fp8`` (feed-forwards), custom ops
opaque to ``torch.compile``, read the pre-activation (and the attention output) once per row, apply the
tanh GELU, and write the row's fp8 data and scale (:func:`.fp8_triton.gelu_cat_rowwise_fp8`, with no
attention part for the feed-forward); :func:`project` and :func:`project_gelu` then call
``torch._scaled_mm`` with the layer's own fp8 weight exactly as torchao does for a row-wise
``Float8Tensor`` (its ``torch`` kernel choice), so the fused LoRA strategy's in-place requantisation is
seen as before. The quantisation rule is torchao's (``amax / 448`` rounded to bf16, then
``clamp(x / scale)`` to e4m3) applied to the bf16-rounded GELU, i.e. what eager torchao computes;
:func:`reference` is that rule in torch, used on devices without Triton and by the tests.

Where: :func:`install` sets the ``out_projection`` slots of FastLoRA's own single blocks
(:attr:`~.runtime.flux.FluxSingleTransformerBlock.out_projection`, for ``proj_out``) and feed-forwards
(:attr:`~.runtime.flux.FeedForward.out_projection`, for ``net[2]``) when that layer holds a row-wise fp8
weight that torchao would run with its ``torch`` kernel (no MSLK), the activation is the tanh GELU and
the device is a CUDA GPU with Triton. A layer replaced later (the ``adapter`` strategy's LoRA layer)
falls back to the plain path at trace time. The function in a slot is part of each block's saved-graph
key (:mod:`.precompile` digests its file).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .custom_ops import register_once
from .kernels import FP8_MAX
from .runtime.flux import GELU as FeedForwardGELU

logger = logging.getLogger(__name__)


def reference(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat([attn, gelu_tanh(mlp)], -1)`` (``gelu_tanh(mlp)`` where ``attn`` is None) quantised per row as
    torchao does: the fp8 data ``[..., Ka + Km]`` and the float32 scales ``[rows, 1]`` (rows = every
    dimension but the last, flattened)."""
    h = F.gelu(mlp, approximate="tanh")
    if attn is not None:
        h = torch.cat([attn, h], dim=-1)
    scale = (h.abs().amax(dim=-1, keepdim=True) / FP8_MAX).to(torch.float32)
    q = (h.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(-1, 1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


#: The kernel's launch: elements per loop step and warps per row (``benchmarks/bench_projection.py``
#: sweeps both; RESULTS.md has the numbers behind this choice).
LAUNCH = {"BLOCK": 1024, "num_warps": 8}


def _run(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ka, km = (0 if attn is None else attn.shape[-1]), mlp.shape[-1]
    if mlp.device.type != "cuda" or mlp.dtype != torch.bfloat16 or (attn is not None and attn.dtype != torch.bfloat16):
        return reference(attn, mlp)
    from . import fp8_triton

    m = _rows(mlp)
    a = m if attn is None else _rows(attn)  # with no attention part the kernel never reads ``a``
    q = torch.empty((*mlp.shape[:-1], ka + km), dtype=torch.float8_e4m3fn, device=mlp.device)
    scale = torch.empty((m.shape[0], 1), dtype=torch.float32, device=mlp.device)
    if m.shape[0]:
        with torch.cuda.device(mlp.device):
            fp8_triton.gelu_cat_rowwise_fp8[(m.shape[0],)](a, m, q, scale, ka, km, a.stride(0), m.stride(0),
                                                           ka + km, **LAUNCH)
    return q, scale


def _fake(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = attn.numel() // attn.shape[-1]
    return (attn.new_empty((*attn.shape[:-1], attn.shape[-1] + mlp.shape[-1]), dtype=torch.float8_e4m3fn),
            attn.new_empty((rows, 1), dtype=torch.float32))


def _run_gelu(mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(None, mlp)


def _fake_gelu(mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = mlp.numel() // mlp.shape[-1]
    return mlp.new_empty(mlp.shape, dtype=torch.float8_e4m3fn), mlp.new_empty((rows, 1), dtype=torch.float32)


gelu_cat_fp8 = register_once("gelu_cat_fp8", _run, _fake)
gelu_fp8 = register_once("gelu_fp8", _run_gelu, _fake_gelu)


def _scaled_linear(linear: torch.nn.Linear, q: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The GEMM torchao runs for a row-wise fp8 ``linear`` on an input already quantised to ``q`` / ``scale``;
    the output has ``like``'s leading dimensions and dtype."""
    weight: Any = linear.weight  # a torchao Float8Tensor: qdata [out, in], scale [out, 1], mm_config
    out = torch._scaled_mm(q.reshape(-1, q.shape[-1]), weight.qdata.t(), scale_a=scale,
                           scale_b=weight.scale.t(), bias=linear.bias, out_dtype=like.dtype,
                           use_fast_accum=weight.mm_config.use_fast_accum)
    return out.reshape(*like.shape[:-1], out.shape[-1])


def project(linear: torch.nn.Linear, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """``linear(cat([attn, gelu_tanh(mlp)], -1))`` for a row-wise fp8 ``linear`` (:func:`why_not`),
    its input quantised by :data:`gelu_cat_fp8`; the GEMM is the one torchao runs for that weight."""
    q, scale = gelu_cat_fp8(attn, mlp)
    return _scaled_linear(linear, q, scale, attn)


def project_gelu(linear: torch.nn.Linear, mlp: torch.Tensor) -> torch.Tensor:
    """``linear(gelu_tanh(mlp))`` for a row-wise fp8 ``linear`` (:func:`why_not`), its input quantised by
    :data:`gelu_fp8`; the GEMM is the one torchao runs for that weight."""
    q, scale = gelu_fp8(mlp)
    return _scaled_linear(linear, q, scale, mlp)


def why_not(linear: torch.nn.Module, activation: torch.nn.Module) -> str | None:
    """Why :func:`project` / :func:`project_gelu` cannot stand in for ``linear`` applied to
    ``activation``'s output (``torch.nn.GELU`` or the feed-forward's own GELU with its projection), or None."""
    try:
        from torchao.quantization import Float8Tensor, PerRow
        from torchao.quantization.quantize_.common import KernelPreference
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import _is_mslk_available
    except ImportError:  # another torchao layout: its fp8 linears are not the ones this replicates
        return "torchao's Float8Tensor API not found"
    if type(linear) is not torch.nn.Linear:
        return f"the layer is a {type(linear).__name__}"
    if not (isinstance(activation, (torch.nn.GELU, FeedForwardGELU)) and activation.approximate == "tanh"):
        return "the MLP activation is not the tanh GELU"
    w = linear.weight
    if not isinstance(w, Float8Tensor):
        return "the layer's weight is not a torchao Float8Tensor"
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
        try:
            g = torch.Generator(device=device).manual_seed(0)
            attn = (torch.randn(9, 1104, device=device, generator=g) * 3).bfloat16()
            mlp = (torch.randn(9, 2064, device=device, generator=g) * 2).bfloat16()
            attn[2, 5], mlp[4, 100] = 300.0, 250.0
            ok = True
            for part in (attn, None):  # the single blocks' form, then the feed-forwards'
                q, scale = _run(part, mlp)
                ref_q, ref_scale = reference(part, mlp)
                ok = ok and torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
            if not ok:
                logger.warning("the fused fp8 projection kernel differs from torchao's rule on %s; the GELU-fed "
                               "fp8 layers stay torchao's", device)
        except Exception as exc:  # a Triton that cannot build the kernel here
            logger.warning("the fused fp8 projection kernel failed on %s (%s: %s); the GELU-fed fp8 layers "
                           "stay torchao's", device, type(exc).__name__, exc)
            ok = False
        _kernel_ok[device] = ok
    return _kernel_ok[device]


def _install(slots: list[tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]], form: Any, what: str) -> int:
    """Set ``form`` in the ``out_projection`` slot of each ``(holder, linear, activation)`` whose layer
    :func:`why_not` accepts; none at all when the first is refused, so one block class never mixes forms
    (each form is a graph of its own). Returns how many were set."""
    done = 0
    for holder, linear, activation in slots:
        why = why_not(linear, activation)
        if why is None:
            holder.out_projection = form
            done += 1
        elif not done:
            logger.info("%s left to torchao: %s", what, why)
            return 0
    if done:
        logger.info("%s: fp8 input in one kernel (%d layers)", what, done)
    return done


def install(transformer: torch.nn.Module, device: torch.device) -> int:
    """Set the ``out_projection`` slots of FastLoRA's own transformer on a CUDA ``device`` with Triton
    whose kernel passes :func:`kernel_ok`: every eligible single block's (:func:`project`) and every
    eligible double block's two feed-forwards' (:func:`project_gelu`). Returns how many layers got it
    (0 elsewhere, logged why)."""
    singles = [(b, b.proj_out, b.act_mlp) for b in getattr(transformer, "single_transformer_blocks", ())
               if hasattr(b, "out_projection")]
    feedforwards = [(ff, ff.net[2], ff.net[0]) for b in getattr(transformer, "transformer_blocks", ())
                    for ff in (getattr(b, "ff", None), getattr(b, "ff_context", None))
                    if ff is not None and hasattr(ff, "out_projection")]
    if not (singles or feedforwards) or device.type != "cuda":
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.info("GELU-fed fp8 layers left to torchao: no Triton")
        return 0
    if not kernel_ok(device):
        return 0
    return (_install(singles, project, "single blocks' output projection")
            + _install(feedforwards, project_gelu, "double blocks' feed-forward output"))
