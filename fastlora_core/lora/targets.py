"""Where a LoRA module goes: every module name a Flux.1 LoRA file may use (diffusers/PEFT, kohya,
XLabs, BFL; CLIP-L and T5 parts) -> the diffusers module(s) it targets, how a fused layer splits
and whether its row halves swap. The BFL and diffusers tables themselves live in
``loading/keymaps.py``, shared with model loading; :mod:`.formats` reads the files."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..loading.keymaps import (
    ADD_QKV,
    BFL_BLOCKS,
    BFL_DOUBLE,
    BFL_GLOBAL,
    BFL_SINGLE,
    DIFFUSERS_DOUBLE,
    DIFFUSERS_GLOBAL,
    DIFFUSERS_SINGLE,
    QKV,
    Entry,
)

# --------------------------------------------------------------------------------------------------
# Module tables (the BFL and diffusers ones live in loading/keymaps.py, shared with model loading).
# Keys are (block kind, source suffix); block kind "" means a non-block layer.
# Values: (diffusers module suffixes, split kind, swap the two row halves of up).
# --------------------------------------------------------------------------------------------------

_Entry = Entry

_XLABS_DOUBLE: dict[str, _Entry] = {
    "processor.qkv_lora1": (QKV, "qkv", False),
    "processor.proj_lora1": (("attn.to_out.0",), None, False),
    "processor.qkv_lora2": (ADD_QKV, "qkv", False),
    "processor.proj_lora2": (("attn.to_add_out",), None, False),
}
_XLABS_SINGLE: dict[str, _Entry] = {
    "processor.qkv_lora": (QKV, "qkv", False),
    "processor.proj_lora": (("proj_out",), None, False),
}

# (layout, block kind in the file) -> diffusers block prefix
_BLOCKS = {
    "diffusers": {"transformer_blocks": "transformer_blocks", "single_transformer_blocks": "single_transformer_blocks"},
    "bfl": BFL_BLOCKS,
    "xlabs": BFL_BLOCKS,
}


def _plain(names: Iterable[str]) -> dict[str, _Entry]:
    return {n: ((n,), None, False) for n in names}


_TABLES: dict[str, dict[str, dict[str, _Entry]]] = {
    "diffusers": {
        "transformer_blocks": _plain(DIFFUSERS_DOUBLE),
        "single_transformer_blocks": _plain(DIFFUSERS_SINGLE),
        "": _plain(DIFFUSERS_GLOBAL),
    },
    "bfl": {"double_blocks": BFL_DOUBLE, "single_blocks": BFL_SINGLE, "": BFL_GLOBAL},
    "xlabs": {"double_blocks": _XLABS_DOUBLE, "single_blocks": _XLABS_SINGLE, "": {}},
}
# kohya spells the same module names with "_" instead of "."
_TABLES_US: dict[str, dict[str, dict[str, _Entry]]] = {
    layout: {kind: {k.replace(".", "_"): v for k, v in t.items()} for kind, t in kinds.items()}
    for layout, kinds in _TABLES.items()
    if layout != "xlabs"
}

_DOTTED_BLOCK = re.compile(r"([a-z_]+)\.(\d+)\.(.+)")
_US_BLOCK = re.compile(r"([a-z_]+?)_(\d+)_(.+)")


@dataclass(frozen=True)
class _Target:
    """Where one LoRA module of the file goes."""

    component: str  # "transformer" | "text_encoder" | "text_encoder_2"
    modules: tuple[str, ...]  # diffusers module names; several for a fused qkv / linear1
    split: str | None  # None | "qkv" | "linear1"
    swap_halves: bool  # BFL (shift, scale) -> diffusers (scale, shift)
    layout: str  # "diffusers" | "kohya" | "xlabs" | "bfl"


def _lookup(name: str, layouts: Iterable[str], underscore: bool) -> tuple[str, _Entry] | None:
    """Resolve a transformer module name (prefix already removed) against the layout tables."""
    tables = _TABLES_US if underscore else _TABLES
    m = (_US_BLOCK if underscore else _DOTTED_BLOCK).fullmatch(name)
    for layout in layouts:
        kinds = tables.get(layout)
        if kinds is None:
            continue
        if m is not None and m.group(1) in kinds and m.group(1):
            entry = kinds[m.group(1)].get(m.group(3))
            if entry is not None:
                prefix = f"{_BLOCKS[layout][m.group(1)]}.{m.group(2)}."
                return layout, (tuple(prefix + s for s in entry[0]), entry[1], entry[2])
        entry = kinds[""].get(name)
        if entry is not None:
            return layout, entry
    return None


# Text encoders: CLIP-L (CLIPTextModel) and T5 (T5EncoderModel) module names.
_CLIP_DOTTED = re.compile(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))")
_CLIP_US = re.compile(r"(?:text_model_)?encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])")
_T5_DOTTED = re.compile(
    r"(encoder\.block\.\d+\.layer\.(?:0\.SelfAttention\.(?:q|k|v|o)|1\.DenseReluDense\.(?:wi_0|wi_1|wi|wo)))"
)
_T5_US = re.compile(r"encoder_block_(\d+)_layer_(0_SelfAttention_(?:q|k|v|o)|1_DenseReluDense_(?:wi_0|wi_1|wi|wo))")


def _clip_target(name: str, underscore: bool, layout: str) -> _Target | None:
    if underscore:
        m = _CLIP_US.fullmatch(name)
        if m is None:
            return None
        sub = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        module = f"text_model.encoder.layers.{m.group(1)}.{sub}"
    else:
        m = _CLIP_DOTTED.fullmatch(name)
        if m is None:
            return None
        module = "text_model." + m.group(1)
    return _Target("text_encoder", (module,), None, False, layout)


def _t5_target(name: str, underscore: bool, layout: str) -> _Target | None:
    if underscore:
        m = _T5_US.fullmatch(name)
        if m is None:
            return None
        sub = m.group(2)
        sub = sub.replace("0_SelfAttention_", "0.SelfAttention.").replace("1_DenseReluDense_", "1.DenseReluDense.")
        module = f"encoder.block.{m.group(1)}.layer.{sub}"
    else:
        m = _T5_DOTTED.fullmatch(name)
        if m is None:
            return None
        module = m.group(1)
    return _Target("text_encoder_2", (module,), None, False, layout)


def _transformer_target(name: str, layouts: Iterable[str], underscore: bool, label: str | None) -> _Target | None:
    found = _lookup(name, layouts, underscore)
    if found is None:
        return None
    layout, (modules, split, swap) = found
    return _Target("transformer", modules, split, swap, label or layout)


_LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_DOTTED_LAYOUTS = ("diffusers", "bfl", "xlabs")


def _resolve(module_key: str) -> _Target | None:
    """Map the module part of a key (role suffix removed) to its target, or None if unknown."""
    k = module_key
    # kohya-style underscore names
    if k.startswith("lora_unet_"):
        return _transformer_target(k[len("lora_unet_"):], ("bfl", "diffusers"), True, "kohya")
    if k.startswith("lora_transformer_"):
        return _transformer_target(k[len("lora_transformer_"):], ("diffusers",), True, "kohya")
    if k.startswith("lycoris_"):
        return _transformer_target(k[len("lycoris_"):], ("diffusers", "bfl"), True, "kohya")
    for prefix in ("lora_te_", "lora_te1_"):
        if k.startswith(prefix):
            return _clip_target(k[len(prefix):], True, "kohya")
    for prefix in ("lora_te3_", "lora_te2_"):
        if k.startswith(prefix):  # lora_te2_ is CLIP-G in SDXL/SD3 files: only accepted with T5 names
            return _t5_target(k[len(prefix):], True, "kohya")
    # dotted names
    if k.startswith("text_encoder_2."):
        return _t5_target(k[len("text_encoder_2."):], False, "diffusers")
    if k.startswith("text_encoder."):
        return _clip_target(k[len("text_encoder."):], False, "diffusers")
    if k.startswith("text_encoders.clip_l.transformer."):
        return _clip_target(k[len("text_encoders.clip_l.transformer."):], False, "bfl")
    if k.startswith("text_encoders.t5xxl.transformer."):
        return _t5_target(k[len("text_encoders.t5xxl.transformer."):], False, "bfl")
    for prefix in _LORA_PREFIXES:
        if k.startswith(prefix):
            k = k[len(prefix):]
            break
    return _transformer_target(k, _DOTTED_LAYOUTS, False, None)


@functools.lru_cache(maxsize=4096)
def bfl_module_targets(name: str) -> tuple[tuple[str, ...], str | None, bool] | None:
    """The diffusers module(s) a BFL-layout transformer module (``double_blocks.0.img_attn.qkv``)
    covers, in row order: ``(modules, split, swap_halves)`` where ``split`` is ``"qkv"`` /
    ``"linear1"`` for fused layers and ``swap_halves`` marks the final adaLN's (shift, scale) ->
    (scale, shift) order. None for a name that is not a linear layer of Flux.1. Memoised: every
    LoRA added to a MODEL asks again for the same few hundred names."""
    found = _lookup(name, ("bfl",), False)
    return None if found is None else found[1]
