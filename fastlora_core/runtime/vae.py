"""Flux.1's autoencoder without diffusers: a stand-in for diffusers 0.42's ``AutoencoderKL`` as the
Flux pipeline and FastLoRA use it (``decode`` for images, ``encode(...).latent_dist.mean`` for the
engine's preview colours).

The same module tree as diffusers' class (``Encoder`` / ``Decoder`` of ``DownEncoderBlock2D`` /
``UpDecoderBlock2D``, ``UNetMidBlock2D`` with one attention, ``ResnetBlock2D``, ``Downsample2D`` /
``Upsample2D``), so the same ``state_dict`` keys and shapes, no buffers, and the same arithmetic in
the same order (``AttnProcessor2_0`` for the mid-block attention), so float32 outputs are bitwise
equal on the CPU (``tests/test_runtime_vae.py``). Not covered (diffusers stays the path): tiling,
slicing, block types other than the two above, spatial norm.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import RuntimeModule

logger = logging.getLogger(__name__)

__all__ = ["DecoderOutput", "DiagonalGaussian", "EncoderOutput", "FluxVAE", "VAEConfig"]

#: diffusers' ``AutoencoderKL`` constructor defaults for the keys this module reads.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
#: diffusers' ``activations.ACT2CLS`` (the resnets' ``act_fn``; the encoder / decoder output act is SiLU).
_ACTIVATIONS: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish,
                                            "gelu": nn.GELU, "relu": nn.ReLU}
#: diffusers' ``AutoencoderKL`` uses eps 1e-6 in every group norm of the VAE.
_EPS = 1e-6


class VAEConfig(Mapping[str, Any]):
    """The VAE's config: diffusers' defaults overlaid with ``config.json`` (unknown keys kept, unused;
    ``_class_name`` and other private keys dropped); read as attributes (``vae.config.scaling_factor``,
    as the pipeline does) or as a mapping (``dict(vae.config)``)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        merged = {**_DEFAULTS, **{k: v for k, v in values.items() if not k.startswith("_")}}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            merged[key] = tuple(merged[key])
        self._values = merged

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"VAEConfig({self._values!r})"


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding (what the VAE uses): norm, act, conv twice,
    plus a 1x1 shortcut convolution where the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, act: str) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = nn.GroupNorm(num_groups=groups, num_channels=out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = _ACTIVATIONS[act]()
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
                              if in_channels != out_channels else None)

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden = self.nonlinearity(self.norm1(input_tensor))
        hidden = self.conv1(hidden)
        hidden = self.nonlinearity(self.norm2(hidden))
        hidden = self.conv2(self.dropout(hidden))
        if self.conv_shortcut is not None:
            # diffusers 0.42 makes the input contiguous only in training; in eval the tensor keeps its
            # layout (the upsampler's output is strided differently) and the convolution kernel, so its
            # roundings, follow the layout: calling .contiguous() here changes float32 results.
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / 1.0  # output_scale_factor 1.0, kept for the same op order


