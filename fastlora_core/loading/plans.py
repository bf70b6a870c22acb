"""Recognising single files: safetensors header -> :class:`Plan` (module config, key prefix,
layout). No tensor is read; every width and layer count comes from header shapes, the rest from the
shipped configs in ``fastlora_core/configs/`` or our own ``fastlora.*`` metadata.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from ..errors import ModelLoadError
from .header import Header, _describe, _quantised, describe_keys

logger = logging.getLogger(__name__)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: safetensors ``__metadata__`` keys written by :func:`write_single_files` and read back here.
META_COMPONENT = "fastlora.component"
META_CONFIG = "fastlora.config"
META_AXES = "fastlora.axes_dims_rope"


Role = Literal["transformer", "clip_l", "t5xxl", "vae"]
#: The pipeline component each role loads (``FluxPipeline`` attribute, diffusers folder name).
COMPONENT_OF: dict[Role, str] = {"transformer": "transformer", "clip_l": "text_encoder", "t5xxl": "text_encoder_2",
                                 "vae": "vae"}
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
        return json.load(f)



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


# Where a transformer checkpoint keeps its tensors ("" first: bare BFL or diffusers names). Not the
# LoRA prefixes of lora/formats.py: LoRA files add PEFT's "base_model.model." and never a bare "model.".
_CHECKPOINT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")


def _plan_transformer(h: Header) -> _Plan:
    role: Role = "transformer"
    keys = h.tensors
    _quantised(h, role)
    bfl = _find_prefix(keys, ("double_blocks.0.img_attn.qkv.weight", "img_in.weight"), _CHECKPOINT_PREFIXES)
    dif = _find_prefix(keys, ("x_embedder.weight",), _CHECKPOINT_PREFIXES)
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
        raise _fail(role, h, f"is damaged: {e}.", "Download it again.") from e
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
        raise _fail(role, h, f"is an incomplete CLIP text encoder (missing {e}).", "Download clip_l.safetensors again.") from e
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
        raise _fail(role, h, f"is an incomplete T5 encoder (missing {e}).", "Download the T5 file again.") from e
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
        raise _fail(role, h, f"is an incomplete autoencoder (missing {e}).", "Download ae.safetensors again.") from e
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




