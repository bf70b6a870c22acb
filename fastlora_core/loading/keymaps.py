"""Key maps between the original Black Forest Labs (BFL) Flux layout and diffusers, and between the
LDM autoencoder layout and diffusers (the loading direction).

The BFL tables are the single description of how Flux.1's modules are named in each layout. Two
readers use them: :func:`bfl_to_diffusers` (model checkpoints, ``loading.single_file``) and the
LoRA reader (``lora/formats.py``), which maps each LoRA module the same way. The writer
(``loading/writer.py``) has its own hand-written inverse on purpose: tests check this direction
against diffusers' own converters and the writing direction by round trips, so one table cannot
hide a mistake in both.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

#: One BFL module: (diffusers module suffixes, split kind, swap the two row halves).
#: Split kind ``"qkv"``: three equal row blocks; ``"linear1"``: ``[h, h, h, rows - 3h]`` with
#: ``h`` the layer's input width (see :func:`split_sizes`). Swapped halves: BFL's final adaLN
#: produces ``(shift, scale)``, diffusers' ``norm_out.linear`` ``(scale, shift)``.
Entry = tuple[tuple[str, ...], str | None, bool]

QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

#: Linear layers of a diffusers ``FluxTransformer2DModel``: double blocks, single blocks, the rest.
DIFFUSERS_DOUBLE = (
    *QKV, "attn.to_out.0", *ADD_QKV, "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear",
)  # fmt: skip
DIFFUSERS_SINGLE = (*QKV, "proj_mlp", "proj_out", "norm.linear")
DIFFUSERS_GLOBAL = (
    "x_embedder", "context_embedder",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "norm_out.linear", "proj_out",
)  # fmt: skip

#: BFL block kind -> diffusers block prefix.
BFL_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}

BFL_DOUBLE: dict[str, Entry] = {
    "img_attn.qkv": (QKV, "qkv", False),
    "img_attn.proj": (("attn.to_out.0",), None, False),
    "img_mlp.0": (("ff.net.0.proj",), None, False),
    "img_mlp.2": (("ff.net.2",), None, False),
    "img_mod.lin": (("norm1.linear",), None, False),
    "txt_attn.qkv": (ADD_QKV, "qkv", False),
    "txt_attn.proj": (("attn.to_add_out",), None, False),
    "txt_mlp.0": (("ff_context.net.0.proj",), None, False),
    "txt_mlp.2": (("ff_context.net.2",), None, False),
    "txt_mod.lin": (("norm1_context.linear",), None, False),
}
BFL_SINGLE: dict[str, Entry] = {
    "linear1": ((*QKV, "proj_mlp"), "linear1", False),
    "linear2": (("proj_out",), None, False),
    "modulation.lin": (("norm.linear",), None, False),
}
BFL_GLOBAL: dict[str, Entry] = {
    "img_in": (("x_embedder",), None, False),
    "txt_in": (("context_embedder",), None, False),
    "time_in.in_layer": (("time_text_embed.timestep_embedder.linear_1",), None, False),
    "time_in.out_layer": (("time_text_embed.timestep_embedder.linear_2",), None, False),
    "vector_in.in_layer": (("time_text_embed.text_embedder.linear_1",), None, False),
    "vector_in.out_layer": (("time_text_embed.text_embedder.linear_2",), None, False),
    "guidance_in.in_layer": (("time_text_embed.guidance_embedder.linear_1",), None, False),
    "guidance_in.out_layer": (("time_text_embed.guidance_embedder.linear_2",), None, False),
    "final_layer.linear": (("proj_out",), None, False),
    "final_layer.adaLN_modulation.1": (("norm_out.linear",), None, True),
}
#: RMSNorm scales of the checkpoints (not Linear layers, so no LoRA targets them).
BFL_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
BFL_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}

_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")


def split_sizes(split: str, rows: int, hidden: int) -> list[int] | None:
    """Row counts of the parts of a fused ``qkv`` (three equal blocks) or ``linear1`` layer
    (``Linear(hidden, 3 * hidden + mlp_hidden)``); None when ``rows`` cannot be split so."""
    if split == "qkv":
        return [rows // 3] * 3 if rows % 3 == 0 else None
    return [hidden, hidden, hidden, rows - 3 * hidden] if rows > 3 * hidden else None


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two row halves exchanged: BFL ``(shift, scale)`` <-> diffusers ``(scale, shift)``."""
    half = int(t.shape[0]) // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _bfl_to_diffusers(sd: dict[str, torch.Tensor], inner_dim: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename/split a BFL Flux state dict (prefix already removed) into diffusers names.

    ``qkv`` weights are split in three equal row blocks, ``linear1`` of single blocks into
    ``inner_dim`` x3 + the MLP rows, and the final adaLN's (shift, scale) halves are swapped to
    diffusers' (scale, shift) (all from the tables above). Works on meta tensors too (dry run).
    Returns the converted dict and the keys it did not recognise.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        m = _BLOCK_RE.match(key)
        if m is None:
            base, _, suffix = key.rpartition(".")
            pre, entry = "", BFL_GLOBAL.get(base)
        else:
            kind, idx, name, suffix = m.groups()
            pre = f"{BFL_BLOCKS[kind]}.{idx}."
            norms = BFL_DOUBLE_NORMS if kind == "double_blocks" else BFL_SINGLE_NORMS
            if f"{name}.{suffix}" in norms:
                out[pre + norms[f"{name}.{suffix}"]] = t
                continue
            entry = (BFL_DOUBLE if kind == "double_blocks" else BFL_SINGLE).get(name)
        if entry is None or suffix not in ("weight", "bias"):
            unknown.append(key)
            continue
        modules, split, swap = entry
        sizes = split_sizes(split, int(t.shape[0]), inner_dim) if split else [int(t.shape[0])]
        if sizes is None:
            unknown.append(key)
            continue
        parts = t.split(sizes, dim=0) if split else (swap_halves(t) if swap else t,)
        for module, part in zip(modules, parts):
            out[f"{pre}{module}.{suffix}"] = part
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




