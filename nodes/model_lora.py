"""ComfyUI LoRA patches on FastLoRA's MODEL -> the engine's LoRA stack.

ComfyUI's LoRA loaders (``LoraLoader``, ``LoraLoaderModelOnly`` and every stacker built on
``comfy.sd.load_lora_for_models``) map a file's keys to the model's BFL weight names and call
``model.add_patches(patches, strength)`` on a clone. Each such call is one LoRA of the stack
(:class:`PatchGroup`). Here it becomes one in-memory :class:`NormalizedLora` at strength 1 (kept in
the engine's LoRA cache under a ``memory:<n>`` path) plus its strength, so sampling applies it with
the engine's own swap: no ComfyUI weight merge, no recompile, and a strength change is a swap.

Only plain LoRA patches can be represented that way: ``LoRAAdapter`` with up/down (and alpha), row
offsets on fused weights, no per-patch function, no DoRA scale, no conv ``mid``, no reshape, and the
model-merge multiplier ``strength_model`` at 1. Anything else is refused here, in the node that adds
it, with what to do instead.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._core import errors, lora_mapped, specs
from ._core import lora_bfl as bfl

logger = logging.getLogger(__name__)

PREFIX = "diffusion_model."
SUFFIX = ".weight"

# What ComfyUI's other weight adapters are, for messages (comfy/weight_adapter/*.py).
_ADAPTER_KINDS = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "glora": "GLoRA", "oft": "OFT", "boft": "BOFT"}
_HOW_TO = ("Use a plain LoRA (up/down weights) with this MODEL, or ComfyUI's own UNETLoader for this "
           "graph.")
# A LoRA loader that mapped none of its file's keys (ComfyUI logged them as "lora key not loaded") would
# leave the image unchanged without a word: UNETLoader's model does that, FastLoRA's MODEL refuses.
NOTHING_MAPPED = (
    "LoRA #{n} on this MODEL: ComfyUI's LoRA loader found no weight of this Flux model in the file (its keys "
    "are logged above as 'lora key not loaded'). It is a LoRA for another model family (SD 1.5, SDXL, SD3 ...), "
    "a text-encoder-only LoRA on a model-only loader, or a Flux layout ComfyUI does not map. Use a Flux.1 LoRA; "
    "for a text-encoder LoRA use LoraLoader; or load the file with LoRA Hotswap for MODEL (FastLoRA), which "
    "reads more Flux LoRA layouts and names what it cannot use.")
# For what FastLoRA's own reader takes from a file (lora/formats.py, lora/lycoris.py).
_FILE_NODE = ("Or load the file with LoRA Hotswap for MODEL (FastLoRA) in place of this LoRA loader: FastLoRA reads "
              "LyCORIS LoKr / LoHa, DoRA and .diff files itself (fused strategy).")


class PatchRefused(errors.LoraError):
    """A ComfyUI weight patch that FastLoRA's engine cannot apply exactly."""


@dataclass(frozen=True)
class PatchGroup:
    """One ``add_patches`` call: the patches ComfyUI's loader built from one LoRA, and its strength."""

    patches: Mapping[Any, Any]
    strength: float
    deltas: tuple[bfl.BflDelta, ...]
    #: ``deltas`` as one LoRA at strength 1 (None without deltas)
    lora: bfl.NormalizedLora | None

    @classmethod
    def of(cls, patches: Mapping[Any, Any], strength: float, deltas: tuple[bfl.BflDelta, ...], index: int,
           out_features: Mapping[str, int]) -> PatchGroup:
        """The ``index``-th group added to a MODEL (0-based), its deltas converted now: the loader
        node that added them is where a LoRA that does not fit the transformer is refused, and the
        conversion is not repeated at sampling."""
        label = f"LoRA #{index + 1} on this MODEL ({len(deltas)} weights)"  # how messages name it
        lora = bfl.lora_from_bfl(deltas, label, out_features) if deltas else None
        return cls(patches, strength, deltas, lora)


@dataclass(frozen=True)
class FileLora:
    """A LoRA file added to a MODEL by FastLoRA's own node (``LoraHotswapModel``): read by the engine
    like ``Generate``'s LoRAs, in every format the engine takes (LoKr, LoHa, DoRA and ``.diff`` files
    included with the ``fused`` strategy), instead of through ComfyUI's patches."""

    spec: specs.LoraSpec


def _describe_patch(value: Any) -> str:
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return _ADAPTER_KINDS.get(name, f"a '{name}' weight adapter")
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return {"diff": "a full weight difference ('diff': a model merge, or a LoRA file with .diff/.diff_b keys)",
                "set": "a weight replacement ('set_weight')",
                "model_as_lora": "a model used as a LoRA"}.get(value[0], f"a '{value[0]}' patch")
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return "a full weight difference (a model merge, e.g. ModelMergeSimple)"
    return f"a {type(value).__name__} patch"


