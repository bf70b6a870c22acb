"""Optimisations applied to a loaded FluxPipeline: device checks, attention backend, quantisation,
compilation and offload. Each function states what it needs from the device and fails with an
``OptionsError`` that says what to change when it is not available.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from . import cancel, deps, precompile
from .background_compile import BackgroundCompiler, Job
from .errors import OptionsError
from .precompile import PrecompiledBlocks
from .specs import EngineOptions

logger = logging.getLogger(__name__)

#: ``EngineOptions.dtype`` names -> torch dtypes (``specs.DTYPES`` lists the names).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

# Our attention names -> diffusers attention backends (diffusers.models.attention_dispatch).
_ATTENTION_BACKENDS: dict[str, str] = {
    "sdpa": "native",
    "sdpa_cudnn": "_native_cudnn",
    "sdpa_flash": "_native_flash",
    "sdpa_efficient": "_native_efficient",
    "sdpa_math": "_native_math",
    "flash_attn": "flash",
}


#: Free GPU memory above which the weights are read straight to the GPU and the fused strategy's
#: masters stay there (decision 29): a full bf16 master of Flux.1-dev is ~24 GB. Also the room above
#: which compile workers start by default (decision 45: one more process and CUDA context).
AMPLE_ROOM_BYTES = 64 * 2**30

#: The same rule for a transformer-only engine (ComfyUI's MODEL path) with one-byte weights
#: (decision 64): the bf16 masters (22.2 GiB) + the fp8 transformer (11.1 GiB) + sampling at
#: 1024x1024 and a swap's scratch. 40 GiB lets 48 GB cards (L40S, RTX 6000 Ada) keep their masters
#: on the GPU (swaps of ~45 ms instead of ~0.7 s from RAM); measured in ``benchmarks/RESULTS.md``.
TRANSFORMER_ONLY_ROOM_BYTES = 40 * 2**30


def room_for_masters(transformer_only: bool, quantization: str) -> int:
    """Free GPU bytes above which an engine reads its weights straight to the GPU and keeps the fused
    strategy's masters there (decision 29): the whole pipeline needs :data:`AMPLE_ROOM_BYTES`; the
    transformer alone, quantised to one byte per weight, :data:`TRANSFORMER_ONLY_ROOM_BYTES`. With
    unquantised weights the transformer alone holds two bf16 copies (44 GiB), so the larger rule."""
    if transformer_only and quantization in ("fp8", "fp8_weight_only", "int8_weight_only"):
        return TRANSFORMER_ONLY_ROOM_BYTES
    return AMPLE_ROOM_BYTES


def tensor_bytes(tensors: Iterable[torch.Tensor], device: torch.device | None = None) -> int:
    """Bytes of ``tensors`` (only those on ``device``, when given), a storage several of them share
    counted once. A tensor subclass (a quantised weight) has no storage of its own to share and is
    counted as it is."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if device is not None and tensor.device != device:
            continue
        if type(tensor) in (torch.Tensor, torch.nn.Parameter):
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def module_tensors(modules: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of ``modules``."""
    return [t for module in modules for t in (*module.parameters(), *module.buffers())]


def resident_bytes(modules: Sequence[torch.nn.Module], device: torch.device) -> int:
    """Bytes of these modules' parameters and buffers that sit on ``device`` (a tensor shared by
    several modules counted once): memory a pipeline handed to the engine already holds there."""
    return tensor_bytes(module_tensors(modules), device)


def usable_bytes(device: torch.device) -> int:
    """The most of a CUDA ``device``'s memory this process may use: its total, within what
    ``torch.cuda.set_per_process_memory_fraction`` allows."""
    total = torch.cuda.get_device_properties(device).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return int((get_fraction(device) if get_fraction else 1.0) * total)


def free_bytes(device: torch.device) -> int:
    """Free memory on a CUDA ``device`` for this process: the driver's free memory, within
    :func:`usable_bytes` (``mem_get_info`` ignores the per-process fraction)."""
    free, _total = torch.cuda.mem_get_info(device)
    return min(free, usable_bytes(device) - torch.cuda.memory_reserved(device))


def resolve_device(options: EngineOptions) -> torch.device:
    if options.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"device={options.device} but CUDA is not available here. Use device=auto or cpu.")
    if device.type == "cuda" and device.index is None:  # memory queries need an explicit index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionsError("device=mps but MPS is not available here. Use device=auto or cpu.")
    return device


AUTO_NF4_BELOW_GIB = 30


def _why_not_fp8(options: EngineOptions, device: torch.device) -> str:
    """Why ``quantization=auto`` cannot be fp8 here ("" when it can)."""
    if device.type != "cuda":
        return f"device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} < 8.9"
    if options.dtype != "bfloat16":
        return f"dtype={options.dtype}"
    if options.offload != "none":
        return f"offload={options.offload}"
    return deps.usable("torchao")


def _why_not_nf4(options: EngineOptions, device: torch.device) -> str:
    """Why ``t5_quantization=auto`` should not be nf4 here ("" when it should)."""
    if device.type != "cuda":
        return f"device is {device.type}"
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    if total_gib >= AUTO_NF4_BELOW_GIB:
        return f"{total_gib:.0f} GiB GPU holds the bf16 T5"
    if options.offload != "none":
        return f"offload={options.offload}"
    return deps.usable("bitsandbytes")


def why_not_compile(device: torch.device) -> str:
    """Why torch.compile (inductor) cannot work on ``device`` here ("" when it can): GPUs need a
    Triton that imports and matches torch (Windows ComfyUI portable usually has none); the CPU
    needs a C++ compiler."""
    if device.type in ("cuda", "xpu"):
        why = deps.usable("triton") or deps.triton_torch_mismatch()
        return f"torch.compile on {device.type} needs Triton: {why}" if why else ""
    if device.type == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++", "clang++", "c++", "cl") if c]
        if not any(shutil.which(c) for c in compilers):
            return "torch.compile on the CPU needs a C++ compiler (g++, clang++ or MSVC cl) on PATH"
    return ""


def resolve_options(options: EngineOptions, device: torch.device) -> EngineOptions:
    """The options an engine uses on ``device``: every ``auto`` choice resolved, the rest as given.
    ``quantization=auto`` -> ``fp8`` on CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell),
    bfloat16 weights, no offload and torchao installed; ``t5_quantization=auto`` -> ``nf4`` on a CUDA
    GPU with less than ``AUTO_NF4_BELOW_GIB`` GiB, no offload and bitsandbytes installed (a 24 GB
    card then holds the fp8 pipeline); ``none`` otherwise. ``compile`` falls back to ``off`` with a
    warning when inductor cannot work here (``why_not_compile``). Logs each choice; never raises."""
    changes: dict[str, str] = {}
    for name, why_not, chosen in (("quantization", _why_not_fp8, "fp8"), ("t5_quantization", _why_not_nf4, "nf4")):
        if getattr(options, name) != "auto":
            continue
        why = why_not(options, device)
        changes[name] = "none" if why else chosen
        logger.info("%s=auto -> %s (%s)", name, changes[name], why or f"on {device}")
    if options.compile != "off" and (why := why_not_compile(device)):
        changes["compile"] = "off"
        logger.warning("compile=%s -> off: %s. Images are the same, only slower; install it and "
                       "restart to compile.", options.compile, why)
    return dataclasses.replace(options, **changes)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What an engine runs with: the options with every ``auto`` choice resolved for ``device``, the
    device itself and the torch dtype. Made once by :func:`resolve` and passed down."""

    options: EngineOptions
    device: torch.device
    dtype: torch.dtype


