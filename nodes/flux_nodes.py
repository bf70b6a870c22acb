"""The four FastLoRA nodes: widgets -> core specs -> core call -> ComfyUI outputs.

``OptimizedFluxLoader`` builds (or reuses) the compiled engine and returns a handle;
``LoraHotswap`` and ``PadDummyLora`` return new handles that only *describe* the wanted LoRA stack
and adapter slot; ``Generate`` is the one place where a handle becomes engine state.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from . import comfy_bridge as bridge
from . import comfy_model, memory
from ._core import FluxEngine, errors, registry, specs
from .handle import EngineHandle, SlotSpec

logger = logging.getLogger(__name__)

CATEGORY = "FastLoRA/Flux"
ENGINE = "FASTLORA_ENGINE"
NONE = bridge.NONE
SOURCE_DIFFUSERS = "diffusers folder"
SOURCE_FILES = "single files"
COMPONENTS_ALL = "everything (Generate + MODEL)"
COMPONENTS_TRANSFORMER = "transformer only (MODEL)"
TARGET_LISTED = "listed LoRAs"
TARGET_ALL = "all Flux layers"
PAD_SLOTS = 4
# This copy's folder in custom_nodes (reported by /fastlora/stats: which copy runs when there are two).
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DEFAULTS = specs.EngineOptions()

# Counters shown by GET /fastlora/stats (and used by the real-ComfyUI tests).
STATS: dict[str, Any] = {"builds": 0, "generates": 0, "last": None}


def _engine_input() -> tuple[str, dict[str, str]]:
    return (ENGINE, {"tooltip": "FastLoRA engine handle from OptimizedFluxLoader, LoraHotswap or PadDummyLora."})


def _combo(values: tuple[str, ...], default: str, tooltip: str) -> tuple[list[str], dict[str, Any]]:
    return (list(values), {"default": default, "tooltip": tooltip})


def _with_none(values: list[str]) -> list[str]:
    return [NONE] + [v for v in values if v != NONE]


def _device_option() -> str:
    """ComfyUI's device (honours --cpu, --cuda-device) as an EngineOptions.device string."""
    device = bridge.torch_device()
    text = str(device)
    kind = getattr(device, "type", text.split(":")[0])
    return text if kind in ("cpu", "cuda", "mps") else "auto"


def _bytes_on_disk(source: specs.ModelSource) -> int:
    paths: list[str] = []
    if source.diffusers_dir:
        for root, _dirs, files in os.walk(source.diffusers_dir):
            paths += [os.path.join(root, f) for f in files if f.endswith((".safetensors", ".bin"))]
    else:
        paths = [p for p in (source.transformer, source.clip_l, source.t5xxl, source.vae) if p]
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def engine_for(key: specs.EngineKey) -> FluxEngine:
    """The registry's engine for ``key``; after an unload (or new options elsewhere) it is rebuilt,
    first asking ComfyUI to make room for it."""
    engine = registry.peek(key)
    if engine is None:
        memory.prune()
        device = bridge.torch_device()
        bridge.free_memory(_bytes_on_disk(key.source) * 1.2, device)
        logger.info("FastLoRA: building engine for %s", key.source.describe())
        # ComfyUI's text encoders may hold the room the engine's masters would use (decision 66)
        engine = registry.get_engine(key.source, key.options,
                                     make_room=lambda needed: bridge.free_memory(needed, device))
        STATS["builds"] += 1
        memory.prune()  # the registry released the previous engine, if any
    return engine


def stats() -> dict[str, Any]:
    """What GET /fastlora/stats returns: live engines, compile counters, ComfyUI registration."""
    engines = []
    for engine in registry.engines():
        engines.append({
            "source": engine.source.describe(),
            "options": {k: getattr(engine.options, k) for k in engine.options.__dataclass_fields__},
            "device": str(engine.device),
            "compiles": engine.compiles,
            "offloaded": engine.offloaded,
            "loaded_stack": engine.loaded_stack.describe(),
            # where the last LoRA change's time went: swap_ms = read_ms (files not in RAM) + stage_ms
            # (to the GPU) + the strategy's writes
            "last_swap": engine.last_swap.as_dict() if engine.last_swap is not None else None,
            "timings": engine.timings,
            # regional compile's saved blocks (decision 40): loaded or compiled, and background workers
            "saved_blocks": engine.precompiled.report() if engine.precompiled is not None else None,
        })
    return {
        **STATS,
        "pack": PACK_DIR,
        "engines": engines,
        "comfy_models": [repr(w) for w in memory.wrappers()],
        "unloads": memory.UNLOADS,
    }


