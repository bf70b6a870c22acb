"""T5 v1.1 (T5-XXL) encoder without transformers: a stand-in for ``T5EncoderModel`` as Flux uses it
(shared rules and pieces: :mod:`.text`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import as_mapping, embedding
from .text import TextEncoderBase, TextEncoderConfig, TextEncoderOutput, activation

logger = logging.getLogger(__name__)

__all__ = ["T5Encoder"]


# --------------------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------------------

#: ``T5Config`` defaults (transformers 5.25) for the keys the encoder reads.
_T5_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "relu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "is_decoder": False,
    "output_hidden_states": False,
}
_T5_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
               "head_dim": "d_kv"}


def _t5_config(config: Mapping[str, Any]) -> TextEncoderConfig:
    values = {**_T5_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k not in _T5_DEFAULTS}}
    proj = str(values["feed_forward_proj"])
    act_info = proj.split("-")
    if len(act_info) > 1 and act_info[0] != "gated" or len(act_info) > 2:
        raise ValueError(f"feed_forward_proj {proj!r} is not 'gated-{{ACT_FN}}' or '{{ACT_FN}}'.")
    # T5Config.__post_init__ derives these from feed_forward_proj; values given in config.json win.
    values["dense_act_fn"] = config.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else act_info[-1])
    values["is_gated_act"] = config.get("is_gated_act", act_info[0] == "gated")
    if values.get("is_decoder"):
        raise ValueError("T5Encoder is the encoder stack only; is_decoder=True needs transformers.")
    values["use_cache"] = False  # what T5EncoderModel sets on its config
    values["is_encoder_decoder"] = False
    activation(str(values["dense_act_fn"]))
    return TextEncoderConfig(values, _T5_ALIASES)


class T5LayerNorm(nn.Module):
    """RMS norm without bias; the variance is taken in float32 and the result cast back to a half
    weight dtype, exactly as transformers' ``T5LayerNorm``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def _to_wo_dtype(hidden_states: torch.Tensor, wo: nn.Linear) -> torch.Tensor:
    """transformers keeps T5's ``wo`` in float32 under fp16 (``_keep_in_fp32_modules``): the input
    is cast to its dtype, never to an integer one (transformers excludes int8 only; a bitsandbytes
    NF4 weight is stored as uint8, decision 60)."""
    weight = wo.weight
    if isinstance(weight, torch.Tensor) and hidden_states.dtype != weight.dtype and weight.dtype.is_floating_point:
        hidden_states = hidden_states.to(weight.dtype)
    return hidden_states


