"""What both swap strategies share: a resolved stack, target lookup and the dry-run validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import FileKey
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


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear-like module (plain, quantised, bitsandbytes or PEFT-wrapped) by its name in the
    original model (PEFT's ``.base_layer`` suffix removed)."""
    out: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if name.endswith(".base_layer") or ".lora_" in name:
            continue
        if hasattr(module, "base_layer") or isinstance(module, torch.nn.Linear):
            out[name] = module
    return out


def per_layer(entries: list[ResolvedEntry], part: str = "transformer") -> dict[str, list[tuple[ResolvedEntry, LoraLayer]]]:
    layers: dict[str, list[tuple[ResolvedEntry, LoraLayer]]] = {}
    for entry in entries:
        for name, layer in getattr(entry.lora, part).items():
            layers.setdefault(name, []).append((entry, layer))
    return layers


def check_targets_exist(entries: list[ResolvedEntry], modules: dict[str, torch.nn.Module], part: str) -> None:
    """Every target of ``part`` must be a linear layer of the model with matching shapes: a LoRA
    made for a Flux model of another size (or another model) is refused before anything is
    written (``formats.fit_problems`` on the strategy's cached module map)."""
    from .formats import fit_problems, raise_if_unfit

    for entry in entries:
        layers = getattr(entry.lora, part)
        raise_if_unfit(entry.lora.path, fit_problems(layers, modules), len(layers))