# Which model inputs each ``source`` reads; the loader ignores the others, and so does validation.
SOURCE_INPUTS: dict[str, tuple[str, ...]] = {
    SOURCE_DIFFUSERS: ("diffusers_model",),
    SOURCE_FILES: ("transformer", "clip_l", "t5xxl", "vae"),
}
# The ComfyUI model folder each single-file input lists (folder_paths names; aliases such as unet/clip
# are folded in by ComfyUI itself).
FILE_FOLDERS: dict[str, str] = {
    "transformer": "diffusion_models", "clip_l": "text_encoders", "t5xxl": "text_encoders", "vae": "vae",
}
# Loader inputs, in the order ComfyUI shows them. UI-format workflows store widget values by position,
# so this order must never change (workflows saved by earlier versions keep loading); new inputs go at
# the end. The options after ``quantization`` are "advanced": front ends that support the flag fold
# them away, and an API graph may leave them out to get the defaults.
LOADER_INPUTS: tuple[str, ...] = (
    "source", "diffusers_model", "transformer", "clip_l", "t5xxl", "vae", "quantization",
    "t5_quantization", "attention", "compile", "offload", "dtype", "swap_strategy", "max_rank", "components",
    "deterministic",
)
# ``components`` is not advanced: whether the text encoders and VAE load is the first choice of a MODEL graph.
ADVANCED_INPUTS: tuple[str, ...] = tuple(
    name for name in LOADER_INPUTS[LOADER_INPUTS.index("quantization") + 1:] if name != "components")


def _model_choices(name: str) -> list[str]:
    """What the dropdown of model input ``name`` lists (``None`` first)."""
    if name == "diffusers_model":
        return _with_none(bridge.diffusers_folders())
    return _with_none(bridge.file_list(FILE_FOLDERS[name]))


def source_problem(source: str, models: dict[str, str | None], components: str = COMPONENTS_ALL) -> str | None:
    """Why ``source`` cannot be loaded with these model inputs, or None when it can.

    Only the inputs ``source`` reads are looked at (the others may name anything, e.g. files this
    machine does not have). A value of None is a link from another node, checked when the loader runs.
    The one place these rules live: ComfyUI's validation (``VALIDATE_INPUTS``) and the loader use it.
    """
    if source not in SOURCE_INPUTS:
        return f"source {source!r} is not one of {', '.join(SOURCE_INPUTS)}."
    if components not in (COMPONENTS_ALL, COMPONENTS_TRANSFORMER):
        return f"components {components!r} is not one of {COMPONENTS_ALL}, {COMPONENTS_TRANSFORMER}."
    used = SOURCE_INPUTS[source]
    if components == COMPONENTS_TRANSFORMER:  # the transformer alone: the diffusers folder, or its file
        used = used[:1]
    missing = [name for name in used if models.get(name, NONE) == NONE]
    if missing and source == SOURCE_DIFFUSERS:
        return ("source = diffusers folder but no diffusers_model is selected. Put a Flux diffusers folder "
                "in models/diffusers (press R to refresh) or switch source to single files.")
    if missing:
        return (f"source = single files needs {', '.join(missing)}: pick them in the loader (files in "
                "models/diffusion_models, models/text_encoders and models/vae), or switch source to "
                "diffusers folder.")
    for name in used:
        value = models.get(name)
        if value is not None and value not in _model_choices(name):
            where = "models/diffusers (a folder with model_index.json)" if name == "diffusers_model" \
                else f"models/{FILE_FOLDERS[name]}"
            return (f"{name} = {value!r} is not in {where}. Put it there and press R to refresh, pick "
                    f"another one, or switch source.")
    return None


