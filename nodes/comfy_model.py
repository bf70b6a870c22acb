"""FastLoRA's engine as a standard ComfyUI ``MODEL``.

The MODEL is a ``comfy.model_patcher.ModelPatcher`` subclass around a ``comfy.model_base.Flux``
configured exactly as ComfyUI's UNETLoader would configure it for the same weights (model detection
on the BFL shapes: sampling shift, latent format, guidance), so KSampler, SamplerCustomAdvanced,
FluxGuidance, CFG, img2img, noise masks, every sampler and scheduler run unchanged. Only its
``diffusion_model`` differs: :class:`EngineDiffusionModel` takes ComfyUI's Flux call (latents
``[B, 16, H, W]``, T5 context, pooled CLIP, sigma, guidance), patchifies like ComfyUI's Flux and runs
the engine's one optimised, compiled diffusers transformer - the same one ``Generate`` uses.

LoRAs: ComfyUI's LoRA loaders call ``add_patches`` on a clone. :class:`FastLoraModelPatcher`
records each call as one LoRA of the stack (``model_lora``), refusing at once what the engine cannot
apply; ComfyUI never merges weights itself. Right before sampling (``pre_run``), the engine's weights
are made to match that clone's stack with the engine's swap: two samplers with different LoRAs in
one graph each get their own stack, and a strength change is a swap, never a recompile.

Anything that reaches inside ComfyUI's own Flux module (ControlNet residuals, block or attention
patches, diffusion-model wrappers such as TorchCompileModel, LoRA hooks, Kontext reference latents,
attention masks) cannot work on the compiled transformer: it is refused before the first step by
an ``outer_sample`` wrapper, with what to do instead.

Every ComfyUI import is inside a function (the pack imports without ComfyUI).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch

from . import memory
from . import model_lora as lora_patches
from ._core import FluxEngine, errors, specs

logger = logging.getLogger(__name__)

WRAPPER_KEY = "fastlora"
PATCH_SIZE = 2
# Object patches that only touch the BaseModel shell, never the diffusion model (ModelSamplingFlux...).
SAFE_OBJECT_PATCHES = ("model_sampling", "latent_format")
# Wrapper kinds that run outside the diffusion model (sampler level); others reach inside it.
SAFE_WRAPPER_KINDS = ("outer_sample", "prepare_sampling", "sampler_sample", "predict_noise", "calc_cond_batch")
STATS: dict[str, Any] = {"samples": 0, "last": None}


class ModelPathRefused(errors.FastLoraError):
    """Something in the graph cannot run on FastLoRA's compiled transformer."""