def resolve(options: EngineOptions) -> Resolved:
    """The one place where options meet the device: the device is chosen, ``auto`` choices resolved
    (:func:`resolve_options`) and the device-dependent checks run (:func:`check_device_support`).
    Raises OptionsError saying what to change; reads no weight."""
    device = resolve_device(options)
    resolved = resolve_options(options, device)
    check_device_support(resolved, device)
    return Resolved(resolved, device, TORCH_DTYPES[resolved.dtype])


def why_not_own_modules(options: EngineOptions) -> str | None:
    """Why an engine with these (resolved) options loads diffusers' and transformers' classes instead
    of FastLoRA's own Flux modules (:mod:`fastlora_core.runtime`, decision 39), or None.

    The own modules cover the default path, every option that changes only the transformer's
    weights or kernels, and a bitsandbytes T5 (:func:`quantize_t5` swaps the layers of either T5,
    decision 60). Offload needs diffusers' pipeline hooks, and ``flash_attn`` is a diffusers
    attention backend."""
    if options.offload != "none":
        return f"offload={options.offload} uses diffusers' offload hooks"
    if options.attention == "flash_attn":
        return "attention=flash_attn is a diffusers attention backend"
    return None


def check_device_support(options: EngineOptions, device: torch.device) -> None:
    """Checks that need the device or an optional package. Raises OptionsError saying what to change."""
    for name, value, package in (("quantization", options.quantization, "torchao"),
                                 ("t5_quantization", options.t5_quantization, "bitsandbytes")):
        if value not in ("none", "auto") and (why := deps.usable(package)):
            raise OptionsError(f"{name}={value} needs {package}: {why}. Use {name}=auto or none.")
    if options.quantization == "fp8":
        if device.type != "cuda":
            raise OptionsError(
                "quantization=fp8 (torchao dynamic float8) needs an NVIDIA GPU with compute capability "
                f">= 8.9 (Ada, Hopper or newer); this engine runs on {device.type}. Use "
                "quantization=fp8_weight_only or int8_weight_only, or none."
            )
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise OptionsError(
                f"quantization=fp8 needs compute capability >= 8.9; this GPU is {major}.{minor}. "
                "Use quantization=int8_weight_only (or fp8_weight_only) instead."
            )
    if options.attention == "cudnn_fp8":
        from . import fp8_attention

        fp8_attention.check(device)
    if options.offload != "none" and device.type != "cuda":
        raise OptionsError(
            f"offload={options.offload} moves weights between CPU and GPU; this engine runs on "
            f"{device.type}. Use offload=none."
        )
    if options.dtype == "float16" and device.type == "cpu":
        raise OptionsError("dtype=float16 is very slow and inexact on CPU; use bfloat16 or float32.")


