"""Model sources -> a Flux pipeline: FastLoRA's own (``runtime.pipeline.FluxRuntimePipeline``, decision
39) or ``diffusers.FluxPipeline`` (docs/ARCHITECTURE.md, decision 10).

Two kinds of source (:class:`~fastlora_core.specs.ModelSource`):

* a diffusers folder (``model_index.json`` + component subfolders), loaded with
  ``FluxPipeline.from_pretrained(..., local_files_only=True)``;
* the single files ComfyUI users have: a Flux transformer checkpoint (BFL key layout as in
  ``flux1-dev.safetensors``, optionally under ``model.diffusion_model.``, or diffusers layout),
  ``clip_l.safetensors``, ``t5xxl_*.safetensors`` and ``ae.safetensors``, plus tokenizers.

Single files carry no configuration, so every width and layer count is derived from tensor shapes;
what shapes cannot tell (attention heads of CLIP, rope axes for head dims other than 128, VAE
scaling) comes from the shipped configs in ``fastlora_core/configs/`` (the public Flux.1 release)
or, for files we wrote ourselves (tiny test models), from ``fastlora.*`` entries of the safetensors
``__metadata__``. No hub is ever contacted.

Validate before you build: :func:`load_pipeline` first reads the four safetensors headers (cheap: a
few KB each), checks that every file is complete, recognises what each file is, derives every
config, checks that the components fit each other, finds and loads the tokenizers, and converts the
*header* shapes (meta tensors) through the same key mapping used for the real weights, comparing
the result with the target modules' state dicts. Only then is a module built from the weights. Every
problem raises :class:`~fastlora_core.errors.ModelLoadError` naming the file and saying what to do.
Weights read straight to a device start arriving as soon as the headers and plans are known, on a
thread of their own, while the rest of these checks run (decision 37); a refusal stops those reads and
drops what they read, so a refused model leaves nothing behind either way.

:func:`write_single_files` is the inverse, used by tests and install smoke tests: it writes a
pipeline as ComfyUI-style single files with its own, independent key mapping (diffusers -> BFL /
LDM), optionally storing T5 or the transformer as float8 (``scaled_fp8`` too).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import OptionsError
from ..specs import ModelSource
from .diffusers_folder import DIRECT_COMPONENTS, _load_diffusers
from .header import Header, TensorInfo, describe_keys, read_header
from .plans import CONFIG_DIR, META_AXES, META_COMPONENT, META_CONFIG, load_shipped_config
from .single_file import _load_single_files
from .tokenizers import find_tokenizer_dirs
from .transformer_only import _load_transformer_only
from .writer import _diffusers_to_bfl as diffusers_to_bfl
from .writer import write_single_files, write_t5_file

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import FluxPipeline

__all__ = [
    "CONFIG_DIR", "DIRECT_COMPONENTS", "META_AXES", "META_COMPONENT", "META_CONFIG", "SUPPORTED_DTYPES", "Header", "TensorInfo",
    "describe_keys", "diffusers_to_bfl", "find_tokenizer_dirs", "load_pipeline", "load_shipped_config", "read_header",
    "write_single_files", "write_t5_file",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load_pipeline(source: ModelSource, dtype: torch.dtype, device: torch.device | None = None,
                  on_device: Collection[str] = DIRECT_COMPONENTS, own_modules: bool = False) -> FluxPipeline:
    """Load a Flux pipeline from a diffusers folder or from ComfyUI single files.

    Contract:
        Returns a ``diffusers.FluxPipeline`` (or, with ``own_modules``, FastLoRA's pipeline) on CPU, every module in eval mode with
        ``requires_grad=False``. Weights are in ``dtype`` (float32, float16 or bfloat16) whatever
        their storage dtype (fp32/fp16/bf16/float8_e4m3fn, ComfyUI ``scaled_fp8`` included); like
        ``from_pretrained``, T5's ``wo`` layers stay float32 when ``dtype`` is float16. Both source
        kinds give identical modules for identical weights. With ``device``, the files of the
        components named in ``on_device`` (``transformer``, ``text_encoder``, ``text_encoder_2``,
        ``vae``) go straight into that device's memory and are cast and converted there
        (:mod:`.direct`; decision 29): the same weights, bitwise, without a CPU copy; the other
        components stay on the CPU. The function keeps no state: a failure
        leaves nothing behind and the next call starts afresh. ``own_modules``: FastLoRA's own
        modules, tokenizers and sampler (:mod:`fastlora_core.runtime`, decision 39) in a
        :class:`~fastlora_core.runtime.pipeline.FluxRuntimePipeline` with the same attributes, the
        same state-dict keys and, for the same weights, the same images; without diffusers' and
        transformers' imports. A diffusers folder whose scheduler the own sampler does not implement
        loads through diffusers (logged).

    Failure modes (all :class:`ModelLoadError`, raised before any weight is read unless noted):
        missing file or folder; folder without ``model_index.json``; a pipeline that is not Flux.1
        text-to-image (Fill, Canny/Depth, Kontext, SDXL...); a file that is not safetensors (pickle,
        GGUF, random bytes), truncated or corrupt; a checkpoint that is another model (SDXL, SD3,
        Chroma, Flux.2, a LoRA), a Flux variant we cannot run, or quantised (NF4/int8/GGUF); clip_l
        and t5xxl swapped; a VAE that is not the 16-channel Flux autoencoder; components that do not
        fit each other; no tokenizers. Errors while reading weights (I/O) are also ModelLoadError.
        An unsupported ``dtype`` raises :class:`OptionsError`.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise OptionsError(f"dtype={dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32.")
    if source.transformer_only:
        return _load_transformer_only(source, dtype, device if "transformer" in on_device else None, own_modules)
    if source.kind == "diffusers":
        assert source.diffusers_dir is not None
        return _load_diffusers(Path(source.diffusers_dir), dtype, device, on_device, own_modules)
    return _load_single_files(source, dtype, device, on_device, own_modules)

