"""The *adapter* swap strategy (the published recipe): PEFT LoRA layers padded to ``max_rank``.

Contract:
- A *slot* is one PEFT adapter (``fastlora``) injected on a fixed set of target layers at rank
  ``slot_rank``, with ``lora_alpha == r`` so PEFT's scaling is the constant 1.0. It is created by
  ``prepare_slot`` (``PadDummyLora``: the union of planned LoRAs, or every Flux layer) or, failing
  that, by the first LoRA stack applied. Creating or widening a slot changes the module structure:
  a compiled model recompiles once (logged). Everything else is a copy into existing tensors.
- ``apply(entries)``: for every slot layer, ``lora_A[:R] = cat(down_i)`` and
  ``lora_B[:, :R] = cat(strength_i * scale_i * up_i)`` (the rest zero). Strength and alpha/r are
  folded into ``lora_B``, so no float scale ever changes (a changing Python float would recompile,
  and ``set_adapters`` after a hotswap applies the first adapter's alpha/r). A stack of LoRAs is
  their concatenation along the rank, exact by construction.
- ``validate(entries)`` is a dry run: every target inside the slot, the stacked rank per layer
  <= ``slot_rank``, shapes equal. On failure: ``LoraFitError`` saying what to do, nothing written.
- The new tensors are computed in full before the first copy, so a failure while computing (bad
  data, out of memory) leaves the slot untouched.
- Text-encoder parts are reported as ignored (the slot covers the transformer only).
- LyCORIS LoKr / LoHa, DoRA and full-delta files (dense layers) are refused with advice to use
  ``fused``: a LoKr / LoHa / diff delta is not a low-rank product (as a LoRA it would need a rank up
  to the layer's width), and DoRA's rescaling depends on the merged weight, which an unmerged PEFT
  LoRA layer never forms.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch

from ..errors import LoraFitError
from .base import ResolvedEntry, SwapStrategy, check_targets_exist, linear_modules, per_layer
from .types import DenseLayer, LoraLayer, NormalizedLora

logger = logging.getLogger(__name__)

ADAPTER_NAME = "fastlora"

#: The start of PEFT's warning for a LoRA layer on a torchao-quantised base layer (peft 0.21).
PEFT_TORCHAO_MERGE_WARNING = "TorchaoLoraLinear was instantiated without"


class AdapterStrategy(SwapStrategy):
    name = "adapter"
    uses_slot = True

    def __init__(self, transformer: torch.nn.Module, max_rank: int, dtype: torch.dtype) -> None:
        self.transformer = transformer
        self.max_rank = max_rank
        self.dtype = dtype
        self.slot_targets: frozenset[str] = frozenset()
        self.slot_rank = 0
        self._lora_layers: dict[str, torch.nn.Module] = {}
        self._modules = linear_modules(transformer)
        self._active: dict[str, bool] = {}

    # -- slot ---------------------------------------------------------------------------------
    def slot_size(self) -> tuple[int, int]:
        return len(self.slot_targets), self.slot_rank

    def has_slot(self) -> bool:
        return bool(self.slot_targets)

    def covers(self, targets: frozenset[str], rank: int) -> bool:
        return targets <= self.slot_targets and rank <= self.slot_rank

    def prepare_slot(self, targets: frozenset[str], rank: int) -> bool:
        """Make sure a slot covers ``targets`` at ``rank``. Returns True when the module structure
        changed (a compiled model will recompile once). Existing weights in the slot are zeroed.
        A ``rank`` above ``max_rank`` raises it (the engine checked the LoRAs against ``rank``)."""
        self.max_rank = max(self.max_rank, rank)
        unknown = sorted(t for t in targets if t not in self._modules)
        if unknown:
            raise LoraFitError(f"cannot build an adapter slot on unknown layers: {', '.join(unknown[:3])}")
        if self.has_slot() and self.covers(targets, rank):
            return False
        targets = frozenset(targets) | self.slot_targets
        rank = max(rank, self.slot_rank)
        self._remove_slot()
        from peft import LoraConfig, inject_adapter_in_model

        pattern = "^(?:" + "|".join(re.escape(t) for t in sorted(targets)) + ")$"
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=pattern,
                            init_lora_weights=False)
        with warnings.catch_warnings():
            # On an fp8 (torchao) base layer PEFT warns, once per slot, that its merge() / unmerge() would
            # fail; the slot never merges (swaps copy into lora_A / lora_B), so the warning would only
            # alarm the ComfyUI console.
            warnings.filterwarnings("ignore", message=PEFT_TORCHAO_MERGE_WARNING, category=UserWarning)
            inject_adapter_in_model(config, self.transformer, adapter_name=ADAPTER_NAME)
        self._modules = linear_modules(self.transformer)
        self._lora_layers = {}
        with torch.no_grad():
            for name in targets:
                module = self._modules[name]
                a = module.lora_A[ADAPTER_NAME]  # type: ignore[index]
                b = module.lora_B[ADAPTER_NAME]  # type: ignore[index]
                device = a.weight.device  # type: ignore[union-attr]
                a.to(device=device, dtype=self.dtype)
                b.to(device=device, dtype=self.dtype)
                a.weight.zero_()  # type: ignore[union-attr]
                b.weight.zero_()  # type: ignore[union-attr]
                a.weight.requires_grad_(False)  # type: ignore[union-attr]
                b.weight.requires_grad_(False)  # type: ignore[union-attr]
                self._lora_layers[name] = module
        self.slot_targets = frozenset(targets)
        self.slot_rank = rank
        logger.info("adapter slot: %d layers at rank %d", len(targets), rank)
        return True

    def _remove_slot(self) -> None:
        if not self._lora_layers:
            return
        mods = dict(self.transformer.named_modules())
        for name, module in self._lora_layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = mods[parent_name] if parent_name else self.transformer
            setattr(parent, child, module.base_layer)
        self._lora_layers = {}
        self.slot_targets = frozenset()
        self.slot_rank = 0
        self._modules = linear_modules(self.transformer)

    # -- the contract -------------------------------------------------------------------------
    def _low_rank_layers(self, entries: list[ResolvedEntry]) -> dict[str, list[tuple[ResolvedEntry, LoraLayer]]]:
        """:func:`per_layer` of the transformer part, after :meth:`check_layer_kinds` (so every layer
        is a :class:`LoraLayer`)."""
        self.check_layer_kinds([e.lora for e in entries])
        return {name: [(e, cast(LoraLayer, layer)) for e, layer in items]
                for name, items in per_layer(entries).items()}

    def stack_ranks(self, entries: list[ResolvedEntry]) -> dict[str, int]:
        return {name: sum(layer.rank for _, layer in items)
                for name, items in self._low_rank_layers(entries).items()}

    def check_layer_kinds(self, loras: Sequence[NormalizedLora]) -> None:
        """Refuse LoRAs whose transformer part has dense (LoKr / LoHa / DoRA / diff) layers, which
        the slot cannot hold; the message names the files, their types and the fix."""
        bad = [lora for lora in loras if any(isinstance(layer, DenseLayer) for layer in lora.transformer.values())]
        if bad:
            what = "; ".join(f"{Path(lora.path).name} ({', '.join(lora.dense_kinds())})" for lora in bad)
            raise LoraFitError(
                f"{what}: swap_strategy=adapter holds low-rank LoRA layers only, and these layers are not "
                "low-rank LoRA products (or need the merged weight, as DoRA does). Use swap_strategy=fused "
                "(the default), which merges them into the weights with no recompilation. The previous "
                "LoRAs stay active."
            )

    def validate(self, entries: list[ResolvedEntry]) -> list[str]:
        self.check_layer_kinds([e.lora for e in entries])
        notes: list[str] = []
        for e in entries:
            if e.lora.text_encoder or e.lora.text_encoder_2:
                notes.append(
                    f"{e.name}: its text-encoder layers are ignored with swap_strategy=adapter "
                    "(use swap_strategy=fused to apply them)."
                )
        used = [e for e in entries if e.lora.transformer]
        check_targets_exist(used, self._modules, "transformer")
        ranks = self.stack_ranks(used)
        if not ranks:
            return notes
        limit = self.slot_rank if self.has_slot() else self.max_rank
        outside = sorted(set(ranks) - self.slot_targets) if self.has_slot() else []
        if outside:
            names = sorted({e.lora.path for e in used if set(e.lora.transformer) - self.slot_targets})
            raise LoraFitError(
                f"LoRA file {', '.join(names)} targets {len(outside)} layer(s) outside the prepared adapter slot "
                f"(first: {', '.join(outside[:3])}). Add this LoRA to PadDummyLora (or choose "
                "'all Flux layers'), or use swap_strategy=fused. The previous LoRAs stay active."
            )
        too_big = {n: r for n, r in ranks.items() if r > limit}
        if too_big:
            n, r = max(too_big.items(), key=lambda kv: kv[1])
            files = [e.lora.path for e, _ in per_layer(used)[n]]
            what = f"stack's combined rank (of {', '.join(files)})" if len(files) > 1 else f"file {files[0]}: rank"
            raise LoraFitError(
                f"LoRA {what} {r} (layer {n}) is above the slot's max_rank {limit}. Raise "
                "max_rank in the loader (or PadDummyLora), or use swap_strategy=fused. The previous "
                "LoRAs stay active."
            )
        return notes

    def apply(self, entries: list[ResolvedEntry]) -> int:
        """Copy the stack into the slot (validated first). Returns layers rewritten."""
        used = [e for e in entries if e.lora.transformer]
        if not self.has_slot():
            if not used:
                return 0
            ranks = self.stack_ranks(used)
            self.prepare_slot(frozenset(ranks), self.max_rank)
        layers = self._low_rank_layers(used)
        new: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        with torch.no_grad():
            for name in self.slot_targets:
                items = layers.get(name, [])
                if not items:
                    if self._active.get(name):
                        new[name] = None
                    continue
                module = self._lora_layers[name]
                a = module.lora_A[ADAPTER_NAME].weight  # type: ignore[index,union-attr]
                b = module.lora_B[ADAPTER_NAME].weight  # type: ignore[index,union-attr]
                a_new = torch.zeros_like(a)
                b_new = torch.zeros_like(b)
                r0 = 0
                for entry, layer in items:
                    r = layer.rank
                    a_new[r0:r0 + r] = layer.down.to(device=a.device, dtype=a.dtype)
                    b_new[:, r0:r0 + r] = (layer.up.to(device=b.device, dtype=torch.float32)
                                           * (entry.strength * layer.scale)).to(b.dtype)
                    r0 += r
                new[name] = (a_new, b_new)
            for name, pair in new.items():
                module = self._lora_layers[name]
                a = module.lora_A[ADAPTER_NAME].weight  # type: ignore[index,union-attr]
                b = module.lora_B[ADAPTER_NAME].weight  # type: ignore[index,union-attr]
                if pair is None:
                    a.zero_()
                    b.zero_()
                    self._active[name] = False
                else:
                    a.copy_(pair[0])
                    b.copy_(pair[1])
                    self._active[name] = True
        return len(new)