def compile_cache_dir(options: EngineOptions) -> Path:
    """The persistent inductor cache: the option, else $FASTLORA_CACHE_DIR/inductor, else
    ``~/.cache/fastlora/inductor``."""
    if options.compile_cache_dir:
        return Path(options.compile_cache_dir).expanduser()
    return deps.cache_home() / "inductor"


_OURS = "_FASTLORA_SET_INDUCTOR_CACHE_DIR"  # the TORCHINDUCTOR_CACHE_DIR value FastLoRA wrote, not the user


def user_inductor_cache_dir() -> str | None:
    """``TORCHINDUCTOR_CACHE_DIR`` when the *user* chose it, else None.

    The first time inductor needs its cache folder (importing torchao or diffusers is enough) it
    writes its own default, a per-user temporary folder, into that variable. That value is torch's,
    not the user's, and must not switch off the persistent cache. Before inductor is imported in
    this process, nothing in it can have written the variable: it is the user's (checked without
    importing inductor, whose import brings in Dynamo: decision 43).

    Nor is a folder FastLoRA itself wrote there (:func:`configure_compile_cache` records it in
    ``_FASTLORA_SET_INDUCTOR_CACHE_DIR``): a process started by one that built an engine inherits both
    variables, and its own ``FASTLORA_CACHE_DIR`` or ``compile_cache_dir`` must still count. Compile
    workers do not ask; they keep the inherited folder on purpose (:func:`configure_worker_compile`)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value or value == os.environ.get(_OURS):
        return None
    if "torch._inductor" not in sys.modules:
        return value
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: trust the variable
        return value
    same = os.path.normcase(os.path.abspath(value)) == os.path.normcase(os.path.abspath(default_cache_dir()))
    return None if same else value


def configure_compile_cache(options: EngineOptions) -> Path:
    """Point inductor's on-disk caches (FX graph + autotune + Triton) at a persistent folder so a
    restarted process does not pay the full compile again. A folder the user already set through
    TORCHINDUCTOR_CACHE_DIR wins (torch's own temporary default does not, see
    :func:`user_inductor_cache_dir`)."""
    user = user_inductor_cache_dir()
    if user and not options.compile_cache_dir:
        return Path(user)
    path = compile_cache_dir(options)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ[_OURS] = str(path)
    return path  # inductor's cache switches are set with the compile settings (_compile_settings)


def _compile_settings() -> None:
    """Process-wide settings FastLoRA's compiles need (the serving process's and a compile worker's),
    applied before the first compile rather than with the cache folder: importing inductor's config
    imports Dynamo, which would stand before the weights' reads (decision 43)."""
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # the folder configure_compile_cache chose
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    if hasattr(inductor_config, "dynamic_scale_rblock"):
        # Decision 57: a reduction kernel compiled with one config gets a second, half as wide, at its
        # first call in every process when its registers limit occupancy, and the two are benchmarked
        # there; the choice is never saved (a kernel with one config has no autotune cache entry). Four
        # of the fp8 blocks' kernels did, 0.13-0.52 s of every warm first image on the H100 (2026-12-06).
        inductor_config.dynamic_scale_rblock = False
    if getattr(inductor_config, "freezing", False):
        logger.warning("inductor freezing is on; turning it off (in-place LoRA swaps need live weights)")
        inductor_config.freezing = False
    # Regional compilation shares one graph per block class; blocks that differ in structure (an
    # adapter slot covering some blocks only, several resolutions) each add an entry. Past dynamo's
    # default limit of 8 it would silently run those blocks eagerly, so allow more.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < 64:
            setattr(dynamo_config, name, 64)


