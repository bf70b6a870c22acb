"""FastLoRA's own Flux modules (:mod:`fastlora_core.runtime`) in the loaders, in place of diffusers'
and transformers' classes (decision 39).

The loaders' plans, checks and reads are the same for both kinds of module (same state-dict keys and
shapes); what differs is which class a plan builds (:func:`factory`), how the tokenizers and the
scheduler are made, and the pipeline object around them (:func:`pipeline`). Everything here imports
torch, the ``tokenizers`` library and our own code only; transformers is imported only for a
tokenizer folder the own loaders cannot read (a T5 with ``spiece.model`` alone).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from ..runtime.pipeline import FlowMatchEuler, FluxRuntimePipeline, Tokenizer, unsupported_scheduler
from .plans import _Plan

logger = logging.getLogger(__name__)


def factory(plan: _Plan) -> Callable[[], torch.nn.Module]:
    """A constructor of the own module for ``plan``'s role, from its config."""
    if plan.role == "transformer":
        from ..runtime.flux import FluxTransformer

        return lambda: FluxTransformer.from_config(plan.config)
    if plan.role == "vae":
        from ..runtime.vae import FluxVAE

        return lambda: FluxVAE.from_config(plan.config)
    if plan.role == "clip_l":
        from ..runtime.clip import CLIPTextEncoder

        return lambda: CLIPTextEncoder.from_config(plan.config)
    from ..runtime.t5 import T5Encoder

    return lambda: T5Encoder.from_config(plan.config)


def empty(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The module with its parameters on the meta device (the own modules hold no buffers)."""
    with torch.device("meta"):
        return build()


class TransformersTokenizer:
    """A transformers tokenizer behind the runtime's tokenizer interface (the fallback for folders
    the own loaders cannot read)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.model_max_length = int(tok.model_max_length)

    def __len__(self) -> int:
        return len(self.tok)

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        return self.tok(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids


def tokenizers(clip_dir: Path, t5_dir: Path, clip_max_len: int) -> tuple[Tokenizer, Tokenizer]:
    """The CLIP and T5 tokenizers of two folders, read by :mod:`fastlora_core.runtime.tokenize`, or
    by transformers for a folder those loaders do not read (logged)."""
    from ..runtime.tokenize import TokenizerFilesError, load_clip_tokenizer, load_t5_tokenizer

    try:
        clip: Tokenizer = load_clip_tokenizer(clip_dir, clip_max_len)
        t5: Tokenizer = load_t5_tokenizer(t5_dir)
        return clip, t5
    except TokenizerFilesError as e:
        logger.info("tokenizers through transformers: %s", e)
    from .tokenizers import _load_tokenizers

    clip_tok, t5_tok = _load_tokenizers(clip_dir, t5_dir, clip_max_len)
    return TransformersTokenizer(clip_tok), TransformersTokenizer(t5_tok)


def folder_scheduler_config(folder: Path) -> dict[str, Any]:
    """A diffusers folder's ``scheduler/scheduler_config.json``."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} cannot be read ({e}). Download the model again.") from e


def why_not_folder(folder: Path) -> str | None:
    """Why a diffusers folder needs diffusers' own pipeline (a scheduler variant the own sampler does
    not implement), or None."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{path} cannot be read"
    why = unsupported_scheduler(config)
    return f"its {why}" if why else None


def pipeline(modules: Mapping[str, torch.nn.Module | None], clip_tok: Tokenizer | None, t5_tok: Tokenizer | None,
             scheduler_config: Mapping[str, Any]) -> FluxRuntimePipeline:
    """The sampler over the built modules (keys: ``transformer``, ``text_encoder``,
    ``text_encoder_2``, ``vae``; missing ones are None, as in a transformer-only load)."""
    return FluxRuntimePipeline(transformer=modules["transformer"], text_encoder=modules.get("text_encoder"),
                               text_encoder_2=modules.get("text_encoder_2"), tokenizer=clip_tok,
                               tokenizer_2=t5_tok, vae=modules.get("vae"),
                               scheduler=FlowMatchEuler.from_config(scheduler_config))
