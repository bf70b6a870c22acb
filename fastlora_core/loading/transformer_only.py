"""The transformer alone (for ComfyUI's own text encoders and VAE): a ``FluxPipeline`` whose text
encoders, tokenizers and VAE are None, from a diffusers folder or a single transformer file, with
the same checks as the full loaders and nothing else read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModelLoadError
from ..specs import ModelSource
from .diffusers_folder import _dtype_kwarg, _finish, component_plan
from .header import Header, read_header
from .plans import _Plan, _plan_transformer, load_shipped_config
from .single_file import _build, background_reads

if TYPE_CHECKING:  # pragma: no cover
    from .direct import BackgroundReads

logger = logging.getLogger(__name__)


def _load_transformer_only(source: ModelSource, dtype: torch.dtype, device: torch.device | None = None,
                           own_modules: bool = False) -> Any:
    """A FluxPipeline holding only the transformer and a scheduler (text encoders, tokenizers and VAE
    are None): the same checks as the full loaders for the transformer, nothing else is read.
    ``device``: the weights are read straight into that device's memory, starting before diffusers
    is imported (decision 37). ``own_modules``: FastLoRA's own transformer in FastLoRA's sampler
    object (:mod:`.own`) instead."""
    shards: list[Header] = []
    if source.diffusers_dir:
        folder = Path(source.diffusers_dir)
        sub = folder / "transformer"
        if not (sub / "config.json").is_file():
            raise ModelLoadError(f"{folder} has no transformer/config.json, so it is not a diffusers Flux folder. "
                                 "Use the folder of a diffusers Flux model, or a single transformer file.")
        shards = [read_header(f, "transformer weights") for f in sorted(sub.glob("*.safetensors"))]
        plan = component_plan(folder, "transformer", shards)[0] if device is not None or own_modules else None
    else:
        plan = _plan_transformer(read_header(source.transformer or "", "transformer"))
    with background_reads([(plan, shards)] if plan is not None and device is not None else [], device) as reads:
        transformer = _transformer(source, plan, shards, dtype, device, reads, own_modules)
    guidance = bool(transformer.config.guidance_embeds)
    sched_name = "scheduler_dev" if guidance else "scheduler_schnell"
    sched_cfg = {k: v for k, v in load_shipped_config(sched_name).items() if not k.startswith("_")}
    if own_modules:
        from . import own

        runtime = own.pipeline({"transformer": transformer}, None, None, sched_cfg)
        _finish(runtime, keep=("transformer",) if device is not None else ())
        logger.info("loaded the Flux transformer alone with FastLoRA's own module (%s): %s", dtype, source.describe())
        return runtime
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_cfg), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    _finish(pipe, keep=("transformer",) if device is not None else ())
    logger.info("loaded the Flux transformer alone (%s): %s", dtype, source.describe())
    return pipe


def _transformer(source: ModelSource, plan: _Plan | None, shards: list[Header], dtype: torch.dtype,
                 device: torch.device | None, reads: BackgroundReads | None, own_modules: bool = False) -> Any:
    """The transformer module: checked on meta tensors, then built from the (background) reads; a
    diffusers folder without a device loads through ``from_pretrained``."""
    if plan is None:  # a diffusers folder read on the CPU
        from diffusers import FluxTransformer2DModel

        sub = Path(source.diffusers_dir or "") / "transformer"
        try:
            return FluxTransformer2DModel.from_pretrained(str(sub), **_dtype_kwarg(dtype), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - anything diffusers raises on a broken folder
            raise ModelLoadError(f"The transformer in {sub.parent} could not be loaded: {type(e).__name__}: {e}. "
                                 "Check that the download is complete.") from e
    try:
        _build(plan, dtype, dry_run=True, own_modules=own_modules)
        return _build(plan, dtype, dry_run=False, device=device, shards=shards, reads=reads, own_modules=own_modules)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - anything diffusers raises on a broken folder
        raise ModelLoadError(f"The transformer in {plan.header.path} could not be loaded: {type(e).__name__}: {e}. "
                             "Check that the download is complete.") from e
