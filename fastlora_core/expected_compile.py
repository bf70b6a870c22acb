"""Compile the expected first request's block graphs while the weights are read (decision 47).

With an empty compile cache a process's first image waits for the two Flux block classes to compile:
with decision 45 the serving process compiles the double blocks while a worker compiles the single
ones, but both start only when the first image reaches its first block, after the weights have been
read, quantised and the first LoRA applied (about 9 of a 22.9 s cold start on the H200). What a
compile needs is known much earlier: the block classes' structure follows from the transformer's
``config.json`` and the engine's options, and the blocks' inputs from the request's size.

So when the first image will certainly compile (decision 46's test), the engine hands each block class
to a worker of its own before it reads a weight (:meth:`.BackgroundCompiler.expect`); the registry
starts those workers before its checks (:func:`workers_before_checks`). Each worker
builds a *specimen*, a transformer of the same config with one block of each class and random
weights, prepared by the engine's own steps (:func:`specimen`), runs it once on the inputs of the
expected request (:data:`EXPECTED`, the defaults of ``Generate``, the CLI and the API: 1024x1024, 512
text tokens, batch 1) to record what each block class receives (:func:`block_inputs`), announces the
file name that graph will have, compiles and saves it. The serving process's blocks look for exactly
that name (:mod:`.precompile`): a first request of that size then loads graphs the workers compiled
during the reads, and a first request of any other size (or a block that prepares differently from
the specimen: a different name) cancels the workers and compiles as decision 45 does. Every image is
compiled, so decision 17's promise holds as with decision 45.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .specs import EngineOptions, GenerateRequest, ModelSource
from .timings import Phases

if TYPE_CHECKING:
    from .background_compile import BackgroundCompiler
    from .runtime.flux import FluxTransformer

logger = logging.getLogger(__name__)

#: The request a process most likely serves first: ``Generate``'s, the CLI's and the API's defaults.
EXPECTED = GenerateRequest()

#: Flux's autoencoder halves the image three times; used where the VAE's own config is not at hand.
FLUX_VAE_SCALE_FACTOR = 8


def why_not(options: EngineOptions, source: ModelSource) -> str:
    """Why the expected request's graphs cannot be compiled ahead for this engine ("" when they can):
    the specimen reproduces the fused strategy's blocks (the adapter strategy replaces layers with
    LoRA layers sized by the first stack) of an engine that generates images itself (a
    transformer-only engine serves ComfyUI's sampler, whose sizes are its own)."""
    if options.swap_strategy != "fused":
        return f"swap_strategy={options.swap_strategy} (its LoRA layers are made by the first stack)"
    if options.offload != "none":
        return f"offload={options.offload}"
    if source.transformer_only:
        return "a transformer-only engine (ComfyUI's sampler chooses the sizes)"
    return ""


def matches(request: GenerateRequest) -> bool:
    """Whether ``request``'s blocks get the expected request's inputs (its size, batch and text
    length; the prompt, seed, steps and guidance change values, not shapes)."""
    return ((request.width, request.height, request.batch, request.max_sequence_length)
            == (EXPECTED.width, EXPECTED.height, EXPECTED.batch, EXPECTED.max_sequence_length))


def workers_before_checks(source: ModelSource, options: EngineOptions) -> BackgroundCompiler | None:
    """The compile workers (one per block class), started before the registry's dependency and device
    checks (1.6-2.0 s of a cold start, torchao's import mostly) when what decides on them can be told
    without those checks: regional compile with saved blocks and an empty cache folder, workers compiling ahead, the
    fused strategy without offload, and a CUDA GPU whose memory could have ample room. The engine
    takes them (``FluxEngine(workers=...)``) and closes them when its own, exact checks disagree;
    None otherwise."""
    from . import background_compile, precompile
    from .optimize import AMPLE_ROOM_BYTES, configure_compile_cache

    if (options.compile != "regional" or options.deterministic or options.dynamic_shapes
            or why_not(options, source) or options.device not in ("auto", "cuda")
            or background_compile.mode(ample_room=True) != "ahead" or precompile.why_not_here(dynamic=False)
            or not torch.cuda.is_available()):
        return None
    # the engine's compile cache, set now: the workers inherit inductor's cache folder from this
    # process's environment when they start, and would otherwise compile into torch's default one
    if precompile.has_saved_blocks(precompile.folder_for(configure_compile_cache(options))):
        return None
    device = torch.device("cuda")
    if torch.cuda.get_device_properties(device).total_memory <= AMPLE_ROOM_BYTES:
        return None
    from .runtime.flux import FluxTransformer

    workers = background_compile.BackgroundCompiler(device)
    workers.start(count=len(FluxTransformer._repeated_blocks))  # one per block class
    return workers


def model_shapes(source: ModelSource) -> tuple[dict[str, Any], int] | None:
    """The transformer's config and the VAE's scale factor, from the source's small files and
    without reading a weight; None when they cannot be read (the loader then says why)."""
    from .loading.header import read_header
    from .loading.plans import _plan_transformer

    try:
        if source.diffusers_dir:
            folder = Path(source.diffusers_dir)
            config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
            vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
            return dict(config), 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        plan = _plan_transformer(read_header(source.transformer or "", "transformer"))
        return dict(plan.config), FLUX_VAE_SCALE_FACTOR
    except Exception as exc:  # the loader reports a bad source properly
        logger.info("no compile ahead of the first request: the model's config cannot be read (%s: %s)",
                    type(exc).__name__, exc)
        return None


def specimen(config: Mapping[str, Any], options: EngineOptions, dtype: torch.dtype,
             device: torch.device, phases: Phases | None = None) -> FluxTransformer:
    """A transformer of ``config`` with one block of each class and random weights, prepared as the
    engine prepares the real one: quantised, its attention and fp8 projection set, its block lists
    checked for cancels, its single blocks handing over contiguous outputs, and its blocks as the
    saved-block dispatch leaves them. They then fingerprint as the real ones do
    (:func:`.block_keys.fingerprint`). ``phases``, where given, records each part's seconds (``build``,
    ``quantise``, ``finish``: a worker reports them with its announcement)."""
    from . import cancel
    from .background_compile import _fill
    from .optimize import finish_transformer, hand_over_contiguous, quantize_transformer
    from .precompile import make_picklable, repeated_blocks
    from .runtime.flux import FluxTransformer

    phases = phases or Phases()
    with phases.phase("build"):
        with torch.device("meta"):
            transformer = FluxTransformer.from_config({**config, "num_layers": 1, "num_single_layers": 1})
        transformer = transformer.to_empty(device=device).to(dtype).eval().requires_grad_(False)
        with torch.no_grad():
            for tensor in transformer.parameters():
                _fill(tensor)
    with phases.phase("quantise"):
        quantize_transformer(transformer, options.quantization, device)
    with phases.phase("finish"):
        # the fp8 projection's kernel check (a Triton build on a cold start) is left to the serving
        # process: its answer only decides whether the blocks fingerprint with the slot set
        finish_transformer(transformer, options, device, cancel.CheckHolder(), check_kernels=False)
        hand_over_contiguous(transformer)
        for block in repeated_blocks(transformer):
            make_picklable(block)  # as installing the saved-block dispatch leaves the real blocks
    return transformer


def step_inputs(transformer: FluxTransformer, request: GenerateRequest, vae_scale_factor: int,
                dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The transformer's inputs in the first step of ``request``, made by the sampler's own functions
    (:mod:`.runtime.pipeline`; values aside): text embeddings and CLIP's pooled output in the text
    encoders' dtype (``dtype``), packed latents and their positions, the schedule's first timestep."""
    from .runtime.pipeline import (
        FlowMatchEuler,
        guidance_input,
        prepare_latents,
        text_positions,
        transformer_inputs,
    )

    config = transformer.config
    batch, text = request.batch, request.max_sequence_length
    latents, image_ids = prepare_latents(batch, config.in_channels // 4, request.height, request.width,
                                         vae_scale_factor, dtype, device, None)
    timesteps, _ = FlowMatchEuler().schedule(request.steps, latents.shape[1], device)
    pooled = torch.zeros(batch, config.pooled_projection_dim, device=device, dtype=dtype)
    embeds = torch.zeros(batch, text, config.joint_attention_dim, device=device, dtype=dtype)
    return transformer_inputs(latents, timesteps[0], guidance_input(config, request.guidance, batch, device),
                              pooled, embeds, text_positions(text, device, dtype), image_ids)


class _AllSeen(Exception):
    """Raised by :func:`block_inputs`' hook once every block class's inputs are recorded."""


def block_inputs(transformer: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, tuple[tuple, dict]]:
    """What each block class's first block receives when ``transformer`` runs on ``inputs``, by class
    name (a forward under inference mode, as the engine samples, stopped as soon as the last class's
    first block is about to run: what follows it is not needed, and on a cold start it is on the
    critical path of decision 47's announcement)."""
    from .precompile import repeated_blocks

    blocks = repeated_blocks(transformer)
    classes = {type(block).__name__ for block in blocks}
    seen: dict[str, tuple[tuple, dict]] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault(type(module).__name__, (args, kwargs))
        if seen.keys() >= classes:
            raise _AllSeen

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        with torch.inference_mode():
            transformer(**inputs)
    except _AllSeen:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen
