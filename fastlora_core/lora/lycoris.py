"""LyCORIS LoKr / LoHa, DoRA and full-delta ("diff") layers: reading one module's keys and the
dense delta they define.

These adapters are not low-rank products, so they cannot live in a PEFT LoRA slot; the ``fused``
strategy merges them instead: their delta is rebuilt at apply time, in float32 on the weight's
device, and added to the weight like a LoRA's (:func:`contribution`).

Keys of one module (after the module name; LyCORIS, kohya and PEFT spell them the same way)::

    LoKr  lokr_w1 | lokr_w1_a + lokr_w1_b,  lokr_w2 | lokr_w2_a + lokr_w2_b [+ lokr_t2],  [alpha]
    LoHa  hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b [+ hada_t1, hada_t2],  [alpha]
    diff  diff (the full weight delta), diff_b (a bias delta; also alone)
    DoRA  dora_scale (LyCORIS / kohya, on a LoRA, LoKr or LoHa module) or
          lora_magnitude_vector[.weight] (PEFT / diffusers, on a LoRA module)

Deltas at strength 1 (the same as LyCORIS' training forward and ComfyUI's ``weight_adapter``):

* LoKr: ``kron(w1, w2) * scale``, ``w1 = w1_a @ w1_b`` and ``w2 = w2_a @ w2_b`` when decomposed;
  with ``lokr_t2``: ``w2 = einsum("ij,jr,ip->pr", t2, w2_b, w2_a)``. ``scale = alpha / rank`` where
  ``rank`` is that of the decomposed ``w2`` (else of ``w1``); 1 when neither is decomposed or
  there is no alpha (LyCORIS then trains at scale 1).
* LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`` (``rank = w1_b.shape[0]``; 1 without
  alpha); with ``hada_t1`` / ``hada_t2`` each factor is ``einsum("ij,jr,ip->pr", t, w_b, w_a)``.
* PEFT-saved LoKr / LoHa files hold no alpha (PEFT keeps ``alpha`` / ``r`` in adapter_config.json):
  scale 1, which is PEFT's default (``alpha == r``).
* diff: the tensor itself.

DoRA (weight decomposition) rescales the merged weight ``W + dW`` to the trained magnitude ``m``,
with the norm taken on the original weight the engine holds (the bf16 master for fp8 weights)::

    DoRA(W) = (W + dW) * m / (||W + dW|| + eps)

* LyCORIS / kohya ``dora_scale``: shape ``[out, 1]`` = norms of the output rows (LyCORIS'
  default ``wd_on_out``), or ``[1, in]`` = norms of the input columns; ``eps`` = float32 eps.
* PEFT ``lora_magnitude_vector``: shape ``[out]``, norms of the output rows, no eps.

ComfyUI's loader (checked at a125cd84) agrees with this for LoKr, LoHa and per-input-column DoRA
at every strength, but for per-output-row DoRA it divides by the norm of the original rows ``||W||``
instead of ``||W + dW||``; LyCORIS' training forward and PEFT use the merged weight, as we do.

Strength ``s`` interpolates between the original and the DoRA weight, ``W + s * (DoRA(W) - W)``,
as ComfyUI's loader does. (PEFT instead scales ``dW`` inside the norm, and lycoris-lora 4.x's
merge helper gives ``W + dW`` at strength 0; all three agree at strength 1.) In a stack every
layer's contribution is computed against the original weight and the contributions are summed,
so the order of the stack does not matter.

Known limits (refused at read time with a message): DoRA with per-input-column norms on a fused
``qkv`` / ``linear1`` module (its norm spans the q, k, v and mlp layers the engine holds
separately), and convolution-shaped (Tucker ``t`` with kernel dimensions) factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import LoraFormatError
from .types import DenseLayer, file_float

# Key suffix -> role: one table for the reader (formats.py adds it to its own LoRA roles).
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lokr_w1", "lokr_w1"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".dora_scale", "dora_scale"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
)
ROLES = frozenset(role for _, role in ROLE_SUFFIXES)

_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


# --------------------------------------------------------------------------------------------------
# The maths
# --------------------------------------------------------------------------------------------------


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,jr,ip->pr", t, w_b, w_a)


def _rebuild(kind: str, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The delta of ``kind`` from its factors, before ``scale`` (shape ``[out, in]``)."""
    if kind == "lora":
        return f["up"] @ f["down"]
    if kind == "lokr":
        w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2 = _tucker(f["t2"], f["w2_a"], f["w2_b"])
        else:
            w2 = f["w2_a"] @ f["w2_b"]
        return torch.kron(w1.contiguous(), w2.contiguous())
    if kind == "loha":
        m1 = _tucker(f["t1"], f["w1_a"], f["w1_b"]) if "t1" in f else f["w1_a"] @ f["w1_b"]
        m2 = _tucker(f["t2"], f["w2_a"], f["w2_b"]) if "t2" in f else f["w2_a"] @ f["w2_b"]
        return m1 * m2
    if kind == "diff":
        return f["diff"]
    raise ValueError(f"no weight delta for kind {kind!r}")


