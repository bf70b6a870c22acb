"""The value that travels on ``FASTLORA_ENGINE`` links.

A handle is immutable data: which engine (``EngineKey``), which LoRA stack is wanted, and which
adapter slot to prepare. Nodes return new handles and never touch the engine (docs/ARCHITECTURE.md,
decision 1): ComfyUI hands cached outputs to several consumers by reference, so only ``Generate``
turns a handle into engine state, right before it samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ._core import specs


@dataclass(frozen=True)
class SlotSpec:
    """What ``engine.prepare_slot`` gets: the union of these LoRAs' targets (or every layer)."""

    lora_paths: tuple[str, ...] = ()
    all_layers: bool = False
    max_rank: int | None = None

    def union(self, other: SlotSpec) -> SlotSpec:
        paths = self.lora_paths + tuple(p for p in other.lora_paths if p not in self.lora_paths)
        ranks = [r for r in (self.max_rank, other.max_rank) if r]
        return SlotSpec(paths, self.all_layers or other.all_layers, max(ranks) if ranks else None)


@dataclass(frozen=True)
class EngineHandle:
    key: specs.EngineKey
    stack: specs.LoraStack = field(default_factory=specs.LoraStack)
    slot: SlotSpec | None = None

    def with_lora(self, lora: specs.LoraSpec) -> EngineHandle:
        return replace(self, stack=self.stack.plus(lora))

    def with_slot(self, slot: SlotSpec) -> EngineHandle:
        return replace(self, slot=slot if self.slot is None else self.slot.union(slot))

    def describe(self) -> str:
        loras = ", ".join(f"{d['file']}@{d['strength']}" for d in self.stack.describe()) or "no LoRA"
        return f"FluxEngine[{self.key.source.describe()}] + {loras}"
