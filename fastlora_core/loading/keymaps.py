"""Key maps between the original Black Forest Labs (BFL) Flux layout and diffusers, and between the
LDM autoencoder layout and diffusers (the loading direction).
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)


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




