"""The *fused* swap strategy: LoRA deltas merged into the weights in place.

Contract:
- ``apply(entries)`` makes every touched linear weight equal to ``master + sum(strength * scale *
  up @ down)`` computed in float32 and rounded once to the weight's dtype (re-quantised from the
  high-precision master for torchao-quantised weights). Layers no longer touched are restored
  *exactly* from the master copy (never by subtraction).
- Only layers whose contribution changed are rewritten; the same stack again costs nothing.
- The tensors are updated in place (``copy_``), so a compiled graph that reads them sees the new
  values with no recompilation. Never combine with inductor ``freezing``.
- Validation (targets exist, shapes match) happens before the first write. If a write fails
  anyway (e.g. out of memory), every layer written in this call is restored and the previous stack
  re-applied before the error propagates: no half-swapped weights.
- No rank or target limit; stacks are sums.
- Per-row fp8 weights whose masters live on the weight's GPU are merged in groups: the ``addmm`` of
  each layer into one scratch buffer of up to :data:`GROUP_BYTES`, then one Triton launch
  requantises the whole group (:func:`~fastlora_core.kernels.grouped_rowwise_fp8_quant`, the same
  arithmetic as the per-layer kernel). Same values, far fewer launches: on hosts with a slow CPU the
  per-layer loop was bound by Python, not by the GPU (NOTES attempt 38).
- Where the masters live in system RAM instead, a swap sends the ones it needs to the GPU in groups
  through pinned memory (:class:`~fastlora_core.lora.master_feed.MasterFeed`) rather than one
  pageable copy per layer; the layers are then merged one by one.
- Dense layers (LyCORIS LoKr / LoHa, full ``diff``, DoRA: :class:`~fastlora_core.lora.types.DenseLayer`)
  add ``strength * lycoris.contribution(layer, W)``, rebuilt in float32 on the weight's device from
  the original weight ``W`` (the high-precision master for quantised weights: DoRA's norm is taken
  there), and the sum is rounded once. A bias delta (``diff_b``) is added to the layer's bias the
  same way, restored exactly from its own saved original.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import torch

from .. import triton_key
from ..errors import LoraError
from ..kernels import QuantGroup
from . import lycoris
from .base import Contribution, ResolvedEntry, SwapStrategy, check_targets_exist, linear_modules, per_layer
from .master_feed import MasterFeed
from .quantized import clone_quantized, copy_into_quantized, is_quantized, requantize_like, restore_quantized
from .spill import to_ram
from .staging import PinnedStager
from .types import DenseLayer

logger = logging.getLogger(__name__)

#: Most merged bf16 bytes one grouped requantisation covers (the scratch buffer it needs on the GPU;
#: only used where the masters are on the GPU, which the engine allows with > 64 GiB free).
GROUP_BYTES = 512 * 2**20
_UNRESOLVED = object()


@dataclass(frozen=True)
class _Fp8Layer:
    """A per-row fp8 weight merged by the grouped path, resolved once: its master (on the weight's
    GPU) and the weight's inner tensors, which swaps write in place (so they stay these objects
    until the model moves)."""

    master: torch.Tensor
    qdata: torch.Tensor
    scale: torch.Tensor  # the weight's ``[N, 1]`` scales, flat


class FusedStrategy(SwapStrategy):
    name = "fused"

    def __init__(self, models: dict[str, torch.nn.Module], quantization: str = "none",
                 master_device: torch.device | str = "cpu") -> None:
        """models: part name (``transformer``, ``text_encoder``, ``text_encoder_2``) -> module."""
        self.models = models
        self.quantization = quantization
        self.master_device = torch.device(master_device)
        self._modules: dict[str, dict[str, torch.nn.Module]] = {}
        # Grouped fp8 path: layer -> what it writes (None: not eligible), and the launch tables by group.
        self._fp8_layers: dict[tuple[str, str], _Fp8Layer | None] = {}
        self._groups: dict[tuple[int, ...], QuantGroup] = {}
        self.group_bytes = GROUP_BYTES
        self.refresh_modules()
        # Exact originals of touched layers that have no master: plain tensors, or (for a quantised
        # weight, which then cannot take a LoRA) its inner tensors. A quantised layer with a master is
        # restored by quantising its master again, which gives its original bytes: keeping them as well
        # would cost the fp8 bytes of every LoRA layer a second time where the masters live (8.6 GB for
        # Flux.1-dev's 418 layers).
        self._orig: dict[tuple[str, str], torch.Tensor | dict[str, torch.Tensor]] = {}
        # Exact original biases of layers whose bias a ``diff_b`` changed.
        self._orig_bias: dict[tuple[str, str], torch.Tensor] = {}
        # High-precision masters of quantised transformer layers, captured before quantisation.
        self._hp_master: dict[str, torch.Tensor] = {}
        self._current: dict[tuple[str, str], Contribution] = {}
        self._entries: list[ResolvedEntry] = []
        self._fast_fp8: bool | None = None  # None: not checked yet
        self._scratch: torch.Tensor | None = None
        self._stager: PinnedStager | None = None  # sends masters in system RAM to the GPU (MasterFeed)
        self._device_before_offload: torch.device | None = None

    # -- set-up -------------------------------------------------------------------------------
    def capture_hp_masters(self, transformer: torch.nn.Module, names: list[str]) -> None:
        """Keep a high-precision copy of these layers' weights *before* the transformer is quantised,
        so merged weights are re-quantised from full precision."""
        self._forget_fp8_layers()
        mods = dict(transformer.named_modules())
        for n in names:
            w = mods[n].weight
            # No copy when already there: quantisation replaces the module's parameter and leaves
            # this tensor untouched, so the master simply keeps the original alive.
            master = w.detach().to(self.master_device)
            self._hp_master[n] = master
            if master.data_ptr() != w.data_ptr():
                # A copy on the GPU the model is about to move to (masters leave the CPU only for the
                # engine's own device): the layer now reads its weight from there, so quantising it
                # moves nothing a second time (one 22 GB transfer for Flux.1-dev instead of two) and
                # its CPU copy is freed now. Quantisation replaces the parameter, never writes into it.
                mods[n].weight = torch.nn.Parameter(master, requires_grad=False)
        logger.info("fused: kept %d high-precision master weights on %s (%.1f MiB)", len(names),
                    self.master_device, sum(t.numel() * t.element_size() for t in self._hp_master.values()) / 2**20)

    def refresh_modules(self) -> None:
        self._forget_fp8_layers()
        self._modules = {part: linear_modules(m) for part, m in self.models.items()}
        # LoRA files name CLIP layers ``text_model.encoder...``; newer transformers' CLIPTextModel
        # has no ``text_model`` level. Accept both spellings.
        clip = self._modules.get("text_encoder", {})
        for name, module in list(clip.items()):
            if not name.startswith("text_model."):
                clip.setdefault("text_model." + name, module)

    def move_masters(self, device: torch.device | str) -> None:
        """Move the master copies (ComfyUI unload / reload of the engine)."""
        if self.master_device == torch.device(device):
            return
        self._forget_fp8_layers()
        if torch.device(device).type == "cpu":  # 22 GiB of Flux masters: through pinned chunks (decision 65)
            self._hp_master = dict(zip(self._hp_master, to_ram(list(self._hp_master.values())), strict=True))
        else:
            self._hp_master = {n: t.to(device) for n, t in self._hp_master.items()}
        self._orig = {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
                      for k, v in self._orig.items()}
        self._orig_bias = {k: v.to(device) for k, v in self._orig_bias.items()}
        self.master_device = torch.device(device)

    def model_moved(self) -> None:
        self.refresh_modules()

    def move_held_to_ram(self) -> None:
        self.move_masters("cpu")  # later swaps take the master feed (decision 62)

    def held_tensors(self) -> list[torch.Tensor]:
        """The masters, and the saved originals of touched layers that have none (plain weights,
        biases): on the GPU where it has room for them (decisions 29 and 64), otherwise in RAM."""
        held: list[torch.Tensor] = [*self._hp_master.values(), *self._orig_bias.values()]
        for saved in list(self._orig.values()):
            held.extend(saved.values() if isinstance(saved, dict) else [saved])
        return held

    def offload(self) -> None:
        self._device_before_offload = self.master_device
        self.move_masters("cpu")

    def reload(self) -> None:
        if self._device_before_offload is not None:
            self.move_masters(self._device_before_offload)
            self._device_before_offload = None

    # -- the contract -------------------------------------------------------------------------
    def validate(self, entries: list[ResolvedEntry]) -> list[str]:
        """Dry run; returns warnings. Raises LoraFitError when a LoRA cannot be applied."""
        warnings: list[str] = []
        for part, label in (("transformer", "Flux transformer"), ("text_encoder", "CLIP text encoder"),
                            ("text_encoder_2", "T5 text encoder")):
            used = [e for e in entries if getattr(e.lora, part)]
            if not used:
                continue
            if part not in self._modules:
                why = ("the T5 encoder is quantised; load with t5_quantization=none to apply it"
                       if part == "text_encoder_2" else "that model is not part of this engine")
                warnings.append(f"{', '.join(e.name for e in used)}: its {label} layers are ignored ({why}).")
                continue
            check_targets_exist(used, self._modules[part], part)
            if part != "transformer":
                for e in used:
                    for n in getattr(e.lora, part):
                        w = getattr(self._modules[part][n], "weight", None)
                        if w is None or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                            raise LoraError(
                                f"{e.name}: cannot merge into the quantised {label} layer {n}. Load the "
                                "engine with t5_quantization=none to use this LoRA's text-encoder part."
                            )
        return warnings

    def apply(self, entries: list[ResolvedEntry]) -> int:
        """Make the weights match ``entries`` (validated). Returns the number of layers rewritten."""
        wanted: dict[tuple[str, str], list] = {}
        for part in self.models:
            for name, items in per_layer(entries, part).items():
                wanted[(part, name)] = items
        todo: list[tuple[str, str]] = []
        for key in set(wanted) | set(self._current):
            contrib: Contribution = tuple((e.key, e.strength) for e, _ in wanted.get(key, []))
            if self._current.get(key, ()) != contrib:
                todo.append(key)
        written: list[tuple[str, str]] = []
        group: list[tuple[_Fp8Layer, list]] = []  # grouped fp8 layers not merged yet
        grouped = 0  # their elements
        order = sorted(todo)
        feed = self._master_feed(order)  # restored layers need their masters too
        try:
            with torch.no_grad():
                for key in order:
                    written.append(key)  # first: a write that fails halfway is rolled back too
                    items = wanted.get(key, [])
                    fp8 = self._grouped_target(key, items)
                    if fp8 is None:
                        self._write(key, items, feed)
                        continue
                    if group and grouped + fp8.master.numel() > self.group_bytes // 2:
                        self._merge_group(group)
                        group, grouped = [], 0
                    group.append((fp8, items))
                    grouped += fp8.master.numel()
                if group:
                    self._merge_group(group)
        except Exception:
            logger.exception("fused swap failed; restoring the previous weights")
            self._rollback(written)
            raise
        for key in todo:
            contrib = tuple((e.key, e.strength) for e, _ in wanted.get(key, []))
            if contrib:
                self._current[key] = contrib
            else:
                self._current.pop(key, None)
        self._entries = list(entries)
        return len(todo)

    def _master_feed(self, keys: list[tuple[str, str]]) -> MasterFeed | None:
        """Where the masters are in system RAM and the weights on a GPU: a feed that sends the masters
        of ``keys`` (in swap order: merged and restored layers alike) in groups through pinned memory
        (decision 62); else None."""
        if self.master_device.type != "cpu" or not self._hp_master:
            return None
        names = [name for part, name in keys if part == "transformer" and name in self._hp_master]
        if not names:
            return None
        device = self._weight("transformer", names[0]).device
        if device.type != "cuda":
            return None
        if self._stager is None or self._stager.device != device:
            # Copied from memory, without looking up file ranges per group (/proc/self/maps each time):
            # masters are the loader's own allocations (a mapped one would still copy right, slower).
            self._stager = PinnedStager(device, read_files=False)
        return MasterFeed(self._hp_master, names, device, self._stager)

    # -- fp8 fast path (CUDA) ---------------------------------------------------------------------
    def _triton_fp8(self, weight: torch.Tensor, master: torch.Tensor) -> bool:
        """Use the Triton row-wise requantisation (4-7x faster than torchao's, bit-identical) for
        per-row Float8 weights on CUDA, after a one-time self-check against torchao on this
        machine; any mismatch or error falls back to torchao for good."""
        if self._fast_fp8 is False or weight.device.type != "cuda" or master.dtype != torch.bfloat16:
            return False
        if type(weight).__name__ != "Float8Tensor" or list(getattr(weight, "block_size", [])) != [1, weight.shape[-1]]:
            return False
        if self._fast_fp8 is None:
            self._fast_fp8 = fp8_kernels_ok(weight.device)
        return bool(self._fast_fp8)

    # -- grouped fp8 path (CUDA, masters on the GPU) ------------------------------------------------
    def _forget_fp8_layers(self) -> None:
        """Weights or masters are about to be replaced (model moved, masters moved or captured)."""
        self._fp8_layers.clear()
        self._groups.clear()

    def _grouped_target(self, key: tuple[str, str], items: list) -> _Fp8Layer | None:
        """The layer's grouped-path handle when ``items`` (its new stack) can take that path: LoRA
        layers only, no bias of its own changed by an earlier stack, a per-row fp8 weight with its
        master on the same GPU and the Triton kernels verified (its original is its master, quantised)."""
        if not items or key in self._orig_bias or _has_dense(items):
            return None
        fp8 = self._fp8_layers.get(key, _UNRESOLVED)
        if fp8 is _UNRESOLVED:
            fp8 = self._fp8_layers[key] = self._resolve_fp8(key)
        return cast("_Fp8Layer | None", fp8)

    def _resolve_fp8(self, key: tuple[str, str]) -> _Fp8Layer | None:
        weight = self._weight(*key)
        master = self._master_of(key, weight)
        if master is None or master.device != weight.device or not self._triton_fp8(weight, master):
            return None
        from ..kernels import groupable

        names, _ = weight.__tensor_flatten__()  # type: ignore[attr-defined]
        qdata, scale = getattr(weight, names[0]), getattr(weight, names[1]).view(-1)
        # The master stands for the scratch slice it is merged into (same shape and dtype; slices
        # are aligned by construction).
        return _Fp8Layer(master, qdata, scale) if groupable(master, qdata, scale) else None

    def _merge_group(self, group: list[tuple[_Fp8Layer, list]]) -> None:
        """``master + sum(strength * scale * up @ down)`` of every layer into consecutive slices of
        the scratch buffer (bf16, the ops ``_merged_hp`` runs), then one requantisation launch."""
        from ..kernels import grouped_rowwise_fp8_quant

        device = group[0][0].master.device
        total = sum(fp8.master.numel() for fp8, _ in group)
        # The whole group size at once, so the buffer is not reallocated group after group.
        buf = self._scratch_of(max(total, self.group_bytes // 2), device, torch.bfloat16)[:total]
        merged, offset = [], 0
        for fp8, items in group:
            out = buf[offset:offset + fp8.master.numel()].view(fp8.master.shape)
            for i, (entry, layer) in enumerate(items):
                up = layer.up.to(device=device, dtype=torch.bfloat16)
                down = layer.down.to(device=device, dtype=torch.bfloat16)
                torch.addmm(fp8.master if i == 0 else out, up, down, alpha=entry.strength * layer.scale, out=out)
            merged.append((out, fp8.qdata, fp8.scale))
            offset += fp8.master.numel()
        key = tuple(id(fp8) for fp8, _ in group)
        table = self._groups.get(key)  # the same layers give the same table: nothing new to copy to the GPU
        if table is None:
            if len(self._groups) >= 256:  # many different layer sets: start over rather than grow
                self._groups.clear()
            table = self._groups[key] = QuantGroup(buf, merged)
        grouped_rowwise_fp8_quant(table, buf)

    def _scratch_of(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The first ``numel`` elements of the reused scratch buffer (grown, never shrunk)."""
        if (self._scratch is None or self._scratch.numel() < numel or self._scratch.device != device
                or self._scratch.dtype != dtype):
            self._scratch = torch.empty(numel, device=device, dtype=dtype)
        return self._scratch[:numel]

    # -- internals ----------------------------------------------------------------------------
    def _rollback(self, written: list[tuple[str, str]]) -> None:
        """Put every layer written by a failed apply back to the previous stack (``_current`` still
        describes it); if even that fails, back to the exact original."""
        previous = {part: per_layer(self._entries, part) for part in self.models}
        with torch.no_grad():
            for key in written:
                part, name = key
                try:
                    self._write(key, previous[part].get(name, []))
                except Exception:  # pragma: no cover - last resort
                    self._restore(key)
                    self._current.pop(key, None)

    def _restore(self, key: tuple[str, str]) -> None:
        self._restore_bias(key)
        self._restore_weight(key)

    def _master_of(self, key: tuple[str, str], weight: torch.Tensor) -> torch.Tensor | None:
        """The high-precision master of a quantised transformer layer; None for any other layer."""
        if key[0] != "transformer" or not is_quantized(weight):
            return None
        return self._hp_master.get(key[1])

    def _restore_weight(self, key: tuple[str, str], feed: MasterFeed | None = None) -> None:
        """The layer's original weight, exactly: a quantised layer's master quantised again (the
        rule that made its original bytes: torchao's, or the Triton kernel checked bit for bit against
        it), any other layer's saved copy."""
        part, name = key
        weight = self._weight(part, name)
        master = self._master_of(key, weight)
        if master is not None:
            src = (feed.get(name) if feed is not None else master).to(weight.device, non_blocking=True)
            self._quantise_into(weight, src, master)
            return
        saved = self._orig.get(key)
        if saved is None:
            return
        if isinstance(saved, dict):
            restore_quantized(weight, saved)
        else:
            weight.copy_(saved)

    def _quantise_into(self, weight: torch.Tensor, hp: torch.Tensor, master: torch.Tensor) -> None:
        """Quantise ``hp`` (the master, or master + LoRA deltas, on the weight's device) into the
        quantised ``weight`` in place, with the rule that quantised the model."""
        if self._triton_fp8(weight, master):
            from ..kernels import rowwise_fp8_quant_into

            names, _ = weight.__tensor_flatten__()  # type: ignore[attr-defined]
            rowwise_fp8_quant_into(hp, getattr(weight, names[0]), getattr(weight, names[1]).view(-1))
        else:
            copy_into_quantized(weight, requantize_like(weight, hp, self.quantization))

    def _weight(self, part: str, name: str) -> torch.Tensor:
        """The weight of a target layer (a plain or torchao tensor; typed, as nn.Module attributes are not)."""
        return cast(torch.Tensor, self._modules[part][name].weight)

    def _bias(self, part: str, name: str) -> torch.Tensor:
        """The bias of a target layer (checked to exist by validation when a ``diff_b`` targets it)."""
        return cast(torch.Tensor, self._modules[part][name].bias)

    def _restore_bias(self, key: tuple[str, str]) -> None:
        saved = self._orig_bias.get(key)
        if saved is not None:
            self._bias(*key).copy_(saved)

    def _write_bias(self, key: tuple[str, str], items: list) -> None:
        """bias = original + sum(strength * diff_b), in float32, rounded once; the original when no
        layer of the stack changes it."""
        biased = [(e.strength, layer.bias) for e, layer in items
                  if isinstance(layer, DenseLayer) and layer.bias is not None]
        if not biased:
            self._restore_bias(key)
            return
        bias = self._bias(*key)
        if key not in self._orig_bias:
            self._orig_bias[key] = bias.detach().to(self.master_device, copy=True)
        new = self._orig_bias[key].to(device=bias.device, dtype=torch.float32, copy=True)
        for strength, delta in biased:
            new.add_(delta.to(device=bias.device, dtype=torch.float32), alpha=strength)
        bias.copy_(new.to(bias.dtype))

    def _write(self, key: tuple[str, str], items: list, feed: MasterFeed | None = None) -> None:
        """Rewrite one layer for its new stack ``items``; a quantised layer's master comes from
        ``feed`` when given (masters in system RAM), else from where it lives."""
        part, name = key
        weight = self._weight(part, name)
        quantized = is_quantized(weight)
        master = self._master_of(key, weight)
        if key not in self._orig and master is None:  # a quantised layer's original is its master
            self._orig[key] = clone_quantized(weight, self.master_device) if quantized else \
                weight.detach().to(self.master_device, copy=True)
        self._write_bias(key, items)
        items = [(e, layer) for e, layer in items if not isinstance(layer, DenseLayer) or layer.has_weight_delta]
        if not items:
            self._restore_weight(key, feed)
            return
        device = weight.device
        if quantized:
            if master is None:
                raise LoraError(f"layer {name} is quantised but has no high-precision master copy")
            merged = self._merged_hp(feed.get(name) if feed is not None else master, items, device)
            self._quantise_into(weight, merged, master)
            return
        # Plain weights: accumulate in float32, round once to the weight's dtype.
        new = self._orig[key].to(device=device, dtype=torch.float32, copy=True)  # type: ignore[union-attr]
        _accumulate(new, new.clone() if _has_dora(items) else new, items)
        weight.copy_(new.to(weight.dtype))

    def _merged_hp(self, master: torch.Tensor, items: list, device: torch.device) -> torch.Tensor:
        """``master + sum(strength * scale * up @ down)`` in the master's dtype (bf16 for fp8), in a
        reused scratch buffer on the weight's device: the exact input torchao would quantise. With a
        dense layer in the stack the sum is taken in float32 against the master and rounded once."""
        buf = self._scratch_of(master.numel(), device, master.dtype).view(master.shape)
        src = master.to(device, non_blocking=True)  # no copy when the master is on this device
        if _has_dense(items):  # float32 accumulation against the master, rounded once
            acc = src.to(torch.float32, copy=True)
            _accumulate(acc, src.to(torch.float32) if _has_dora(items) else acc, items)
            buf.copy_(acc)
            return buf
        for i, (entry, layer) in enumerate(items):
            up = layer.up.to(device=device, dtype=master.dtype)
            down = layer.down.to(device=device, dtype=master.dtype)
            # The first term reads the master straight into the buffer: one pass instead of two.
            torch.addmm(src if i == 0 else buf, up, down, alpha=entry.strength * layer.scale, out=buf)
        return buf


def _has_dense(items: list) -> bool:
    return any(isinstance(layer, DenseLayer) for _, layer in items)


def _has_dora(items: list) -> bool:
    """Whether a layer's contribution depends on the original weight (DoRA's norm): only then does
    the accumulation need a separate unmodified float32 copy of it."""
    return any(isinstance(layer, DenseLayer) and layer.magnitude is not None for _, layer in items)


def _accumulate(acc: torch.Tensor, original: torch.Tensor, items: list) -> None:
    """``acc += sum(strength * delta)`` in float32: ``addmm`` for a LoRA, the dense contribution
    (computed against ``original``, the layer's unmodified float32 weight) for the others. Without
    DoRA in ``items`` no contribution reads ``original`` beyond its device: pass ``acc`` itself."""
    for entry, layer in items:
        if isinstance(layer, DenseLayer):
            delta = lycoris.contribution(layer, original)
            if delta is not None:
                acc.add_(delta, alpha=entry.strength)
        else:
            up = layer.up.to(device=acc.device, dtype=torch.float32)
            down = layer.down.to(device=acc.device, dtype=torch.float32)
            acc.addmm_(up, down, alpha=entry.strength * layer.scale)


#: The self-check's result per GPU, once per process (a property of the machine and the installed
#: Triton and torchao, not of an engine).
_kernels_ok: dict[torch.device, bool] = {}


def fp8_kernels_ok(device: torch.device) -> bool:
    """Whether the Triton requantisation reproduces torchao's per-row float8 bit for bit on
    ``device`` (:func:`_triton_fp8_self_check`, run on first use, then remembered)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _kernels_ok:
        triton_key.wait()  # decision 52: the key being hashed beside the loader, not hashed twice
        _kernels_ok[device] = _triton_fp8_self_check(device)
    return _kernels_ok[device]


def prepare_fp8_swaps(device: torch.device) -> None:
    """The once-per-process work of the first fp8 fused swap on a GPU, done ahead (the engine runs it
    while its loader waits for a read, decision 42): the kernels' self-check, which compiles the two
    Triton kernels with an empty Triton cache (1.7 s of the first LoRA on the H200) or loads them,
    and cuBLAS's start where nothing has used it yet (the first merge's ``addmm`` would pay it)."""
    if device.type != "cuda":
        return
    fp8_kernels_ok(device)
    x = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
    x.addmm_(x, x)


def _triton_fp8_self_check(device: torch.device) -> bool:
    """True when both Triton kernels (per layer and grouped) reproduce torchao's per-row float8
    quantisation bit for bit here."""
    try:
        from torchao.quantization import Float8Tensor, PerRow

        from ..kernels import grouped_rowwise_fp8_quant, rowwise_fp8_quant_into
        from ..optimize import torch_kernels

        ok, outs = True, []
        for n, k in ((96, 640), (40, 1104), (7, 3008)):  # widths that are not block multiples (but of 16)
            x = (torch.randn(n, k, device=device) * 0.05).to(torch.bfloat16)
            x[3, 7] = 0.0
            ref = Float8Tensor.from_hp(x, granularity=PerRow(), **torch_kernels())  # the engine's path
            for grouped in (False, True):
                qdata = torch.empty_like(ref.qdata)
                scale = torch.empty(ref.scale.numel(), device=device, dtype=torch.float32)
                if grouped:
                    outs.append((x, qdata, scale, ref))
                else:
                    rowwise_fp8_quant_into(x, qdata, scale)
                    ok = ok and _same_quantised(qdata, scale, ref)
        buf = torch.cat([x.reshape(-1) for x, _, _, _ in outs])  # the matrices in one buffer, as in a swap
        views, offset = [], 0
        for x, qdata, scale, _ in outs:
            views.append((buf[offset:offset + x.numel()].view(x.shape), qdata, scale))
            offset += x.numel()
        grouped_rowwise_fp8_quant(QuantGroup(buf, views), buf)
        ok = ok and all(_same_quantised(qdata, scale, ref) for _, qdata, scale, ref in outs)
    except Exception as exc:  # Triton missing, driver issue, torchao layout change...
        logger.warning("fp8 fused swaps: Triton requantisation unavailable (%s); using torchao", exc)
        return False
    if not ok:
        logger.warning("fp8 fused swaps: Triton requantisation differs from torchao here; using torchao")
    return ok


def _same_quantised(qdata: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``qdata`` / flat ``scale`` are bitwise torchao's ``Float8Tensor`` ``ref``."""
    return torch.equal(qdata.view(torch.uint8), ref.qdata.view(torch.uint8)) and torch.equal(  # type: ignore[attr-defined]
        scale, ref.scale.reshape(-1).float())  # type: ignore[attr-defined]
