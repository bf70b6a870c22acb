"""What both swap strategies share: a resolved stack, target lookup and the dry-run validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraFitError
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


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, a PEFT LoRA wrapper or a quantised Linear."""
    base = getattr(module, "base_layer", module)
    out_f = getattr(base, "out_features", None)
    in_f = getattr(base, "in_features", None)
    if out_f is None or in_f is None:
        raise TypeError(f"{type(module).__name__} is not a linear layer")
    return int(out_f), int(in_f)


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


def check_targets_exist(entries: list[ResolvedEntry], modules: dict[str, torch.nn.Module], part: str,
                        model_label: str) -> None:
    """Every target must be a linear layer of the model with matching shapes: a LoRA made for a
    Flux model of another size (or another model) is refused before anything is written."""
    for entry in entries:
        layers = getattr(entry.lora, part)
        missing = [n for n in layers if n not in modules]
        if missing:
            raise LoraFitError(
                f"{entry.name}: {len(missing)} target layer(s) do not exist in this {model_label} "
                f"(first: {', '.join(sorted(missing)[:3])}). Is this LoRA for Flux.1? "
                "Nothing was changed."
            )
        for n, layer in layers.items():
            out_f, in_f = linear_shape(modules[n])
            if layer.up.shape[0] != out_f or layer.down.shape[1] != in_f:
                raise LoraFitError(
                    f"{entry.name}: layer {n} is {out_f}x{in_f} in this {model_label} but the LoRA is "
                    f"{layer.up.shape[0]}x{layer.down.shape[1]}: the LoRA was made for a model of another "
                    "size. Nothing was changed."
                )
