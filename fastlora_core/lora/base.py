"""What both swap strategies share: their interface (:class:`SwapStrategy`, all the engine knows of
them), a resolved stack, target lookup and the dry-run validation."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .cache import FileKey
from .fit import fit_problems, linear_modules, raise_if_unfit
from .types import Layer, NormalizedLora

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

__all__ = ["Contribution", "ResolvedEntry", "SwapStrategy", "check_targets_exist", "linear_modules", "per_layer"]


class SwapStrategy(ABC):
    """How a LoRA stack gets into the model. The engine calls only these methods (never asks which
    strategy it holds); a new strategy implements :meth:`validate` and :meth:`apply` and overrides
    the hooks it needs.

    Contract of :meth:`apply`: the weights end up as the stack says, in place (a compiled graph
    sees them without recompiling); a failure restores the previous stack before it propagates.
    """

    name: ClassVar[str]
    #: Whether swaps go through a pre-built slot of fixed targets and rank (PEFT layers) that
    #: :meth:`prepare_slot` sizes; False: any rank and target swaps with no preparation.
    uses_slot: ClassVar[bool] = False

    @abstractmethod
    def validate(self, entries: list[ResolvedEntry]) -> list[str]:
        """Dry run before anything is written; returns warnings. Raises LoraError when the stack
        cannot be applied."""

    @abstractmethod
    def apply(self, entries: list[ResolvedEntry]) -> int:
        """Make the weights match ``entries``; returns how many layers were written."""

    def model_moved(self) -> None:
        """The model was quantised or moved to its device: refresh anything cached about it."""
        return None

    def offload(self) -> None:
        """The engine moved its weights to CPU RAM (ComfyUI unload): follow with any state."""
        return None

    def reload(self) -> None:
        """The engine moved its weights back to the device: undo :meth:`offload`."""
        return None

    def move_held_to_ram(self) -> None:
        """Move :meth:`held_tensors` that sit on a GPU to system RAM (the engine keeps working, its
        swaps reading them from there). Nothing to move by default."""
        return None

    def held_tensors(self) -> list[torch.Tensor]:
        """Tensors the strategy keeps beside the model's own (masters, saved originals), wherever they
        live: part of the engine's memory (:meth:`FluxEngine.memory_bytes`). None by default."""
        return []

    def check_layer_kinds(self, loras: Sequence[NormalizedLora]) -> None:
        """Raise LoraFitError when a LoRA holds layers this strategy can never apply (whatever its
        slot), naming the files and what to use instead. A strategy that refuses a layer kind calls
        it from :meth:`validate`; the engine also calls it on the files planned for
        :meth:`prepare_slot`, so a slot is never sized for them. Accepts everything by default."""
        return None

    def prepare_slot(self, targets: frozenset[str], rank: int) -> bool:
        """Size the slot (``uses_slot`` strategies) to cover ``targets`` at ``rank``; True when the
        module structure changed (a compiled model recompiles once). Nothing to do otherwise."""
        return False

    def slot_size(self) -> tuple[int, int]:
        """(number of targets, rank) of the slot; (0, 0) without one."""
        return 0, 0


def per_layer(entries: list[ResolvedEntry], part: str = "transformer") -> dict[str, list[tuple[ResolvedEntry, Layer]]]:
    layers: dict[str, list[tuple[ResolvedEntry, Layer]]] = {}
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