def import_compiler() -> None:
    """Import what compiling, or loading a saved block (:mod:`.precompile`), needs first: inductor's
    compile entry point and the precompile API. The first call would import them anyway (about 0.8 s
    of a 2-core CPU's first image; hundreds of modules); the loader does it while it waits for a
    read (``loading.direct.while_waiting``, decision 42)."""
    import torch._dynamo.aot_compile  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401


def warm_compile_pool() -> None:
    """Start inductor's pool of compile processes now (a compile worker does as it starts, decision 46).
    Inductor starts it at a process's first compile and, until the pool answers, compiles each Triton
    kernel in the process itself, one after another."""
    from torch._inductor.async_compile import maybe_warm_pool

    maybe_warm_pool()


def configure_worker_compile() -> None:
    """A background compile worker's settings: the serving process's (its cache folder comes with
    the inherited ``TORCHINDUCTOR_CACHE_DIR``)."""
    _compile_settings()


def _sdpa_backend_available(name: str, device: torch.device) -> bool:
    if device.type != "cuda":
        return name in ("sdpa", "sdpa_math")
    if name == "sdpa_cudnn":
        return bool(torch.backends.cudnn.is_available())
    return True


def set_attention(transformer: torch.nn.Module, choice: str, device: torch.device) -> str:
    """Select the attention kernel; returns the name actually used (logged).

    ``auto``: PyTorch's SDPA, which on Hopper already dispatches to its fastest fused kernel
    (cuDNN / flash); measured in benchmarks/RESULTS.md. Explicit choices that the device cannot
    run raise OptionsError instead of silently falling back.
    """
    if choice == "auto":
        logger.info("attention: auto -> PyTorch SDPA (native dispatch) on %s", device)
        return "sdpa"
    if choice == "cudnn_fp8":
        from . import fp8_attention

        marked = fp8_attention.install(transformer, device)
        logger.info("attention: cuDNN FP8 attention in %d attention layers", marked)
        return choice
    if choice == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise OptionsError(
                "attention=flash_attn needs the flash-attn package (pip install flash-attn) and an "
                "NVIDIA GPU. Use attention=auto."
            ) from exc
        if device.type != "cuda":
            raise OptionsError("attention=flash_attn needs an NVIDIA GPU. Use attention=auto.")
    elif not _sdpa_backend_available(choice, device):
        raise OptionsError(
            f"attention={choice} is not available on {device.type}. Use attention=auto or sdpa."
        )
    backend = _ATTENTION_BACKENDS[choice]
    if backend != "native":
        transformer.set_attention_backend(backend)  # type: ignore[operator]
    logger.info("attention: %s (diffusers backend %s)", choice, backend)
    return choice


