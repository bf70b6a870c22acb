"""CLIP-L text encoder without transformers: a stand-in for ``CLIPTextModel`` as Flux uses it
(shared rules and pieces: :mod:`.text`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import as_mapping, embedding
from .text import TextEncoderBase, TextEncoderConfig, TextEncoderOutput, activation

logger = logging.getLogger(__name__)

__all__ = ["CLIPTextEncoder"]


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------

#: ``CLIPTextConfig`` defaults (transformers 5.25) for the keys the encoder reads.
_CLIP_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "output_hidden_states": False,
}


def _clip_config(config: Mapping[str, Any]) -> TextEncoderConfig:
    values = {**_CLIP_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k not in _CLIP_DEFAULTS}}
    if values["hidden_size"] % values["num_attention_heads"] != 0:
        raise ValueError(f"The hidden size ({values['hidden_size']}) is not a multiple of the number of attention "
                         f"heads ({values['num_attention_heads']}).")
    activation(values["hidden_act"])
    return TextEncoderConfig(values)


class CLIPTextEmbeddings(nn.Module):
    """Token plus absolute position embeddings; positions come from ``torch.arange`` (transformers'
    non-persistent ``position_ids`` buffer holds the same values)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_length = input_ids.shape[-1]
        max_position_embedding = self.position_embedding.weight.shape[0]
        if seq_length > max_position_embedding:
            raise ValueError(f"Sequence length must be less than max_position_embeddings (got `sequence length`: "
                             f"{seq_length} and max_position_embeddings: {max_position_embedding}")
        position_ids = torch.arange(seq_length, dtype=torch.long,
                                    device=self.position_embedding.weight.device).unsqueeze(0)
        inputs_embeds = self.token_embedding(input_ids)
        return inputs_embeds + self.position_embedding(position_ids)


class CLIPAttention(nn.Module):
    """Multi-head attention through SDPA: ``is_causal=True`` without a padding mask, else the
    boolean causal-and-padding mask (transformers' ``sdpa_attention_forward``)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states)
        keys = self.k_proj(hidden_states)
        values = self.v_proj(hidden_states)
        queries = queries.view(hidden_shape).transpose(1, 2)
        keys = keys.view(hidden_shape).transpose(1, 2)
        values = values.view(hidden_shape).transpose(1, 2)
        q_length = queries.shape[2]
        is_causal = q_length > 1 and attention_mask is None
        attn_output = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=attention_mask,
            dropout_p=0.0 if not self.training else float(self.dropout), scale=self.scale, is_causal=is_causal,
        )
        attn_output = attn_output.reshape(attn_output.shape[0], -1, q_length, values.shape[-1])
        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output)


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.activation_fn = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        return self.fc2(hidden_states)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


def _clip_causal_mask(attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The mask transformers' ``create_causal_mask`` gives SDPA: None (SDPA's ``is_causal``) without
    padding, else the boolean ``[batch, 1, query, key]`` causal-and-padding mask (4-D: as given)."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    padding = attention_mask.to(device=device, dtype=torch.bool)
    batch, kv_length = padding.shape
    if padding.sum() == padding.numel():  # _ignore_causal_mask_sdpa (query length == key length)
        return None
    q_idx = torch.arange(kv_length, device=device)[None, None, :, None]
    kv_idx = torch.arange(kv_length, device=device)[None, None, None, :]
    b_idx = torch.arange(batch, device=device)[:, None, None, None]
    mask = q_idx.new_ones((), dtype=torch.bool)
    mask = mask & (kv_idx <= q_idx)
    mask = mask & padding[b_idx, kv_idx]
    return mask.expand(batch, -1, kv_length, kv_length)


class CLIPTextEncoder(TextEncoderBase):
    """Stand-in for transformers 5's ``CLIPTextModel`` (CLIP-L as Flux uses it: the pooled output).

    Build with :meth:`from_config` from the ``config.json`` dict. Returns ``.last_hidden_state``
    (after the final layer norm) and ``.pooler_output`` (the hidden state at the end token: the
    highest id when ``eos_token_id == 2``, transformers' legacy rule for old configs such as
    FLUX.1-dev's, else the first ``eos_token_id``). Attention is transformers' default ``"sdpa"``.

    ``state_dict`` keys are transformers 5's (``embeddings.token_embedding.weight``, no
    ``text_model.``); a state dict in the transformers 4 / ComfyUI layout (``text_model.*``) also
    loads, its prefix dropped."""

    main_input_name = "input_ids"

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id
        self._register_load_state_dict_pre_hook(_strip_text_model_prefix)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> CLIPTextEncoder:
        """From a ``CLIPTextConfig`` dict (``config.json``); unknown keys are kept on ``.config``, unused."""
        return cls(_clip_config(as_mapping(config)))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None) -> TextEncoderOutput:
        """``input_ids [batch, seq]`` -> ``last_hidden_state [batch, seq, hidden]`` and
        ``pooler_output [batch, hidden]``; ``attention_mask`` (1 = token, 0 = padding) as in
        transformers. ``hidden_states`` (when asked): the embeddings and each layer's output, the
        last one before the final layer norm (transformers' CLIP does not tie it)."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.get("output_hidden_states", False))
        input_shape = input_ids.size()
        input_ids = input_ids.view(-1, input_shape[-1])
        hidden_states = self.embeddings(input_ids)
        mask = _clip_causal_mask(attention_mask, hidden_states.device)
        all_hidden: list[torch.Tensor] = []
        for layer in self.encoder.layers:
            if output_hidden_states and not all_hidden:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, mask)
            if output_hidden_states:
                all_hidden.append(hidden_states)
        last_hidden_state = self.final_layer_norm(hidden_states)
        batch_index = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        ids = input_ids.to(dtype=torch.int, device=last_hidden_state.device)
        if self.eos_token_id == 2:
            # Configs from before transformers PR #24773 (eos_token_id 2): the end token has the highest id.
            pooled_output = last_hidden_state[batch_index, ids.argmax(dim=-1)]
        else:
            # The first eos_token_id of each row (the pad token may be the same id).
            pooled_output = last_hidden_state[batch_index, (ids == self.eos_token_id).int().argmax(dim=-1)]
        return TextEncoderOutput(last_hidden_state=last_hidden_state, pooler_output=pooled_output,
                                 hidden_states=tuple(all_hidden) if output_hidden_states else None)


def _strip_text_model_prefix(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Accept transformers 4 / ComfyUI CLIP keys (``text_model.embeddings...``): transformers 5
    renames them on load the same way (its ``PrefixChange("text_model")`` conversion)."""
    old = prefix + "text_model."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + key[len(old):]] = state_dict.pop(key)
