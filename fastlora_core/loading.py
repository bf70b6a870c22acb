"""Model sources -> ``diffusers.FluxPipeline`` on CPU (ARCHITECTURE.md, decision 10).

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
the result with the target modules' state dicts. Only then is a single weight read. Every problem
raises :class:`~fastlora_core.errors.ModelLoadError` naming the file and saying what to do.

:func:`write_single_files` is the inverse, used by tests and install smoke tests: it writes a
pipeline as ComfyUI-style single files with its own, independent key mapping (diffusers -> BFL /
LDM), optionally storing T5 or the transformer as float8 (``scaled_fp8`` too).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import ModelLoadError, OptionsError
from .filekind import MAX_HEADER_BYTES, sniff
from .specs import ModelSource

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import FluxPipeline

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: safetensors ``__metadata__`` keys written by :func:`write_single_files` and read back here.
META_COMPONENT = "fastlora.component"
META_CONFIG = "fastlora.config"
META_AXES = "fastlora.axes_dims_rope"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_ST_DTYPES: dict[str, torch.dtype] = {
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

Role = Literal["transformer", "clip_l", "t5xxl", "vae"]
_ROLE_HELP: dict[str, str] = {
    "transformer": "a Flux.1 transformer checkpoint such as flux1-dev.safetensors (ComfyUI models/diffusion_models/ or models/unet/)",
    "clip_l": "clip_l.safetensors (ComfyUI models/text_encoders/ or models/clip/)",
    "t5xxl": "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (ComfyUI models/text_encoders/)",
    "vae": "the Flux autoencoder ae.safetensors (ComfyUI models/vae/)",
}


def load_shipped_config(name: str) -> dict[str, Any]:
    """A shipped config from ``fastlora_core/configs/<name>.json`` (a fresh dict each call)."""
    return dict(_read_shipped_config(name))


@cache
def _read_shipped_config(name: str) -> dict[str, Any]:
    with open(CONFIG_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header."""

    dtype: str  # safetensors name: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _ST_DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensor names, dtypes, shapes and the free-form metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

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
            tensors[key] = TensorInfo(str(entry["dtype"]), tuple(int(s) for s in entry["shape"]))
            if not 0 <= start <= stop:
                raise ValueError(f"bad data_offsets for {key}")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"The {label} is not a valid .safetensors file ({e}). Download it again or use another copy."
        ) from None
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
    unknown = {t.dtype for t in tensors.values()} - set(_ST_DTYPES)
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
        raise ModelLoadError(f"The {label} cannot be read by safetensors ({e}). Download it again.") from None
    return Header(p, tensors, {str(k): str(v) for k, v in metadata.items()})


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


# --------------------------------------------------------------------------------------------------
# Key mappings. BFL (original Flux) <-> diffusers, LDM autoencoder <-> diffusers.
# Loading uses _bfl_to_diffusers / _ldm_vae_to_diffusers; writing uses the hand-written inverse
# functions further down. tests/test_loading.py checks the loading direction against diffusers' own
# converters and the writing direction by round trips.
# --------------------------------------------------------------------------------------------------

_BFL_GLOBAL = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_BFL_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_BFL_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_BFL_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_BFL_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}

_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")