def finish_transformer(transformer: torch.nn.Module, options: EngineOptions, device: torch.device,
                       holder: cancel.CheckHolder, check_kernels: bool = True) -> tuple[str, int]:
    """The engine's steps on a quantised transformer before it is compiled: the attention kernel, the
    single blocks' fp8 output projection (decision 44; not under offload hooks, which move a layer's
    weights only when its own forward runs) and the cancel checks between blocks (``holder``, a
    :class:`.cancel.CheckHolder`; not under a full-graph compile, which cannot call back into Python).
    One place for them, as a compile for the expected first request builds its specimen blocks with
    the same steps (decision 47; ``check_kernels=False`` there: :func:`.fp8_projection.install`). Returns the
    attention used and how many projections were installed."""
    from . import fp8_projection

    attention = set_attention(transformer, options.attention, device)
    projections = (fp8_projection.install(transformer, device, check_kernels)
                   if options.quantization == "fp8" and options.offload == "none" else 0)
    if options.compile != "full":
        cancel.install(transformer, holder)
    return attention, projections


def torchao_config(mode: str):
    """The torchao quantisation config for our ``quantization`` option."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    # set_inductor_config=False: torchao would otherwise switch on inductor's coordinate-descent
    # tuning process-wide, which re-tunes in every new process even with a warm compile cache
    # (48 of 62 s of a warm-cache first image on the H200, benchmarks/RESULTS.md) and changes the
    # inductor settings of every other compiled model in a ComfyUI process.
    if mode == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False,
                                                         **torch_kernels())
    if mode == "fp8_weight_only":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    if mode == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    raise OptionsError(f"unknown quantization {mode!r}")


def torch_kernels() -> dict[str, object]:
    """``kernel_preference=KernelPreference.TORCH`` for torchao's per-row fp8, where this torchao has it.

    With its default (``AUTO``) torchao quantises and multiplies with MSLK's kernels wherever the ``mslk``
    package imports on an SM90+ GPU, and finds that out with ``importlib.util.find_spec("mslk")`` in every
    quantisation and in every fp8 linear call that runs uncompiled (a search of the import path each
    time: an eager fp8 linear call took 526-708 us against 350-424 us pinned, on a 2-core CPU). FastLoRA's
    swap kernels and fused projection reproduce torchao's torch path bit for bit and every benchmark ran
    on it, so the engine pins that path: the same numbers whatever else is installed, no search per call.
    Also what the kernels' self-checks compare against."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
        from torchao.quantization.quantize_.common import KernelPreference
    except ImportError:  # a torchao without the choice: its own default stands
        return {}
    if "kernel_preference" not in {f.name for f in dataclasses.fields(Float8DynamicActivationFloat8WeightConfig)}:
        return {}
    return {"kernel_preference": KernelPreference.TORCH}


def _is_quantizable_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and module.in_features >= 16 and module.out_features >= 16


def quantize_transformer(transformer: torch.nn.Module, mode: str, device: torch.device | None = None) -> None:
    """Quantise every linear layer of the transformer in place with torchao. With ``device``, each
    layer is moved there just before it is quantised (peak memory: the quantised model plus one
    high-precision layer), and the rest of the model follows."""
    if mode == "none":
        return
    deps.confirm("torchao")  # vouched for from a record at the checks: imported here at the latest
    from torchao.quantization import quantize_

    quantize_(transformer, torchao_config(mode), filter_fn=_is_quantizable_linear, device=device)
    logger.info("transformer quantised: %s", mode)


