"""A diffusers Flux folder -> ``FluxPipeline``, after checking that it is a complete text-to-image
Flux.1 folder with safetensors weights (every header is read first)."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModelLoadError
from .header import Header, TensorInfo, read_header
from .plans import COMPONENT_OF, Role, _Plan

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import FluxPipeline

    from .direct import BackgroundReads

logger = logging.getLogger(__name__)


# -- diffusers folders ------------------------------------------------------------------------------

_FLUX_VARIANT_PIPELINES = {
    "FluxFillPipeline": "Flux.1 Fill (inpainting)",
    "FluxControlPipeline": "Flux.1 Canny/Depth (control)",
    "FluxKontextPipeline": "Flux.1 Kontext (image editing)",
    "FluxPriorReduxPipeline": "Flux.1 Redux",
    "FluxControlNetPipeline": "a Flux ControlNet pipeline",
}
_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler", "tokenizer", "tokenizer_2")


def _load_diffusers(folder: Path, dtype: torch.dtype, device: torch.device | None = None,
                    on_device: Collection[str] = (), own_modules: bool = False) -> Any:
    """``device``: the weights of the components in ``on_device`` are read straight into that
    device's memory; the others load on the CPU with ``from_pretrained``. ``own_modules``: FastLoRA's
    own modules, tokenizers and sampler (:mod:`.own`) instead of diffusers' pipeline, unless the folder
    needs diffusers' (a scheduler variant; logged)."""
    if not folder.exists():
        raise ModelLoadError(f"The diffusers folder {folder} does not exist. Check the path (ComfyUI: models/diffusers/<name>).")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file, not a diffusers folder. For a single .safetensors checkpoint use "
                             "the single-file loader (transformer, clip_l, t5xxl, vae).")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder. Use the "
                             "folder of a diffusers Flux model (e.g. a download of FLUX.1-dev), or load single files.")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        cls = str(index.get("_class_name", ""))
    except (ValueError, AttributeError) as e:
        raise ModelLoadError(f"{index_path} is not valid JSON ({e}). Restore the file.") from e
    if cls in _FLUX_VARIANT_PIPELINES:
        raise ModelLoadError(f"{folder} is {_FLUX_VARIANT_PIPELINES[cls]} ({cls}). FastLoRA runs text-to-image "
                             "Flux.1 dev/schnell and their fine-tunes; use such a model.")
    if cls != "FluxPipeline":
        raise ModelLoadError(f"{folder} holds a {cls or 'unknown'} pipeline, not Flux.1 (FluxPipeline). Use a Flux.1 "
                             "dev/schnell diffusers folder.")
    missing = [c for c in _COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} is missing the component folder(s) {', '.join(missing)}. The download is "
                             "incomplete; download the model again.")
    tcfg_path = folder / "transformer" / "config.json"
    try:
        tcfg = json.loads(tcfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{tcfg_path} cannot be read ({e}). Download the model again.") from e
    if tcfg.get("quantization_config"):
        raise ModelLoadError(f"{folder} holds a pre-quantised transformer ({tcfg['quantization_config'].get('quant_method', '?')}). "
                             "FastLoRA quantises the model itself; use the original bf16 weights.")
    in_ch, out_ch = tcfg.get("in_channels", 64), tcfg.get("out_channels")
    if out_ch is not None and out_ch != in_ch:
        raise ModelLoadError(f"{folder} is a Flux variant with {in_ch} input and {out_ch} output channels (Fill/Canny/"
                             "Depth). FastLoRA runs text-to-image Flux.1 dev/schnell; use such a model.")
    headers: dict[str, list[Header]] = {}
    for comp in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        files = sorted((folder / comp).glob("*.safetensors"))
        if not files and not any((folder / comp).glob("*.bin")):
            raise ModelLoadError(f"{folder / comp} has no weights (.safetensors). The download is incomplete; "
                                 "download the model again.")
        headers[comp] = [read_header(f, f"{comp} weights") for f in files]
    from .single_file import background_reads

    if own_modules:
        from . import own

        why = own.why_not_folder(folder)
        if why is not None:
            logger.info("%s loads through diffusers' pipeline: %s", folder, why)
            own_modules = False
    direct = [name for name in DIRECT_COMPONENTS if name in on_device] if device is not None else []
    if own_modules:
        plans = {name: component_plan(folder, name, headers[name]) for name in DIRECT_COMPONENTS}
        with background_reads([plans[name] for name in direct], device) as reads:
            return _own_pipeline(folder, dtype, device, plans, direct, reads)
    plans = {name: component_plan(folder, name, headers[name]) for name in direct}
    # The weights start arriving now, while diffusers is imported and the modules are checked and
    # built (decision 37); a failure below stops the reads and drops what they read.
    with background_reads(list(plans.values()), device) as reads:
        return _diffusers_pipeline(folder, dtype, device, plans, direct, reads)


def _diffusers_pipeline(folder: Path, dtype: torch.dtype, device: torch.device | None,
                        plans: dict[str, tuple[_Plan, list[Header]]], direct: list[str],
                        reads: BackgroundReads | None) -> FluxPipeline:
    """The rest of :func:`_load_diffusers` once the headers are read (the reads may be under way)."""
    from diffusers import FluxPipeline

    from .single_file import _build

    for plan, _ in plans.values():  # dry run on meta tensors
        _build(plan, dtype, dry_run=True)
    # Built first and handed to from_pretrained, so the pipeline derives what it derives from them
    # (the VAE's scale factor and image processor) exactly as when it loads them itself.
    modules = {name: _build(plan, dtype, dry_run=False, device=device, shards=shards, reads=reads)
               for name, (plan, shards) in plans.items()}
    try:
        pipe = FluxPipeline.from_pretrained(str(folder), **_dtype_kwarg(dtype), **modules, local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - anything diffusers/transformers raise on a broken folder
        raise ModelLoadError(f"The diffusers folder {folder} could not be loaded: {type(e).__name__}: {e}. Check that "
                             "the download is complete and matches FLUX.1-dev's layout.") from e
    _finish(pipe, keep=direct)
    logger.info("loaded diffusers Flux pipeline from %s (%s)", folder, dtype)
    return pipe


def _own_pipeline(folder: Path, dtype: torch.dtype, device: torch.device | None,
                  plans: dict[str, tuple[_Plan, list[Header]]], direct: list[str],
                  reads: BackgroundReads | None) -> Any:
    """:func:`_diffusers_pipeline` with FastLoRA's own modules: every component through its plan
    (``direct`` ones from the reads under way, the others from their files on the CPU), the folder's
    tokenizers and scheduler config."""
    from . import own
    from .single_file import _build

    for plan, _ in plans.values():  # dry run on meta tensors
        _build(plan, dtype, dry_run=True, own_modules=True)
    clip_tok, t5_tok = own.tokenizers(folder / "tokenizer", folder / "tokenizer_2",
                                      int(plans["text_encoder"][0].config.get("max_position_embeddings", 77)))
    modules = {name: _build(plan, dtype, dry_run=False, device=device if name in direct else None, shards=shards,
                            reads=reads if name in direct else None, own_modules=True)
               for name, (plan, shards) in plans.items()}
    pipe = own.pipeline(modules, clip_tok, t5_tok, own.folder_scheduler_config(folder))
    _finish(pipe, keep=direct)
    logger.info("loaded Flux from the diffusers folder %s with FastLoRA's own modules (%s)", folder, dtype)
    return pipe


#: Components the direct read can load from a diffusers folder. Each goes through the single-file
#: loader's plan under this role (its rules for ties, float32 layers and key checks), in the
#: diffusers layout, with the folder's own config.json.
DIRECT_COMPONENTS = tuple(COMPONENT_OF.values())
_ROLE_OF: dict[str, Role] = {component: role for role, component in COMPONENT_OF.items()}


def component_plan(folder: Path, name: str, shards: list[Header] | None = None) -> tuple[_Plan, list[Header]]:
    """The single-file loader's plan for one component of a diffusers folder: its config.json, the
    union of its shards' headers (``header.path`` is the component folder), and the shards.
    ``shards``: their headers when the caller already checked them (``read_header``); read here
    otherwise."""
    sub = folder / name
    if shards is None:
        shards = [read_header(f, f"{name} weights") for f in sorted(sub.glob("*.safetensors"))]
    if not shards:
        raise ModelLoadError(f"{sub} has no .safetensors weights. Download the model again.")
    tensors: dict[str, TensorInfo] = {}
    for h in shards:
        twice = sorted(set(h.tensors) & set(tensors))
        if twice:
            raise ModelLoadError(f"{sub} holds {twice[0]} in more than one .safetensors file. Remove the stray file "
                                 "or download the model again.")
        tensors.update(h.tensors)
    try:
        config = json.loads((sub / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{sub / 'config.json'} cannot be read ({e}). Download the model again.") from e
    return _Plan(role=_ROLE_OF[name], header=Header(sub, tensors), config=config, layout="diffusers"), shards


#: The first diffusers release whose ``from_pretrained`` takes ``dtype=`` (and deprecates ``torch_dtype=``).
DTYPE_KEYWORD_SINCE = (0, 42)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword for the installed diffusers, from its version number."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= DTYPE_KEYWORD_SINCE else {"torch_dtype": dtype}


def _finish(pipe: Any, keep: Collection[str] = ()) -> None:
    """Every loaded module on the CPU, in eval mode, without gradients; the components in ``keep``
    stay where they were read to (``direct.read_tensors``)."""
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            if name not in keep:
                module.to("cpu")
            module.eval().requires_grad_(False)