class OptimizedFluxLoader:
    DESCRIPTION = (
        "Loads Flux.1 once, optimises it (quantisation, attention kernel, torch.compile) and returns a "
        "FastLoRA engine handle. Re-running with the same settings reuses the same compiled engine; "
        "changing a setting rebuilds it (the old one is freed first). Pick either a diffusers folder "
        "(models/diffusers) or single files (diffusion_models + text_encoders + vae); the inputs of the "
        "other kind are ignored. The options below quantization are advanced: the defaults suit most GPUs. "
        "The model output is the same compiled transformer as a standard MODEL for ComfyUI's own LoRA "
        "loaders and samplers; with components = transformer only, nothing else is loaded."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (ENGINE, "MODEL")
    RETURN_NAMES = ("engine", "model")
    OUTPUT_TOOLTIPS = ("Engine handle: connect LoraHotswap, PadDummyLora or Generate.",
                       "The same compiled Flux transformer as a standard MODEL: connect ComfyUI's LoRA loaders and "
                       "samplers (KSampler, SamplerCustomAdvanced ...), with your own CLIP and VAE nodes.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        o = _DEFAULTS
        specs_by_name: dict[str, Any] = {
            "source": ([SOURCE_DIFFUSERS, SOURCE_FILES], {
                "default": SOURCE_DIFFUSERS,
                "tooltip": "Where the Flux weights come from: a diffusers folder, or the four single files "
                           "below. The inputs of the other kind are ignored (they may name anything)."}),
            "diffusers_model": (_model_choices("diffusers_model"), {
                "default": NONE,
                "tooltip": "Flux diffusers folder (with model_index.json) under models/diffusers. "
                           "Used when source = diffusers folder."}),
            "transformer": (_model_choices("transformer"), {
                "default": NONE,
                "tooltip": "Flux transformer checkpoint from models/diffusion_models (or unet), e.g. "
                           "flux1-dev.safetensors. Used when source = single files."}),
            "clip_l": (_model_choices("clip_l"), {
                "default": NONE,
                "tooltip": "CLIP-L text encoder from models/text_encoders (or clip), e.g. clip_l.safetensors. "
                           "Used when source = single files."}),
            "t5xxl": (_model_choices("t5xxl"), {
                "default": NONE,
                "tooltip": "T5-XXL text encoder from models/text_encoders (or clip), e.g. "
                           "t5xxl_fp16.safetensors. Used when source = single files."}),
            "vae": (_model_choices("vae"), {
                "default": NONE,
                "tooltip": "Flux VAE from models/vae, e.g. ae.safetensors. Used when source = single files."}),
            "quantization": _combo(specs.QUANTIZATIONS, o.quantization,
                                   "Transformer weights. auto: fp8 on GPUs with compute capability >= 8.9 "
                                   "(RTX 40xx/50xx, L40, H100/H200; ~1.3x faster than bf16), none elsewhere. "
                                   "fp8 (dynamic, same GPUs), fp8/int8 weight-only (any device), none (bf16, "
                                   "closest to the original model)."),
            "t5_quantization": _combo(specs.T5_QUANTIZATIONS, o.t5_quantization,
                                      "T5 text encoder via bitsandbytes. auto: nf4 on GPUs under 30 GB (24 GB "
                                      "cards), none elsewhere. nf4 saves ~5.4 GB, int8 ~3.6 GB (T5's feed-forward outputs stay "
                                      "unquantised, as in transformers), none keeps full precision."),
            "attention": _combo(specs.ATTENTIONS, o.attention,
                                "Attention kernel. auto uses PyTorch SDPA's own kernel choice (nothing is probed); explicit "
                                "choices fail clearly when unavailable. cudnn_fp8: cuDNN's FP8 attention (Hopper or "
                                "newer, needs nvidia-cudnn-frontend): ~6 % faster per image on an H200, less exact; "
                                "check your images."),
            "compile": _combo(specs.COMPILE_MODES, o.compile,
                              "torch.compile: regional compiles each repeated block (fast to compile, "
                              "nearly full speed), full the whole transformer, off none. Compiled once; "
                              "LoRA swaps never recompile."),
            "offload": _combo(specs.OFFLOADS, o.offload,
                              "CPU offload for small GPUs: model moves whole components when used, "
                              "sequential streams layers (slow, no compile)."),
            "dtype": _combo(specs.DTYPES, o.dtype, "Compute dtype of the pipeline."),
            "swap_strategy": _combo(specs.SWAP_STRATEGIES, o.swap_strategy,
                                    "fused merges LoRA deltas into the weights (no per-step cost, any rank "
                                    "or target); adapter keeps LoRA layers padded to max_rank."),
            "max_rank": ("INT", {"default": o.max_rank, "min": 1, "max": 1024, "step": 1,
                                 "tooltip": "Adapter slot rank (adapter strategy only): LoRAs above it "
                                            "are refused."}),
            "deterministic": ("BOOLEAN", {
                "default": o.deterministic,
                "tooltip": "Same seed, same image in every process, bit for bit (PyTorch's deterministic "
                           "algorithms, switched on for the whole ComfyUI process while this engine lives). "
                           "Off: later images of a run repeat exactly, but the first image after a start may "
                           "differ slightly. Costs +57 to +75 % per image on an H200."}),
        }
        for name in ADVANCED_INPUTS:
            specs_by_name[name][1]["advanced"] = True
        specs_by_name["components"] = ([COMPONENTS_ALL, COMPONENTS_TRANSFORMER], {
            "default": COMPONENTS_ALL,
            "tooltip": "transformer only: load just the Flux transformer (diffusers_model, or the transformer "
                       "file) for the model output; your graph's CLIP and VAE nodes do the rest, no T5, CLIP or "
                       "VAE in memory, and Generate refuses. everything: also the text encoders and VAE, for "
                       "Generate."})
        # Only `source` is required: every other input has a default, so an API graph may leave out
        # the model inputs its source does not read and the advanced options it does not change.
        return {"required": {"source": specs_by_name["source"]},
                "optional": {name: specs_by_name[name] for name in LOADER_INPUTS[1:]}}

    @classmethod
    def VALIDATE_INPUTS(cls, source: str | None, diffusers_model: str | None = NONE,
                        transformer: str | None = NONE, clip_l: str | None = NONE, t5xxl: str | None = NONE,
                        vae: str | None = NONE, components: str | None = COMPONENTS_ALL) -> bool | str:
        """Replaces ComfyUI's per-input check of the inputs named here (``source``, the model inputs and
        ``components``): the inputs the chosen source does not read never block a run. The options keep
        ComfyUI's own checks. A linked input arrives as None and is checked when the loader runs."""
        if source is None:
            return True
        problem = source_problem(source, {"diffusers_model": diffusers_model, "transformer": transformer,
                                          "clip_l": clip_l, "t5xxl": t5xxl, "vae": vae},
                                 components or COMPONENTS_ALL)
        return True if problem is None else problem

    def load(self, source: str, diffusers_model: str = NONE, transformer: str = NONE, clip_l: str = NONE,
             t5xxl: str = NONE, vae: str = NONE, quantization: str = _DEFAULTS.quantization,
             t5_quantization: str = _DEFAULTS.t5_quantization, attention: str = _DEFAULTS.attention,
             compile: str = _DEFAULTS.compile, offload: str = _DEFAULTS.offload, dtype: str = _DEFAULTS.dtype,
             swap_strategy: str = _DEFAULTS.swap_strategy, max_rank: int = _DEFAULTS.max_rank,
             components: str = COMPONENTS_ALL, deterministic: bool = _DEFAULTS.deterministic,
             ) -> tuple[EngineHandle, Any]:
        model_source = _model_source(source, {"diffusers_model": diffusers_model, "transformer": transformer,
                                              "clip_l": clip_l, "t5xxl": t5xxl, "vae": vae}, components)
        options = specs.EngineOptions(
            quantization=quantization, t5_quantization=t5_quantization, attention=attention,
            compile=compile, offload=offload, dtype=dtype, swap_strategy=swap_strategy,
            max_rank=int(max_rank), device=_device_option(), deterministic=bool(deterministic),
        )
        key = specs.EngineKey(model_source, options)
        engine = engine_for(key)
        memory.ensure_loaded(engine)
        return (EngineHandle(key), comfy_model.model_patcher(key, engine) if bridge.has_model_patcher() else None)


def _model_source(source: str, models: dict[str, str], components: str = COMPONENTS_ALL) -> specs.ModelSource:
    problem = source_problem(source, dict(models), components)
    if problem is not None:
        raise errors.OptionsError(problem)
    if components == COMPONENTS_TRANSFORMER:
        if source == SOURCE_DIFFUSERS:
            return specs.ModelSource.transformer_alone(bridge.diffusers_path(models["diffusers_model"]))
        return specs.ModelSource.transformer_alone(bridge.full_path("diffusion_models", models["transformer"]))
    if source == SOURCE_DIFFUSERS:
        return specs.ModelSource.from_diffusers(bridge.diffusers_path(models["diffusers_model"]))
    path = {name: bridge.full_path(FILE_FOLDERS[name], models[name]) for name in SOURCE_INPUTS[SOURCE_FILES]}
    return specs.ModelSource.from_single_files(path["transformer"], path["clip_l"], path["t5xxl"], path["vae"])


def _lora_inputs() -> dict[str, Any]:
    """The LoRA file and strength widgets of both LoRA nodes."""
    return {
        "lora_name": (bridge.file_list("loras"), {"tooltip": "LoRA file from models/loras."}),
        "strength": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                               "tooltip": "LoRA strength; 0 disables it, negative inverts it."}),
    }