class T5DenseActDense(nn.Module):
    """Original T5's feed-forward (``feed_forward_proj="relu"``)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = activation(config.dense_act_fn)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wi(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.wo(_to_wo_dtype(hidden_states, self.wo))


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1's gated feed-forward (``"gated-gelu"``: ``gelu_new(wi_0 x) * wi_1 x``)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = activation(config.dense_act_fn)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_gelu = self.act(self.wi_0(hidden_states))
        hidden_linear = self.wi_1(hidden_states)
        hidden_states = hidden_gelu * hidden_linear
        hidden_states = self.dropout(hidden_states)
        return self.wo(_to_wo_dtype(hidden_states, self.wo))


class T5LayerFF(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.DenseReluDense: nn.Module = (T5DenseGatedActDense(config) if config.is_gated_act
                                          else T5DenseActDense(config))
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        forwarded_states = self.layer_norm(hidden_states)
        forwarded_states = self.DenseReluDense(forwarded_states)
        return hidden_states + self.dropout(forwarded_states)


def _relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                              max_distance: int = 128) -> torch.Tensor:
    """T5's bucketing of key - query offsets (transformers' ``T5Attention._relative_position_bucket``)."""
    relative_buckets: torch.Tensor | int = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    assert isinstance(relative_buckets, torch.Tensor)
    return relative_buckets


class T5Attention(nn.Module):
    """T5 self-attention: unscaled scores plus the relative position bias, through SDPA with the
    bias (and padding) as an additive float mask, as transformers' ``sdpa_attention_forward``."""

    def __init__(self, config: TextEncoderConfig, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.has_relative_attention_bias = has_relative_attention_bias
        self.relative_attention_num_buckets = config.relative_attention_num_buckets
        self.relative_attention_max_distance = config.relative_attention_max_distance
        self.d_model = config.d_model
        self.key_value_proj_dim = config.d_kv
        self.n_heads = config.num_heads
        self.dropout = config.dropout_rate
        self.inner_dim = self.n_heads * self.key_value_proj_dim
        self.scaling = 1.0
        self.q = nn.Linear(self.d_model, self.inner_dim, bias=False)
        self.k = nn.Linear(self.d_model, self.inner_dim, bias=False)
        self.v = nn.Linear(self.d_model, self.inner_dim, bias=False)
        self.o = nn.Linear(self.inner_dim, self.d_model, bias=False)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = embedding(self.relative_attention_num_buckets, self.n_heads)

    def compute_bias(self, query_length: int, key_length: int, device: torch.device | None = None) -> torch.Tensor:
        """The bias ``[1, heads, query_length, key_length]`` from the bucketed offsets (encoder:
        bidirectional, no cache)."""
        if device is None:
            device = self.relative_attention_bias.weight.device
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position
        relative_position_bucket = _relative_position_bucket(
            relative_position, bidirectional=True, num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(relative_position_bucket)
        return values.permute([2, 0, 1]).unsqueeze(0)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.key_value_proj_dim)
        query_states = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v(hidden_states).view(hidden_shape).transpose(1, 2)
        if position_bias is None:
            key_length = key_states.shape[-2]
            if not self.has_relative_attention_bias:
                position_bias = torch.zeros((1, self.n_heads, input_shape[1], key_length),
                                            device=query_states.device, dtype=query_states.dtype)
            else:
                position_bias = self.compute_bias(input_shape[1], key_length, device=query_states.device)
        # transformers' create_position_bias_mask (not causal: the encoder).
        if mask is None:
            bias_mask = position_bias
        elif mask.dtype == torch.bool:
            min_dtype = max(torch.finfo(key_states.dtype).min, torch.finfo(position_bias.dtype).min)
            bias_mask = torch.where(mask, position_bias, min_dtype)
        else:
            bias_mask = position_bias + mask
        attn_output = F.scaled_dot_product_attention(
            query_states, key_states, value_states, attn_mask=bias_mask.contiguous(),
            dropout_p=0.0 if not self.training else self.dropout, scale=self.scaling, is_causal=False,
        )
        attn_output = attn_output.reshape(attn_output.shape[0], -1, query_states.shape[2], value_states.shape[-1])
        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o(attn_output), position_bias


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias=has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        normed_hidden_states = self.layer_norm(hidden_states)
        attention_output, position_bias = self.SelfAttention(normed_hidden_states, mask=attention_mask,
                                                             position_bias=position_bias)
        return hidden_states + self.dropout(attention_output), position_bias


def _clamp_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    """T5's guard against fp16 overflow (transformers' ``T5Block``): clamp to the fp16 range, 1000
    below it once an inf appeared."""
    if hidden_states.dtype == torch.float16:
        clamp_value = torch.where(
            torch.isinf(hidden_states).any(),
            torch.finfo(hidden_states.dtype).max - 1000,
            torch.finfo(hidden_states.dtype).max,
        )
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


class T5Block(nn.Module):
    def __init__(self, config: TextEncoderConfig, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.layer = nn.ModuleList()
        self.layer.append(T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias))
        self.layer.append(T5LayerFF(config))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, position_bias = self.layer[0](hidden_states, attention_mask=attention_mask,
                                                     position_bias=position_bias)
        hidden_states = _clamp_fp16(hidden_states)
        hidden_states = self.layer[-1](hidden_states)
        return _clamp_fp16(hidden_states), position_bias


def _t5_padding_mask(attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The mask transformers' ``create_bidirectional_mask`` gives SDPA: None without padding, else a
    boolean ``[batch, 1, query, key]`` (a 4-D mask is used as given)."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    padding = attention_mask.to(device=device, dtype=torch.bool)
    if padding.all():
        return None
    batch, kv_length = padding.shape
    q_idx = torch.arange(kv_length, device=device)[None, None, :, None]
    kv_idx = torch.arange(kv_length, device=device)[None, None, None, :]
    b_idx = torch.arange(batch, device=device)[:, None, None, None]
    mask = q_idx.new_ones((), dtype=torch.bool)
    mask = mask & (q_idx >= 0)
    mask = mask & padding[b_idx, kv_idx]
    return mask.expand(batch, -1, kv_length, kv_length)


class T5Stack(nn.Module):
    """The encoder stack (``T5EncoderModel.encoder``); ``embed_tokens`` is the model's ``shared``
    embedding, registered under both names as transformers ties them."""

    def __init__(self, config: TextEncoderConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(
            [T5Block(config, has_relative_attention_bias=bool(i == 0)) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> TextEncoderOutput:
        inputs_embeds = self.embed_tokens(input_ids)
        mask = _t5_padding_mask(attention_mask, inputs_embeds.device)
        position_bias: torch.Tensor | None = None
        hidden_states = self.dropout(inputs_embeds)
        all_hidden: list[torch.Tensor] = []
        for layer_module in self.block:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, position_bias = layer_module(hidden_states, mask, position_bias)
        hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)
        # transformers records each block's input then output and ties the last to last_hidden_state.
        hidden = tuple(all_hidden) + (hidden_states,) if output_hidden_states else None
        return TextEncoderOutput(last_hidden_state=hidden_states, hidden_states=hidden)


class T5Encoder(TextEncoderBase):
    """Stand-in for transformers' ``T5EncoderModel`` (T5 v1.1 / T5-XXL as Flux uses it).

    Build with :meth:`from_config` from the ``config.json`` dict. ``forward(input_ids)[0]`` is the
    last hidden state. Attention is transformers' default ``"sdpa"`` implementation."""

    _keep_in_fp32_modules = ["wo"]  # as T5PreTrainedModel: the loader keeps them float32 at fp16
    main_input_name = "input_ids"

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)
        self._register_load_state_dict_pre_hook(_fill_tied_t5_embedding)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> T5Encoder:
        """From a ``T5Config`` dict (``config.json``); unknown keys are kept on ``.config``, unused."""
        return cls(_t5_config(as_mapping(config)))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None) -> TextEncoderOutput:
        """``input_ids [batch, seq]`` -> ``last_hidden_state [batch, seq, d_model]`` (``out[0]``);
        ``attention_mask [batch, seq]`` (1 = token, 0 = padding) as in transformers."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.get("output_hidden_states", False))
        return self.encoder(input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)


def _fill_tied_t5_embedding(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``shared.weight`` and ``encoder.embed_tokens.weight`` are one tensor (transformers ties them
    and saves only ``shared.weight``): a state dict with one of them loads strictly."""
    shared, embed = prefix + "shared.weight", prefix + "encoder.embed_tokens.weight"
    if shared in state_dict and embed not in state_dict:
        state_dict[embed] = state_dict[shared]
    elif embed in state_dict and shared not in state_dict:
        state_dict[shared] = state_dict[embed]
