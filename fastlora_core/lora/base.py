"""What both swap strategies share: a resolved stack, target lookup and the dry-run validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import FileKey
from .fit import fit_problems, linear_modules, raise_if_unfit
from .types import LoraLayer, NormalizedLora

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedEntry:
    key: FileKey
    lora: NormalizedLora
    strength: float

    @property
    def name(self) -> str:
        return Path(self.lora.path).name


Contribution = tuple[tuple[FileKey, float], ...]

__all__ = ["Contribution", "ResolvedEntry", "check_targets_exist", "linear_modules", "per_layer"]


def per_layer(entries: list[ResolvedEntry], part: str = "transformer") -> dict[str, list[tuple[ResolvedEntry, LoraLayer]]]:
    layers: dict[str, list[tuple[ResolvedEntry, LoraLayer]]] = {}
    for entry in entries:
        for name, layer in getattr(entry.lora, part).items():
            layers.setdefault(name, []).append((entry, layer))
    return layers


def check_targets_exist(entries: list[ResolvedEntry], modules: dict[str, torch.nn.Module], part: str) -> None:
    """Every target of ``part`` must be a linear layer of the model with matching shapes: a LoRA
    made for a Flux model of another size (or another model) is refused before anything is
    written (:func:`.fit.fit_problems` on the strategy's cached module map)."""
    for entry in entries:
        layers = getattr(entry.lora, part)
        raise_if_unfit(entry.lora.path, fit_problems(layers, modules), len(layers))