# -- the diffusion model ComfyUI calls ----------------------------------------------------------------
def bfl_shapes(transformer: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transformer's weights under BFL checkpoint names, as meta tensors (shapes only): what
    ComfyUI's model detection and LoRA key maps read."""
    from ._core import loading

    sd: dict[str, torch.Tensor] = {}
    for name, t in transformer.state_dict().items():
        if ".lora_" in name or "lora_magnitude" in name:  # adapter-strategy PEFT layers
            continue
        sd[name.replace(".base_layer.", ".")] = torch.empty(tuple(t.shape), dtype=dtype, device="meta")
    cfg: Any = transformer.config  # diffusers FrozenDict (typed as a Module attribute)
    return loading.diffusers_to_bfl(sd, int(cfg.num_layers), int(cfg.num_single_layers))


class EngineDiffusionModel(torch.nn.Module):
    """ComfyUI's Flux forward signature over the engine's diffusers transformer.

    The engine is looked up by key on every run (ComfyUI's "Unload models" may have released it; the
    next sampling rebuilds it), so the engine is not a submodule: ComfyUI never moves, casts or
    patches its weights. ``state_dict`` answers with the BFL names and shapes (meta tensors).
    """

    def __init__(self, key: specs.EngineKey, engine: FluxEngine) -> None:
        super().__init__()
        self.key = key
        self._engine_ref: list[FluxEngine] = [engine]
        self.dtype = engine.dtype
        self.patch_size = PATCH_SIZE
        cfg = engine.transformer.config
        self.guidance_embed = bool(cfg.guidance_embeds)
        self.vec_in_dim = int(cfg.pooled_projection_dim)
        self._shapes = bfl_shapes(engine.transformer, engine.dtype)
        self.out_features = {n: int(m.out_features) for n, m in _linears(engine.transformer).items()}  # type: ignore[arg-type]

    @property
    def engine(self) -> FluxEngine:
        """The live engine (rebuilt from the registry after an unload)."""
        engine = self._engine_ref[0]
        if engine.released:
            from .flux_nodes import engine_for

            engine = engine_for(self.key)
            self._engine_ref[0] = engine
        return engine

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        out = destination if destination is not None else {}
        for k, v in self._shapes.items():
            out[prefix + k] = v
        return out

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, ref_latents: Any = None, control: Any = None,
                transformer_options: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        if control is not None:
            raise ModelPathRefused("A ControlNet is applied to this FastLoRA MODEL. " + _CONTROLNET_TODO)
        if ref_latents is not None:
            raise ModelPathRefused("Reference latents (Flux Kontext) reached this FastLoRA MODEL. " + _KONTEXT_TODO)
        if kwargs.get("attention_mask") is not None:
            raise ModelPathRefused("An attention mask reached this FastLoRA MODEL. " + _MASK_TODO)
        to = transformer_options or {}
        if to.get("patches") or to.get("patches_replace"):
            raise ModelPathRefused("Model patches reached this FastLoRA MODEL. " + _PATCH_TODO)
        bs, c, h, w = x.shape
        pad_h, pad_w = (-h) % PATCH_SIZE, (-w) % PATCH_SIZE
        if pad_h or pad_w:  # as comfy.ldm.common_dit.pad_to_patch_size
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="circular")
        hp, wp = x.shape[2] // PATCH_SIZE, x.shape[3] // PATCH_SIZE
        img = x.reshape(bs, c, hp, PATCH_SIZE, wp, PATCH_SIZE).permute(0, 2, 4, 1, 3, 5).reshape(bs, hp * wp, c * 4)
        img_ids = torch.zeros(hp, wp, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] = torch.arange(hp, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] = torch.arange(wp, device=x.device, dtype=x.dtype)[None, :]
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype)
        if y is None:
            y = torch.zeros(bs, self.vec_in_dim, device=x.device, dtype=x.dtype)
        timestep = timestep.reshape(-1).expand(bs) if timestep.numel() == 1 else timestep
        if self.guidance_embed:
            if guidance is None:
                guidance = torch.full((bs,), 3.5, device=x.device, dtype=torch.float32)
            guidance = guidance.reshape(-1).expand(bs) if guidance.numel() == 1 else guidance
        else:
            guidance = None
        out = self.engine.run_transformer(img, context, y[:, :self.vec_in_dim], timestep, img_ids.reshape(-1, 3),
                                          txt_ids, guidance)
        out = out.reshape(bs, hp, wp, c, PATCH_SIZE, PATCH_SIZE).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(bs, c, hp * PATCH_SIZE, wp * PATCH_SIZE)[:, :, :h, :w]