def _bfl_to_diffusers(sd: dict[str, torch.Tensor], inner_dim: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename/split a BFL Flux state dict (prefix already removed) into diffusers names.

    ``qkv`` weights are split in three equal row blocks, ``linear1`` of single blocks into
    ``inner_dim`` x3 + the MLP rows, and the final adaLN's (shift, scale) halves are swapped to
    diffusers' (scale, shift). Works on meta tensors too (dry run). Returns the converted dict and
    the keys it did not recognise.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        m = _BLOCK_RE.match(key)
        if m is None:
            base, _, suffix = key.rpartition(".")
            if base in _BFL_GLOBAL and suffix in ("weight", "bias"):
                out[f"{_BFL_GLOBAL[base]}.{suffix}"] = t
            elif base == "final_layer.adaLN_modulation.1" and suffix in ("weight", "bias"):
                shift, scale = t.chunk(2, dim=0)
                out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift], dim=0)
            else:
                unknown.append(key)
            continue
        kind, idx, name, suffix = m.groups()
        if kind == "double_blocks":
            pre = f"transformer_blocks.{idx}."
            if f"{name}.{suffix}" in _BFL_DOUBLE_NORMS:
                out[pre + _BFL_DOUBLE_NORMS[f"{name}.{suffix}"]] = t
            elif name in _BFL_DOUBLE and suffix in ("weight", "bias"):
                out[f"{pre}{_BFL_DOUBLE[name]}.{suffix}"] = t
            elif name in ("img_attn.qkv", "txt_attn.qkv") and suffix in ("weight", "bias"):
                q, k, v = t.chunk(3, dim=0)
                names = ("to_q", "to_k", "to_v") if name.startswith("img") else (
                    "add_q_proj", "add_k_proj", "add_v_proj")
                for n, part in zip(names, (q, k, v)):
                    out[f"{pre}attn.{n}.{suffix}"] = part
            else:
                unknown.append(key)
        else:
            pre = f"single_transformer_blocks.{idx}."
            if f"{name}.{suffix}" in _BFL_SINGLE_NORMS:
                out[pre + _BFL_SINGLE_NORMS[f"{name}.{suffix}"]] = t
            elif name in _BFL_SINGLE and suffix in ("weight", "bias"):
                out[f"{pre}{_BFL_SINGLE[name]}.{suffix}"] = t
            elif name == "linear1" and suffix in ("weight", "bias"):
                mlp = t.shape[0] - 3 * inner_dim
                q, k, v, proj_mlp = t.split([inner_dim, inner_dim, inner_dim, mlp], dim=0)
                for n, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (q, k, v, proj_mlp)):
                    out[f"{pre}{n}.{suffix}"] = part
            else:
                unknown.append(key)
    return out, unknown


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ldm_vae_to_diffusers(sd: dict[str, torch.Tensor], num_up: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an LDM/BFL autoencoder state dict (``encoder.down.0.block.0.norm1.weight``...) to
    diffusers' AutoencoderKL names. Decoder ``up`` blocks are stored in reverse order in LDM; the
    1x1 attention convolutions become linear weights. Returns (converted, unrecognised keys)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        parts = key.split(".")
        new: str | None = None
        if parts[0] in ("quant_conv", "post_quant_conv") and len(parts) == 2:
            new = key
        elif parts[0] in ("encoder", "decoder") and len(parts) >= 3:
            side, rest = parts[0], parts[1:]
            if rest[0] in ("conv_in", "conv_out") and len(rest) == 2:
                new = key
            elif rest[0] == "norm_out" and len(rest) == 2:
                new = f"{side}.conv_norm_out.{rest[1]}"
            elif rest[0] in ("down", "up") and len(rest) >= 4:
                i = int(rest[1])
                blocks = "down_blocks" if rest[0] == "down" else "up_blocks"
                bi = i if rest[0] == "down" else num_up - 1 - i
                if rest[2] == "block" and len(rest) == 6 and rest[4] in _VAE_RESNET:
                    new = f"{side}.{blocks}.{bi}.resnets.{rest[3]}.{_VAE_RESNET[rest[4]]}.{rest[5]}"
                elif rest[2] in ("downsample", "upsample") and rest[3] == "conv" and len(rest) == 5:
                    sampler = "downsamplers" if rest[2] == "downsample" else "upsamplers"
                    new = f"{side}.{blocks}.{bi}.{sampler}.0.conv.{rest[4]}"
            elif rest[0] == "mid" and len(rest) == 4:
                if rest[1] in ("block_1", "block_2") and rest[2] in _VAE_RESNET:
                    j = int(rest[1][-1]) - 1
                    new = f"{side}.mid_block.resnets.{j}.{_VAE_RESNET[rest[2]]}.{rest[3]}"
                elif rest[1] == "attn_1" and rest[2] in _VAE_ATTN:
                    new = f"{side}.mid_block.attentions.0.{_VAE_ATTN[rest[2]]}.{rest[3]}"
                    if t.dim() > 2:
                        t = t.reshape(t.shape[0], t.shape[1])
        if new is None:
            unknown.append(key)
        else:
            out[new] = t
    return out, unknown


# --------------------------------------------------------------------------------------------------
# Per-component inspection: header -> plan (config + how to convert). No tensors are read.
# --------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What to build from one file: the module config, the key prefix to strip, the layout."""

    role: Role
    header: Header
    config: dict[str, Any]
    prefix: str = ""
    layout: str = "native"  # transformer: "bfl" | "diffusers"; vae: "ldm" | "diffusers"
    ignored_prefixes: tuple[str, ...] = ()
    drop_keys: frozenset[str] = frozenset()


def _fail(role: str, header: Header, problem: str, todo: str | None = None) -> ModelLoadError:
    return ModelLoadError(f"The {role} file {header.path} {problem} {todo or 'Expected ' + _ROLE_HELP[role] + '.'}")


def _meta_json(header: Header, key: str) -> dict[str, Any]:
    raw = header.metadata.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        logger.warning("ignoring unreadable %s metadata in %s", key, header.path)
        return {}
    return value if isinstance(value, dict) else {}


def _find_prefix(keys: Iterable[str], anchors: tuple[str, ...], prefixes: tuple[str, ...]) -> str | None:
    """The prefix (from ``prefixes``, "" included) under which one of ``anchors`` is found."""
    ks = set(keys)
    for pre in prefixes:
        if any(pre + a in ks for a in anchors):
            return pre
    return None


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    if not idx:
        return 0
    if idx != set(range(max(idx) + 1)):
        raise ValueError(f"{prefix}* block numbers are not contiguous: {sorted(idx)}")
    return max(idx) + 1


_TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")


def _plan_transformer(h: Header) -> _Plan:
    role: Role = "transformer"
    keys = h.tensors
    _quantised(h, role)
    bfl = _find_prefix(keys, ("double_blocks.0.img_attn.qkv.weight", "img_in.weight"), _TRANSFORMER_PREFIXES)
    dif = _find_prefix(keys, ("x_embedder.weight",), _TRANSFORMER_PREFIXES)
    if bfl is None and dif is None:
        raise _fail(role, h, f"is {_describe(h)}, not a Flux.1 transformer.")
    layout = "bfl" if bfl is not None else "diffusers"
    pre = bfl if bfl is not None else dif
    assert pre is not None
    sub = {k[len(pre):]: v.shape for k, v in keys.items() if k.startswith(pre)}
    if any("distilled_guidance_layer" in k for k in sub) or any("double_stream_modulation" in k for k in sub):
        raise _fail(role, h, f"is {describe_keys(sub)}, not Flux.1.", "FastLoRA runs Flux.1 dev/schnell and their fine-tunes.")
    meta = _meta_json(h, META_CONFIG)

    def need(name: str) -> tuple[int, ...]:
        if name not in sub:
            raise _fail(role, h, f"looks like a Flux transformer but has no '{pre}{name}' tensor (incomplete or "
                        "pruned checkpoint).", "Use a complete Flux.1 checkpoint.")
        return sub[name]

    try:
        if layout == "bfl":
            img_in, txt_in, vec_in = need("img_in.weight"), need("txt_in.weight"), need("vector_in.in_layer.weight")
            final = need("final_layer.linear.weight")
            n_double, n_single = _count_blocks(sub, "double_blocks."), _count_blocks(sub, "single_blocks.")
            qn = "double_blocks.0.img_attn.norm.query_norm.scale" if n_double else "single_blocks.0.norm.query_norm.scale"
            guidance = any(k.startswith("guidance_in.") for k in sub)
            mlp_key = "double_blocks.0.img_mlp.0.weight" if n_double else None
        else:
            img_in, txt_in = need("x_embedder.weight"), need("context_embedder.weight")
            vec_in = need("time_text_embed.text_embedder.linear_1.weight")
            final = need("proj_out.weight")
            n_double = _count_blocks(sub, "transformer_blocks.")
            n_single = _count_blocks(sub, "single_transformer_blocks.")
            qn = "transformer_blocks.0.attn.norm_q.weight" if n_double else "single_transformer_blocks.0.attn.norm_q.weight"
            guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in sub)
            mlp_key = "transformer_blocks.0.ff.net.0.proj.weight" if n_double else None
    except ValueError as e:
        raise _fail(role, h, f"is damaged: {e}.", "Download it again.") from None
    head_dim = need(qn)[0]
    inner, in_ch = img_in[0], img_in[1]
    out_ch = final[0]
    if in_ch != out_ch:
        variant = {384: "Flux.1 Fill (inpainting)", 128: "Flux.1 Canny/Depth (control)"}.get(in_ch, "a Flux variant")
        raise _fail(role, h, f"is {variant}: it takes {in_ch} input channels but produces {out_ch}.",
                    "FastLoRA runs text-to-image Flux.1 dev/schnell (64 channels) and their fine-tunes; use "
                    "flux1-dev.safetensors or flux1-schnell.safetensors.")
    if inner % head_dim:
        raise _fail(role, h, f"has hidden size {inner} not divisible by the head size {head_dim}.", "Download it again.")
    if mlp_key is not None and need(mlp_key)[0] != 4 * inner:
        raise _fail(role, h, f"has an MLP width of {need(mlp_key)[0]} (Flux uses 4 x {inner}).",
                    "This Flux derivative is not supported; use a standard Flux.1 checkpoint.")
    axes = meta.get("axes_dims_rope")
    if META_AXES in h.metadata:
        try:
            axes = [int(x) for x in json.loads(h.metadata[META_AXES])]
        except (ValueError, TypeError):
            axes = None
    if axes is None:
        if head_dim == 128:
            axes = list(load_shipped_config("flux1_dev_transformer")["axes_dims_rope"])
        else:
            raise _fail(role, h, f"has attention head size {head_dim} (Flux.1 uses 128) and no "
                        f"'{META_AXES}' metadata, so its rotary embedding layout is unknown.",
                        "Use a Flux.1 checkpoint, or write the file with fastlora_core.loading.write_single_files.")
    if sum(axes) != head_dim:
        raise _fail(role, h, f"declares axes_dims_rope {axes}, which do not add up to the head size {head_dim}.",
                    "Fix the metadata or rewrite the file.")
    config = {
        "patch_size": 1,
        "in_channels": in_ch,
        "out_channels": None,
        "num_layers": n_double,
        "num_single_layers": n_single,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": txt_in[1],
        "pooled_projection_dim": vec_in[1],
        "guidance_embeds": guidance,
        "axes_dims_rope": axes,
    }
    ignored = tuple(sorted({k.split(".", 1)[0] + "." for k in keys if not k.startswith(pre)})) if pre else ()
    drop = frozenset(k for k in sub if k == "scaled_fp8" or k.endswith((".scale_input", ".input_scale")))
    logger.info("transformer %s: %s layout%s, %d double + %d single blocks, hidden %d, %s", h.path.name, layout,
                f" under '{pre}'" if pre else "", n_double, n_single, inner, "dev (guidance)" if guidance else "schnell")
    return _Plan(role, h, config, pre, layout, ignored, drop)


