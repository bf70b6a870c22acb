"""Writing a pipeline as the single files a ComfyUI user has (tests, install smoke tests, ``write-tiny``).

The diffusers -> BFL / LDM mapping here is hand-written and independent of :mod:`.keymaps` on
purpose: tests check the loading direction against diffusers' own converters and this direction by
round trips, so one table cannot hide a mistake in both.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import OptionsError
from .plans import _CLIP_META_FIELDS, META_AXES, META_COMPONENT, META_CONFIG

logger = logging.getLogger(__name__)


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


def _to_fp8(sd: Mapping[str, torch.Tensor], scaled: bool, norms: bool = False) -> dict[str, torch.Tensor]:
    """Store 2-D+ weights as float8_e4m3fn (as ComfyUI's fp8 transformer files do); ``norms``: the 1-D
    weights too, as in ComfyUI's ``t5xxl_fp8_e4m3fn.safetensors``, whose every tensor is fp8 (ComfyUI
    reads the T5's storage dtype from ``encoder.final_layer_norm.weight``). ``scaled`` adds per-tensor
    ``scale_weight`` entries and the ``scaled_fp8`` marker (ComfyUI's scaled fp8 format)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if (t.dim() >= 2 or norms) and t.is_floating_point():
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


def _save(path: Path, sd: Mapping[str, torch.Tensor], component: str, meta: dict[str, Any] | None = None,
          extra: dict[str, str] | None = None) -> Path:
    """One component's safetensors file, with the ``fastlora.*`` metadata that :func:`load_pipeline`
    reads back (its component and the configuration shapes cannot tell)."""
    from safetensors.torch import save_file

    md = {META_COMPONENT: component, META_CONFIG: json.dumps(meta or {}), **(extra or {})}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(path), metadata=md)
    return path


def write_t5_file(t5: torch.nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the T5-XXL encoder ``t5`` into ``folder`` as ComfyUI's ``t5xxl_<dtype>.safetensors``
    (``encoder.*`` and ``shared.weight``; ``dtype`` None keeps the module's). ``torch.float8_e4m3fn``
    stores every tensor, layer norms included, in fp8 as ComfyUI's ``t5xxl_fp8_e4m3fn.safetensors``
    does: ComfyUI reads the T5's storage dtype from ``encoder.final_layer_norm.weight``."""
    sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    if dtype == torch.float8_e4m3fn:
        sd = _to_fp8(sd, scaled=False, norms=True)
    elif dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    tag = _DTYPE_TAG.get(dtype or next(iter(sd.values())).dtype, "custom")
    config = t5.config
    return _save(Path(folder) / f"t5xxl_{tag}.safetensors", sd, "t5xxl", {
        k: getattr(config, k) for k in ("feed_forward_proj", "dense_act_fn", "is_gated_act", "layer_norm_epsilon",
                                        "relative_attention_max_distance", "pad_token_id", "eos_token_id",
                                        "decoder_start_token_id") if hasattr(config, k)})


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
    dtype (``torch.float8_e4m3fn`` stores the T5's every weight as fp8 like ``t5xxl_fp8_e4m3fn.safetensors``,
    the transformer's 2-D weights;
    with ``scaled_fp8`` the transformer gets ComfyUI's per-tensor ``scale_weight`` format).
    Configuration that shapes cannot tell (rope axes, CLIP heads, VAE scaling...) goes into the
    safetensors metadata (``fastlora.*``) so that :func:`load_pipeline` rebuilds the same modules.

    Returns ``{"transformer", "clip_l", "t5xxl", "vae", "tokenizer_dir"} -> Path`` (the keyword
    arguments of ``ModelSource.from_single_files``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def save(sd: Mapping[str, torch.Tensor], name: str, component: str, meta: dict[str, Any] | None = None,
             extra: dict[str, str] | None = None) -> Path:
        return _save(folder / name, sd, component, meta, extra)

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

    out["t5xxl"] = write_t5_file(pipe.text_encoder_2, folder, t5_dtype)

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


