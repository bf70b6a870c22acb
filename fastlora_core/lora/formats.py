"""Read any Flux.1 LoRA file into one normal form (:class:`~fastlora_core.lora.types.NormalizedLora`).

Supported layouts (detected per key, so a file that mixes them is read too):

* ``diffusers`` / PEFT: ``[transformer.]<diffusers module>.lora_A.weight`` / ``lora_B.weight``
  (``lora_down`` / ``lora_up`` accepted), optional ``<module>.alpha``; alphas may also come from
  diffusers' ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``).
  ``text_encoder.`` (CLIP-L) and ``text_encoder_2.`` (T5) parts are kept.
* ``kohya`` (sd-scripts, ai-toolkit, OneTrainer, SimpleTuner): ``lora_unet_<BFL module, _ separated>``,
  ``lora_transformer_<diffusers module>``, ``lycoris_<diffusers module>``, ``.lora_down`` /
  ``.lora_up`` / ``.alpha``; ``lora_te_`` / ``lora_te1_`` (CLIP-L) and ``lora_te3_`` (T5).
  The block-diagonal ``qkv`` / ``linear1`` layout that sd-scripts writes with ``split_qkv`` is split
  back into per-layer LoRAs of the smaller rank.
* ``xlabs``: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (1 = image stream,
  2 = text stream), ``single_blocks.N.processor.{qkv,proj}_lora``; no alpha (scale 1).
* ``bfl`` (Black Forest Labs / ComfyUI names): ``[diffusion_model.]double_blocks.N.img_attn.qkv`` ...
  with ``lora_A`` / ``lora_B`` or ``lora_down`` / ``lora_up`` (+ ``alpha``); ``text_encoders.clip_l.
  transformer.`` / ``text_encoders.t5xxl.transformer.`` parts.

Why not diffusers' ``FluxLoraLoaderMixin.lora_state_dict``: in diffusers 0.42.1 its kohya path
hard-codes Flux.1-dev widths when splitting ``linear1`` (AssertionError on any other width), drops
the non-block layers (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
``final_layer``) of kohya and BFL ``lora_down`` files without a warning (their converted keys lack
the ``transformer.`` prefix and are filtered out later), discards ``final_layer`` alphas (delta off
by ``rank / alpha``) and does not recognise BFL files with ``lora_A`` / ``lora_B`` names (loads
nothing). This module maps every layout directly and exactly instead (docs/ARCHITECTURE.md, decision 9);
the tests compare per-layer ``scale * up @ down`` against the source LoRA for every layout.

Mapping rules: a fused ``qkv`` / ``linear1`` LoRA maps exactly onto the split diffusers layers -
every part keeps the same ``down`` and takes its rows of ``up``. The ``linear1`` split is derived
from the tensor shapes (``hidden = down.in_features``, rows ``[h, h, h, rows - 3h]``), never from
Flux.1-dev constants. BFL ``final_layer.adaLN_modulation.1`` produces ``(shift, scale)`` while
diffusers ``norm_out.linear`` produces ``(scale, shift)``; the two row halves of ``up`` are swapped.

Beyond low-rank LoRAs, every layout above may hold LyCORIS LoKr / LoHa modules, DoRA magnitudes
(``dora_scale``, PEFT's ``lora_magnitude_vector``) and full deltas (``diff`` / ``diff_b``): their keys
are grouped here like a LoRA's and turned into :class:`~fastlora_core.lora.types.DenseLayer` by
``lora/lycoris.py`` (the maths and norm conventions are documented there); a fused ``qkv`` /
``linear1`` module is split by rows of its delta. OFT / BOFT, GLoRA, (IA)^3, VeRA, norm-tuning
and Flux Control files are refused, naming the type.

Every key of the file is either consumed or reported: unknown keys raise :class:`LoraFormatError`.
The only keys skipped are all-zero ``diff`` / ``diff_b`` / LoRA-bias tensors, which have no effect
(logged at INFO).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraFormatError
from ..filekind import sniff
from ..loading.keymaps import (
    split_sizes,
    swap_halves,
)
from . import lycoris
from .targets import _resolve, _Target
from .types import Layer, LoraLayer, NormalizedLora, file_float

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_FORMATS", "read_lora"]

SUPPORTED_FORMATS: tuple[str, ...] = ("diffusers", "kohya", "xlabs", "bfl")

_MAX_KEYS_IN_MESSAGE = 5

# --------------------------------------------------------------------------------------------------
# Key roles
# --------------------------------------------------------------------------------------------------

_ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".down.weight", "down"),  # XLabs
    (".up.weight", "up"),  # XLabs
    (".alpha", "alpha"),
    *lycoris.ROLE_SUFFIXES,  # LoKr / LoHa / DoRA / diff (lora/lycoris.py)
)
# Keys that carry no LoRA product but are harmless when all zero (ComfyUI / ai-toolkit extras).
_ZERO_OK_SUFFIXES = (".lora_B.bias", ".lora_up.bias", ".bias")
_DIFF_ROLES = ("diff", "diff_b")

# Adapter types FastLoRA cannot apply (the README's LoRA types table lists them).
_UNSUPPORTED: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.oft_(blocks|diag|r)\b|\.oft_R\b"), "a LyCORIS / PEFT OFT"),
    (re.compile(r"\.boft_"), "a PEFT BOFT"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "a LyCORIS GLoRA"),
    (re.compile(r"\.(w_norm|b_norm)$"), "a LyCORIS norm-tuning"),
    (re.compile(r"\.ia3_l\b|\.on_input$"), "an (IA)^3"),
    (re.compile(r"\.vera_lambda_[bd]\b"), "a PEFT VeRA"),
    (re.compile(r"(query_norm|key_norm)\.scale$|\.norm_(added_)?[qk]\.weight$"), "a Flux Control (Canny/Depth) LoRA"),
)

_OTHER_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]"),
     "Stable Diffusion 1.x/2.x/SDXL (UNet)"),
    (re.compile(r"(^|[._])joint_blocks[._]"), "Stable Diffusion 3"),
    (re.compile(r"^lora_te2_text_model_"), "SDXL / Stable Diffusion 3 (CLIP-G text encoder)"),
    (re.compile(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj"), "Flux.2"),
    (re.compile(r"distilled_guidance_layer"), "Chroma"),
    (re.compile(r"img_attn_qkv|txt_attn_qkv|individual_token_refiner"), "HunyuanVideo"),
    (re.compile(r"(^|[._])img_mlp[._]net|(^|[._])img_mod[._]1"), "Qwen-Image"),
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)[._]"), "Wan"),
    (re.compile(r"(^|[._])transformer_blocks[._]\d+[._]attn[12][._]"), "a cross-attention DiT (SD3.5/PixArt/Sana/LTX)"),
    (re.compile(r"(^|[._])layers[._]\d+[._](attention|feed_forward)[._]"), "Lumina 2 / Z-Image"),
    (re.compile(r"^unet\."), "Stable Diffusion (UNet)"),
)  # fmt: skip


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _first(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return shown + (f" (and {more} more)" if more > 0 else "")


def _guess_family(keys: Iterable[str]) -> str | None:
    for key in keys:
        for pattern, family in _OTHER_FAMILIES:
            if pattern.search(key):
                return family
    return None


# --------------------------------------------------------------------------------------------------
# File reading
# --------------------------------------------------------------------------------------------------


def _load_file(path: Path, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the ``__metadata__`` of a safetensors file, with actionable errors
    (NaN / infinities among them unless ``check_finite`` is False)."""
    if not path.exists():
        raise LoraFormatError(
            f"LoRA file not found: {path}. Check the file name, and that the file is in ComfyUI's "
            "models/loras folder (or give the full path)."
        )
    if not path.is_file():
        raise LoraFormatError(f"LoRA path {path} is a folder, not a file. Choose the .safetensors file inside it.")
    size = path.stat().st_size
    if size == 0:
        raise LoraFormatError(
            f"LoRA file {path} is empty (0 bytes): the download or copy was interrupted. Download it again."
        )
    kind = sniff(path)
    if kind == "gguf":
        raise LoraFormatError(
            f"LoRA file {path} is a GGUF file, not a safetensors file. FastLoRA reads only .safetensors "
            "LoRAs: get the .safetensors version of this LoRA."
        )
    if kind in ("pickle", "zip"):
        raise LoraFormatError(
            f"LoRA file {path} is a PyTorch pickle (.pt/.ckpt/.bin), not a safetensors file. FastLoRA reads "
            "only .safetensors LoRAs (pickles can run code when loaded): get the .safetensors version of this "
            "LoRA, or convert it with a trusted tool."
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # safetensors validates the file
            metadata = dict(f.metadata() or {})
            tensors = _private_tensors(path, f)
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError variants
        raise LoraFormatError(
            f"LoRA file {path} ({size} bytes) is not a readable safetensors file ({type(exc).__name__}: {exc}). "
            "It is probably truncated or corrupt (an interrupted download) or not a LoRA at all: download it again."
        ) from exc
    if not tensors:
        raise LoraFormatError(
            f"LoRA file {path} is a valid safetensors file but holds no tensors. It is not a usable LoRA: "
            "download it again or choose another file."
        )
    if check_finite:
        _check_finite(tensors, path)
    return tensors, metadata


def _private_tensors(path: Path, f: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``f`` (opened by ``safe_open``, which checked the header)
    as views of one buffer of this process's own memory, read with several threads
    (:func:`~fastlora_core.fileio.read_span`).

    Not ``f.get_tensor``: its tensors are views of a memory mapping, and copying them out page fault by
    page fault took 121-147 ms for a 523 MB LoRA on the H200 host, the largest part of `Generate`'s
    first use of a file. A tensor the header describes in a way this reader does not take (a dtype
    without a torch equivalent here, bytes not aligned to its element size) is copied out of
    ``f.get_tensor`` instead, so the result never shares memory with the file's mapping."""
    from ..fileio import read_span
    from ..loading.header import ST_DTYPES

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    keys = list(f.keys())
    end = max((int(header[k]["data_offsets"][1]) for k in keys), default=0)
    buf = read_span(path, 8 + n, end)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        entry = header[k]
        a, b = (int(x) for x in entry["data_offsets"])
        dtype = ST_DTYPES.get(entry["dtype"])
        shape = tuple(int(x) for x in entry["shape"])
        if dtype is None or a % dtype.itemsize or b - a != math.prod(shape) * dtype.itemsize:
            out[k] = f.get_tensor(k).clone()
            continue
        out[k] = buf[a:b].view(dtype).view(shape)
    return out


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int, str] | None:
    """``(key, count, "NaN" | "infinite")`` of the first tensor (by key) holding NaN or infinite
    values, or None when every floating-point value is finite.

    Fast path: a float32 sum is finite whenever every value is (NaN and infinities propagate
    through a sum), and a sum costs a fraction of an element-wise ``isfinite`` on the CPU (0.07 s
    vs 1.1 s for a 630 MB rank-64 Flux LoRA on 2 cores); only a tensor whose sum is not finite (bad
    values, or finite values overflowing float32) is checked element by element. On a GPU the same
    test runs on the sums of magnitudes (``torch._foreach_norm`` with ``ord=1``: a few kernels for
    the ~840 tensors of a Flux LoRA instead of one sum each, 16 -> 3-4 ms on the H200, where kernel
    launches dominated; not ``ord=inf``, whose max may drop NaN on CUDA). The results are read back
    together (one device synchronisation per device)."""
    keys = [k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel() > 0]
    if not keys:
        return None
    finite: list[bool | None] = [None] * len(keys)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, k in enumerate(keys):
        t = tensors[k]
        if t.is_cuda and t.element_size() > 1:
            groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        norms = torch._foreach_norm([tensors[keys[i]] for i in idx], ord=1)
        for i, ok in zip(idx, torch.stack(norms).isfinite().tolist()):
            finite[i] = ok
    rest = [i for i, ok in enumerate(finite) if ok is None]
    sums = [(t.float().sum() if t.element_size() == 1 else t.sum(dtype=torch.float32))
            for t in (tensors[keys[i]] for i in rest)]
    by_device: dict[torch.device, list[int]] = {}
    for j, s in enumerate(sums):
        by_device.setdefault(s.device, []).append(j)
    for idx in by_device.values():
        for j, ok in zip(idx, torch.stack([sums[j] for j in idx]).isfinite().tolist()):
            finite[rest[j]] = ok
    suspect = [i for i, ok in enumerate(finite) if not ok]
    for i in suspect:
        t = tensors[keys[i]]
        mask = torch.isfinite(t.float() if t.element_size() == 1 else t)
        if not bool(mask.all()):
            bad = t[~mask]
            return keys[i], int(bad.numel()), "NaN" if bool(bad.isnan().any()) else "infinite"
    return None


def check_values(lora: NormalizedLora) -> None:
    """Refuse NaN or infinite values in a normal-form LoRA (merged, they make every image black).
    The engine calls this once per distinct LoRA whose ``values_checked`` is False (built in memory
    from ComfyUI's patches, or read by its LoRA cache), on the copy it staged: on a GPU that takes
    3-4 ms for a rank-64 Flux LoRA, on the CPU ~100 ms (ARCHITECTURE decisions 23 and 32)."""
    found = first_non_finite(lora.tensors())
    if found is not None:
        key, count, what = found
        raise LoraFormatError(
            f"{lora.path}: {key} holds {count} {what} value(s). Applied, it would turn every image black. The "
            "LoRA file is damaged or was saved from a diverged training run: download it again "
            "or use another checkpoint of this LoRA. Nothing was changed."
        )


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite values: merged into the model they make every image black (NaN).
    Runs when a file is read with ``check_finite`` (the default); the engine's LoRA cache reads
    without it and the engine checks the staged copy instead (decision 32), calling this only to
    name the file's own tensor key when that copy is refused."""
    found = first_non_finite(tensors)
    if found is not None:
        key, count, what = found
        total = tensors[key].numel()
        raise LoraFormatError(
            f"LoRA file {path}: tensor {key} holds {count} {what} value(s) (of {total}). "
            "Applied, it would turn every image black. The file is damaged or was saved from a "
            "diverged training run: download it again or use another checkpoint of this LoRA."
        )


def _adapter_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, dict[str, object]]:
    """diffusers' ``lora_adapter_metadata`` (``transformer.lora_alpha`` ...) split per component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("%s: ignoring unreadable lora_adapter_metadata", path)
        return {}
    out: dict[str, dict[str, object]] = {}
    if not isinstance(flat, dict):
        return out
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        if field:
            out.setdefault(component, {})[field] = value
    return out


def _pattern_value(patterns: object, module: str) -> float | None:
    """PEFT's ``get_pattern_key`` semantics: a pattern matches a module name or its dotted suffix."""
    if not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return None


