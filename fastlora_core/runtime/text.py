"""Flux.1's two text encoders without transformers: T5 v1.1 (``T5EncoderModel``, the 4096-wide
prompt embeddings) and CLIP-L (``CLIPTextModel``, the pooled prompt vector).

Stand-ins for transformers 5.25's classes as ``FluxPipeline`` calls them
(``text_encoder_2(ids, output_hidden_states=False)[0]`` and
``text_encoder(ids, output_hidden_states=False).pooler_output``):

- the same module tree, so the same ``state_dict`` keys, shapes and order (transformers 5 has no
  ``text_model.`` level in ``CLIPTextModel``; T5 lists the tied embedding as both ``shared.weight``
  and ``encoder.embed_tokens.weight``) and the same ``nn.Linear`` / ``nn.Embedding`` leaves, so
  LoRA key maps and the loader's plans apply unchanged;
- the same arithmetic in the same order as transformers' default attention implementation for both
  models, ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention`` with the masks
  ``masking_utils`` builds for it), so float32 outputs are bitwise equal on the CPU
  (``tests/test_runtime_text.py``);
- no buffers: CLIP's ``position_ids`` (a non-persistent buffer in transformers, absent from its
  ``state_dict``) is made with ``torch.arange`` in ``forward``, so a model built under
  ``torch.device("meta")`` and loaded with ``load_state_dict(sd, strict=True, assign=True)`` has
  nothing left on the meta device;
- state dicts as saved on disk load with ``strict=True`` too: T5 with ``shared.weight`` alone
  (transformers saves the tied embedding once), CLIP with transformers 4 / ComfyUI ``text_model.*``
  keys (transformers 5 strips that prefix on load as well).

Inference only: dropout follows ``self.training`` as in transformers, but there is no gradient
checkpointing, cache, ``output_attentions`` or ``inputs_embeds`` (transformers stays the path for
those).

This module holds what both share (config, output, activations, the base class); the encoders are
:mod:`.t5` (``T5Encoder``) and :mod:`.clip` (``CLIPTextEncoder``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .base import RuntimeModule

logger = logging.getLogger(__name__)

__all__ = ["TextEncoderBase", "TextEncoderConfig", "TextEncoderOutput", "activation"]


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


class TextEncoderConfig:
    """A model config with attribute access (``config.d_model``), as transformers' configs give it.

    Holds every key it was built from (unknown keys too, so ``config.json`` round-trips); ``aliases``
    maps transformers' generic names (``hidden_size``) to the model's own (``d_model``)."""

    def __init__(self, values: Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> None:
        object.__setattr__(self, "_aliases", dict(aliases or {}))
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        aliases = self.__dict__.get("_aliases", {})
        if name in aliases:
            return getattr(self, aliases[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def get(self, key: str, default: Any = None) -> Any:
        """``dict.get`` over the attributes (aliases included)."""
        try:
            return getattr(self, key)
        except AttributeError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, _MISSING) is not _MISSING

    def to_dict(self) -> dict[str, Any]:
        """The values as a plain dict (what ``config.json`` holds)."""
        return {k: v for k, v in self.__dict__.items() if k != "_aliases"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"


_MISSING = object()


@dataclass
class TextEncoderOutput:
    """What the encoders return: attribute access like transformers' ``BaseModelOutput(WithPooling)``
    and tuple-style indexing over the fields that are set (``out[0]`` is ``last_hidden_state``)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not None, in order (transformers' ``ModelOutput.to_tuple``)."""
        return tuple(v for v in (self.last_hidden_state, self.pooler_output, self.hidden_states) if v is not None)

    def keys(self) -> list[str]:
        names = ("last_hidden_state", "pooler_output", "hidden_states")
        return [n for n in names if getattr(self, n) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``NewGELUActivation`` (T5 v1.1's ``gelu_new``), written the same way."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``QuickGELUActivation`` (CLIP's ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``FastGELUActivation``."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


#: transformers' ``ACT2FN`` entries these encoders' configs use, as the same torch calls.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": _gelu_new,
    "quick_gelu": _quick_gelu,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": _gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"FastLoRA's text encoders do not implement the activation {name!r} "
                         f"(known: {', '.join(sorted(_ACTIVATIONS))}); use transformers' class.") from None


class TextEncoderBase(RuntimeModule):
    config: TextEncoderConfig