_CLIP_PREFIXES = ("", "text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "clip_l.transformer.",
                  "transformer.", "te1.", "clip_l.")
_CLIP_META_FIELDS = ("num_attention_heads", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                     "pad_token_id", "projection_dim", "attention_dropout", "dropout")


def _wrong_text_encoder(role: str, h: Header) -> None:
    keys = h.tensors
    desc = _describe(h)
    if role == "clip_l" and any("SelfAttention" in k for k in keys):
        raise _fail(role, h, f"is {desc}, not CLIP-L.", "Did you swap clip_l and t5xxl? Pass clip_l.safetensors as clip_l.")
    if role == "t5xxl" and any("text_model.encoder.layers" in k for k in keys):
        raise _fail(role, h, f"is {desc}, not T5.", "Did you swap clip_l and t5xxl? Pass t5xxl_fp16.safetensors as t5xxl.")
    raise _fail(role, h, f"is {desc}, not a {'CLIP-L' if role == 'clip_l' else 'T5-XXL'} text encoder.")


def _plan_clip(h: Header) -> _Plan:
    role: Role = "clip_l"
    _quantised(h, role)
    pre = _find_prefix(h.tensors, ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
                       _CLIP_PREFIXES)
    if pre is None:
        _wrong_text_encoder(role, h)
    assert pre is not None
    projection = h.tensors.get(pre + "text_projection.weight")
    if pre + "text_model.embeddings.token_embedding.weight" in h.tensors:
        pre += "text_model."  # ComfyUI / transformers 4 layout; text_projection & logit_scale are not used
    sub = {k[len(pre):]: v.shape for k, v in h.tensors.items() if k.startswith(pre)}
    try:
        vocab, hidden = sub["embeddings.token_embedding.weight"]
        max_pos = sub["embeddings.position_embedding.weight"][0]
        layers = _count_blocks(sub, "encoder.layers.")
        inter = sub["encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError) as e:
        raise _fail(role, h, f"is an incomplete CLIP text encoder (missing {e}).", "Download clip_l.safetensors again.") from None
    real = load_shipped_config("clip_l")
    meta = _meta_json(h, META_CONFIG)
    config = dict(real)
    config.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=max_pos, num_hidden_layers=layers,
                  intermediate_size=inter)
    config["projection_dim"] = projection.shape[0] if projection is not None else hidden
    is_real = (hidden, layers) == (real["hidden_size"], real["num_hidden_layers"])
    if not is_real:
        config["num_attention_heads"] = max(1, hidden // 64)
    config.update({k: meta[k] for k in _CLIP_META_FIELDS if k in meta})
    if not is_real and "num_attention_heads" not in meta:
        logger.warning("%s: CLIP with hidden size %d and %d layers is not clip_l; assuming %d attention heads",
                       h.path.name, hidden, layers, config["num_attention_heads"])
    if hidden % int(config["num_attention_heads"]):
        raise _fail(role, h, f"has hidden size {hidden}, not divisible by {config['num_attention_heads']} heads.",
                    "Use clip_l.safetensors.")
    drop = frozenset(k for k in sub if k in ("text_projection.weight", "logit_scale", "embeddings.position_ids"))
    return _Plan(role, h, config, pre, "native", (), drop)


_T5_PREFIXES = ("", "text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.", "te2.")


def _plan_t5(h: Header) -> _Plan:
    role: Role = "t5xxl"
    _quantised(h, role)
    pre = _find_prefix(h.tensors, ("encoder.block.0.layer.0.SelfAttention.q.weight",), _T5_PREFIXES)
    if pre is None:
        _wrong_text_encoder(role, h)
    assert pre is not None
    sub = {k[len(pre):]: v.shape for k, v in h.tensors.items() if k.startswith(pre)}
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in sub:
        raise _fail(role, h, "is a UMT5 encoder (per-layer position bias, as used by Wan and others), not T5 v1.1.",
                    "Use t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors.")
    emb = sub.get("shared.weight") or sub.get("encoder.embed_tokens.weight")
    try:
        if emb is None:
            raise KeyError("shared.weight")
        vocab, d_model = emb
        rel = sub["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        q = sub["encoder.block.0.layer.0.SelfAttention.q.weight"]
        layers = _count_blocks(sub, "encoder.block.")
    except (KeyError, ValueError) as e:
        raise _fail(role, h, f"is an incomplete T5 encoder (missing {e}).", "Download the T5 file again.") from None
    buckets, heads = rel
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in sub
    wi = sub.get(ff + ("wi_0.weight" if gated else "wi.weight"))
    d_ff = wi[0] if wi else None
    if d_ff is None or q[0] % heads:
        raise _fail(role, h, "is an incomplete or unusual T5 encoder.", "Download the T5 file again.")
    config = load_shipped_config("t5xxl")
    config.update(vocab_size=vocab, d_model=d_model, d_kv=q[0] // heads, d_ff=d_ff, num_layers=layers,
                  num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets)
    if not gated:
        config.update(feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=False)
    config.update({k: v for k, v in _meta_json(h, META_CONFIG).items() if k in (
        "feed_forward_proj", "dense_act_fn", "is_gated_act", "layer_norm_epsilon", "relative_attention_max_distance",
        "pad_token_id", "eos_token_id", "decoder_start_token_id")})
    ignored = tuple(sorted({k.split(".", 1)[0] + "." for k in sub if k.startswith(("decoder.", "lm_head."))}))
    drop = frozenset(k for k in sub if k.startswith(("decoder.", "lm_head.")) or k == "scaled_fp8"
                     or k.endswith((".scale_input", ".input_scale")))
    return _Plan(role, h, config, pre, "native", ignored, drop)


_VAE_PREFIXES = ("", "first_stage_model.", "vae.", "ae.")


def _plan_vae(h: Header) -> _Plan:
    role: Role = "vae"
    _quantised(h, role)
    keys = h.tensors
    pre = _find_prefix(keys, ("encoder.down.0.block.0.conv1.weight",), _VAE_PREFIXES)
    layout = "ldm"
    if pre is None:
        pre = _find_prefix(keys, ("encoder.down_blocks.0.resnets.0.conv1.weight",), _VAE_PREFIXES)
        layout = "diffusers"
    if pre is None:
        raise _fail(role, h, f"is {_describe(h)}, not an autoencoder.")
    sub = {k[len(pre):]: v.shape for k, v in keys.items() if k.startswith(pre)}
    try:
        if layout == "ldm":
            n = _count_blocks(sub, "encoder.down.")
            channels = [sub[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(n)]
            per_block = _count_blocks(sub, "encoder.down.0.block.")
            attn = "encoder.mid.attn_1.q.weight" in sub
        else:
            n = _count_blocks(sub, "encoder.down_blocks.")
            channels = [sub[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n)]
            per_block = _count_blocks(sub, "encoder.down_blocks.0.resnets.")
            attn = "encoder.mid_block.attentions.0.to_q.weight" in sub
        in_ch = sub["encoder.conv_in.weight"][1]
        enc_out = sub["encoder.conv_out.weight"][0]
        latent = sub["decoder.conv_in.weight"][1]
        out_ch = sub["decoder.conv_out.weight"][0]
    except (KeyError, ValueError) as e:
        raise _fail(role, h, f"is an incomplete autoencoder (missing {e}).", "Download ae.safetensors again.") from None
    meta = _meta_json(h, META_CONFIG)
    real = load_shipped_config("ae")
    if enc_out != 2 * latent:
        raise _fail(role, h, f"is not a KL autoencoder (encoder gives {enc_out} channels for {latent} latent channels).",
                    "Use the Flux autoencoder ae.safetensors.")
    if latent != real["latent_channels"] and not meta:
        what = "an SD1.x/SDXL VAE" if latent == 4 else "not the Flux autoencoder"
        raise _fail(role, h, f"is {what} ({latent} latent channels; Flux needs 16).",
                    "Use the Flux autoencoder ae.safetensors (ComfyUI models/vae/ae.safetensors).")
    config = dict(real)
    config.update(
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=per_block,
        in_channels=in_ch,
        out_channels=out_ch,
        latent_channels=latent,
        mid_block_add_attention=attn,
        use_quant_conv="quant_conv.weight" in sub,
        use_post_quant_conv="post_quant_conv.weight" in sub,
    )
    if any(c % int(config["norm_num_groups"]) for c in channels) and "norm_num_groups" not in meta:
        raise _fail(role, h, f"has channel widths {channels} that do not fit 32 normalisation groups.",
                    "Use the Flux autoencoder ae.safetensors.")
    config.update({k: meta[k] for k in ("norm_num_groups", "scaling_factor", "shift_factor", "sample_size",
                                        "act_fn", "force_upcast") if k in meta})
    if meta == {} and channels != real["block_out_channels"]:
        logger.warning("%s: 16-channel autoencoder with widths %s (Flux ae uses %s); using Flux scaling %s / shift %s",
                       h.path.name, channels, real["block_out_channels"], real["scaling_factor"], real["shift_factor"])
    return _Plan(role, h, config, pre, layout)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

_TOKENIZER_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("clip", "t5"),  # ours (write_single_files)
    ("tokenizer", "tokenizer_2"),  # a diffusers Flux folder
    ("comfy/sd1_tokenizer", "comfy/text_encoders/t5_tokenizer"),  # a ComfyUI checkout root
    ("sd1_tokenizer", "text_encoders/t5_tokenizer"),  # ComfyUI's comfy/ package folder
)


def _has_clip_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def _has_t5_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "spiece.model").is_file()


def _comfyui_root() -> Path | None:
    """The ComfyUI checkout we run inside, if any (found from already-imported modules only)."""
    for name in ("folder_paths", "comfy"):
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None)
        if f:
            p = Path(f).resolve().parent
            return p if name == "folder_paths" else p.parent
    env = os.environ.get("COMFYUI_DIR")
    return Path(env) if env else None