#: T5 layers that stay unquantised: the feed-forward output projections. transformers keeps them out
#: of its bitsandbytes conversion (``T5PreTrainedModel._keep_in_fp32_modules``), and T5's feed-forward
#: casts its input to ``wo.weight.dtype`` unless that is int8: an NF4 ``wo`` (uint8 storage) would get
#: its input cast to uint8, and the text embeddings would be noise (decision 60).
T5_KEEP_UNQUANTISED = ("wo",)

#: The int8 layers' outlier threshold: activation columns with a value above it run in 16-bit beside
#: the int8 product (LLM.int8()). 6.0 is transformers' ``BitsAndBytesConfig.llm_int8_threshold``, so
#: ``t5_quantization=int8`` computes what a T5 loaded with ``load_in_8bit=True`` computes; bitsandbytes'
#: own default, 0.0, quantises every activation column to int8, so one large column coarsens the
#: steps of all the others in its row (decision 61).
T5_INT8_THRESHOLD = 6.0


def quantize_t5(text_encoder: torch.nn.Module, mode: str, dtype: torch.dtype, device: torch.device) -> None:
    """Replace the T5 encoder's linear layers by bitsandbytes NF4 / int8 layers, in place, all but
    :data:`T5_KEEP_UNQUANTISED`, int8 with transformers' outlier threshold (:data:`T5_INT8_THRESHOLD`):
    what transformers' own bitsandbytes loading does. bitsandbytes
    quantises when the module is moved to its device."""
    if mode == "none":
        return
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise OptionsError(
            f"t5_quantization={mode} needs bitsandbytes (pip install bitsandbytes); or use none."
        ) from exc
    replaced = 0
    for parent in list(text_encoder.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name in T5_KEEP_UNQUANTISED:
                continue
            if mode == "nf4":
                if child.in_features % 64:
                    continue
                new: torch.nn.Module = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=dtype, quant_type="nf4",
                )
                new.weight = bnb.nn.Params4bit(child.weight.data.to(dtype), requires_grad=False, quant_type="nf4")
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=T5_INT8_THRESHOLD)
                new.weight = bnb.nn.Int8Params(child.weight.data.to(dtype), requires_grad=False,
                                               has_fp16_weights=False)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, child_name, new.to(device))
            replaced += 1
    logger.info("T5 quantised with bitsandbytes %s: %d linear layers", mode, replaced)


_CONTIGUOUS_CLASSES: dict[type, type] = {}


def hand_over_contiguous(transformer: torch.nn.Module) -> int:
    """Make every single-stream block return tensors with standard strides, so all 38 share one
    compiled graph.

    A diffusers single block returns its two streams as slices of one tensor (batch stride
    ``(text + image tokens) * dim``), while the first single block gets contiguous tensors from the
    last double block. Dynamo guards on strides, so regional compilation made a third graph for that
    first block: one more compile cold (and one more re-trace warm) for the same code. The copies run
    inside the compiled graph, and the next block concatenates its inputs anyway (ARCHITECTURE
    decision 31: +0.2 % per loop on the H200, one re-trace fewer per process start). The block keeps
    its class name (``compile_repeated_blocks`` matches on it), its state dict and its values;
    returns how many blocks were changed. FastLoRA's own single block has a switch for it
    (``contiguous_outputs``); diffusers' gets a subclass with the same name."""
    changed = 0
    for block in getattr(transformer, "single_transformer_blocks", ()):
        if hasattr(type(block), "contiguous_outputs"):
            if not block.contiguous_outputs:
                block.contiguous_outputs = True
                changed += 1
            continue
        base = type(block)
        if base in _CONTIGUOUS_CLASSES.values():
            continue
        if base not in _CONTIGUOUS_CLASSES:
            base_forward = base.forward

            def forward(self: torch.nn.Module, *args: object, _base=base_forward, **kwargs: object) -> tuple:
                # clone, not .contiguous(): with batch 1 a slice counts as contiguous but keeps the
                # parent's batch stride, which is what the guard compares
                return tuple(t.clone(memory_format=torch.contiguous_format) for t in _base(self, *args, **kwargs))

            _CONTIGUOUS_CLASSES[base] = type(base.__name__, (base,), {
                "forward": forward, "__module__": base.__module__,
                "__doc__": f"{base.__name__} returning contiguous tensors (fastlora_core.optimize.hand_over_contiguous)."})
        block.__class__ = _CONTIGUOUS_CLASSES[base]
        changed += 1
    return changed