class LoraHotswap:
    DESCRIPTION = (
        "Adds a LoRA (with its strength) to the handle's wanted LoRA stack. Chain several to stack them; "
        "branch to compare. It never touches the engine: Generate swaps the weights in place right "
        "before sampling (milliseconds, no reload, no recompile)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (ENGINE,)
    RETURN_NAMES = ("engine",)
    OUTPUT_TOOLTIPS = ("Handle with this LoRA added to the stack.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "engine": _engine_input(),
            **_lora_inputs(),
        }}

    def apply(self, engine: EngineHandle, lora_name: str, strength: float) -> tuple[EngineHandle]:
        path = bridge.full_path("loras", lora_name)
        return (engine.with_lora(specs.LoraSpec.of(path, float(strength))),)


class LoraHotswapModel:
    DESCRIPTION = (
        "Adds a LoRA (with its strength) to the LoRA stack of Optimized Flux Loader's MODEL, like ComfyUI's "
        "LoraLoaderModelOnly, but read by FastLoRA itself: every file LoRA Hotswap takes, LyCORIS LoKr / LoHa, "
        "DoRA and .diff files included (fused strategy). Chain several, or mix with ComfyUI's LoRA loaders. The "
        "sampler swaps the weights in place right before sampling: no reload, no recompile."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same MODEL with this LoRA added to its stack.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model output of Optimized Flux Loader (FastLoRA), or of a LoRA "
                                           "loader after it."}),
            **_lora_inputs(),
        }}

    def apply(self, model: Any, lora_name: str, strength: float) -> tuple[Any]:
        path = bridge.full_path("loras", lora_name)
        return (comfy_model.with_lora_file(model, specs.LoraSpec.of(path, float(strength))),)