def deltas_of(patches: Mapping[Any, Any], strength_model: float) -> tuple[bfl.BflDelta, ...]:
    """The low-rank deltas of one ``add_patches`` call, or PatchRefused naming the first patch that
    cannot be applied exactly."""
    if strength_model != 1.0:
        raise PatchRefused(
            f"A node scales this MODEL's own weights (strength_model={strength_model}, as model-merge nodes "
            f"do); FastLoRA's MODEL only takes LoRAs. {_HOW_TO}")
    out: list[bfl.BflDelta] = []
    for k, value in patches.items():
        key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        what = _describe_patch(value)
        if type(value).__name__ != "LoRAAdapter":
            readable = getattr(value, "name", None) in ("lokr", "loha") or (isinstance(value, tuple) and value[:1] == ("diff",))
            raise PatchRefused(f"{key} gets {what}, which FastLoRA's engine cannot swap. {_HOW_TO}"
                               + (f" {_FILE_NODE}" if readable else ""))
        if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
            raise PatchRefused(f"{key}: a LoRA on a bias or norm weight; FastLoRA swaps linear weights only. {_HOW_TO}")
        up, down, alpha, mid, dora_scale, reshape = value.weights
        if dora_scale is not None:
            raise PatchRefused(f"{key}: a DoRA LoRA (dora_scale); ComfyUI's LoRA loaders hand FastLoRA's MODEL plain "
                               f"LoRAs only. {_HOW_TO} {_FILE_NODE}")
        if mid is not None or reshape is not None or function is not None:
            raise PatchRefused(f"{key}: a LoRA with a conv 'mid' weight, reshape or weight function. {_HOW_TO}")
        if offset is not None and offset[0] != 0:
            raise PatchRefused(f"{key}: a LoRA on a column slice of the weight. {_HOW_TO}")
        up2, down2 = up.flatten(start_dim=1), down.flatten(start_dim=1)
        scale = float(alpha) / down2.shape[0] if alpha is not None else 1.0
        rows = (int(offset[1]), int(offset[2])) if offset is not None else None
        out.append(bfl.BflDelta(key[len(PREFIX):-len(SUFFIX)], up2, down2, scale, rows))
    return tuple(out)


class InMemoryLoras:
    """Gives every distinct patch group one ``memory:<n>`` path in the engine's LoRA cache.

    A group is the same LoRA when it holds the same tensor objects at the same places (ComfyUI's
    loaders keep the file's tensors and build new adapters around them on every run), so running a
    LoRA node again with another strength reuses the converted LoRA: only the strength changes. The
    tensors are held here, so their ids cannot be reused by other tensors while an entry lives.

    It is also the same LoRA when its tensors are new objects read again from the same unchanged
    file (``lora_mapped.tensor_sources``: a user going back to a LoRA file used before, whose node
    read it anew): the LoRA already converted and staged on the GPU is reused instead of reading the
    file's pages again.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], tuple[str, tuple[torch.Tensor, ...]]] = OrderedDict()

    @staticmethod
    def fingerprint(group: PatchGroup) -> tuple[Any, ...]:
        items = []
        for d in group.deltas:
            items.append((d.module, d.rows, d.scale, id(d.up), lora_mapped.version(d.up), id(d.down), lora_mapped.version(d.down)))
        return tuple(sorted(items, key=repr))

    def path_for(self, group: PatchGroup, cache: Any) -> str:
        """The cache path of ``group`` (with deltas) as one LoRA at strength 1 (put in the cache on first
        use, or again when the cache evicted it; the engine checks its values for NaN / infinities when
        it stages it)."""
        assert group.lora is not None, "a group without deltas has no LoRA"
        key = self.fingerprint(group)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and cache.has(hit[0]):
                self._entries.move_to_end(key)
                return hit[0]
        held = tuple(t for d in group.deltas for t in (d.up, d.down))
        sources = lora_mapped.tensor_sources(held)
        source_key = None
        if sources is not None:
            per_delta = ((d.module, d.rows, d.scale, sources[2 * i], sources[2 * i + 1])  # held: up, down per delta
                         for i, d in enumerate(group.deltas))
            source_key = ("file", *sorted(per_delta, key=repr))
            with self._lock:
                hit = self._entries.get(source_key)
                if hit is not None and cache.has(hit[0]):
                    self._remember(source_key, hit[0], ())
                    self._remember(key, hit[0], held)
                    return hit[0]
        path = cache.put(group.lora)
        with self._lock:
            self._remember(key, path, held)
            if source_key is not None:
                self._remember(source_key, path, ())
        return path

    def _remember(self, key: tuple[Any, ...], path: str, held: tuple[torch.Tensor, ...]) -> None:
        """Record ``key`` -> ``path`` as the newest entry, dropping the oldest beyond ``max_entries``."""
        self._entries[key] = (path, held)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


IN_MEMORY = InMemoryLoras()


def stack_of(groups: tuple[PatchGroup | FileLora, ...], engine: Any) -> specs.LoraStack:
    """The engine LoRA stack for a MODEL's LoRAs (ComfyUI's patch groups and FastLoRA's files), in the
    order the loader nodes were chained."""
    entries = []
    for group in groups:
        if isinstance(group, FileLora):
            if group.spec.strength != 0.0:
                entries.append(group.spec)
            continue
        if not group.deltas or group.strength == 0.0:
            continue
        path = IN_MEMORY.path_for(group, engine.lora_cache)
        entries.append(specs.LoraSpec(path, float(group.strength)))
    return specs.LoraStack(tuple(entries))