def _linears(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from ._core import lora_base

    return lora_base.linear_modules(transformer)


_CONTROLNET_TODO = ("ControlNet adds residuals inside ComfyUI's own Flux blocks, which FastLoRA's compiled "
                    "transformer does not have: remove the Apply ControlNet node from this branch, or load the "
                    "model with ComfyUI's UNETLoader for ControlNet graphs.")
_KONTEXT_TODO = ("Flux Kontext / reference-latent conditioning (ReferenceLatent, FluxKontextImageScale) needs "
                 "the Kontext model and ComfyUI's own Flux: remove that node, or use UNETLoader with a Kontext model.")
_MASK_TODO = ("Attention masks (e.g. regional conditioning with masks) are not supported by FastLoRA's "
              "transformer: remove the mask from the conditioning, or use UNETLoader for this graph.")
_PATCH_TODO = ("Block, attention or input patches (PuLID, IP-Adapter, TeaCache, FreeU-style nodes ...) replace "
               "parts of ComfyUI's own Flux module, which FastLoRA's compiled transformer does not have: remove "
               "that node, or use UNETLoader for this graph.")


# -- the ModelPatcher --------------------------------------------------------------------------------
_CLASS_LOCK = threading.Lock()
_PATCHER_CLASS: type | None = None
_BASE_PATCHERS: weakref.WeakValueDictionary[specs.EngineKey, Any] = weakref.WeakValueDictionary()


def patcher_class() -> type:
    """``FastLoraModelPatcher`` (defined on first use: it subclasses ComfyUI's ModelPatcher)."""
    global _PATCHER_CLASS
    with _CLASS_LOCK:
        if _PATCHER_CLASS is None:
            _PATCHER_CLASS = _define_patcher_class()
        return _PATCHER_CLASS


def _define_patcher_class() -> type:
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.utils

    class FastLoraModelPatcher(comfy.model_patcher.ModelPatcher):
        """A ModelPatcher whose weights belong to a FastLoRA engine (see the module docstring)."""

        fastlora_groups: tuple[lora_patches.PatchGroup | lora_patches.FileLora, ...] = ()

        @property
        def fastlora_adapter(self) -> EngineDiffusionModel:
            return self.model.diffusion_model

        @property
        def fastlora_engine(self) -> FluxEngine:
            """The live engine (rebuilt if ComfyUI's unload released it)."""
            return self.fastlora_adapter.engine

        @property
        def fastlora_current_engine(self) -> FluxEngine:
            """The engine as it is now, released or not (never rebuilds)."""
            return self.fastlora_adapter._engine_ref[0]

        # LoRA patches become the engine's stack -------------------------------------------------
        def add_patches(self, patches: Any, strength_patch: float = 1.0, strength_model: float = 1.0) -> Any:
            # LoraLoader hands the model and the CLIP the same dict: keep what names this model's weights,
            # as ModelPatcher.add_patches does (the CLIP part is the CLIP's business).
            adapter = self.fastlora_adapter
            if not patches and strength_patch != 0.0:
                raise lora_patches.PatchRefused(lora_patches.NOTHING_MAPPED.format(n=len(self.fastlora_groups) + 1))
            patches = {k: v for k, v in patches.items()
                       if (k if isinstance(k, str) else k[0])[len(lora_patches.PREFIX):] in adapter._shapes}
            deltas = lora_patches.deltas_of(patches, strength_model) if strength_patch != 0.0 else ()
            group = lora_patches.PatchGroup.of(dict(patches), float(strength_patch), deltas,
                                               len(self.fastlora_groups), adapter.out_features)  # refuses a misfit
            if not deltas and strength_patch != 0.0:
                logger.warning("FastLoRA MODEL: a LoRA loader added no weight of this Flux transformer, only "
                               "text-encoder weights (left to the CLIP)")
            self.fastlora_groups = self.fastlora_groups + (group,)
            return super().add_patches(patches, strength_patch, strength_model)

        def clone(self) -> Any:
            n = super().clone()
            n.fastlora_groups = self.fastlora_groups
            return n

        def fastlora_stack(self) -> specs.LoraStack:
            adapter = self.fastlora_adapter
            return lora_patches.stack_of(self.fastlora_groups, adapter.engine)

        # sampling ---------------------------------------------------------------------------------
        def pre_run(self) -> None:
            super().pre_run()
            engine = self.fastlora_engine
            swap = engine.prepare_external(self.fastlora_stack())
            self._fastlora_compiles = engine.compiles
            STATS["last"] = {"swap": swap.as_dict(), "stack": swap.stack}
            if swap.changed:
                logger.info("FastLoRA MODEL: LoRA stack %s applied in %.1f ms", swap.stack, swap.swap_ms)

        def cleanup(self) -> None:
            super().cleanup()
            start = getattr(self, "_fastlora_compiles", None)
            if start is not None and STATS["last"] is not None:
                engine = self.fastlora_current_engine
                STATS["samples"] += 1
                STATS["last"]["new_compiles"] = engine.compiles - start
                STATS["last"]["compiles"] = engine.compiles
                self._fastlora_compiles = None

        # memory: the engine moves as a whole, ComfyUI never touches its weights -------------------
        def model_size(self) -> int:
            engine = self.fastlora_current_engine
            return 0 if engine.released else int(engine.memory_bytes())

        def loaded_size(self) -> int:
            engine = self.fastlora_current_engine
            return 0 if engine.released or engine.offloaded else self.model_size()

        def lowvram_patch_counter(self) -> int:
            return 0

        def current_loaded_device(self) -> Any:
            return self.load_device if self.loaded_size() else self.offload_device

        def is_clone(self, other: Any) -> bool:
            if super().is_clone(other):
                return True
            engine = getattr(other, "engine", None)  # the Generate path's memory.EngineModel
            return engine is not None and engine is self.fastlora_current_engine

        def load(self, device_to: Any = None, lowvram_model_memory: int = 0, force_patch_weights: bool = False,
                 full_load: bool = False) -> None:
            engine = self.fastlora_engine
            if engine.offloaded:
                engine.reload()
            self.model.model_loaded_weight_memory = self.loaded_size()
            self.model.device = device_to if device_to is not None else self.load_device

        def partially_load(self, device_to: Any, extra_memory: float = 0, force_patch_weights: bool = False) -> int:
            before = self.loaded_size()
            self.patch_model(device_to)
            return self.loaded_size() - before

        def patch_model(self, device_to: Any = None, lowvram_model_memory: int = 0, load_weights: bool = True,
                        force_patch_weights: bool = False) -> Any:
            with self.use_ejected():
                for k in self.object_patches:
                    old = comfy.utils.set_attr(self.model, k, self.object_patches[k])
                    if k not in self.object_patches_backup:
                        self.object_patches_backup[k] = old
                if load_weights:
                    self.load(device_to)
            self.inject_model()
            return self.model

        def unpatch_model(self, device_to: Any = None, unpatch_weights: bool = True) -> None:
            self.eject_model()
            for k in list(self.object_patches_backup):
                comfy.utils.set_attr(self.model, k, self.object_patches_backup[k])
            self.object_patches_backup.clear()
            if unpatch_weights:
                self.model.model_loaded_weight_memory = 0

        def partially_unload(self, device_to: Any, memory_to_free: float = 0) -> int:
            engine = self.fastlora_current_engine
            return memory.partially_unload(engine, memory_to_free, self.loaded_size(),
                                           lambda: memory.unload_engine(engine))

        def detach(self, unpatch_all: bool = True) -> Any:
            self.eject_model()
            self.model_patches_to(self.offload_device)
            if unpatch_all:
                self.unpatch_model(self.offload_device, unpatch_weights=True)
                memory.unload_engine(self.fastlora_current_engine)
            for callback in self.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_DETACH):
                callback(self, unpatch_all)
            return self.model

    return FastLoraModelPatcher