def find_tokenizer_dirs(tokenizer_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The (clip, t5) tokenizer folders for a single-file source.

    ``tokenizer_dir`` may hold ``clip/`` + ``t5/`` (what :func:`write_single_files` writes), be a
    diffusers Flux folder (``tokenizer/`` + ``tokenizer_2/``), a ComfyUI checkout root (its bundled
    ``comfy/sd1_tokenizer`` and ``comfy/text_encoders/t5_tokenizer``) or ComfyUI's ``comfy/``
    folder. When it is None, the ComfyUI installation we run inside (or ``$COMFYUI_DIR``) is used.

    Raises:
        ModelLoadError: nothing usable found; the message lists the accepted layouts.
    """
    how = (
        "Give tokenizer_dir: a folder with clip/ and t5/ tokenizer subfolders (files written by "
        "tokenizer.save_pretrained, or vocab.json + merges.txt for CLIP and tokenizer.json or spiece.model "
        "for T5), a diffusers Flux folder (tokenizer/ + tokenizer_2/), or a ComfyUI checkout (its bundled "
        "comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer are used)."
    )
    if tokenizer_dir is None:
        root = _comfyui_root()
        if root is None:
            raise ModelLoadError("No tokenizers: single-file Flux models do not contain them. " + how)
        base = root
    else:
        base = Path(tokenizer_dir)
        if not base.is_dir():
            raise ModelLoadError(f"The tokenizer folder {base} does not exist. " + how)
    for clip_rel, t5_rel in _TOKENIZER_LAYOUTS:
        clip_d, t5_d = base / clip_rel, base / t5_rel
        if clip_d.is_dir() or t5_d.is_dir():
            if not _has_clip_tokenizer(clip_d):
                raise ModelLoadError(f"No CLIP tokenizer files in {clip_d} (need tokenizer.json, or vocab.json "
                                     "+ merges.txt). " + how)
            if not _has_t5_tokenizer(t5_d):
                raise ModelLoadError(f"No T5 tokenizer files in {t5_d} (need tokenizer.json or spiece.model). " + how)
            return clip_d, t5_d
    raise ModelLoadError(f"No tokenizers found in {base}. " + how)


def _load_tokenizers(clip_d: Path, t5_d: Path, clip_max_len: int) -> tuple[Any, Any]:
    import transformers

    clip_cls = getattr(transformers, "CLIPTokenizerFast", None) if (clip_d / "tokenizer.json").is_file() else None
    t5_cls = getattr(transformers, "T5TokenizerFast", None) if (t5_d / "tokenizer.json").is_file() else None
    try:
        clip_tok = (clip_cls or transformers.CLIPTokenizer).from_pretrained(str(clip_d), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"The CLIP tokenizer in {clip_d} cannot be loaded ({e}). Use ComfyUI's "
                             "comfy/sd1_tokenizer or a diffusers Flux folder's tokenizer/.") from None
    try:
        t5_tok = (t5_cls or transformers.T5Tokenizer).from_pretrained(str(t5_d), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"The T5 tokenizer in {t5_d} cannot be loaded ({e}). Use ComfyUI's "
                             "comfy/text_encoders/t5_tokenizer or a diffusers Flux folder's tokenizer_2/.") from None
    if clip_tok.model_max_length > clip_max_len:
        # ComfyUI's sd1_tokenizer says 8192; the pipeline pads CLIP prompts to model_max_length.
        clip_tok.model_max_length = clip_max_len
    return clip_tok, t5_tok


# --------------------------------------------------------------------------------------------------
# Building modules
# --------------------------------------------------------------------------------------------------


def _empty_module(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with parameters on the meta device (buffers stay real), without init cost."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _factory(plan: _Plan, dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
    if plan.role == "transformer":
        from diffusers import FluxTransformer2DModel

        return lambda: FluxTransformer2DModel(**plan.config)
    if plan.role == "vae":
        from diffusers import AutoencoderKL

        cfg = {k: v for k, v in plan.config.items() if not k.startswith("_")}
        return lambda: AutoencoderKL(**cfg)
    if plan.role == "clip_l":
        from transformers import CLIPTextConfig, CLIPTextModel

        ccfg = {k: v for k, v in plan.config.items() if k not in ("architectures", "model_type")}
        return lambda: CLIPTextModel(_with_dtype(CLIPTextConfig(**ccfg), dtype))
    from transformers import T5Config, T5EncoderModel

    tcfg = {k: v for k, v in plan.config.items() if k not in ("architectures", "model_type", "is_gated_act")}
    return lambda: T5EncoderModel(_with_dtype(T5Config(**tcfg), dtype))


def _with_dtype(config: Any, dtype: torch.dtype) -> Any:
    """Record the weights' dtype in a transformers config as from_pretrained does (``dtype`` in
    transformers 5, ``torch_dtype`` before)."""
    import transformers

    attr = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    setattr(config, attr, dtype)
    return config


def _fp32_names(module: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Module names transformers keeps in float32 at this dtype (T5's ``wo`` at fp16), mirroring
    ``from_pretrained`` so both load paths produce the same dtypes."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(names)


def _convert(plan: _Plan, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """File state dict (prefix stripped, markers dropped, scales applied) -> module state dict."""
    if plan.role == "transformer" and plan.layout == "bfl":
        return _bfl_to_diffusers(sd, plan.config["num_attention_heads"] * plan.config["attention_head_dim"])
    if plan.role == "vae" and plan.layout == "ldm":
        return _ldm_vae_to_diffusers(sd, len(plan.config["block_out_channels"]))
    if plan.role == "t5xxl":
        sd = dict(sd)
        if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
            sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
        if "encoder.embed_tokens.weight" not in sd and "shared.weight" in sd:
            sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    return sd, []


def _collect(plan: _Plan, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
             keep_fp32: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read (or fake, in the dry run) the file's tensors, apply fp8 scales, cast, and convert to the
    module's key layout. ``get`` returns a file tensor by its full key. Each tensor is cast as soon
    as it is read, so peak memory is the result plus one tensor (e.g. fp8 -> bf16 never holds both
    copies of the model)."""
    pre = plan.prefix
    names = [k[len(pre):] for k in plan.header.tensors if k.startswith(pre)]
    scale_keys = {n for n in names if n.endswith((".scale_weight", ".weight_scale"))}
    sd: dict[str, torch.Tensor] = {}
    for n in names:
        if n in plan.drop_keys or n in scale_keys:
            continue
        t = get(pre + n)
        for sk in (n[: -len("weight")] + "scale_weight", n[: -len("weight")] + "weight_scale"):
            if n.endswith(".weight") and sk in scale_keys:
                s = get(pre + sk)
                if s.numel() != 1 and tuple(s.shape) not in ((t.shape[0], 1), (t.shape[0],)):
                    raise _fail(plan.role, plan.header, f"has a weight scale of shape {tuple(s.shape)} for {n}.",
                                "Only per-tensor or per-row scaled fp8 is supported; use the bf16/fp8 release.")
                s = s.float().reshape(-1, *([1] * (t.dim() - 1))) if s.numel() != 1 else s.float().reshape(())
                t = t.float() * s
        # T5 keeps its file names, so the from_pretrained fp32 rule (``wo`` at fp16) applies here.
        target = torch.float32 if keep_fp32 and any(m in n.split(".") for m in keep_fp32) else dtype
        sd[n] = t if t.dtype == target else t.to(target)
        del t
    converted, unknown = _convert(plan, sd)
    if unknown:
        raise _fail(plan.role, plan.header, f"has {len(unknown)} tensor(s) this model does not use (e.g. "
                    f"{', '.join(sorted(unknown)[:3])}).",
                    "It is probably a different model variant; use a standard Flux.1 file.")
    return converted