def weight_delta(layer: DenseLayer, device: torch.device | str) -> torch.Tensor | None:
    """The layer's weight delta at strength 1 (scale applied, ``rows`` taken), float32 on ``device``;
    None for a bias-only layer."""
    if not layer.has_weight_delta:
        return None
    factors = {k: t.to(device=device, dtype=torch.float32) for k, t in layer.factors.items()}
    full = _rebuild(layer.kind, factors)
    if layer.scale != 1.0:
        full = full * layer.scale
    if layer.rows is None:
        return full
    return torch.cat([full[a:b] for a, b in layer.rows]) if len(layer.rows) > 1 else full[slice(*layer.rows[0])]


def contribution(layer: DenseLayer, weight: torch.Tensor) -> torch.Tensor | None:
    """What this layer adds to ``weight`` (the original weight in float32, on the device where
    the result is wanted) at strength 1: the delta, or ``DoRA(W) - W`` for a DoRA layer. None when
    the layer changes no weight (bias only)."""
    delta = weight_delta(layer, weight.device)
    if layer.magnitude is None:
        return delta
    merged = weight + delta if delta is not None else weight.clone()
    magnitude = layer.magnitude.to(device=weight.device, dtype=torch.float32)
    if layer.dora_axis == "out":
        norm = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
        factor = magnitude.view(-1, 1) / (norm + layer.dora_eps)
    else:
        norm = torch.linalg.vector_norm(merged, dim=0, keepdim=True)
        factor = magnitude.view(1, -1) / (norm + layer.dora_eps)
    return merged.mul_(factor).sub_(weight)


# --------------------------------------------------------------------------------------------------
# Reading one module
# --------------------------------------------------------------------------------------------------

_KIND_ROLES = {
    "lokr": {"lokr_w1": "w1", "lokr_w1_a": "w1_a", "lokr_w1_b": "w1_b", "lokr_w2": "w2", "lokr_w2_a": "w2_a",
             "lokr_w2_b": "w2_b", "lokr_t2": "t2"},
    "loha": {"hada_w1_a": "w1_a", "hada_w1_b": "w1_b", "hada_w2_a": "w2_a", "hada_w2_b": "w2_b",
             "hada_t1": "t1", "hada_t2": "t2"},
    "diff": {"diff": "diff"},
}
# Which factor sets make a complete module of each kind.
_COMPLETE = {
    "lokr": ({"w1"}, {"w1_a", "w1_b"}),
    "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
}