class PadDummyLora:
    DESCRIPTION = (
        "Adapter strategy only: prepares one adapter slot covering the layers (union of targets) and "
        "rank of every LoRA listed here, or of all Flux layers, so that swapping between them never "
        "recompiles. Put it right after the loader, before the LoraHotswap nodes. No effect with the "
        "fused strategy."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (ENGINE,)
    RETURN_NAMES = ("engine",)
    OUTPUT_TOOLTIPS = ("Handle whose adapter slot covers the listed LoRAs.",)
    FUNCTION = "pad"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        loras = _with_none(bridge.file_list("loras"))
        required: dict[str, Any] = {
            "engine": _engine_input(),
            "target": ([TARGET_LISTED, TARGET_ALL], {
                "default": TARGET_LISTED,
                "tooltip": "listed LoRAs: the union of the layers the LoRAs below touch; all Flux layers: "
                           "every layer a Flux LoRA can target (any LoRA fits, more per-step cost)."}),
        }
        for i in range(1, PAD_SLOTS + 1):
            required[f"lora_{i}"] = (loras, {"default": NONE,
                                             "tooltip": f"LoRA {i} you plan to swap in (None to skip)."})
        required["max_rank"] = ("INT", {"default": 0, "min": 0, "max": 1024, "step": 1,
                                        "tooltip": "Slot rank; 0 uses the loader's max_rank. Must be at "
                                                   "least the largest rank you will load."})
        return {"required": required}

    def pad(self, engine: EngineHandle, target: str, lora_1: str, lora_2: str, lora_3: str, lora_4: str,
            max_rank: int) -> tuple[EngineHandle]:
        names = [n for n in (lora_1, lora_2, lora_3, lora_4) if n != NONE]
        if target == TARGET_LISTED and not names:
            raise errors.OptionsError("PadDummyLora: list at least one LoRA, or set target to all Flux layers.")
        paths = tuple(bridge.full_path("loras", n) for n in names)
        slot = SlotSpec(paths, target == TARGET_ALL, int(max_rank) or None)
        return (engine.with_slot(slot),)


class Generate:
    DESCRIPTION = (
        "Makes the engine's weights match the handle's LoRA stack (in place, validated first, no "
        "recompile), then samples Flux. Shows a progress bar; Cancel stops it within one step."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Generated images (batch).",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        r = _DEFAULTS_REQUEST
        return {"required": {
            "engine": _engine_input(),
            "prompt": ("STRING", {"multiline": True, "default": r.prompt, "tooltip": "Text prompt."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Random seed: same seed, prompt and LoRA stack give the same image."}),
            "steps": ("INT", {"default": r.steps, "min": 1, "max": 200,
                              "tooltip": "Sampling steps (Flux.1-dev: 20-30)."}),
            "guidance": ("FLOAT", {"default": r.guidance, "min": 0.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "Flux distilled guidance (3.5 is typical)."}),
            "width": ("INT", {"default": r.width, "min": 16, "max": 4096, "step": 16,
                              "tooltip": "Image width, a multiple of 16. A new size may compile once."}),
            "height": ("INT", {"default": r.height, "min": 16, "max": 4096, "step": 16,
                               "tooltip": "Image height, a multiple of 16. A new size may compile once."}),
            "batch": ("INT", {"default": r.batch, "min": 1, "max": 16,
                              "tooltip": "Images per run."}),
        }}

    def generate(self, engine: EngineHandle, prompt: str, seed: int, steps: int, guidance: float,
                 width: int, height: int, batch: int) -> tuple[Any]:
        handle = engine
        flux = engine_for(handle.key)
        memory.ensure_loaded(flux)
        if handle.slot is not None:  # the engine knows its slot: a covered request changes nothing
            info = flux.prepare_slot(handle.slot.lora_paths, handle.slot.all_layers, handle.slot.max_rank)
            if info["changed"]:
                logger.info("FastLoRA: adapter slot %s", info)
        request = specs.GenerateRequest(prompt=prompt, seed=int(seed), steps=int(steps), guidance=float(guidance),
                                        width=int(width), height=int(height), batch=int(batch))
        t0 = time.perf_counter()
        on_step, on_preview = bridge.progress_callbacks(int(steps))
        result = flux.generate(request, handle.stack, on_step, on_preview, bridge.cancel_check())
        STATS["generates"] += 1
        STATS["last"] = {
            "seconds": round(time.perf_counter() - t0, 4),
            "new_compiles": result.new_compiles,
            "compiles": flux.compiles,
            "swap": result.swap.as_dict() if result.swap is not None else None,
        }
        logger.info("FastLoRA: %s -> %d image(s) in %.2f s (swap %s, %d new compiles)", handle.describe(),
                    result.images.shape[0], result.seconds,
                    f"{result.swap.swap_ms:.1f} ms" if result.swap is not None else "-", result.new_compiles)
        return (result.images,)


_DEFAULTS_REQUEST = specs.GenerateRequest()

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "OptimizedFluxLoader": OptimizedFluxLoader,
    "LoraHotswap": LoraHotswap,
    "LoraHotswapModel": LoraHotswapModel,
    "PadDummyLora": PadDummyLora,
    "Generate": Generate,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "OptimizedFluxLoader": "Optimized Flux Loader (FastLoRA)",
    "LoraHotswap": "LoRA Hotswap (FastLoRA)",
    "LoraHotswapModel": "LoRA Hotswap for MODEL (FastLoRA)",
    "PadDummyLora": "Pad Dummy LoRA (FastLoRA)",
    "Generate": "Generate (FastLoRA)",
}