def _adapt_to_module(plan: _Plan, module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP: the file's keys are kept without ``text_model.``; transformers 4's CLIPTextModel wants
    it, transformers 5's does not."""
    if plan.role == "clip_l" and hasattr(module, "text_model") and "text_model.embeddings.token_embedding.weight" in (
            module.state_dict()):
        return {"text_model." + k: v for k, v in sd.items()}
    return sd


def _check_against(plan: _Plan, module: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        bits = []
        if missing:
            bits.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            bits.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            bits.append(f"{len(wrong)} with the wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)})")
        names = " (diffusers names)" if plan.layout in ("bfl", "ldm") else ""
        raise _fail(plan.role, plan.header, f"does not match the model it describes{names}: " + "; ".join(bits) + ".",
                    "The file is incomplete (one shard of a split model?) or a different model variant; use the "
                    f"complete file ({_ROLE_HELP[plan.role]}).")


def _build(plan: _Plan, dtype: torch.dtype, dry_run: bool) -> torch.nn.Module | None:
    """Dry run: convert meta tensors of the header shapes and compare with the module's state dict.
    Real run: read, convert, cast and assign the weights. Returns the module (None in a dry run)."""
    module = _empty_module(_factory(plan, dtype))
    keep_fp32 = _fp32_names(module, dtype)
    if dry_run:
        info = plan.header.tensors

        def get(k: str) -> torch.Tensor:
            return torch.empty(info[k].shape, dtype=info[k].torch_dtype, device="meta")

        _check_against(plan, module, _adapt_to_module(plan, module, _collect(plan, get, dtype, keep_fp32)))
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(plan.header.path), framework="pt", device="cpu") as f:
            sd = _collect(plan, f.get_tensor, dtype, keep_fp32)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - I/O or decoding failure while reading
        raise _fail(plan.role, plan.header, f"could not be read ({e}).", "Download it again.") from None
    sd = _adapt_to_module(plan, module, sd)
    _check_against(plan, module, sd)
    if plan.role == "t5xxl" and "shared.weight" in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # keep the tie: one tensor
    module.load_state_dict(sd, strict=True, assign=True)
    if plan.role == "t5xxl":
        module.encoder.embed_tokens = module.shared  # type: ignore[attr-defined]
    left = [n for n, p in module.named_parameters() if p.is_meta] + [n for n, b in module.named_buffers() if b.is_meta]
    if left:  # pragma: no cover - guarded by _check_against
        raise _fail(plan.role, plan.header, f"left {len(left)} tensors unset ({left[0]}).", "Report this as a bug.")
    module.eval().requires_grad_(False)
    return module


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_pipeline(source: ModelSource, dtype: torch.dtype) -> FluxPipeline:
    """Load a Flux pipeline from a diffusers folder or from ComfyUI single files.

    Contract:
        Returns a ``diffusers.FluxPipeline`` on CPU, every module in eval mode with
        ``requires_grad=False``. Weights are in ``dtype`` (float32, float16 or bfloat16) whatever
        their storage dtype (fp32/fp16/bf16/float8_e4m3fn, ComfyUI ``scaled_fp8`` included); like
        ``from_pretrained``, T5's ``wo`` layers stay float32 when ``dtype`` is float16. Both source
        kinds give identical modules for identical weights. The function keeps no state: a failure
        leaves nothing behind and the next call starts afresh.

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
    try:
        source.validate()
    except OptionsError as e:
        raise ModelLoadError(str(e)) from None
    if source.transformer_only:
        return _load_transformer_only(source, dtype)
    if source.kind == "diffusers":
        assert source.diffusers_dir is not None
        return _load_diffusers(Path(source.diffusers_dir), dtype)
    return _load_single_files(source, dtype)


def _load_transformer_only(source: ModelSource, dtype: torch.dtype) -> FluxPipeline:
    """A FluxPipeline holding only the transformer and a scheduler (text encoders, tokenizers and VAE
    are None): the same checks as the full loaders for the transformer, nothing else is read."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if source.diffusers_dir:
        folder = Path(source.diffusers_dir)
        sub = folder / "transformer"
        if not (sub / "config.json").is_file():
            raise ModelLoadError(f"{folder} has no transformer/config.json, so it is not a diffusers Flux folder. "
                                 "Use the folder of a diffusers Flux model, or a single transformer file.")
        for f in sorted(sub.glob("*.safetensors")):
            read_header(f, "transformer weights")
        try:
            transformer = FluxTransformer2DModel.from_pretrained(str(sub), **_dtype_kwarg(dtype), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - anything diffusers raises on a broken folder
            raise ModelLoadError(f"The transformer in {folder} could not be loaded: {type(e).__name__}: {e}. Check "
                                 "that the download is complete.") from None
        guidance = bool(transformer.config.guidance_embeds)
    else:
        plan = _plan_transformer(read_header(source.transformer or "", "transformer"))
        _build(plan, dtype, dry_run=True)
        transformer = _build(plan, dtype, dry_run=False)
        guidance = bool(plan.config["guidance_embeds"])
    sched_name = "scheduler_dev" if guidance else "scheduler_schnell"
    sched_cfg = {k: v for k, v in load_shipped_config(sched_name).items() if not k.startswith("_")}
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_cfg), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    _finish(pipe)
    logger.info("loaded the Flux transformer alone (%s): %s", dtype, source.describe())
    return pipe


# -- diffusers folders ------------------------------------------------------------------------------

_FLUX_VARIANT_PIPELINES = {
    "FluxFillPipeline": "Flux.1 Fill (inpainting)",
    "FluxControlPipeline": "Flux.1 Canny/Depth (control)",
    "FluxKontextPipeline": "Flux.1 Kontext (image editing)",
    "FluxPriorReduxPipeline": "Flux.1 Redux",
    "FluxControlNetPipeline": "a Flux ControlNet pipeline",
}
_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler", "tokenizer", "tokenizer_2")


def _load_diffusers(folder: Path, dtype: torch.dtype) -> FluxPipeline:
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
        raise ModelLoadError(f"{index_path} is not valid JSON ({e}). Restore the file.") from None
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
        raise ModelLoadError(f"{tcfg_path} cannot be read ({e}). Download the model again.") from None
    if tcfg.get("quantization_config"):
        raise ModelLoadError(f"{folder} holds a pre-quantised transformer ({tcfg['quantization_config'].get('quant_method', '?')}). "
                             "FastLoRA quantises the model itself; use the original bf16 weights.")
    in_ch, out_ch = tcfg.get("in_channels", 64), tcfg.get("out_channels")
    if out_ch is not None and out_ch != in_ch:
        raise ModelLoadError(f"{folder} is a Flux variant with {in_ch} input and {out_ch} output channels (Fill/Canny/"
                             "Depth). FastLoRA runs text-to-image Flux.1 dev/schnell; use such a model.")
    for comp in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        files = sorted((folder / comp).glob("*.safetensors"))
        if not files and not any((folder / comp).glob("*.bin")):
            raise ModelLoadError(f"{folder / comp} has no weights (.safetensors). The download is incomplete; "
                                 "download the model again.")
        for f in files:
            read_header(f, f"{comp} weights")
    from diffusers import FluxPipeline

    try:
        pipe = FluxPipeline.from_pretrained(str(folder), **_dtype_kwarg(dtype), local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - anything diffusers/transformers raise on a broken folder
        raise ModelLoadError(f"The diffusers folder {folder} could not be loaded: {type(e).__name__}: {e}. Check that "
                             "the download is complete and matches FLUX.1-dev's layout.") from None
    _finish(pipe)
    logger.info("loaded diffusers Flux pipeline from %s (%s)", folder, dtype)
    return pipe


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers >= 0.42 takes ``dtype=`` and deprecates ``torch_dtype=``; older ones only know the latter."""
    import inspect

    from diffusers import DiffusionPipeline

    src = inspect.getsource(DiffusionPipeline.from_pretrained)
    return {"dtype": dtype} if 'kwargs.pop("dtype"' in src else {"torch_dtype": dtype}


def _finish(pipe: Any) -> None:
    pipe.to("cpu")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)


# -- single files -----------------------------------------------------------------------------------


def _load_single_files(source: ModelSource, dtype: torch.dtype) -> FluxPipeline:
    paths: dict[Role, str] = {"transformer": source.transformer or "", "clip_l": source.clip_l or "",
                              "t5xxl": source.t5xxl or "", "vae": source.vae or ""}
    headers = {role: read_header(p, role) for role, p in paths.items()}
    plans = {
        "transformer": _plan_transformer(headers["transformer"]),
        "clip_l": _plan_clip(headers["clip_l"]),
        "t5xxl": _plan_t5(headers["t5xxl"]),
        "vae": _plan_vae(headers["vae"]),
    }
    _check_fit(plans)
    clip_d, t5_d = find_tokenizer_dirs(source.tokenizer_dir)
    clip_tok, t5_tok = _load_tokenizers(clip_d, t5_d, int(plans["clip_l"].config["max_position_embeddings"]))
    if len(clip_tok) > plans["clip_l"].config["vocab_size"] or len(t5_tok) > plans["t5xxl"].config["vocab_size"]:
        raise ModelLoadError(f"The tokenizers in {clip_d.parent} do not match the text encoders (vocabulary "
                             f"{len(clip_tok)}/{len(t5_tok)} vs {plans['clip_l'].config['vocab_size']}/"
                             f"{plans['t5xxl'].config['vocab_size']}). Use the tokenizers that belong to these files.")
    for plan in plans.values():  # full dry run on meta tensors: nothing has been read yet
        _build(plan, dtype, dry_run=True)
    for plan in plans.values():
        for pre in plan.ignored_prefixes:
            logger.info("%s: ignoring the '%s*' tensors in %s", plan.role, pre, plan.header.path.name)

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    modules = {role: _build(plan, dtype, dry_run=False) for role, plan in plans.items()}
    sched_name = "scheduler_dev" if plans["transformer"].config["guidance_embeds"] else "scheduler_schnell"
    sched_cfg = {k: v for k, v in load_shipped_config(sched_name).items() if not k.startswith("_")}
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_cfg),
        text_encoder=modules["clip_l"],
        tokenizer=clip_tok,
        text_encoder_2=modules["t5xxl"],
        tokenizer_2=t5_tok,
        vae=modules["vae"],
        transformer=modules["transformer"],
    )
    _finish(pipe)
    logger.info("loaded Flux pipeline from single files (%s): %s", dtype, source.describe())
    return pipe


def _check_fit(plans: Mapping[str, _Plan]) -> None:
    t, c, t5, v = (plans[r].config for r in ("transformer", "clip_l", "t5xxl", "vae"))
    th = plans["transformer"].header
    if t["pooled_projection_dim"] != c["hidden_size"]:
        raise ModelLoadError(
            f"The clip_l file {plans['clip_l'].header.path} has hidden size {c['hidden_size']} but the transformer "
            f"{th.path} expects {t['pooled_projection_dim']}. Use clip_l.safetensors (CLIP-L, 768), not CLIP-G or "
            "another encoder.")
    if t["joint_attention_dim"] != t5["d_model"]:
        raise ModelLoadError(
            f"The t5xxl file {plans['t5xxl'].header.path} has width {t5['d_model']} but the transformer {th.path} "
            f"expects {t['joint_attention_dim']}. Use t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors "
            "(T5 v1.1 XXL), not T5-base/large or UMT5.")
    if t["in_channels"] != 4 * v["latent_channels"]:
        raise ModelLoadError(
            f"The vae file {plans['vae'].header.path} has {v['latent_channels']} latent channels but the transformer "
            f"{th.path} expects {t['in_channels'] // 4}. Use the Flux autoencoder ae.safetensors.")


# --------------------------------------------------------------------------------------------------
# Writing single files (tests, smoke tests). Independent, hand-written diffusers -> BFL/LDM mapping.
# --------------------------------------------------------------------------------------------------


def _diffusers_to_bfl(sd: Mapping[str, torch.Tensor], num_layers: int, num_single: int) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> original BFL key layout (flux1-dev.safetensors)."""
    g = sd.__getitem__
    out: dict[str, torch.Tensor] = {}

    def lin(bfl: str, dif: str) -> None:
        out[f"{bfl}.weight"], out[f"{bfl}.bias"] = g(f"{dif}.weight"), g(f"{dif}.bias")

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        lin(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for part in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{part}"] = torch.cat([g(f"{d}.attn.to_{x}.{part}") for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{part}"] = torch.cat([g(f"{d}.attn.add_{x}_proj.{part}") for x in "qkv"])
        out[f"{b}.img_attn.norm.query_norm.scale"] = g(f"{d}.attn.norm_q.weight")
        out[f"{b}.img_attn.norm.key_norm.scale"] = g(f"{d}.attn.norm_k.weight")
        out[f"{b}.txt_attn.norm.query_norm.scale"] = g(f"{d}.attn.norm_added_q.weight")
        out[f"{b}.txt_attn.norm.key_norm.scale"] = g(f"{d}.attn.norm_added_k.weight")
        lin(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        lin(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        lin(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        lin(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        lin(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        lin(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(num_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        lin(f"{b}.modulation.lin", f"{d}.norm.linear")
        for part in ("weight", "bias"):
            out[f"{b}.linear1.{part}"] = torch.cat(
                [g(f"{d}.attn.to_q.{part}"), g(f"{d}.attn.to_k.{part}"), g(f"{d}.attn.to_v.{part}"), g(f"{d}.proj_mlp.{part}")])
        out[f"{b}.norm.query_norm.scale"] = g(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = g(f"{d}.attn.norm_k.weight")
        lin(f"{b}.linear2", f"{d}.proj_out")
    lin("final_layer.linear", "proj_out")
    for part in ("weight", "bias"):
        scale, shift = g(f"norm_out.linear.{part}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale])
    return out


def _diffusers_to_ldm_vae(sd: Mapping[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM/BFL ``ae.safetensors`` layout."""
    out: dict[str, torch.Tensor] = {}
    res = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    att = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in sd.items():
        new = key
        m = re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", key)
        if m:
            side, kind, i, what, j, rest = m.groups()
            idx = int(i) if kind == "down" else num_blocks - 1 - int(i)
            if what == "resnets":
                name, _, p = rest.rpartition(".")
                new = f"{side}.{kind}.{idx}.block.{j}.{res[name]}.{p}"
            else:
                new = f"{side}.{kind}.{idx}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"
        elif m2 := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)$", key):
            side, j, name, p = m2.groups()
            new = f"{side}.mid.block_{int(j) + 1}.{res[name]}.{p}"
        elif m3 := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
            side, name, p = m3.groups()
            new = f"{side}.mid.attn_1.{att[name]}.{p}"
            if p == "weight" and name != "group_norm":
                t = t.reshape(*t.shape, 1, 1)
        elif key.endswith(("conv_norm_out.weight", "conv_norm_out.bias")):
            new = key.replace("conv_norm_out", "norm_out")
        out[new] = t
    return out


def _to_fp8(sd: Mapping[str, torch.Tensor], scaled: bool) -> dict[str, torch.Tensor]:
    """Store 2-D+ weights as float8_e4m3fn (as ComfyUI's fp8 files do); ``scaled`` adds per-tensor
    ``scale_weight`` entries and the ``scaled_fp8`` marker (ComfyUI's scaled fp8 format)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if t.dim() >= 2 and t.is_floating_point():
            if scaled and k.endswith(".weight"):
                s = (t.float().abs().max() / 448.0).clamp(min=1e-12)
                out[k] = (t.float() / s).to(torch.float8_e4m3fn)
                out[k[: -len("weight")] + "scale_weight"] = s.reshape(())
            else:
                out[k] = t.to(torch.float8_e4m3fn)
        else:
            out[k] = t
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


_DTYPE_TAG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3fn"}


def write_single_files(
    pipe: Any,
    folder: str | os.PathLike[str],
    transformer_layout: Literal["bfl", "diffusers"] = "bfl",
    t5_dtype: torch.dtype | None = None,
    *,
    transformer_prefix: str = "",
    transformer_dtype: torch.dtype | None = None,
    scaled_fp8: bool = False,
) -> dict[str, Path]:
    """Write ``pipe`` as the single files a ComfyUI user has.

    Writes into ``folder``: the transformer (``flux1-dev.safetensors``, BFL key layout, optionally
    under ``transformer_prefix`` such as ``"model.diffusion_model."``; or diffusers layout), CLIP
    (``clip_l.safetensors``, ``text_model.*`` keys), T5 (``t5xxl_<dtype>.safetensors``, ``encoder.*``
    and ``shared.weight``), the autoencoder (``ae.safetensors``, LDM layout) and the tokenizers
    (``tokenizers/clip``, ``tokenizers/t5``). ``t5_dtype`` / ``transformer_dtype`` choose a storage
    dtype (``torch.float8_e4m3fn`` stores 2-D weights as fp8 like ``t5xxl_fp8_e4m3fn.safetensors``;
    with ``scaled_fp8`` the transformer gets ComfyUI's per-tensor ``scale_weight`` format).
    Configuration that shapes cannot tell (rope axes, CLIP heads, VAE scaling...) goes into the
    safetensors metadata (``fastlora.*``) so that :func:`load_pipeline` rebuilds the same modules.

    Returns ``{"transformer", "clip_l", "t5xxl", "vae", "tokenizer_dir"} -> Path`` (the keyword
    arguments of ``ModelSource.from_single_files``).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def save(sd: Mapping[str, torch.Tensor], name: str, component: str, meta: dict[str, Any] | None = None,
             extra: dict[str, str] | None = None) -> Path:
        md = {META_COMPONENT: component, META_CONFIG: json.dumps(meta or {}), **(extra or {})}
        path = folder / name
        save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(path), metadata=md)
        return path

    out: dict[str, Path] = {}
    tr = pipe.transformer
    tcfg = dict(tr.config)
    tsd = tr.state_dict()
    if transformer_layout == "bfl":
        tsd = _diffusers_to_bfl(tsd, tcfg["num_layers"], tcfg["num_single_layers"])
    elif transformer_layout != "diffusers":
        raise OptionsError(f"transformer_layout={transformer_layout!r}: use 'bfl' or 'diffusers'.")
    if transformer_dtype is not None:
        tsd = _to_fp8(tsd, scaled_fp8) if transformer_dtype == torch.float8_e4m3fn else {
            k: v.to(transformer_dtype) for k, v in tsd.items()}
    tsd = {transformer_prefix + k: v for k, v in tsd.items()}
    tname = "flux1-dev" + ("" if transformer_layout == "bfl" else "-diffusers")
    if transformer_dtype == torch.float8_e4m3fn:
        tname += "-fp8" + ("-scaled" if scaled_fp8 else "")
    out["transformer"] = save(tsd, tname + ".safetensors", "transformer",
                              {"axes_dims_rope": list(tcfg["axes_dims_rope"])},
                              {META_AXES: json.dumps(list(tcfg["axes_dims_rope"]))})

    ccfg = pipe.text_encoder.config
    csd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in pipe.text_encoder.state_dict().items()}
    out["clip_l"] = save(csd, "clip_l.safetensors", "clip_l",
                         {k: getattr(ccfg, k) for k in _CLIP_META_FIELDS if hasattr(ccfg, k)})

    t5 = pipe.text_encoder_2
    t5sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    if t5_dtype == torch.float8_e4m3fn:
        t5sd = _to_fp8(t5sd, scaled=False)
    elif t5_dtype is not None:
        t5sd = {k: v.to(t5_dtype) for k, v in t5sd.items()}
    tag = _DTYPE_TAG.get(t5_dtype or next(iter(t5sd.values())).dtype, "custom")
    t5c = t5.config
    out["t5xxl"] = save(t5sd, f"t5xxl_{tag}.safetensors", "t5xxl", {
        k: getattr(t5c, k) for k in ("feed_forward_proj", "dense_act_fn", "is_gated_act", "layer_norm_epsilon",
                                     "relative_attention_max_distance", "pad_token_id", "eos_token_id",
                                     "decoder_start_token_id") if hasattr(t5c, k)})

    vcfg = dict(pipe.vae.config)
    vsd = _diffusers_to_ldm_vae(pipe.vae.state_dict(), len(vcfg["block_out_channels"]))
    out["vae"] = save(vsd, "ae.safetensors", "vae", {
        k: vcfg[k] for k in ("norm_num_groups", "scaling_factor", "shift_factor", "sample_size", "act_fn",
                             "force_upcast") if k in vcfg})

    tok = folder / "tokenizers"
    pipe.tokenizer.save_pretrained(str(tok / "clip"))
    pipe.tokenizer_2.save_pretrained(str(tok / "t5"))
    out["tokenizer_dir"] = tok
    logger.info("wrote single files to %s (%s layout)", folder, transformer_layout)
    return out