def read_module(
    path: Path,
    module_key: str,
    raw: Mapping[str, torch.Tensor],
    roles: Mapping[str, str],
    low_rank: tuple[torch.Tensor, torch.Tensor, float] | None,
    alpha: float | None,
) -> DenseLayer:
    """One module of a LyCORIS / DoRA / diff file as a full (not yet row-cut) :class:`DenseLayer`.

    roles: role (see ``ROLE_SUFFIXES``) -> key, for this module's keys other than a LoRA's
        down / up / alpha; low_rank: ``(down, up, scale)`` when the module also has a LoRA (already
        checked by the LoRA reader); alpha: the module's ``.alpha`` value, if any.
    Raises LoraFormatError naming the file and the keys for mixed, incomplete or misshapen modules.
    """
    kinds = {kind for kind, table in _KIND_ROLES.items() if any(r in roles for r in table)}
    if low_rank is not None:
        kinds.add("lora")
    keys = sorted(roles.values())
    if len(kinds) > 1:
        raise LoraFormatError(
            f"LoRA file {path}: {module_key} mixes {' and '.join(sorted(kinds))} weights ({', '.join(keys)}). "
            "The file is damaged or mixes two adapters: choose a clean file."
        )
    if "dora_scale" in roles and "magnitude" in roles:
        raise LoraFormatError(
            f"LoRA file {path}: {module_key} has two DoRA magnitudes (dora_scale and lora_magnitude_vector). "
            "The file is damaged: download it again."
        )
    kind = kinds.pop() if kinds else "bias"
    factors: dict[str, torch.Tensor] = {}
    if kind == "lora":
        assert low_rank is not None
        down, up, scale = low_rank
        factors = {"down": down, "up": up}
    else:
        for role, name in _KIND_ROLES.get(kind, {}).items():
            if role in roles:
                factors[name] = file_float(raw[roles[role]])
        scale = _scale(kind, factors, alpha)
    if kind in _COMPLETE:
        sides = ("w1", "w2") if kind == "lokr" else ("",)
        for side in sides:
            need = _COMPLETE[kind] if not side else ({side}, {side + "_a", side + "_b"})
            if not any(s <= set(factors) for s in need):
                raise LoraFormatError(
                    f"LoRA file {path} is incomplete: the {kind} module {module_key} lacks "
                    f"{' or '.join('+'.join(sorted(s)) for s in need)} (found: {', '.join(keys)}). "
                    "The file is damaged or was saved wrongly: download it again."
                )
    for name, t in factors.items():
        if t.ndim != 2:
            raise LoraFormatError(
                f"LoRA file {path}: {module_key} {name} has shape {tuple(t.shape)}; Flux.1 layers are linear "
                "(2-D weights): convolution adapters belong to other model families. Choose a Flux.1 LoRA."
            )
    shape: tuple[int, int] = (-1, -1)
    if kind != "bias":
        try:
            meta = _rebuild(kind, {k: torch.empty(t.shape, device="meta") for k, t in factors.items()})
        except RuntimeError as exc:
            raise LoraFormatError(
                f"LoRA file {path}: the {kind} factors of {module_key} do not fit together "
                f"({', '.join(f'{k} {tuple(t.shape)}' for k, t in factors.items())}: {exc}). "
                "The file is damaged: download it again."
            ) from exc
        shape = (int(meta.shape[0]), int(meta.shape[1]))
    magnitude, axis, eps = _magnitude(path, module_key, raw, roles, shape)
    bias = None
    if "diff_b" in roles:
        bias = file_float(raw[roles["diff_b"]])
        if bias.ndim != 1 or (shape[0] >= 0 and bias.shape[0] != shape[0]):
            raise LoraFormatError(
                f"LoRA file {path}: {roles['diff_b']} has shape {tuple(bias.shape)}, but a bias delta of this "
                f"layer has {shape[0] if shape[0] >= 0 else 'one row per output'} values. The file is damaged."
            )
        if shape[0] < 0:
            shape = (int(bias.shape[0]), -1)
    if kind == "bias" and magnitude is not None:
        raise LoraFormatError(
            f"LoRA file {path}: {module_key} has a DoRA magnitude but no LoRA / LoKr / LoHa weights "
            f"(found: {', '.join(keys)}). The file is damaged: download it again."
        )
    return DenseLayer(kind, factors, float(scale), shape, None, magnitude, axis, eps, bias)


