"""What every runtime module shares: ``dtype`` / ``device`` as diffusers and transformers report them,
and reading a config given as a mapping or as a config object."""

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