class Attention(nn.Module):
    """The mid block's single-head self-attention over pixels (diffusers' ``Attention`` built with
    ``_from_deprecated_attn_block=True``, run by ``AttnProcessor2_0``): group norm, q/k/v, SDPA,
    out projection, residual, ``rescale_output_factor`` 1."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.heads = 1  # diffusers: in_channels // attention_head_dim with attention_head_dim = in_channels
        self.group_norm = nn.GroupNorm(num_channels=channels, num_groups=groups, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels, bias=True)
        self.to_k = nn.Linear(channels, channels, bias=True)
        self.to_v = nn.Linear(channels, channels, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, bias=True), nn.Dropout(0.0)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self.to_q(hidden_states)
        key = self.to_k(hidden_states)
        value = self.to_v(hidden_states)
        head_dim = key.shape[-1] // self.heads
        query = query.view(batch, -1, self.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, self.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, self.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, self.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = self.to_out[1](self.to_out[0](hidden_states))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        return (hidden_states + residual) / 1.0  # residual_connection, rescale_output_factor 1.0


class UNetMidBlock2D(nn.Module):
    """resnet, attention (when ``mid_block_add_attention``), resnet at the lowest resolution. Without
    attention ``attentions`` is empty, as diffusers' list of ``None`` holds no parameters either."""

    def __init__(self, channels: int, groups: int, act: str, add_attention: bool) -> None:
        super().__init__()
        self.add_attention = add_attention
        self.attentions = nn.ModuleList([Attention(channels, groups, _EPS)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, _EPS, act) for _ in range(2)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        if self.add_attention:
            hidden_states = self.attentions[0](hidden_states)
        return self.resnets[1](hidden_states)


class Downsample2D(nn.Module):
    """Stride-2 convolution after padding right and bottom by one (``padding=0``, as the VAE has it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0))


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution (diffusers' ``contiguous`` guards kept: they are
    no-ops for values, but keep the same memory layout into ``interpolate``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[0] >= 64:
            hidden_states = hidden_states.contiguous()
        if hidden_states.numel() * 2 > pow(2, 31):
            hidden_states = hidden_states.contiguous()
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    """One encoder level: ``layers`` resnets, then a downsampler except at the last level."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act: str,
                 add_downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                                                    _EPS, act) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        for down in self.downsamplers or ():
            hidden_states = down(hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """One decoder level: ``layers`` resnets (``layers_per_block + 1``), then an upsampler except at the
    last level."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act: str,
                 add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                                                    _EPS, act) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        for up in self.upsamplers or ():
            hidden_states = up(hidden_states)
        return hidden_states


class Encoder(nn.Module):
    """Images -> ``2 * latent_channels`` moments (mean and log-variance), diffusers' ``vae.Encoder``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        channels, groups, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        out = channels[0]
        for i in range(len(cfg.down_block_types)):
            prev, out = out, channels[i]
            self.down_blocks.append(DownEncoderBlock2D(prev, out, cfg.layers_per_block, groups, act,
                                                       add_downsample=i != len(channels) - 1))
        self.mid_block = UNetMidBlock2D(channels[-1], groups, act, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(num_channels=channels[-1], num_groups=groups, eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latents -> images, diffusers' ``vae.Decoder`` with group norm (no spatial norm)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        channels, groups, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[-1], kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()
        self.mid_block = UNetMidBlock2D(channels[-1], groups, act, cfg.mid_block_add_attention)
        reversed_channels = list(reversed(channels))
        out = reversed_channels[0]
        for i in range(len(cfg.up_block_types)):
            prev, out = out, reversed_channels[i]
            self.up_blocks.append(UpDecoderBlock2D(prev, out, cfg.layers_per_block + 1, groups, act,
                                                   add_upsample=i != len(channels) - 1))
        self.conv_norm_out = nn.GroupNorm(num_channels=channels[0], num_groups=groups, eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class DiagonalGaussian:
    """The encoder's posterior (diffusers' ``DiagonalGaussianDistribution``, not deterministic):
    ``mean``, ``logvar`` clamped to [-30, 20], ``std``, ``var``, ``sample()``, ``mode()``."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """``mean + std * noise``, the noise drawn as diffusers' ``randn_tensor`` draws it (a CPU
        generator draws on the CPU, a list draws one batch item per generator)."""
        device, dtype = self.parameters.device, self.parameters.dtype
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]
        first = generator[0] if isinstance(generator, list) else generator
        rand_device = device
        if first is not None and first.device.type != device.type:
            if first.device.type != "cpu":
                raise ValueError(f"Cannot generate a {device} tensor from a generator of type {first.device.type}.")
            rand_device = torch.device("cpu")
        shape = tuple(self.mean.shape)
        if isinstance(generator, list):
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype)
                               for g in generator[:shape[0]]], dim=0).to(device)
        else:
            noise = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The posterior's mode, its mean."""
        return self.mean


@dataclass
class EncoderOutput:
    """``encode``'s result (diffusers' ``AutoencoderKLOutput``)."""

    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput:
    """``decode``'s result (diffusers' ``DecoderOutput``)."""

    sample: torch.Tensor


class FluxVAE(RuntimeModule):
    """Flux's autoencoder (or any ``AutoencoderKL`` config built from the two block types above), with
    ``AutoencoderKL``'s parameter names, config and ``encode`` / ``decode`` / ``forward``."""

    #: diffusers' flags; always off here (tiled and sliced encode / decode are not implemented).
    use_tiling = False
    use_slicing = False

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        unsupported = {t for t in config.down_block_types if t != "DownEncoderBlock2D"} | {
            t for t in config.up_block_types if t != "UpDecoderBlock2D"}
        if unsupported or config.act_fn not in _ACTIVATIONS:
            raise ValueError(f"FastLoRA's VAE does not implement {sorted(unsupported) or config.act_fn}; "
                             "load this autoencoder through diffusers.")
        if len(config.down_block_types) != len(config.block_out_channels) or \
                len(config.up_block_types) != len(config.block_out_channels):
            raise ValueError(f"VAE config has {len(config.block_out_channels)} block_out_channels but "
                             f"{len(config.down_block_types)} down / {len(config.up_block_types)} up block types.")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FluxVAE:
        """Build from diffusers' ``vae/config.json`` dict (or a ``VAEConfig``); random weights, or meta
        parameters under ``torch.device("meta")`` for the loader's ``load_state_dict(assign=True)``."""
        return cls(config if isinstance(config, VAEConfig) else VAEConfig(config))

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        """Not implemented: diffusers' ``AutoencoderKL`` is the path for tiled decoding."""
        raise NotImplementedError("FastLoRA's own VAE has no tiled encode/decode; load the VAE through "
                                  "diffusers' AutoencoderKL to use enable_tiling().")

    def enable_slicing(self) -> None:
        """Not implemented: diffusers' ``AutoencoderKL`` is the path for sliced decoding."""
        raise NotImplementedError("FastLoRA's own VAE has no sliced encode/decode; load the VAE through "
                                  "diffusers' AutoencoderKL to use enable_slicing().")

    def disable_tiling(self) -> None:
        """Nothing to do: tiling is never on."""

    def disable_slicing(self) -> None:
        """Nothing to do: slicing is never on."""

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncoderOutput | tuple[DiagonalGaussian]:
        """Images ``[B, 3, H, W]`` in -1..1 -> the posterior over latents ``[B, C, H/f, W/f]``."""
        posterior = DiagonalGaussian(self._moments(x))
        return EncoderOutput(posterior) if return_dict else (posterior,)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output through ``quant_conv`` where the config has one."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents (already unscaled: ``z / scaling_factor + shift_factor``) -> images ``[B, 3, H, W]``
        (about -1..1)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        decoded = self.decoder(z)
        return DecoderOutput(decoded) if return_dict else (decoded,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode then decode (the posterior's mode, or a sample of it), as ``AutoencoderKL.forward``."""
        posterior = DiagonalGaussian(self._moments(sample))
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