def _scale(kind: str, factors: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    if alpha is None or alpha == 0:  # LyCORIS treats alpha 0 / missing as alpha = rank
        return 1.0
    if kind == "lokr":
        if "w2_b" in factors:
            return alpha / int(factors["w2_b"].shape[0])
        if "w1_b" in factors:
            return alpha / int(factors["w1_b"].shape[0])
        return 1.0
    if kind == "loha":
        return alpha / int(factors["w1_b"].shape[0])
    return 1.0


def _magnitude(path: Path, module_key: str, raw: Mapping[str, torch.Tensor], roles: Mapping[str, str],
               shape: tuple[int, int]) -> tuple[torch.Tensor | None, str, float]:
    """(magnitude as float32 1-D, axis ``out`` / ``in``, eps) of a DoRA module; (None, ...) otherwise."""
    out_f, in_f = shape
    if "magnitude" in roles:  # PEFT: [out], row norms, no eps
        key = roles["magnitude"]
        m = raw[key].detach().to("cpu", torch.float32).clone()
        if m.ndim != 1 or m.shape[0] != out_f:
            raise LoraFormatError(
                f"LoRA file {path}: {key} has shape {tuple(m.shape)}, expected [{out_f}] (one magnitude per "
                "output row). The file is damaged: download it again."
            )
        return m, "out", 0.0
    if "dora_scale" in roles:  # LyCORIS / kohya: [out, 1] or [1, in]
        key = roles["dora_scale"]
        m = raw[key].detach().to("cpu", torch.float32).clone()
        if m.ndim == 2 and m.shape[0] == out_f and m.shape[1] == 1:
            return m.view(-1), "out", _FLOAT32_EPS
        if m.ndim == 2 and m.shape[0] == 1 and m.shape[1] == in_f:
            return m.view(-1), "in", _FLOAT32_EPS
        raise LoraFormatError(
            f"LoRA file {path}: {key} has shape {tuple(m.shape)}; a DoRA scale of this {out_f}x{in_f} layer is "
            f"[{out_f}, 1] (per output row) or [1, {in_f}] (per input column). The file is damaged."
        )
    return None, "out", 0.0


def cut(path: Path, module_key: str, layer: DenseLayer,
        segments: list[tuple[tuple[int, int], ...]] | None) -> list[DenseLayer]:
    """The parts of ``layer`` for each target module: ``segments[i]`` are the rows of the rebuilt
    delta that module ``i`` takes (a fused ``qkv`` / ``linear1`` split, or BFL's swapped halves);
    ``None``: one module, all rows. A ``diff`` and the bias are cut now; LoKr / LoHa / LoRA factors
    are kept whole and cut after rebuilding at apply time."""
    if segments is None:
        return [layer]
    out_rows = layer.shape[0]
    parts: list[DenseLayer] = []
    split = len(segments) > 1
    if split and layer.magnitude is not None and layer.dora_axis == "in":
        raise LoraFormatError(
            f"LoRA file {path}: {module_key} is a DoRA with per-input-column norms on a fused layer; its "
            "norm spans several layers that FastLoRA holds separately (q, k, v, mlp), so it cannot be "
            "applied exactly. Use a DoRA trained with per-output-row norms (LyCORIS' default), or the "
            "diffusers (split) layout."
        )
    for rows in segments:

        def take(t: torch.Tensor, rows: tuple[tuple[int, int], ...] = rows) -> torch.Tensor:
            return torch.cat([t[a:b] for a, b in rows]).contiguous()

        magnitude = layer.magnitude
        if magnitude is not None and layer.dora_axis == "out":
            magnitude = take(magnitude)
        bias = None if layer.bias is None else take(layer.bias)
        if layer.kind == "diff":
            diff = take(layer.factors["diff"])
            part = replace(layer, factors={"diff": diff}, shape=(int(diff.shape[0]), layer.shape[1]),
                           magnitude=magnitude, bias=bias)
        elif layer.kind == "bias":
            part = replace(layer, shape=(sum(b - a for a, b in rows), -1), bias=bias)
        else:
            part = replace(layer, rows=rows, magnitude=magnitude, bias=bias)
        parts.append(part)
    assert sum(p.out_features for p in parts) == out_rows or out_rows < 0
    return parts