def _split_fused(down: torch.Tensor, up: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a fused LoRA exactly: each part keeps ``down`` and takes its rows of ``up``.

    When ``up`` is block-diagonal over equal rank chunks (sd-scripts ``split_qkv`` files), each part
    takes only its own chunk of ``down`` and block of ``up`` (a smaller rank, the same delta).
    """
    n = len(sizes)
    rank = int(down.shape[0])
    ups = list(torch.split(up, sizes, dim=0))
    if rank % n == 0:
        r = rank // n
        sparse = all(
            not torch.any(part[:, :i * r]) and not torch.any(part[:, (i + 1) * r:]) for i, part in enumerate(ups)
        )
        if sparse:
            return [(down[i * r:(i + 1) * r].clone(), part[:, i * r:(i + 1) * r].contiguous())
                    for i, part in enumerate(ups)]
    return [(down.clone(), part.contiguous()) for part in ups]


@dataclass
class _Group:
    """The keys of one LoRA module in the file."""

    down: str | None = None
    up: str | None = None
    alpha: str | None = None
    more: dict[str, str] = field(default_factory=dict)  # LoKr / LoHa / DoRA / diff roles -> key

    def keys(self) -> list[str]:
        return [k for k in (self.down, self.up, self.alpha, *self.more.values()) if k is not None]

    def add(self, role: str, key: str) -> None:
        if role in ("down", "up", "alpha"):
            setattr(self, role, key)
        else:
            self.more[role] = key


def read_lora(path: str | os.PathLike[str], check_finite: bool = True) -> NormalizedLora:
    """Read a Flux.1 LoRA safetensors file of any supported layout into a :class:`NormalizedLora`.

    ``check_finite=False`` leaves the NaN / infinity check to the caller (the result says
    ``values_checked=False``): the engine checks the copy it stages on the GPU, where that takes
    3-4 ms instead of ~100 ms on the CPU for a rank-64 Flux LoRA (ARCHITECTURE decision 32).

    Contract:
        * Every tensor key of the file is consumed, or the call fails: nothing is dropped silently
          (all-zero ``diff`` / ``diff_b`` / bias keys, which change nothing, are skipped with an INFO
          log). Text-encoder layers go to ``text_encoder`` (CLIP-L) / ``text_encoder_2`` (T5).
        * For every low-rank layer (:class:`LoraLayer`), ``scale * up @ down`` equals the delta the
          file describes (``scale`` = ``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA
          metadata, 1.0 without alpha). LoKr / LoHa / DoRA / diff modules become
          :class:`DenseLayer` (see ``lora/lycoris.py``). Fused ``qkv`` / ``linear1`` modules are
          split into the diffusers layers; widths come from the tensor shapes, so any Flux size works.
        * Tensors keep the file's floating dtype (fp32, bf16 or fp16; anything else becomes fp32),
          contiguous, on the CPU, and not shared with each other (except that the parts of a split
          LoKr / LoHa share its factors).
        * ``source_format`` is one of ``diffusers`` / ``kohya`` / ``xlabs`` / ``bfl``, or several
          joined by ``+`` for a file that mixes layouts.
        * This does not check the LoRA against a model; call :func:`fastlora_core.lora.fit.validate_against` for that.

    Raises:
        LoraFormatError: the file is missing, empty, a pickle, truncated or corrupt, holds no LoRA,
            is a LoRA for another model family, is of an unsupported type (OFT / BOFT, GLoRA, (IA)^3,
            VeRA, norm-tuning, Flux Control), has keys that are not understood, a down without its up
            (or the reverse), inconsistent ranks, incomplete or misshapen LoKr / LoHa / DoRA factors,
            or two entries for the same layer. The message names the
            file, the first offending keys, and what to do.
    """
    p = Path(os.fspath(path))
    raw, metadata = _load_file(p, check_finite)
    keys = list(raw)

    for pattern, kind in _UNSUPPORTED:
        bad = [k for k in keys if pattern.search(k)]
        if bad:
            raise LoraFormatError(
                f"LoRA file {p} is {kind} file, which FastLoRA does not support (keys: {_first(bad)}). "
                "Use a plain LoRA (lora_A/lora_B or lora_down/lora_up weights), or convert this file to a "
                "plain LoRA first (e.g. with a LoRA extraction/resize tool)."
            )
    adapter_meta = _adapter_metadata(metadata, p)
    for component, meta in adapter_meta.items():
        if meta.get("use_dora") and not any(k.endswith(".lora_magnitude_vector") or
                                            k.endswith(".lora_magnitude_vector.weight") for k in keys):
            raise LoraFormatError(
                f"LoRA file {p} says it is a DoRA ({component}.use_dora in its metadata) but holds no DoRA "
                "magnitudes (lora_magnitude_vector). The file is incomplete: save or download it again."
            )

    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    skipped: list[str] = []
    full_diffs: list[str] = []
    for key in keys:
        split = _split_role(key)
        if (split is None and key.endswith(_ZERO_OK_SUFFIXES)) or (split is not None and split[1] in _DIFF_ROLES):
            if not torch.any(raw[key]):
                skipped.append(key)  # changes nothing
                continue
            if split is None:
                full_diffs.append(key)
                continue
        if split is None:
            unknown.append(key)
            continue
        module_key, role = split
        groups.setdefault(module_key, _Group()).add(role, key)

    targets: dict[str, _Target] = {}
    for module_key, group in groups.items():
        target = _resolve(module_key)
        if target is not None:
            targets[module_key] = target
        elif set(group.more) <= set(_DIFF_ROLES) and not (group.down or group.up or group.alpha):
            full_diffs.extend(group.keys())  # e.g. a norm's scale: not a linear layer
        else:
            unknown.extend(group.keys())

    if full_diffs:
        raise LoraFormatError(
            f"LoRA file {p} holds full weight or bias differences for layers that are not linear layers of "
            f"Flux.1 ({_first(full_diffs)}: norms, embeddings or LoRA biases), which FastLoRA cannot apply. "
            "Use a LoRA without these tensors, or merge this one into the model with another tool."
        )
    if unknown:
        family = _guess_family(unknown)
        if family is not None:
            raise LoraFormatError(
                f"LoRA file {p} looks like a LoRA for {family}, not for Flux.1 (keys: {_first(unknown)}). "
                "Use it with a model of that family, or choose a Flux.1 LoRA."
            )
        if len(unknown) == len(keys):
            raise LoraFormatError(
                f"LoRA file {p} is not a Flux.1 LoRA in any layout FastLoRA knows (diffusers/PEFT, kohya, "
                f"XLabs, BFL/ComfyUI). First keys: {_first(unknown)}. Choose a Flux.1 LoRA; if this one "
                "works elsewhere, please report its key names."
            )
        raise LoraFormatError(
            f"LoRA file {p} has keys FastLoRA does not understand ({len(unknown)}): {_first(unknown)}. "
            "Refusing to load it partly (those layers would be silently missing). Make sure it is a Flux.1 "
            "LoRA; if it works elsewhere, please report these key names."
        )
    if skipped:
        logger.info("%s: skipped %d all-zero diff/bias keys (no effect): %s", p, len(skipped), _first(skipped))

    parts: dict[str, dict[str, Layer]] = {"transformer": {}, "text_encoder": {}, "text_encoder_2": {}}
    origin: dict[tuple[str, str], str] = {}
    layouts: set[str] = set()
    te_layouts: set[str] = set()
    for module_key in sorted(targets):
        target = targets[module_key]
        group = groups[module_key]
        pieces: list[Layer]
        if group.more:  # LoKr / LoHa / DoRA / diff: a dense delta (lora/lycoris.py)
            pieces = _dense_pieces(p, raw, module_key, group, target, adapter_meta)
        else:
            pieces = _low_rank_pieces(p, raw, module_key, group, target, adapter_meta)
        part = parts[target.component]
        for module, layer in zip(target.modules, pieces):
            if module in part:
                raise LoraFormatError(
                    f"LoRA file {p} has two entries for the layer {module}: {origin[(target.component, module)]} "
                    f"and {module_key}. The file mixes two LoRAs or layouts; choose a clean LoRA file."
                )
            part[module] = layer
            origin[(target.component, module)] = module_key
        (layouts if target.component == "transformer" else te_layouts).add(target.layout)

    n_layers = sum(len(v) for v in parts.values())
    if n_layers == 0:
        raise LoraFormatError(
            f"LoRA file {p} holds no LoRA weights (only all-zero diff/bias keys). Choose another LoRA file."
        )
    source_format = "+".join(sorted(layouts or te_layouts))
    logger.debug(
        "%s: %s LoRA, %d transformer / %d CLIP / %d T5 layers",
        p, source_format, len(parts["transformer"]), len(parts["text_encoder"]), len(parts["text_encoder_2"]),
    )
    return NormalizedLora(
        path=str(p),
        source_format=source_format,
        transformer=parts["transformer"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        values_checked=check_finite,
    )


def _low_rank(p: Path, raw: Mapping[str, torch.Tensor], module_key: str, group: _Group, target: _Target,
              adapter_meta: Mapping[str, Mapping[str, object]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, scale)`` of a LoRA module, checked."""
    if group.down is None or group.up is None:
        have, missing = (group.keys(), "up (lora_B/lora_up)" if group.up is None else "down (lora_A/lora_down)")
        raise LoraFormatError(
            f"LoRA file {p} is incomplete: {module_key} has no {missing} weight (found: {_first(have)}). "
            "The file is damaged or was saved wrongly: download it again."
        )
    down = file_float(raw[group.down])
    up = file_float(raw[group.up])
    if down.ndim != 2 or up.ndim != 2:
        raise LoraFormatError(
            f"LoRA file {p}: {group.down} / {group.up} have shapes {tuple(down.shape)} / {tuple(up.shape)}; "
            "a Flux.1 LoRA has 2-D weights (convolution LoRAs belong to other model families). "
            "Choose a Flux.1 LoRA."
        )
    rank = int(down.shape[0])
    if int(up.shape[1]) != rank:
        raise LoraFormatError(
            f"LoRA file {p}: {group.down} has rank {rank} but {group.up} has rank {int(up.shape[1])}. "
            "The file is damaged or not a LoRA: download it again."
        )
    if rank == 0:
        raise LoraFormatError(
            f"LoRA file {p}: {group.down} / {group.up} have rank 0 (shapes {tuple(down.shape)} / "
            f"{tuple(up.shape)}): the file holds no LoRA weights for this layer. "
            "The file is damaged or was saved wrongly: download it again."
        )
    return down, up, _scale(p, raw, group, target, rank, adapter_meta)


def _low_rank_pieces(p: Path, raw: Mapping[str, torch.Tensor], module_key: str, group: _Group, target: _Target,
                     adapter_meta: Mapping[str, Mapping[str, object]]) -> list[Layer]:
    """A LoRA module as one :class:`LoraLayer` per target module (fused qkv / linear1 split)."""
    down, up, scale = _low_rank(p, raw, module_key, group, target, adapter_meta)
    if target.split is not None:
        sizes = split_sizes(target.split, int(up.shape[0]), int(down.shape[1]))
        if sizes is None:
            raise LoraFormatError(
                f"LoRA file {p}: {group.up} has {int(up.shape[0])} rows, which cannot be split into "
                f"{', '.join(target.modules)} (in_features {int(down.shape[1])}). This LoRA was not made "
                "for a Flux.1 model: choose a Flux.1 LoRA."
            )
        return [LoraLayer(d, u, scale) for d, u in _split_fused(down, up, sizes)]
    if target.swap_halves:
        if up.shape[0] % 2:
            raise LoraFormatError(
                f"LoRA file {p}: {group.up} has an odd number of rows ({int(up.shape[0])}), but "
                "final_layer.adaLN_modulation.1 holds (shift, scale) halves. Choose a Flux.1 LoRA."
            )
        up = swap_halves(up)  # (shift, scale) -> (scale, shift)
    return [LoraLayer(down, up, scale)]


def _dense_pieces(p: Path, raw: Mapping[str, torch.Tensor], module_key: str, group: _Group, target: _Target,
                  adapter_meta: Mapping[str, Mapping[str, object]]) -> list[Layer]:
    """A LoKr / LoHa / DoRA / diff module as one :class:`DenseLayer` per target module: the rows of
    a fused qkv / linear1 delta are split like a LoRA's ``up``, BFL's swapped halves likewise."""
    low = _low_rank(p, raw, module_key, group, target, adapter_meta) if (group.down or group.up) else None
    alpha = None
    if group.alpha is not None and low is None:
        alpha = _alpha_value(p, raw, group.alpha)
    layer = lycoris.read_module(p, module_key, raw, group.more, low, alpha)
    rows, in_f = layer.shape
    segments: list[tuple[tuple[int, int], ...]] | None = None
    if target.split is not None:
        # A bias-only (diff_b) module has no input width: only qkv (equal thirds) splits without it.
        sizes = split_sizes(target.split, rows, in_f) if in_f > 0 or target.split == "qkv" else None
        if sizes is None:
            raise LoraFormatError(
                f"LoRA file {p}: {module_key} changes {rows} rows, which cannot be split into "
                f"{', '.join(target.modules)} (in_features {in_f}). This LoRA was not made for a Flux.1 "
                "model: choose a Flux.1 LoRA."
            )
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        segments = [((a, a + n),) for a, n in zip(starts, sizes)]
    elif target.swap_halves:
        if rows % 2:
            raise LoraFormatError(
                f"LoRA file {p}: {module_key} changes an odd number of rows ({rows}), but "
                "final_layer.adaLN_modulation.1 holds (shift, scale) halves. Choose a Flux.1 LoRA."
            )
        segments = [((rows // 2, rows), (0, rows // 2))]  # (shift, scale) -> (scale, shift)
    return list(lycoris.cut(p, module_key, layer, segments))


def _alpha_value(path: Path, raw: Mapping[str, torch.Tensor], key: str) -> float:
    alpha_t = raw[key]
    if alpha_t.numel() != 1:
        raise LoraFormatError(
            f"LoRA file {path}: {key} should be one number but has shape {tuple(alpha_t.shape)}. "
            "The file is damaged or not a LoRA: download it again."
        )
    alpha = float(alpha_t.reshape(()).to(torch.float64).item())
    if not math.isfinite(alpha):
        raise LoraFormatError(f"LoRA file {path}: {key} is {alpha}. The file is damaged: download it again.")
    return alpha


def _scale(
    path: Path,
    raw: Mapping[str, torch.Tensor],
    group: _Group,
    target: _Target,
    rank: int,
    adapter_meta: Mapping[str, Mapping[str, object]],
) -> float:
    """``alpha / rank`` from the ``.alpha`` key, else from diffusers metadata, else 1.0."""
    if group.alpha is not None:
        return _alpha_value(path, raw, group.alpha) / rank
    meta = adapter_meta.get(target.component) if target.layout == "diffusers" else None
    if not meta:
        return 1.0
    module = target.modules[0]
    alpha_v = _pattern_value(meta.get("alpha_pattern"), module)
    if alpha_v is None:
        lora_alpha = meta.get("lora_alpha")
        if not isinstance(lora_alpha, (int, float)):
            return 1.0
        alpha_v = float(lora_alpha)
    if not math.isfinite(alpha_v):
        raise LoraFormatError(f"LoRA file {path}: its lora_adapter_metadata gives {module} the alpha {alpha_v}. "
                              "The file is damaged: download it again.")
    if meta.get("use_rslora"):
        return alpha_v / math.sqrt(rank)
    return alpha_v / rank
