"""FP8 attention through cuDNN's fused kernel (``EngineOptions.attention = "cudnn_fp8"``, opt-in).

Why: attention is ~28 of the ~93 ms of kernel time in one fp8 Flux forward on the H200 (1024x1024),
and cuDNN's fused FP8 attention runs Flux's shape in 282 us against 412 us for its bf16 kernel:
the 28-step loop went 2.86 -> 2.65 s, an image through the engine 2.95 -> 2.76 s with the own modules
(benchmarks/RESULTS.md, NOTES attempt 42).

How: q, k and v are scaled per tensor to e4m3 (plain torch, so inductor fuses the scaling into the
RoPE / RMSNorm kernel that produces them) and handed to the custom op ``fastlora::cudnn_fp8_sdpa``,
which ``torch.compile(fullgraph=True)`` keeps as one opaque call. On Hopper cuDNN writes an e4m3
output only (a bf16 output is Blackwell-only): it is scaled by ``1 / descale_v``, which keeps every
element in range (attention output is a convex combination of V's rows, so it cannot exceed V's
absolute maximum), and multiplied back here.

Where: diffusers' Flux attention processors call ``transformer_flux.dispatch_attention_fn`` with
``backend=processor._attention_backend``. :func:`install` marks the processors of one transformer
with :data:`BACKEND` and puts a router in front of that function: calls marked so, without a mask,
dropout, causal masking, custom scale or GQA, take the FP8 kernel; every other call goes to
diffusers' function unchanged, so other Flux models in the process are not affected. FastLoRA's own
Flux modules (``runtime.flux``, decision 39) make only plain calls and have a kernel slot per
attention layer: :func:`install` sets it to :func:`fp8_sdpa` there.

Precision: softmax probabilities and the output are e4m3 too. On a random-weight full-size Flux the
forward's error against bf16 stayed 5.57 % (5.56 % with fp8 linears alone), but on a peaky synthetic
attention (q, k x3) the kernel's own error is 13.9 % against 0.2 % for bf16: that is why it is not
the default, and why a user should look at their own LoRA's images before relying on it.

Needs ``nvidia-cudnn-frontend`` (the ``cudnn`` Python package) and an SM90+ GPU; :func:`check`
(before anything is read) and :func:`install` say so in an ``OptionsError`` otherwise.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import torch

from .custom_ops import register_once
from .errors import OptionsError
from .kernels import FP8_MAX

logger = logging.getLogger(__name__)

#: The marker put into a processor's ``_attention_backend`` (diffusers' own names are enum values).
BACKEND = "fastlora_cudnn_fp8"

#: The graph's tensors by uid: q, k, v, their descales, softmax descale and scale, output scale, output, amax.
UIDS = (0, 1, 2, 5, 6, 7, 8, 9, 10, 3, 12)

# Built graphs by shape and device, with their few small tensors, and one cuDNN handle per device: kept
# for the process, as cuDNN's own caches are.
_graphs: dict[tuple[Any, ...], tuple[Any, dict[str, torch.Tensor]]] = {}
_handles: dict[int, Any] = {}
_lock = threading.Lock()


def _cudnn_graph(b: int, h: int, s: int, d: int, attn_scale: float, device: torch.device):
    """A built cuDNN FP8 attention graph for ``[B, S, H, D]`` e4m3 inputs and output (cached)."""
    import cudnn

    key = (b, h, s, d, attn_scale, device.index)
    with _lock:
        cached = _graphs.get(key)
        if cached is not None:
            return cached
        handle = _handles.get(device.index)
        if handle is None:
            with torch.cuda.device(device):
                handle = _handles[device.index] = cudnn.create_handle()
        f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        stride = (s * h * d, d, h * d, 1)  # [B, S, H, D] memory seen as cuDNN's [B, H, S, D]
        q, k, v = (graph.tensor(uid=uid, dim=(b, h, s, d), stride=stride, data_type=f8) for uid in (0, 1, 2))

        def scalar(uid: int):
            return graph.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)

        o, _stats, _amax_s, amax_o = graph.sdpa_fp8(
            q=q, k=k, v=v, descale_q=scalar(5), descale_k=scalar(6), descale_v=scalar(7), descale_s=scalar(8),
            scale_s=scalar(9), scale_o=scalar(10), generate_stats=False, attn_scale=attn_scale,
            use_causal_mask=False)
        o.set_uid(3).set_output(True).set_dim((b, h, s, d)).set_stride(stride).set_data_type(f8)
        amax_o.set_uid(12).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        consts = {  # softmax probabilities (0..1) scaled to e4m3's range and back
            "s_scale": torch.full((1, 1, 1, 1), FP8_MAX, dtype=torch.float32, device=device),
            "s_descale": torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, dtype=torch.float32, device=device),
            "amax_o": torch.empty((1, 1, 1, 1), dtype=torch.float32, device=device),
            "workspace": torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device),
        }
        _graphs[key] = (graph, consts)
        return graph, consts


def _run(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
         descale_v: torch.Tensor, scale_o: torch.Tensor, attn_scale: float) -> torch.Tensor:
    """e4m3 ``[B, S, H, D]`` q/k/v and their ``[1, 1, 1, 1]`` float32 descales -> the e4m3 attention
    output multiplied by ``scale_o``."""
    import cudnn

    b, s, h, d = q8.shape
    graph, c = _cudnn_graph(b, h, s, d, attn_scale, q8.device)
    out = torch.empty(q8.shape, dtype=torch.float8_e4m3fn, device=q8.device)
    handle = _handles[q8.device.index]
    cudnn.set_stream(handle, torch.cuda.current_stream(q8.device).cuda_stream)
    # The ordered form (buffers in UIDS' order) skips the frontend's per-call dict handling: less host
    # time per call, which matters at 57 calls per step.
    graph.execute((q8.contiguous(), k8.contiguous(), v8.contiguous(), descale_q, descale_k, descale_v,
                   c["s_descale"], c["s_scale"], scale_o, out, c["amax_o"]), c["workspace"], handle=handle,
                  tensor_uids=UIDS)
    return out


def _fake(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale):
    return torch.empty(q8.shape, dtype=torch.float8_e4m3fn, device=q8.device)


cudnn_fp8_sdpa = register_once("cudnn_fp8_sdpa", _run, _fake)


def to_fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` scaled by one factor to e4m3, and the ``[1, 1, 1, 1]`` float32 factor that undoes it."""
    amax = x.abs().amax().float().clamp(min=1e-6)
    scale = FP8_MAX / amax
    x8 = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, (1.0 / scale).reshape(1, 1, 1, 1)


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` q/k/v (diffusers' dispatch layout) -> attention in q's dtype, computed in e4m3."""
    q8, descale_q = to_fp8_per_tensor(q)
    k8, descale_k = to_fp8_per_tensor(k)
    v8, descale_v = to_fp8_per_tensor(v)
    out = cudnn_fp8_sdpa(q8, k8, v8, descale_q, descale_k, descale_v, 1.0 / descale_v, 1.0 / math.sqrt(q.shape[-1]))
    return (out.float() * descale_v).to(q.dtype)


ADVICE = "Use attention=auto (PyTorch SDPA), which needs nothing extra."


def check(device: torch.device) -> None:
    """Raise ``OptionsError`` unless ``device`` and the installed packages can run cuDNN's FP8
    attention (cheap: no weight is read and no kernel is run; :func:`install` probes the kernel)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        raise OptionsError(f"attention=cudnn_fp8 needs an NVIDIA GPU of compute capability 9.0 (Hopper) or "
                           f"newer; this engine runs on {device}. {ADVICE}")
    try:
        import cudnn  # noqa: F401
    except ImportError as exc:
        raise OptionsError("attention=cudnn_fp8 needs the nvidia-cudnn-frontend package "
                           f"(pip install nvidia-cudnn-frontend). {ADVICE}") from exc


def probe(device: torch.device) -> None:
    """Run the kernel once on a small input; ``OptionsError`` when cuDNN refuses it on this GPU."""
    x = torch.randn(1, 128, 1, 128, device=device, dtype=torch.bfloat16)
    try:
        fp8_sdpa(x, x, x)
        torch.cuda.synchronize(device)
    except Exception as exc:  # the frontend raises its own types; all mean "not here"
        raise OptionsError(f"attention=cudnn_fp8: cuDNN refused its FP8 attention on this GPU ({exc}). "
                           f"{ADVICE}") from exc


def _router(original):
    """``dispatch_attention_fn`` with calls marked :data:`BACKEND` (and plain) sent to :func:`fp8_sdpa`."""

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, **kwargs):
        if backend == BACKEND:
            if attn_mask is None and not dropout_p and not is_causal and scale is None and not enable_gqa:
                return fp8_sdpa(query, key, value)
            backend = None  # what FP8 attention cannot do runs as the processor's default would
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                        backend=backend, **kwargs)

    dispatch_attention_fn.fastlora_original = original  # type: ignore[attr-defined]
    return dispatch_attention_fn


def install(transformer: torch.nn.Module, device: torch.device) -> int:
    """Route ``transformer``'s attention through FP8 attention on ``device`` (checked and probed
    first: ``OptionsError`` when it cannot run); returns how many processors were marked."""
    check(device)
    probe(device)
    set_fn = getattr(transformer, "set_attention_fn", None)
    if set_fn is not None:  # FastLoRA's own Flux modules (runtime.flux): one kernel slot per layer
        return int(set_fn(fp8_sdpa))
    import diffusers.models.transformers.transformer_flux as flux

    with _lock:
        if not hasattr(flux.dispatch_attention_fn, "fastlora_original"):
            flux.dispatch_attention_fn = _router(flux.dispatch_attention_fn)
    marked = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = BACKEND
            marked += 1
    return marked