def model_patcher(key: specs.EngineKey, engine: FluxEngine) -> Any:
    """The MODEL for ``engine``: one base patcher per engine (re-running the loader returns the same
    one, so ComfyUI sees the same model), configured like UNETLoader's for the same weights."""
    base = _BASE_PATCHERS.get(key)
    if base is not None and base.fastlora_adapter._engine_ref[0] is engine:
        return base
    import comfy.model_detection
    import comfy.patcher_extension

    adapter = EngineDiffusionModel(key, engine)
    shapes = dict(adapter._shapes)
    config = comfy.model_detection.model_config_from_unet(shapes, "")
    if config is None:  # pragma: no cover - the engine only loads Flux.1
        raise ModelPathRefused("ComfyUI does not recognise this transformer as Flux.1; use UNETLoader.")
    config.set_inference_dtype(engine.dtype, None)
    config.unet_config["disable_unet_model_creation"] = True
    model = config.get_model(shapes, "", device=engine.device)
    config.unet_config.pop("disable_unet_model_creation", None)
    model.diffusion_model = adapter
    model.extra_conds = _conditioning_on_device(model)
    cpu = torch.device("cpu")
    patcher = patcher_class()(model, load_device=engine.device, offload_device=cpu)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample)
    _BASE_PATCHERS[key] = patcher
    return patcher


#: Conditioning tensors the model casts to its device and dtype in every call (model_base._apply_model).
DEVICE_CONDS = ("c_crossattn", "y", "guidance")


