"""What every runtime module shares: ``dtype`` / ``device`` as diffusers and transformers report them,
reading a config given as a mapping or as a config object, and embeddings that cost nothing to build
on the meta device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class RuntimeModule(nn.Module):
    """``dtype`` / ``device`` properties as diffusers' ``ModelMixin`` and transformers'
    ``PreTrainedModel`` have them (the pipeline and the engine read both)."""

    @property
    def dtype(self) -> torch.dtype:
        """The first floating-point parameter's dtype (T5 may keep its ``wo`` layers in float32)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """The first parameter's device."""
        return next(self.parameters()).device


def as_mapping(config: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """A config dict from a mapping or from a config object with ``to_dict()`` (diffusers' FrozenDict,
    a transformers config, ours)."""
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise TypeError(f"expected a config mapping, got {type(config).__name__}")


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """``nn.Embedding(num_embeddings, embedding_dim)``, but on the meta device without its random
    initialisation. The loaders build every module on the meta device and then fill it from the file
    (:mod:`fastlora_core.loading.own`), so that initialisation is meaningless there, and on meta it
    runs through ``torch._refs``, whose first use imports ``torch._dynamo``: 1.4-1.8 s of a start that
    never compiles (``compile=off``: no Triton, sequential offload). On any other device the embedding
    is initialised as usual."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
    return nn.Embedding(num_embeddings, embedding_dim)