def compile_transformer(transformer: torch.nn.Module, mode: str, dynamic: bool,
                        cache_dir: Path | None = None,
                        background: BackgroundCompiler | None = None, ahead: bool = False,
                        expected: Iterable[Job] = ()) -> PrecompiledBlocks | None:
    """``full``: the whole transformer as one graph; ``regional``: each repeated block (the 19 double
    and 38 single blocks share two graphs), compiling in a fraction of the time. Never uses inductor
    ``freezing``: frozen weights are constants and in-place LoRA updates would be ignored.

    With ``cache_dir`` (the compile cache), regional compilation of FastLoRA's own transformer saves
    each compiled block class there and later processes load it without re-tracing
    (:mod:`.precompile`, decision 40); returns that dispatcher, or None for plain ``torch.compile``.
    ``background``: the dispatcher hands block classes it has no file for to these workers and runs
    the blocks eagerly meanwhile (:mod:`.background_compile`, decision 41), or with ``ahead`` hands
    the other block classes over while compiling the first and waits for them (decision 45); closed
    when unused. ``expected``: its jobs compiling the expected first request's graphs (decision 47)."""
    if mode != "off" and next(transformer.parameters()).device.type == "cuda":
        deps.confirm("triton")  # vouched for from a record at the checks (why_not_compile)
    _compile_settings()
    kwargs: dict[str, object] = {"fullgraph": True, "dynamic": True if dynamic else None}
    if mode == "full":
        transformer.compile(**kwargs)
    elif mode == "regional":
        hand_over_contiguous(transformer)
        why = "no compile cache folder" if cache_dir is None else precompile.why_not(transformer, dynamic)
        if cache_dir is not None and not why:
            blocks = PrecompiledBlocks(precompile.folder_for(cache_dir), next(transformer.parameters()).device,
                                       background, ahead=ahead, expected=expected)
            n = blocks.install(precompile.repeated_blocks(transformer))
            logger.info("regional compile: %d blocks, compiled block classes saved to and loaded from %s", n,
                        blocks.folder)
            return blocks
        logger.info("regional compile with plain torch.compile (blocks re-traced in every process): %s", why)
        transformer.compile_repeated_blocks(**kwargs)  # type: ignore[operator]
    elif mode != "off":
        raise OptionsError(f"unknown compile mode {mode!r}")
    if background is not None:
        background.close()
    return None


def enable_deterministic() -> tuple[bool, bool]:
    """Switch PyTorch's deterministic algorithms on for the process (``EngineOptions.deterministic``)
    and return the previous ``(enabled, warn_only)`` so :func:`restore_deterministic` can undo it.

    ``torch.use_deterministic_algorithms`` is used rather than inductor's own ``deterministic``
    setting because dynamo restores that setting from the global flag after tracing each frame: with
    regional compilation only the first block class would compile deterministically. The global flag
    also makes inductor skip timing-based choices between kernel variants (which sum in another
    order), which is what made the first image of a process and other processes differ on the H200.
    ``CUBLAS_WORKSPACE_CONFIG`` is set when unset (it takes effect for cuBLAS handles made later).
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    logger.info("deterministic=True: PyTorch's deterministic algorithms are on for this process")
    return previous


def restore_deterministic(previous: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def apply_offload(pipe, mode: str, device: torch.device) -> None:
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)


def dynamo_compile_count() -> int:
    """Graphs dynamo has compiled in this process so far (recompiles included; a precompile trace
    that restarted counts once). Zero before dynamo's first import, which this does not cause: a
    process that never compiles (``compile=off``) need not pay its 1.4-1.8 s (decision 51)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]) - precompile.extra_graphs()
