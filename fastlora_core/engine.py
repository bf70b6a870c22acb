"""One Flux pipeline, optimised and compiled once; LoRA stacks swapped in place.

``FluxEngine`` is the library's centre. It is declarative about LoRAs: ``apply(stack)`` (or
``generate(request, stack)``) makes the weights match the wanted stack, whatever was loaded before,
and does nothing when it already matches. Every LoRA problem is detected before the first tensor is
written, so a refused stack leaves the engine serving the previous one bit for bit.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import background_compile, cancel, expected_compile, idle_work, precompile, triton_key
from .errors import EngineReleasedError, LoraFitError, LoraFormatError, OptionsError, out_of_memory
from .first_calls import FirstCalls
from .lora.adapter import AdapterStrategy
from .lora.base import ResolvedEntry, SwapStrategy
from .lora.cache import GLOBAL_CACHE, MEMORY_PREFIX, DeviceLoraCache, FileKey, LoraCache, file_key
from .lora.formats import check_values, read_lora
from .lora.fused import FusedStrategy
from .optimize import (
    AMPLE_ROOM_BYTES,
    Resolved,
    apply_offload,
    compile_transformer,
    configure_compile_cache,
    dynamo_compile_count,
    enable_deterministic,
    finish_transformer,
    free_bytes,
    module_tensors,
    quantize_t5,
    quantize_transformer,
    resident_bytes,
    resolve,
    restore_deterministic,
    room_for_masters,
    tensor_bytes,
    usable_bytes,
    why_not_own_modules,
)
from .precompile import PrecompiledBlocks
from .specs import EngineKey, EngineOptions, GenerateRequest, LoraStack, ModelSource
from .timings import Phases

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
PreviewCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class SwapReport:
    strategy: str
    stack: list[dict[str, object]]
    swap_ms: float
    changed: bool
    layers_written: int = 0
    from_cache: bool = True
    warnings: list[str] = field(default_factory=list)
    read_ms: float = 0.0  # reading and converting files not in the RAM cache (part of swap_ms)
    stage_ms: float = 0.0  # copying LoRAs not yet on the GPU there (part of swap_ms)

    def as_dict(self) -> dict[str, object]:
        return {
            "strategy": self.strategy, "stack": self.stack, "swap_ms": round(self.swap_ms, 3),
            "changed": self.changed, "layers_written": self.layers_written,
            "from_cache": self.from_cache, "warnings": self.warnings,
            "read_ms": round(self.read_ms, 3), "stage_ms": round(self.stage_ms, 3),
        }


@dataclass
class GenerateResult:
    images: torch.Tensor  # float32 [B, H, W, C] in 0..1, CPU
    seconds: float
    new_compiles: int
    swap: SwapReport | None = None


def run_pipeline(pipe, request: GenerateRequest, callback=None) -> torch.Tensor:
    """Sample with a FluxPipeline exactly as the engine does (also used for reference images).
    Returns float32 ``[B, H, W, C]`` in 0..1 on the CPU."""
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    with torch.inference_mode():
        out = pipe(
            prompt=request.prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            num_images_per_prompt=request.batch,
            generator=generator,
            max_sequence_length=request.max_sequence_length,
            output_type="pt",
            callback_on_step_end=callback,
        )
    return out.images.permute(0, 2, 3, 1).float().clamp(0, 1).cpu()


def weight_writes() -> torch.inference_mode:
    """The autograd mode of every call that writes weights or keeps tensors for later swaps.

    ComfyUI runs nodes under ``torch.inference_mode()``, library users usually do not, and one process
    may do both. Tensors made under inference mode (scratch buffers, masters, adapter slots, the
    weights of an engine built in a ComfyUI node) cannot be written in place outside it, while normal
    tensors can be written inside it; so the strategies always run inside it, whatever the caller's
    mode, and a swap never fails (or fails to restore) because an earlier one ran in the other mode."""
    return torch.inference_mode()


class FluxEngine:
    """Load, optimise and serve one Flux pipeline.

    Thread-safe: apply/generate/offload run one at a time. Raises ``OptionsError`` for impossible
    options (before any weight is read), ``ModelLoadError`` for bad model files.
    """

    def __init__(self, source: ModelSource, options: EngineOptions | None = None,
                 lora_cache: LoraCache | None = None, *, resolved: Resolved | None = None,
                 pipeline: Any = None, workers: background_compile.BackgroundCompiler | None = None,
                 make_room: Callable[[int], None] | None = None) -> None:
        """Load ``source`` and optimise it as ``options`` say.

        ``resolved``: ``optimize.resolve(options)`` when the caller already made it (the registry
        does, to refuse impossible options before releasing anything); made here otherwise.
        ``pipeline``: use this already loaded ``FluxPipeline`` instead of loading ``source`` (see
        :meth:`from_pipeline`). ``workers``: compile workers started before the checks
        (:func:`.expected_compile.workers_before_checks`); the engine uses them or closes them.
        ``make_room(bytes)``: asks a host that holds other models on this GPU (ComfyUI) to unload them
        until ``bytes`` are free; called only when that would keep the weights on the GPU
        (:meth:`_room`, decision 66).
        """
        started = time.perf_counter()
        options = options or EngineOptions()
        self.key = EngineKey(source, options)  # what was asked for (``auto`` stays ``auto``)
        self.source = source
        resolved = resolved or resolve(options)
        self.device = resolved.device
        self.options = options = resolved.options  # what is used: ``auto`` choices resolved
        self.dtype = resolved.dtype
        self.lora_cache = lora_cache if lora_cache is not None else GLOBAL_CACHE
        self._lock = threading.RLock()
        self.compiles = 0
        self._compiled = False
        self.loaded_stack = LoraStack()
        self._loaded_keys: tuple[FileKey, ...] = ()  # identity of the loaded stack's files
        # LoRAs staged on the GPU, next to the RAM cache they come from
        self.device_loras = DeviceLoraCache(self.device, self.dtype, enabled=options.offload == "none")
        self._preview_map: torch.Tensor | None = None
        self._cancel = cancel.CheckHolder()  # check_cancel of the generation in progress
        self.attention = "sdpa"
        self.released = False
        self.offloaded = False
        # Start-up breakdown (issue 13): build phases, then first_lora / first_image on first use.
        self.phases = Phases(self.device)
        self.last_swap: SwapReport | None = None  # the last apply that changed weights (GET /fastlora/stats)

        self._deterministic_before = enable_deterministic() if options.deterministic else None
        self._compile_cache: Path | None = None
        self.precompiled: PrecompiledBlocks | None = None  # regional compile's saved blocks (decision 40)
        self._background: background_compile.BackgroundCompiler | None = None
        # Decided once, before anything is read: the weights (and the fused strategy's masters) go
        # straight to the GPU only when it has ample room for them (decisions 29 and 64).
        room = self._room(pipeline, make_room)
        self._ample_room = room > room_for_masters(source.transformer_only, options.quantization)
        self._background_mode: str | None = None
        self._expected: list[background_compile.Job] = []  # the expected first request's graphs (decision 47)
        self._first_calls: FirstCalls | None = None  # the encoders' and VAE's (decision 55)
        # Seconds those first calls took on their thread; None where not made ahead (or they failed).
        self.first_calls_ahead_s: float | None = None
        if options.compile != "off":
            self._compile_cache = configure_compile_cache(options)  # the folder only: no import (decision 43)
            if options.compile == "regional" and not options.deterministic and not options.dynamic_shapes:
                # workers start when a block class has no saved graph (decisions 41 and 45), or while
                # the weights are read when the cache has no saved graph at all (decision 46)
                self._background_mode = background_compile.mode(room > AMPLE_ROOM_BYTES)
                if self._background_mode is not None:
                    self._background = workers or background_compile.BackgroundCompiler(self.device)
                    workers = None
        if workers is not None:  # started before the checks, which this engine's exact ones overrule
            workers.close()
        t0 = time.perf_counter()
        self.phases.add("setup", t0 - started)
        try:
            if pipeline is None:
                pipeline = self._load(source)
            pipe, pipeline = pipeline, None
            self._first_calls = FirstCalls.start(pipe, options, self.device, self._ample_room)
            self._optimise(pipe)
        except BaseException:  # nothing of a failed build stays behind: memory, settings, workers
            self._await_first_calls()
            pipe = pipeline = None
            self._free_memory()
            if self._deterministic_before is not None:
                restore_deterministic(self._deterministic_before)
            if self._background is not None:
                self._background.close()
            raise
        self.load_seconds = time.perf_counter() - t0
        self.phases.add("build", self.load_seconds)
        logger.info("engine ready in %.1f s (%s, %s)", self.load_seconds, source.describe(), options)

    def _load(self, source: ModelSource) -> Any:
        """Read the pipeline (the ``read`` phase), with work for the loader's waits (decision 42) and,
        when the first image will compile, a compile worker getting ready meanwhile (decision 46)."""
        from .loading import direct, load_pipeline

        why_not = why_not_own_modules(self.options)
        if why_not is not None:
            logger.info("loading with diffusers' and transformers' classes: %s", why_not)
        if self._background is not None and why_not is None and self._first_image_compiles():
            # workers compile the expected first request's graphs (decision 47), or one gets ready
            self._expected = self._compile_expected(source)
            if not self._expected:
                self._background.start()
        if triton_key.used(self.options, self.device):  # decision 52: Triton's key hashed beside the reads
            triton_key.start()
        with self.phases.phase("read"), direct.while_waiting(*self._work_while_reading()):
            return load_pipeline(source, self.dtype, self.device if self._ample_room else None,
                                 self._read_to_device(), own_modules=why_not is None)

    def _compile_expected(self, source: ModelSource) -> list[background_compile.Job]:
        """Hand each block class's graph for the expected first request to a worker before the reads
        (decision 47); no jobs where the specimen cannot stand for this engine's blocks."""
        assert self._background is not None and self._compile_cache is not None
        why = "" if self._background_mode == "ahead" else "background compile runs the blocks uncompiled"
        why = why or expected_compile.why_not(self.options, source)
        shapes = None if why else expected_compile.model_shapes(source)
        if shapes is None:
            if why:
                logger.info("no compile ahead of the first request: %s", why)
            return []
        from .runtime.flux import FluxTransformer

        config, vae_scale_factor = shapes
        return self._background.expect(config, vae_scale_factor, self.options, self.dtype,
                                       precompile.folder_for(self._compile_cache), FluxTransformer._repeated_blocks)

    def _drop_expected(self) -> None:
        """The first request is not the expected one, so no block will load its workers' graphs
        (decision 47): stop them now rather than at the first block, and get one worker ready for
        decision 45's hand-over while the LoRA is applied and the prompt encoded."""
        assert self._background is not None
        logger.info("the first request is not %dx%d: compiling for it instead of the expected request",
                    expected_compile.EXPECTED.width, expected_compile.EXPECTED.height)
        for job in self._expected:
            self._background.cancel(job)
        self._expected = []
        self._background.start()

    def _work_while_reading(self) -> list[Callable[[], object]]:
        """What the loader does while it waits for a read (:mod:`.idle_work`)."""
        return idle_work.while_reading(self.options, self.device)

    @classmethod
    def from_pipeline(cls, pipe: Any, options: EngineOptions | None = None, *, label: str = "in-memory pipeline",
                      lora_cache: LoraCache | None = None) -> FluxEngine:
        """An engine around a ``diffusers.FluxPipeline`` you already hold (in the options' dtype, on
        the CPU or already on the engine's GPU, e.g. random weights built by a benchmark): optimised,
        compiled and swapped exactly like a loaded one. Its weights become the engine's (the fused
        strategy's masters are those tensors where they stay on the GPU), so weights already on the
        GPU count as room there (:meth:`_free_bytes`). ``label`` names it in logs and in ``engine.key`` (a
        ``ModelSource`` whose ``diffusers_dir`` is the label; nothing is read from it). Not
        registered in the registry."""
        return cls(ModelSource(diffusers_dir=label), options, lora_cache, pipeline=pipe)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per start-up phase: ``read`` (weights from disk into CPU memory, or straight into
        GPU memory when it has ample room), ``masters`` (the fused strategy's bf16 copies; none to make
        after a direct read), ``t5`` and ``transformer`` (quantised layer by layer while moving to the
        device: transfer and quantisation together), ``move_rest`` (CLIP, VAE, the rest),
        ``setup`` (the constructor before ``build``: options, the compile cache's configuration),
        ``checks`` (added by ``registry.get_engine``: the dependency and device checks before the
        constructor, which import the optional packages they check and start CUDA),
        ``build`` (the rest of the constructor, ``load_seconds``: the phases above and the steps between
        them); then,
        on first use, ``first_lora`` (the first stack applied: reading, staging, swapping),
        ``compile_setup`` (wrapping the blocks for ``torch.compile``; none with compile off) and
        ``first_image`` (the first ``generate``'s sampling: compilation included when compile is on).
        Phases on a GPU end synchronised. Keys appear as phases run."""
        return self.phases.as_dict()

    # -- building ------------------------------------------------------------------------------
    def _optimise(self, pipe) -> None:
        o = self.options
        transformer = pipe.transformer
        for module in self._modules(pipe):
            module.eval().requires_grad_(False)
        self.pipe = pipe
        self.transformer = transformer
        if o.swap_strategy == "fused":
            master_device = self._master_device()
            parts = {"transformer": transformer}
            if pipe.text_encoder is not None:
                parts["text_encoder"] = pipe.text_encoder
            if o.t5_quantization == "none" and pipe.text_encoder_2 is not None:
                parts["text_encoder_2"] = pipe.text_encoder_2
            fused = FusedStrategy(parts, o.quantization, master_device)
            if o.quantization != "none":
                from .lora.fit import flux_lora_targets

                # Before quantisation, from the weights as loaded: no copy when they already are
                # where the masters live (CPU RAM, or the GPU after a direct read), else one per layer.
                with self.phases.phase("masters"):
                    fused.capture_hp_masters(transformer, flux_lora_targets(transformer))
            self.strategy: SwapStrategy = fused
        else:
            self.strategy = AdapterStrategy(transformer, o.max_rank, self.dtype)
        # Quantise layer by layer *while* moving to the device, then move the rest: the bf16
        # transformer (24 GB) and T5 (9.5 GB) never sit on the GPU whole, so the fp8 + NF4 recipe
        # loads on a 24 GB card.
        target = self.device if o.offload == "none" else torch.device("cpu")
        if pipe.text_encoder_2 is not None:
            with self.phases.phase("t5"):
                quantize_t5(pipe.text_encoder_2, o.t5_quantization, self.dtype, target)
        with self.phases.phase("transformer"):
            quantize_transformer(transformer, o.quantization, target)
        with self.phases.phase("move_rest"):
            if o.offload == "none":
                pipe.to(self.device)
            self.strategy.model_moved()
        self.attention, self.fused_projections = finish_transformer(transformer, o, self.device, self._cancel)
        apply_offload(pipe, o.offload, self.device)
        pipe.set_progress_bar_config(disable=True)

    @staticmethod
    def _modules(pipe) -> list[torch.nn.Module]:
        """The pipeline's weight-holding modules that were loaded (a transformer-only engine has one)."""
        return [m for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae) if m is not None]

    def _room(self, pipeline: Any = None, make_room: Callable[[int], None] | None = None) -> int:
        """:meth:`_free_bytes`, after asking the host to make room where this GPU could hold the
        weights and masters (``optimize.room_for_masters``) but other models it holds are in the way
        (decision 66). ComfyUI 0.3.64 ran the shipped MODEL workflow's text encoders (9,319 MB with a
        bf16 T5) before the loader, so on a 48 GB card they took the room decision 64 gives the masters:
        every swap then sent them from RAM (0.67-0.79 s) instead of merging on the GPU (~45 ms). The
        encoders have done their work by then and ComfyUI loads them again when a prompt changes.

        A host frees memory by dropping its tensors, which leaves them in PyTorch's cache; ``free_bytes``
        counts only what the driver has free, so the cache is emptied before measuring again. ComfyUI
        0.3.64 counts that cache as free itself and empties it only after unloading a model whole: where
        part of its T5 sufficed, it unloaded that part and left it cached, and the engine, measuring
        the same shortage, kept its masters in RAM (2026-12-07, a 45 GiB-sized H100)."""
        needed = room_for_masters(self.source.transformer_only, self.options.quantization)
        if (make_room is not None and pipeline is None and self.device.type == "cuda"
                and self.options.offload == "none" and self._free_bytes() <= needed < usable_bytes(self.device)):
            make_room(needed)
            torch.cuda.empty_cache()
        return self._free_bytes(pipeline)

    def _free_bytes(self, pipeline: Any = None) -> int:
        """GPU bytes this engine may count on (0 without a GPU or with offload), measured against
        ``optimize.room_for_masters``: whether the weights are read straight to the GPU and the fused
        strategy's masters stay there (decisions 29 and 64), and against ``AMPLE_ROOM_BYTES`` for the
        compile workers (decision 45). Smaller cards keep the CPU path: read on the CPU, quantised
        layer by layer while moving, masters in CPU RAM.

        A ``pipeline`` handed in (:meth:`from_pipeline`) that already sits on this GPU counts as room:
        its weights are the engine's own (the masters are those very tensors, no copy), so they must
        not count against it. Without this an H100 80GB holding the 31 GiB bf16 pipeline showed 47 GiB
        free and sent the masters to CPU RAM: fused swaps of 0.7 s instead of ~40 ms (2026-12-07)."""
        if self.device.type != "cuda" or self.options.offload != "none":
            return 0
        resident = resident_bytes(self._modules(pipeline), self.device) if pipeline is not None else 0
        return free_bytes(self.device) + resident

    def _first_image_compiles(self) -> bool:
        """Whether the first image will compile block graphs on this GPU: regional compile with saved
        blocks (decision 40) and none saved in the cache folder yet. Then a compile worker (when workers
        are on) starts while the weights are read (decision 46). A cache with saved blocks (of any
        model) starts nothing early."""
        o = self.options
        if self.device.type != "cuda" or o.compile != "regional" or self._compile_cache is None:
            return False
        if precompile.why_not_here(o.dynamic_shapes):
            return False
        return not precompile.has_saved_blocks(precompile.folder_for(self._compile_cache))

    def _read_to_device(self) -> tuple[str, ...]:
        """Components whose files are read straight to the GPU (when it has ample room): all but a
        T5 that bitsandbytes quantises, which it does while moving the CPU weights (``quantize_t5``)."""
        from .loading import DIRECT_COMPONENTS

        return tuple(name for name in DIRECT_COMPONENTS
                     if not (name == "text_encoder_2" and self.options.t5_quantization != "none"))

    def _master_device(self) -> torch.device:
        """Master copies for the fused strategy live on the GPU when it has room (fast swaps),
        otherwise in CPU RAM."""
        return self.device if self._ample_room else torch.device("cpu")

    def _ensure_compiled(self) -> None:
        if self._compiled or self.options.compile == "off":
            return
        with self.phases.phase("compile_setup"):
            self.precompiled = compile_transformer(self.transformer, self.options.compile,
                                                   self.options.dynamic_shapes, self._compile_cache,
                                                   self._background, ahead=self._background_mode == "ahead",
                                                   expected=self._expected)
            self._expected = []
        self._compiled = True

    # -- LoRA ----------------------------------------------------------------------------------
    def _resolve(self, stack: LoraStack, keys: tuple[FileKey, ...]) -> tuple[list[ResolvedEntry], bool, float, float]:
        """The stack's LoRAs (``keys``: their files' current identity), read (or taken from the RAM
        cache) and staged on the device, a LoRA built in memory checked for NaN / infinities there;
        also whether all came from the cache and the milliseconds spent reading and staging."""
        entries = []
        from_cache = True
        read_s = stage_s = 0.0
        for spec, current in zip(stack.active(), keys):
            t0 = time.perf_counter()
            key, lora, hit = self.lora_cache.lookup(spec.path, current)
            t1 = time.perf_counter()
            staged = self.device_loras.stage(key, lora)
            if not lora.values_checked:  # checked once, where staged (decisions 23 and 32)
                try:
                    check_values(staged)
                except LoraFormatError:
                    self.device_loras.drop(key)
                    if not spec.path.startswith(MEMORY_PREFIX):
                        read_lora(spec.path)  # raises naming the file's own tensor key when it holds the bad value
                    raise
                self.lora_cache.mark_checked(key)
            read_s += t1 - t0
            stage_s += time.perf_counter() - t1
            from_cache = from_cache and hit
            entries.append(ResolvedEntry(key, staged, spec.strength))
        return entries, from_cache, read_s * 1000, stage_s * 1000

    def apply(self, stack: LoraStack) -> SwapReport:
        """Make the weights match ``stack``. Raises LoraError (format or fit) with the engine
        unchanged. Applying the loaded stack again costs only a look at its files (a file rewritten
        since it was applied is read and applied again)."""
        with self._lock:
            self._check_usable()
            t0 = time.perf_counter()
            keys = tuple(file_key(spec.path) for spec in stack.active())
            if stack == self.loaded_stack and keys == self._loaded_keys:
                return SwapReport(self.strategy.name, stack.describe(), 0.0, False)
            entries, from_cache, read_ms, stage_ms = self._resolve(stack, keys)
            warnings = self.strategy.validate(entries)
            for w in warnings:
                logger.warning(w)
            try:
                with weight_writes():
                    layers = self.strategy.apply(entries)
            except torch.OutOfMemoryError as exc:  # the strategy already restored the previous stack
                self._free_memory()
                raise out_of_memory("applying the LoRA stack (the previous stack is still active)", exc,
                                    self.options) from exc
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.loaded_stack, self._loaded_keys = stack, keys
            ms = (time.perf_counter() - t0) * 1000
            if "first_lora" not in self.phases.seconds:
                self.phases.add("first_lora", ms / 1000)
            staged = f", to {self.device.type.upper()} {stage_ms:.1f} ms" if self.device.type != "cpu" else ""
            logger.info("LoRA stack %s applied in %.1f ms (read %.1f ms%s; %s, %d layers)",
                        stack.describe(), ms, read_ms, staged, self.strategy.name, layers)
            self.last_swap = SwapReport(self.strategy.name, stack.describe(), ms, True, layers, from_cache,
                                        warnings, read_ms, stage_ms)
            return self.last_swap

    def check(self, stack: LoraStack) -> list[str]:
        """Everything :meth:`apply` would refuse about ``stack``, refused now, without changing any
        weight: each file read (or taken from the RAM cache) and staged, its values checked, its layers
        checked against this engine's model and strategy. Returns the warnings ``apply`` would log. For
        a node that adds a LoRA, so that a bad file is refused there rather than at sampling."""
        with self._lock:
            self._check_usable()
            keys = tuple(file_key(spec.path) for spec in stack.active())
            entries, _, _, _ = self._resolve(stack, keys)
            return self.strategy.validate(entries)

    def prepare_slot(self, lora_paths: Sequence[str] = (), all_layers: bool = False,
                     max_rank: int | None = None) -> dict[str, object]:
        """Adapter strategy: build (or widen) the zero adapter slot to cover the union of these
        LoRAs' targets (or every Flux layer) at ``max_rank``, so later swaps never recompile.
        Fused strategy: nothing to do (no rank or target limit). Raises LoraError for bad files."""
        with self._lock:
            self._check_usable()
            if not self.strategy.uses_slot:
                return {"strategy": self.strategy.name, "changed": False, "targets": 0, "rank": 0}
            rank = max_rank or self.options.max_rank
            targets: set[str] = set()
            if all_layers:
                from .lora.fit import flux_lora_targets

                targets.update(flux_lora_targets(self.transformer))
            for path in lora_paths:
                _, lora = self.lora_cache.get(path)
                self.strategy.check_layer_kinds([lora])
                targets.update(lora.transformer)
                if lora.max_rank > rank:
                    raise LoraFitError(
                        f"{path}: rank {lora.max_rank} is above max_rank {rank}. Raise max_rank."
                    )
            with weight_writes():
                changed = self.strategy.prepare_slot(frozenset(targets), rank)
            if changed:
                # The slot starts empty: re-apply whatever stack was loaded.
                previous, self.loaded_stack, self._loaded_keys = self.loaded_stack, LoraStack(), ()
                if previous.entries:
                    self.apply(previous)
                if self._compiled:
                    logger.warning("adapter slot changed after compilation: the next run recompiles once")
            return {"strategy": self.strategy.name, "changed": changed,
                    "targets": self.strategy.slot_size()[0], "rank": self.strategy.slot_size()[1]}

    # -- generation ----------------------------------------------------------------------------
    def generate(self, request: GenerateRequest, stack: LoraStack | None = None,
                 on_step: StepCallback | None = None,
                 on_preview: PreviewCallback | None = None,
                 check_cancel: Callable[[], None] | None = None) -> GenerateResult:
        """Sample images. ``stack`` (when given) is applied first. ``on_step(step, total)`` runs
        after every step; an exception it raises stops sampling and propagates, leaving the engine
        usable. ``check_cancel()`` runs before every transformer block (``compile`` regional or off;
        between steps only with full) and stops sampling the same way, so Cancel acts within a
        fraction of a step. ``on_preview(step, total, rgb)`` (optional) gets a cheap preview of the first image
        after every step: float32 ``[h, w, 3]`` in 0..1 at latent resolution, from a linear
        latent-to-RGB map fitted once with this engine's VAE. Same request and stack -> same images."""
        request.validate()
        if self.source.transformer_only:
            raise OptionsError(
                "This engine holds the Flux transformer only (no text encoders or VAE), so it cannot "
                "generate by itself. Use its MODEL output with ComfyUI's CLIP, sampler and VAE nodes, or "
                "load the engine with its text encoders and VAE for Generate."
            )
        with self._lock:
            self._check_usable()
            if self._expected and not expected_compile.matches(request):
                self._drop_expected()
            swap = self.apply(stack) if stack is not None else None
            self._ensure_compiled()
            before = dynamo_compile_count()
            t0 = time.perf_counter()

            def callback(pipe, i, t, kwargs):
                if check_cancel is not None:
                    check_cancel()
                if on_step is not None:
                    on_step(i + 1, request.steps)
                if on_preview is not None:
                    on_preview(i + 1, request.steps, self.latent_preview(kwargs["latents"], request))
                return {}

            self._cancel.check = check_cancel
            self._await_first_calls()
            try:
                images = run_pipeline(self.pipe, request, callback)
            except torch.OutOfMemoryError as exc:
                self._free_memory()
                raise out_of_memory(
                    f"generating {request.batch} image(s) at {request.width}x{request.height}", exc, self.options
                ) from exc
            finally:
                self._cancel.check = None
                if self._background is not None:
                    self._background.release_idle()  # workers this image did not need
            seconds = time.perf_counter() - t0
            if "first_image" not in self.phases.seconds:  # compile (when on) + the first image's sampling
                self.phases.add("first_image", seconds)
            new = dynamo_compile_count() - before
            self.compiles += new
            if new:
                logger.info("compiled %d graph(s) during this run (%.1f s including sampling)", new, seconds)
            return GenerateResult(images, seconds, new, swap)

    # -- an outside sampler (ComfyUI's MODEL path) ---------------------------------------------
    def prepare_external(self, stack: LoraStack) -> SwapReport:
        """Get ready for a sampler that calls :meth:`run_transformer` itself: weights back on the
        device, ``stack`` applied (same contract as :meth:`apply`), the transformer compiled."""
        with self._lock:
            self._check_usable()
            swap = self.apply(stack)
            if self._compiled and self._background is not None:
                self._background.release_idle()  # workers the earlier runs did not need
            self._ensure_compiled()
            return swap

    def run_transformer(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                        txt_ids: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """One forward pass of the optimised (compiled) transformer in diffusers' conventions:
        packed latents ``[B, S, C*4]``, ``timestep``/``guidance`` in sigma units (the model scales
        them by 1000). Compilations it triggers are added to :attr:`compiles`; a device OOM becomes
        :class:`EngineOutOfMemoryError` and the engine stays usable."""
        with self._lock:
            self._check_usable()
            before = dynamo_compile_count()
            try:
                out = self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                       pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                       txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
            except torch.OutOfMemoryError as exc:
                self._free_memory()
                raise out_of_memory(f"sampling a batch of {hidden_states.shape[0]}", exc, self.options) from exc
            new = dynamo_compile_count() - before
            if new:
                self.compiles += new
                logger.info("compiled %d graph(s) for input shape %s", new, tuple(hidden_states.shape))
            return out

    # -- previews ------------------------------------------------------------------------------
    def latent_preview(self, latents: torch.Tensor, request: GenerateRequest) -> torch.Tensor:
        """RGB preview ``[h, w, 3]`` (0..1, CPU) of the first image in packed Flux ``latents``."""
        with torch.no_grad():
            factors = self._preview_factors()
            lat = self.pipe._unpack_latents(latents[:1], request.height, request.width,
                                            self.pipe.vae_scale_factor)[0].float()
            rgb = torch.einsum("chw,cr->hwr", lat, factors[:-1].to(lat.device)) + factors[-1].to(lat.device)
            return rgb.clamp(0, 1).cpu()

    def _preview_factors(self) -> torch.Tensor:
        """A ``(C + 1) x 3`` linear map from normalised latents to RGB, fitted by least squares on a
        few smooth random colour images encoded by this engine's own VAE (done once, lazily)."""
        if self._preview_map is None:
            import torch.nn.functional as F

            vae = self.pipe.vae
            g = torch.Generator().manual_seed(0)
            images = F.interpolate(torch.rand(8, 3, 4, 4, generator=g), size=(128, 128), mode="bilinear",
                                   align_corners=False)
            param = next(vae.parameters())
            with torch.inference_mode():
                z = vae.encode((images * 2 - 1).to(param.device, param.dtype)).latent_dist.mean.float().cpu()
            shift = getattr(vae.config, "shift_factor", 0.0) or 0.0
            z = (z - shift) * vae.config.scaling_factor
            target = F.adaptive_avg_pool2d(images, z.shape[-2:])
            x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
            y = target.permute(0, 2, 3, 1).reshape(-1, 3)
            self._preview_map = torch.linalg.lstsq(x, y).solution
        return self._preview_map

    # -- memory --------------------------------------------------------------------------------
    def _await_first_calls(self) -> None:
        """Wait for the encoders' and VAE's first calls made ahead (decision 55): before this engine
        uses, moves or frees those modules itself."""
        calls, self._first_calls = self._first_calls, None
        if calls is not None:
            calls.wait()
            self.first_calls_ahead_s = calls.seconds

    def _check_usable(self) -> None:
        """Call with ``_lock`` held: a ``release()`` that ran while this thread waited for the lock
        is seen here, not as a missing ``pipe`` later."""
        if self.released:
            raise EngineReleasedError("this engine was released; get a new one from the registry")
        if self.offloaded:
            self.reload()

    def memory_bytes(self) -> int:
        """Bytes of weights held (0 once released): the modules' parameters and buffers, and the
        swap strategy's own tensors (the fused masters) where they sit on the engine's device. What
        ComfyUI's memory manager counts as this model's size: on a GPU with room for them the masters
        are as large as the transformer (decision 64). Lock-free: safe to call while generating."""
        pipe = getattr(self, "pipe", None)  # a local reference: release() may run meanwhile
        strategy = getattr(self, "strategy", None)
        if self.released or pipe is None:
            return 0
        held = strategy.held_tensors() if strategy is not None else []
        # a master that is still its layer's weight counts once
        return tensor_bytes([*module_tensors(self._modules(pipe)), *(t for t in held if t.device == self.device)])

    def masters_to_ram(self) -> int:
        """Free GPU memory and keep the engine (ComfyUI's partial unload, decision 65): the swap
        strategy's tensors on the GPU (the fused masters, decision 64) move to system RAM, from where
        later swaps send them in pinned groups (decision 62: ~0.7 s instead of ~45 ms). Returns the
        GPU bytes freed, 0 where none of them sat there. They stay in RAM: moving them back whenever
        memory looks free would pay both moves each time ComfyUI loads its text encoders again."""
        with self._lock:
            if self.released or self.offloaded or self.device.type == "cpu":
                return 0
            before = self.memory_bytes()
            with weight_writes():
                self.strategy.move_held_to_ram()
            freed = before - self.memory_bytes()
            if freed:
                self._free_memory()
                logger.info("moved the masters to system RAM: %.1f GiB of GPU memory freed; swaps now "
                            "send them from there", freed / 2**30)
            return freed

    def offload(self) -> None:
        """Move the weights to CPU RAM (ComfyUI 'unload'); the next use moves them back. Quantised
        engines cannot move and are released instead."""
        with self._lock:
            if self.released or self.offloaded or self.device.type == "cpu":
                return
            self._await_first_calls()
            if self.options.quantization != "none" or self.options.offload != "none":
                self.release()
                return
            self.pipe.to("cpu")
            self.device_loras.clear()
            with weight_writes():
                self.strategy.offload()
            self.offloaded = True
            self._free_memory()

    def reload(self) -> None:
        with self._lock:
            if self.offloaded:
                self.pipe.to(self.device)
                with weight_writes():
                    self.strategy.reload()
                self.offloaded = False

    def release(self) -> None:
        """Free everything this engine holds. It cannot be used afterwards."""
        with self._lock:
            if self.released:
                return
            self._await_first_calls()
            self.released = True
            if self._background is not None:
                self._background.close()
            self.device_loras.clear()
            for attr in ("pipe", "transformer", "strategy"):
                if hasattr(self, attr):
                    delattr(self, attr)
            self._free_memory()
            if self._deterministic_before is not None:
                restore_deterministic(self._deterministic_before)
            logger.info("engine released: %s", self.source.describe())

    @staticmethod
    def _free_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
