"""Flux.1's transformer without diffusers: a stand-in for diffusers 0.42's ``FluxTransformer2DModel``.

- Built from the same config dict (the transformer's ``config.json``; unknown keys such as
  ``_class_name`` are ignored) with :meth:`FluxTransformer.from_config`.
- The same module tree as diffusers' class: the same ``state_dict`` keys, shapes and order, the same
  ``nn.Linear`` names (LoRA adapters and the loader's plans address them by name), the same
  parameter-free leaves (``nn.Dropout``, ``nn.SiLU``) where diffusers has them, and no buffers, so a
  model built under ``torch.device("meta")`` and loaded with
  ``load_state_dict(sd, strict=True, assign=True)`` has nothing left on the meta device.
- The same arithmetic in the same order as diffusers' default path (``FluxAttnProcessor`` with
  ``dispatch_attention_fn``'s native backend, i.e. ``torch.nn.functional.scaled_dot_product_attention``
  on ``[B, H, S, D]`` views permuted from ``[B, S, H, D]``; ``FluxPosEmbed`` in float64 on the CPU),
  so float32 outputs are bitwise equal on the CPU (``tests/test_runtime_flux.py``).

The layers below the blocks (embeddings, rotary positions, adaptive norms, the feed-forward) are in
:mod:`.flux_layers`; this module has the attention, the two block classes and the model.

Attention runs through one place, :meth:`FluxAttention.attend`: assign a callable to a module's
``attention_fn`` (or override ``attend``) to swap the kernel for that module.

Not covered (diffusers stays the path for them): ControlNet residuals, IP-adapters, attention
processors, fused QKV projections, gradient checkpointing, context / tensor parallelism, and
``joint_attention_kwargs`` other than ``None``, ``{}`` or ``{"scale": 1.0}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import RuntimeModule, as_mapping
from .flux_layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
    FeedForward,
    FluxPosEmbed,
    apply_rotary_emb,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionFn",
    "FluxAttention",
    "FluxPosEmbed",
    "FluxSingleTransformerBlock",
    "FluxTransformer",
    "FluxTransformerBlock",
    "FluxTransformerConfig",
    "FluxTransformerOutput",
    "apply_rotary_emb",
    "native_attention",
]

#: ``fn(query, key, value) -> out``, all ``[batch, seq, heads, head_dim]`` (diffusers' layout).
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# forward() keywords of diffusers' class that are no-ops when None / False (ControlNet inputs).
_NOOP_WHEN_UNSET = ("controlnet_block_samples", "controlnet_single_block_samples", "controlnet_blocks_repeat")


# --------------------------------------------------------------------------------------------------
# Config and output
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FluxTransformerConfig:
    """The transformer's ``config.json`` values with diffusers' defaults (FLUX.1-schnell's shape), read
    as attributes (``config.in_channels``) or items (``config["in_channels"]``) like diffusers'
    ``FrozenDict``. ``out_channels`` stays as given (None means ``in_channels``, as in diffusers)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> FluxTransformerConfig:
        """The known keys of ``config`` (a diffusers config dict); others are ignored."""
        known = {f.name for f in fields(cls)}
        ignored = sorted(k for k in config if k not in known and not k.startswith("_"))
        if ignored:
            logger.debug("FluxTransformerConfig: ignoring config keys %s", ignored)
        values = {k: v for k, v in config.items() if k in known}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(int(d) for d in values["axes_dims_rope"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The values as a plain dict (``axes_dims_rope`` as a list, as ``config.json`` holds it)."""
        out = asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """``dict.get`` over the fields."""
        return getattr(self, key, default) if key in self.__dataclass_fields__ else default

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.__dataclass_fields__

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@dataclass
class FluxTransformerOutput:
    """``forward(..., return_dict=True)``'s result: ``.sample`` (also ``[0]``), as diffusers'
    ``Transformer2DModelOutput``."""

    sample: torch.Tensor

    def to_tuple(self) -> tuple[torch.Tensor]:
        return (self.sample,)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if isinstance(key, str):
            if key != "sample":
                raise KeyError(key)
            return self.sample
        return self.to_tuple()[key]


# --------------------------------------------------------------------------------------------------
# Attention and blocks (diffusers.models.transformers.transformer_flux)
# --------------------------------------------------------------------------------------------------


def native_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SDPA on ``[B, S, H, D]`` tensors, returning ``[B, S, H, D]``: what diffusers'
    ``dispatch_attention_fn`` does with its native backend (no mask, no dropout, default scale)."""
    query, key, value = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    out = F.scaled_dot_product_attention(query=query, key=key, value=value, attn_mask=None, dropout_p=0.0,
                                         is_causal=False, scale=None, enable_gqa=False)
    return out.permute(0, 2, 1, 3)


#: diffusers' names of the SDPA backends -> PyTorch's kernel choices.
_SDPA_BACKENDS: dict[str, str] = {"_native_cudnn": "CUDNN_ATTENTION", "_native_flash": "FLASH_ATTENTION",
                                  "_native_efficient": "EFFICIENT_ATTENTION", "_native_math": "MATH"}


def _sdpa_with(kernel: str) -> AttentionFn:
    """:func:`native_attention` with PyTorch's SDPA restricted to one kernel (``SDPBackend`` name), as
    diffusers' ``_native_cudnn`` / ``_native_flash`` / ... backends run it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, kernel)
    contiguous = kernel == "CUDNN_ATTENTION"  # diffusers' cuDNN backend copies the permuted inputs

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        query, key, value = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        if contiguous:
            query, key, value = (x.contiguous() for x in (query, key, value))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(query=query, key=key, value=value, attn_mask=None,
                                                 dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
        return out.permute(0, 2, 1, 3)

    return attention


class FluxAttention(nn.Module):
    """Flux's attention: QK-RMSNorm, joint text+image attention in the double-stream blocks
    (``added_kv_proj_dim``), RoPE, and the output projections (``FluxAttnProcessor``'s arithmetic).

    Every attention call goes through :meth:`attend`; set ``attention_fn`` (an :data:`AttentionFn`) on a
    module to route its calls to another kernel, or None for :func:`native_attention`."""

    #: The kernel :meth:`attend` calls; None: :func:`native_attention` (diffusers' default).
    attention_fn: AttentionFn | None = None

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 bias: bool = False, added_kv_proj_dim: int | None = None, added_proj_bias: bool | None = True,
                 out_bias: bool = True, eps: float = 1e-5, out_dim: int | None = None,
                 context_pre_only: bool | None = None, pre_only: bool = False,
                 elementwise_affine: bool = True) -> None:
        super().__init__()
        self.head_dim = dim_head
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.query_dim = query_dim
        self.use_bias = bias
        self.dropout = dropout
        self.out_dim = out_dim if out_dim is not None else query_dim
        self.context_pre_only = context_pre_only
        self.pre_only = pre_only
        self.heads = out_dim // dim_head if out_dim is not None else heads
        self.added_kv_proj_dim = added_kv_proj_dim
        self.added_proj_bias = added_proj_bias

        self.norm_q = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=elementwise_affine)
        self.norm_k = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=elementwise_affine)
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(query_dim, self.inner_dim, bias=bias)
        if not self.pre_only:
            self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.out_dim, bias=out_bias),
                                         nn.Dropout(dropout)])
        if added_kv_proj_dim is not None:
            self.norm_added_q = nn.RMSNorm(dim_head, eps=eps)
            self.norm_added_k = nn.RMSNorm(dim_head, eps=eps)
            self.add_q_proj = nn.Linear(added_kv_proj_dim, self.inner_dim, bias=bool(added_proj_bias))
            self.add_k_proj = nn.Linear(added_kv_proj_dim, self.inner_dim, bias=bool(added_proj_bias))
            self.add_v_proj = nn.Linear(added_kv_proj_dim, self.inner_dim, bias=bool(added_proj_bias))
            self.to_add_out = nn.Linear(self.inner_dim, query_dim, bias=out_bias)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention over ``[B, S, H, D]`` (text tokens first): the one place every
        Flux block's attention runs, so another kernel is swapped in here (``attention_fn``)."""
        fn = self.attention_fn
        return native_attention(query, key, value) if fn is None else fn(query, key, value)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Image (and, with ``encoder_hidden_states``, text) stream attention: one tensor for the single
        blocks (no output projection), ``(image, text)`` projected outputs for the double blocks."""
        query = self.to_q(hidden_states)
        key = self.to_k(hidden_states)
        value = self.to_v(hidden_states)

        query = query.unflatten(-1, (-1, self.head_dim))
        key = key.unflatten(-1, (-1, self.head_dim))
        value = value.unflatten(-1, (-1, self.head_dim))
        query = self.norm_q(query)
        key = self.norm_k(key)

        if encoder_hidden_states is not None and self.added_kv_proj_dim is not None:
            encoder_query = self.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, self.head_dim))
            encoder_key = self.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, self.head_dim))
            encoder_value = self.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, self.head_dim))
            encoder_query = self.norm_added_q(encoder_query)
            encoder_key = self.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend(query, key, value)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1)
        hidden_states = self.to_out[0](hidden_states.contiguous())
        hidden_states = self.to_out[1](hidden_states)
        encoder_hidden_states = self.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class FluxTransformerBlock(nn.Module):
    """Double-stream (MMDiT) block: separate image and text weights, joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(query_dim=dim, added_kv_proj_dim=dim, dim_head=attention_head_dim,
                                  heads=num_attention_heads, out_dim=dim, context_pre_only=False, bias=True,
                                  eps=eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim=dim, dim_out=dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, hidden_states)`` after the block, as diffusers returns them."""
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb)

        attn_output, context_attn_output = self.attn(hidden_states=norm_hidden_states,
                                                     encoder_hidden_states=norm_encoder_hidden_states,
                                                     image_rotary_emb=image_rotary_emb)

        attn_output = gate_msa.unsqueeze(1) * attn_output
        hidden_states = hidden_states + attn_output
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_output = self.ff(norm_hidden_states)
        ff_output = gate_mlp.unsqueeze(1) * ff_output
        hidden_states = hidden_states + ff_output

        context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
        encoder_hidden_states = encoder_hidden_states + context_attn_output
        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context_ff_output = self.ff_context(norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over text+image tokens: attention and MLP in parallel, one output projection."""

    #: Return the two streams as tensors of their own instead of slices of one tensor (diffusers'
    #: strides): set by ``optimize.hand_over_contiguous`` so every single block sees the same input
    #: strides and they share one compiled graph.
    contiguous_outputs: bool = False
    #: ``fp8_projection.project`` where ``proj_out`` is a row-wise fp8 layer (set by
    #: ``fp8_projection.install``): the concatenated input is quantised in one kernel, the GELU included.
    out_projection: Callable[[nn.Linear, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(query_dim=dim, dim_head=attention_head_dim, heads=num_attention_heads,
                                  out_dim=dim, bias=True, eps=1e-6, pre_only=True)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, hidden_states)`` after the block (the two streams split back)."""
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        mlp_pre = self.proj_mlp(norm_hidden_states)
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb)
        assert isinstance(attn_output, torch.Tensor)

        gate = gate.unsqueeze(1)
        if self.out_projection is not None and type(self.proj_out) is nn.Linear:
            projected = self.out_projection(self.proj_out, attn_output, mlp_pre)
        else:  # also where a LoRA layer replaced proj_out after install (the adapter strategy)
            projected = self.proj_out(torch.cat([attn_output, self.act_mlp(mlp_pre)], dim=2))
        hidden_states = gate * projected
        hidden_states = residual + hidden_states
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        if self.contiguous_outputs:
            # clone, not .contiguous(): with batch 1 a slice counts as contiguous but keeps the
            # parent's batch stride, which is what Dynamo's guard compares
            return (encoder_hidden_states.clone(memory_format=torch.contiguous_format),
                    hidden_states.clone(memory_format=torch.contiguous_format))
        return encoder_hidden_states, hidden_states


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class FluxTransformer(RuntimeModule):
    """Flux.1's transformer (dev with ``guidance_embeds=True``, schnell without): latents ``[B, S, C]``,
    T5 embeddings, pooled CLIP, timestep (and guidance) in sigma units -> the predicted flow."""

    def __init__(self, config: FluxTransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.out_channels = config.out_channels or config.in_channels
        self.inner_dim = config.num_attention_heads * config.attention_head_dim

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=config.axes_dims_rope)
        time_text_cls = (CombinedTimestepGuidanceTextProjEmbeddings if config.guidance_embeds
                         else CombinedTimestepTextProjEmbeddings)
        self.time_text_embed = time_text_cls(embedding_dim=self.inner_dim,
                                             pooled_projection_dim=config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, self.inner_dim)
        self.x_embedder = nn.Linear(config.in_channels, self.inner_dim)
        self.transformer_blocks = nn.ModuleList([
            FluxTransformerBlock(dim=self.inner_dim, num_attention_heads=config.num_attention_heads,
                                 attention_head_dim=config.attention_head_dim)
            for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([
            FluxSingleTransformerBlock(dim=self.inner_dim, num_attention_heads=config.num_attention_heads,
                                       attention_head_dim=config.attention_head_dim)
            for _ in range(config.num_single_layers)])
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, config.patch_size * config.patch_size * self.out_channels,
                                  bias=True)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> FluxTransformer:
        """Build (random weights) from a diffusers transformer config dict; unknown keys are ignored."""
        if isinstance(config, FluxTransformerConfig):
            return cls(config)
        return cls(FluxTransformerConfig.from_mapping(as_mapping(config)))

    #: Block classes :meth:`compile_repeated_blocks` compiles one by one (regional compilation).
    _repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    def compile_repeated_blocks(self, **kwargs: Any) -> None:
        """``torch.compile`` every double and single block (``kwargs`` go to ``Module.compile``), as
        diffusers' method of the same name does: blocks of one class share their compiled graph."""
        blocks = [m for m in self.modules() if type(m).__name__ in self._repeated_blocks]
        if not blocks:
            raise ValueError(f"{type(self).__name__} has no {self._repeated_blocks} blocks to compile.")
        for block in blocks:
            block.compile(**kwargs)

    def set_attention_fn(self, fn: AttentionFn | None) -> int:
        """Route every attention layer's calls to ``fn`` (None: :func:`native_attention`); returns how
        many layers were set."""
        layers = [m for m in self.modules() if isinstance(m, FluxAttention)]
        for layer in layers:
            layer.attention_fn = fn
        return len(layers)

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' SDPA backend names (``native``, ``_native_cudnn``, ``_native_flash``,
        ``_native_efficient``, ``_native_math``): PyTorch SDPA restricted to that kernel."""
        if backend == "native":
            self.set_attention_fn(None)
            return
        if backend not in _SDPA_BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {', '.join(['native', *_SDPA_BACKENDS])}.")
        self.set_attention_fn(_sdpa_with(_SDPA_BACKENDS[backend]))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
                joint_attention_kwargs: Mapping[str, Any] | None = None, *, return_dict: bool = True,
                **unsupported: Any) -> FluxTransformerOutput | tuple[torch.Tensor]:
        """diffusers' ``FluxTransformer2DModel.forward`` for the plain (no ControlNet / IP-adapter) call.

        ``timestep`` and ``guidance`` are ``[B]`` in sigma units (multiplied by 1000 here, as diffusers
        does); ``img_ids`` ``[S_img, 3]`` and ``txt_ids`` ``[S_txt, 3]`` (3-D ids: the first batch entry
        is used, with diffusers' warning). Returns ``(sample,)`` with ``return_dict=False``."""
        _check_unsupported(unsupported, joint_attention_kwargs)

        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = (self.time_text_embed(timestep, pooled_projections) if guidance is None
                else self.time_text_embed(timestep, guidance, pooled_projections))
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)

        if txt_ids.ndim == 3:
            logger.warning("Passing `txt_ids` 3d torch.Tensor is deprecated."
                           "Please remove the batch dimension and pass it as a 2d torch Tensor")
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3:
            logger.warning("Passing `img_ids` 3d torch.Tensor is deprecated."
                           "Please remove the batch dimension and pass it as a 2d torch Tensor")
            img_ids = img_ids[0]
        ids = torch.cat((txt_ids, img_ids), dim=0)
        image_rotary_emb = self.pos_embed(ids)

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states,
                                                         temb=temb, image_rotary_emb=image_rotary_emb)
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states,
                                                         temb=temb, image_rotary_emb=image_rotary_emb)

        hidden_states = self.norm_out(hidden_states, temb)
        output = self.proj_out(hidden_states)
        if not return_dict:
            return (output,)
        return FluxTransformerOutput(sample=output)


def _check_unsupported(unsupported: Mapping[str, Any], joint_attention_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse what this module does not implement rather than silently ignore it."""
    bad = sorted(k for k, v in unsupported.items() if k not in _NOOP_WHEN_UNSET or (v is not None and v is not False))
    if bad:
        raise TypeError(f"FluxTransformer.forward() got unsupported argument(s) {bad}: FastLoRA's own Flux "
                        "transformer has no ControlNet / IP-adapter inputs; use diffusers' "
                        "FluxTransformer2DModel for those.")
    if joint_attention_kwargs:
        extra = {k: v for k, v in joint_attention_kwargs.items() if not (k == "scale" and v == 1.0)}
        if extra:
            raise NotImplementedError(f"joint_attention_kwargs {sorted(extra)} are not implemented by FastLoRA's "
                                      "own Flux transformer (it takes None or {}); use diffusers' "
                                      "FluxTransformer2DModel for attention processor options or LoRA scale.")
