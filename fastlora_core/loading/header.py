"""safetensors headers, read without touching tensor data, and what a checkpoint looks like.

:func:`read_header` is the first check of every model file (and of diffusers folders' weight
files): it refuses pickles, GGUF, truncated and corrupt files before anything is loaded.
:func:`describe_keys` names what a state dict is (SDXL, a LoRA, Flux.2 ...) for error messages.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..filekind import MAX_HEADER_BYTES, sniff

logger = logging.getLogger(__name__)


ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT_STORAGE = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_FP8_STORAGE = {"F8_E4M3", "F8_E5M2"}


# --------------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header."""

    dtype: str  # safetensors name: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    #: ``data_offsets``: the tensor's bytes, relative to the end of the header (``Header.data_start``).
    offsets: tuple[int, int] = field(default=(0, 0), compare=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensor names, dtypes, shapes and the free-form metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    #: File position of the first tensor byte (8 + the header's length).
    data_start: int = 0

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def storage_dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


def read_header(path: str | os.PathLike[str], role: str = "model") -> Header:
    """Parse and sanity-check the header of a safetensors file without reading any tensor data.

    Checks: the file exists; it is not a pickle (``.ckpt``/``.pt``/``.bin``), zip or GGUF file; the
    8-byte header length and the JSON header are well formed; every tensor's ``data_offsets`` lie
    inside the file, and the file is exactly as long as the header says (a shorter file is a
    truncated download). The header is then also opened with ``safetensors.safe_open`` so that the
    library that will read the weights agrees.

    Raises:
        ModelLoadError: naming the file and ``role``, saying what the file looks like and what to do.
    """
    p = Path(path)
    label = f"{role} file {p}"
    if not p.exists():
        raise ModelLoadError(f"The {label} does not exist. Check the path (and that the download finished).")
    if p.is_dir():
        raise ModelLoadError(f"The {label} is a folder; expected a .safetensors file.")
    size = p.stat().st_size
    if size < 8:
        raise ModelLoadError(f"The {label} is empty or truncated ({size} bytes). Download it again.")
    kind = sniff(p)
    if kind == "gguf":
        raise ModelLoadError(
            f"The {label} is a GGUF (quantised) file. FastLoRA needs the original weights: use the "
            "bf16/fp16 or fp8 .safetensors release of this model."
        )
    if kind in ("pickle", "zip"):
        raise ModelLoadError(
            f"The {label} is a PyTorch pickle (.ckpt/.pt/.bin), not a .safetensors file. Use the "
            ".safetensors release of this model (pickles can run code and are not loaded)."
        )
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise ModelLoadError(
                f"The {label} is not a valid .safetensors file (bad header length). It may be another "
                "format or a truncated download; download it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        tensors: dict[str, TensorInfo] = {}
        end = 0
        for key, entry in header.items():
            start, stop = (int(x) for x in entry["data_offsets"])
            tensors[key] = TensorInfo(str(entry["dtype"]), tuple(int(s) for s in entry["shape"]), (start, stop))
            if not 0 <= start <= stop:
                raise ValueError(f"bad data_offsets for {key}")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"The {label} is not a valid .safetensors file ({e}). Download it again or use another copy."
        ) from e
    expected = 8 + n + end
    if size < expected:
        raise ModelLoadError(
            f"The {label} is truncated: the header describes {expected:,} bytes but the file has "
            f"{size:,}. The download or copy did not finish; download it again."
        )
    if size > expected:
        raise ModelLoadError(
            f"The {label} is corrupt: {size - expected:,} unexpected bytes after the tensor data. "
            "Download it again."
        )
    if not tensors:
        raise ModelLoadError(f"The {label} holds no tensors. Use the real model file.")
    unknown = {t.dtype for t in tensors.values()} - set(ST_DTYPES)
    if unknown:
        raise ModelLoadError(
            f"The {label} stores tensors as {', '.join(sorted(unknown))}, which FastLoRA cannot read. "
            "Use a bf16/fp16/fp32 or float8_e4m3fn release."
        )
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt", device="cpu") as sf:
            if set(sf.keys()) != set(tensors):
                raise ValueError("tensor list differs from header")
    except Exception as e:  # noqa: BLE001 - any failure here means the file cannot be read
        raise ModelLoadError(f"The {label} cannot be read by safetensors ({e}). Download it again.") from e
    return Header(p, tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n)


# --------------------------------------------------------------------------------------------------
# What does a checkpoint look like?
# --------------------------------------------------------------------------------------------------

_QUANT_MARKERS = (".absmax", "quant_map", "quant_state", "bitsandbytes", ".SCB", ".qweight", ".qzeros",
                  ".nested_absmax", ".comfy_quant", "weight_packed")


def describe_keys(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> str:
    """A short human description of what a state dict looks like (for error messages)."""
    ks = list(keys)
    has = lambda s: any(s in k for k in ks)  # noqa: E731
    if any(m in k for k in ks for m in _QUANT_MARKERS):
        return "a quantised checkpoint (bitsandbytes NF4/int8, GPTQ/AWQ or ComfyUI mixed quantisation)"
    if has("lora_down") or has("lora_A") or has("lora_up") or has(".lora."):
        return "a LoRA (use it with the FastLoRA LoRA node, not as a model)"
    if has("conditioner.embedders"):
        return "an SDXL checkpoint"
    if has("cond_stage_model.") or (has("input_blocks.") and has("output_blocks.")):
        return "a Stable Diffusion 1.x/2.x (or SDXL UNet) checkpoint"
    if has("joint_blocks."):
        return "a Stable Diffusion 3 / 3.5 checkpoint (MMDiT)"
    if has("distilled_guidance_layer"):
        return "a Chroma checkpoint"
    if has("double_stream_modulation") or has("single_stream_modulation"):
        return "a Flux.2 checkpoint"
    if has("double_blocks.") and has("single_blocks."):
        return "a Flux transformer (BFL layout)"
    if has("single_transformer_blocks.") and has("transformer_blocks."):
        return "a Flux transformer (diffusers layout)"
    if has("down_blocks.") and has("time_embedding"):
        return "a diffusers UNet"
    if has("text_model.encoder.layers."):
        width = None
        if shapes:
            for k, s in shapes.items():
                if k.endswith("text_model.embeddings.token_embedding.weight"):
                    width = s[-1]
        kind = {768: "CLIP-L", 1280: "CLIP-G (OpenCLIP bigG)", 1024: "OpenCLIP-H"}.get(width or 0, "CLIP")
        return f"a {kind} text encoder" + (f" (hidden size {width})" if width else "")
    if has("encoder.block.0.layer.0.SelfAttention"):
        return "a T5 text encoder"
    if has("encoder.down.") and has("decoder.up."):
        return "an autoencoder (VAE, LDM layout)"
    if has("encoder.down_blocks.") and has("decoder.up_blocks."):
        return "an autoencoder (VAE, diffusers layout)"
    if has("model.layers.") or has("layers.0.self_attn"):
        return "a language model"
    sample = ", ".join(sorted(ks)[:3])
    return f"an unrecognised checkpoint (keys like {sample})"


def _describe(header: Header) -> str:
    return describe_keys(header.tensors, {k: v.shape for k, v in header.tensors.items()})


def _quantised(header: Header, role: str) -> None:
    keys = header.tensors
    if any(m in k for k in keys for m in _QUANT_MARKERS) or (
        {"I8", "U8"} & header.storage_dtypes()
        and any(v.dtype in ("I8", "U8") and len(v.shape) >= 1 and k.endswith("weight") for k, v in keys.items())
    ):
        raise ModelLoadError(
            f"The {role} file {header.path} is {describe_keys(keys)}. FastLoRA quantises the model itself "
            "(EngineOptions.quantization / t5_quantization); use the original bf16/fp16 or fp8 .safetensors "
            "release of this model."
        )