def _conditioning_on_device(model: Any) -> Any:
    """``model.extra_conds`` that hands the sampler its text conditioning already on the model's
    device and in its dtype. ComfyUI keeps conditioning on the CPU and casts it to the device in
    every model call; from pageable memory that copy (the T5 context: 512 x 4096 floats) waits for
    the GPU's queue, so the GPU idles while Python prepares the next step: measured on the H200 as
    +5.8 % per image against Generate's loop on the same compiled transformer (issue 9). Casting
    once, when the sampler encodes the conditioning, turns those per-step casts into no-ops; the
    values are the same (the same cast, done once)."""
    encode = model.extra_conds

    def extra_conds(**kwargs: Any) -> dict[str, Any]:
        out = encode(**kwargs)
        device, dtype = kwargs.get("device"), model.get_dtype()
        if device is None:
            return out
        for name in DEVICE_CONDS:
            cond = out.get(name)
            tensor = getattr(cond, "cond", None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                out[name] = cond._copy_with(tensor.to(device=device, dtype=dtype))
        return out

    return extra_conds


def with_lora_file(model: Any, spec: specs.LoraSpec) -> Any:
    """A clone of FastLoRA's MODEL with the LoRA file ``spec`` added to its stack (``LoraHotswapModel``).
    The file is read, staged and checked against the engine now, so a bad one is refused by the node
    that adds it; the weights change only when a sampler runs the clone."""
    fastlora_patcher: Any = patcher_class()  # Any: a class made at run time
    if not isinstance(model, fastlora_patcher):
        raise ModelPathRefused(
            "LoRA Hotswap for MODEL (FastLoRA) takes the model output of Optimized Flux Loader (FastLoRA). For "
            "another model, use ComfyUI's LoraLoaderModelOnly.")
    if spec.strength != 0.0:
        for warning in model.fastlora_engine.check(specs.LoraStack((spec,))):
            logger.warning("FastLoRA MODEL: %s", warning)
    clone = model.clone()
    clone.fastlora_groups = clone.fastlora_groups + (lora_patches.FileLora(spec),)
    return clone


# -- refusals, before the first step ---------------------------------------------------------------
def _outer_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
    guider = executor.class_obj
    patcher = guider.model_patcher
    if isinstance(patcher, patcher_class()):
        problems = refusals(patcher, getattr(guider, "conds", {}), guider.model_options)
        if problems:
            raise ModelPathRefused("FastLoRA MODEL cannot run this graph as wired:\n- " + "\n- ".join(problems))
        patcher.fastlora_engine  # type: ignore[attr-defined]  # noqa: B018 - rebuild a released engine before ComfyUI loads models
        patcher.fastlora_stack()  # type: ignore[attr-defined]  # convert new LoRAs now: a bad one fails before any model is loaded
    return executor(*args, **kwargs)


def refusals(patcher: Any, conds: dict[str, list[dict[str, Any]]], model_options: dict[str, Any]) -> list[str]:
    """Everything about to reach this MODEL that FastLoRA's transformer cannot honour, one line each."""
    out: list[str] = []
    recorded = {k if isinstance(k, str) else k[0] for g in patcher.fastlora_groups
                if isinstance(g, lora_patches.PatchGroup) for k in g.patches}
    stray = sorted(k for k in patcher.patches if k not in recorded)
    if stray:
        out.append(f"weight patches that did not come through a LoRA loader ({stray[0]} ...). {lora_patches._HOW_TO}")
    if patcher.hook_patches or any("hooks" in c for cs in conds.values() for c in cs):
        out.append("LoRA hooks (Create Hook LoRA / Set CLIP Hooks / Cond Set Props): scheduled weight hooks "
                   "are not supported on FastLoRA's MODEL; use a LoRA loader node instead.")
    objects = sorted(k for k in patcher.object_patches if k not in SAFE_OBJECT_PATCHES)
    if objects:
        out.append(f"a node replaces parts of the model ({', '.join(objects)}). {_PATCH_TODO}")
    if patcher.weight_wrapper_patches or patcher.injections:
        out.append(f"weight wrappers or model injections from another node pack. {_PATCH_TODO}")
    to = model_options.get("transformer_options", {})
    if any(to.get("patches", {}).values()) or any(to.get("patches_replace", {}).values()):
        out.append(_PATCH_TODO)
    wrappers: dict[str, dict[Any, list[Any]]] = {}
    for source in (patcher.wrappers, to.get("wrappers", {})):
        for kind, by_key in source.items():
            for k, funcs in by_key.items():
                if funcs and kind not in SAFE_WRAPPER_KINDS and k != WRAPPER_KEY:
                    wrappers.setdefault(kind, {})[k] = funcs
    for kind, by_key in wrappers.items():
        if "torch.compile" in by_key:
            out.append("TorchCompileModel: FastLoRA's MODEL is already compiled (choose compile on the loader); "
                       "remove the TorchCompileModel node.")
        others = [str(k) for k in by_key if k != "torch.compile"]
        if others:
            out.append(f"a '{kind}' wrapper ({', '.join(others)}) from another node. {_PATCH_TODO}")
    flat = [c for cs in conds.values() for c in cs]
    if any("control" in c for c in flat):
        out.append(_CONTROLNET_TODO)
    if any("gligen" in c for c in flat):
        out.append("GLIGEN conditioning is not supported on Flux; remove the GLIGEN node.")
    if any(c.get("reference_latents") is not None for c in flat):
        out.append(_KONTEXT_TODO)
    if any(c.get("attention_mask") is not None for c in flat):
        out.append(_MASK_TODO)
    return out
