"""LoRA deltas addressed to a BFL-layout Flux transformer -> one :class:`NormalizedLora`.

ComfyUI's LoRA loaders (and anything else that thinks in the BFL checkpoint layout) describe a LoRA
as low-rank deltas on BFL weights, where one fused weight (``img_attn.qkv``, a single block's
``linear1``) holds several diffusers layers stacked by rows, and a delta may cover only some of those
rows (diffusers-format LoRA files address ``to_q`` as rows ``0..hidden`` of ``qkv``). This module
maps such deltas exactly onto the diffusers layers the engine swaps: every part keeps ``down`` and
takes its rows of ``up`` (zero rows where the delta does not reach), so ``scale * up @ down`` per
diffusers layer equals the BFL delta restricted to that layer's rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import LoraFitError
from .targets import bfl_module_targets
from .types import Layer, LoraLayer, NormalizedLora


@dataclass(frozen=True)
class BflDelta:
    """``weight[rows] += scale * up @ down`` on the BFL module ``module`` (no ``.weight`` suffix).

    ``rows`` is ``(start, length)`` of the weight's rows the delta covers, or None for all of them.
    """

    module: str
    up: torch.Tensor  # [rows covered, rank]
    down: torch.Tensor  # [rank, in_features]
    scale: float = 1.0
    rows: tuple[int, int] | None = None


def lora_from_bfl(deltas: Iterable[BflDelta], label: str, out_features: Mapping[str, int]) -> NormalizedLora:
    """One NormalizedLora (transformer part only) from BFL deltas.

    ``out_features``: diffusers module name -> output rows, for every linear of the transformer the
    deltas address (it fixes how a fused BFL weight splits). ``label`` names the LoRA in messages.
    Several deltas landing on one diffusers layer are joined into one layer of summed rank.

    Raises:
        LoraFitError: a module that is not a linear layer of this Flux transformer, or a delta whose
            rows or widths do not fit it; nothing is returned half-built.
    """
    parts: dict[str, list[LoraLayer]] = {}
    problems: list[str] = []
    for d in deltas:
        target = bfl_module_targets(d.module)
        if target is None or any(m not in out_features for m in target[0]):
            problems.append(f"{d.module}: not a linear layer of this Flux transformer")
            continue
        modules, _split, swap = target
        sizes = [int(out_features[m]) for m in modules]
        total = sum(sizes)
        start, length = d.rows if d.rows is not None else (0, total)
        if d.up.ndim != 2 or d.down.ndim != 2 or d.up.shape[1] != d.down.shape[0] or d.up.shape[0] != length \
                or start < 0 or start + length > total:
            problems.append(f"{d.module}: delta of shape {tuple(d.up.shape)} x {tuple(d.down.shape)} on rows "
                            f"{start}..{start + length} does not fit a layer with {total} rows")
            continue
        if swap:  # BFL (shift, scale) -> diffusers (scale, shift): full-height up in diffusers row order
            full = torch.zeros(total, d.up.shape[1], dtype=d.up.dtype)
            full[start:start + length] = d.up
            half = total // 2
            up_rows, start, length = torch.cat([full[half:], full[:half]]), 0, total
        else:
            up_rows = d.up
        offset = 0
        for module, size in zip(modules, sizes):
            lo, hi = max(offset, start), min(offset + size, start + length)
            if lo < hi:
                if lo == offset and hi == offset + size:
                    up = up_rows[lo - start:hi - start]
                else:  # the delta reaches only some rows of this layer: zero elsewhere
                    up = torch.zeros(size, up_rows.shape[1], dtype=up_rows.dtype)
                    up[lo - offset:hi - offset] = up_rows[lo - start:hi - start]
                parts.setdefault(module, []).append(LoraLayer(d.down, up, float(d.scale)))
            offset += size
    if problems:
        shown = "; ".join(problems[:5])
        raise LoraFitError(f"{label} does not fit this Flux transformer ({len(problems)} problem(s): {shown}). Use a "
                           "LoRA made for Flux.1 with this model's size. Nothing was changed.")
    layers: dict[str, Layer] = {}
    for module, items in parts.items():
        if len(items) == 1:
            layers[module] = items[0]
            continue
        dtype = items[0].up.dtype
        ups = [(layer.up.float() * layer.scale).to(dtype) for layer in items]
        layers[module] = LoraLayer(torch.cat([layer.down for layer in items]).to(dtype), torch.cat(ups, dim=1), 1.0)
    return NormalizedLora(label, "comfyui", layers, values_checked=False)
