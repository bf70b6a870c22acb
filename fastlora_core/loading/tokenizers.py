"""Tokenizers for single-file sources (single files do not contain them): found in a folder we
wrote, a diffusers Flux folder or the ComfyUI installation we run inside."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

_TOKENIZER_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("clip", "t5"),  # ours (write_single_files)
    ("tokenizer", "tokenizer_2"),  # a diffusers Flux folder
    ("comfy/sd1_tokenizer", "comfy/text_encoders/t5_tokenizer"),  # a ComfyUI checkout root
    ("sd1_tokenizer", "text_encoders/t5_tokenizer"),  # ComfyUI's comfy/ package folder
)


def _has_clip_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def _has_t5_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "spiece.model").is_file()


def _comfyui_root() -> Path | None:
    """The ComfyUI checkout we run inside, if any (found from already-imported modules only)."""
    for name in ("folder_paths", "comfy"):
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None)
        if f:
            p = Path(f).resolve().parent
            return p if name == "folder_paths" else p.parent
    env = os.environ.get("COMFYUI_DIR")
    return Path(env) if env else None


def find_tokenizer_dirs(tokenizer_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The (clip, t5) tokenizer folders for a single-file source.

    ``tokenizer_dir`` may hold ``clip/`` + ``t5/`` (what :func:`write_single_files` writes), be a
    diffusers Flux folder (``tokenizer/`` + ``tokenizer_2/``), a ComfyUI checkout root (its bundled
    ``comfy/sd1_tokenizer`` and ``comfy/text_encoders/t5_tokenizer``) or ComfyUI's ``comfy/``
    folder. When it is None, the ComfyUI installation we run inside (or ``$COMFYUI_DIR``) is used.

    Raises:
        ModelLoadError: nothing usable found; the message lists the accepted layouts.
    """
    how = (
        "Give tokenizer_dir: a folder with clip/ and t5/ tokenizer subfolders (files written by "
        "tokenizer.save_pretrained, or vocab.json + merges.txt for CLIP and tokenizer.json or spiece.model "
        "for T5), a diffusers Flux folder (tokenizer/ + tokenizer_2/), or a ComfyUI checkout (its bundled "
        "comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer are used)."
    )
    if tokenizer_dir is None:
        root = _comfyui_root()
        if root is None:
            raise ModelLoadError("No tokenizers: single-file Flux models do not contain them. " + how)
        base = root
    else:
        base = Path(tokenizer_dir)
        if not base.is_dir():
            raise ModelLoadError(f"The tokenizer folder {base} does not exist. " + how)
    for clip_rel, t5_rel in _TOKENIZER_LAYOUTS:
        clip_d, t5_d = base / clip_rel, base / t5_rel
        if clip_d.is_dir() or t5_d.is_dir():
            if not _has_clip_tokenizer(clip_d):
                raise ModelLoadError(f"No CLIP tokenizer files in {clip_d} (need tokenizer.json, or vocab.json "
                                     "+ merges.txt). " + how)
            if not _has_t5_tokenizer(t5_d):
                raise ModelLoadError(f"No T5 tokenizer files in {t5_d} (need tokenizer.json or spiece.model). " + how)
            return clip_d, t5_d
    raise ModelLoadError(f"No tokenizers found in {base}. " + how)


def _load_tokenizers(clip_d: Path, t5_d: Path, clip_max_len: int) -> tuple[Any, Any]:
    """transformers' CLIP and T5 tokenizers of two folders (:func:`load_clip_tokenizer`,
    :func:`load_t5_tokenizer`)."""
    return load_clip_tokenizer(clip_d, clip_max_len), load_t5_tokenizer(t5_d)


def load_clip_tokenizer(clip_d: Path, clip_max_len: int) -> Any:
    """transformers' CLIP tokenizer of a folder (the fast class where ``tokenizer.json`` exists), its
    ``model_max_length`` lowered to ``clip_max_len``."""
    import transformers

    clip_cls = getattr(transformers, "CLIPTokenizerFast", None) if (clip_d / "tokenizer.json").is_file() else None
    try:
        clip_tok = (clip_cls or transformers.CLIPTokenizer).from_pretrained(str(clip_d), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"The CLIP tokenizer in {clip_d} cannot be loaded ({e}). Use ComfyUI's "
                             "comfy/sd1_tokenizer or a diffusers Flux folder's tokenizer/.") from e
    if clip_tok.model_max_length > clip_max_len:
        # ComfyUI's sd1_tokenizer says 8192; the pipeline pads CLIP prompts to model_max_length.
        clip_tok.model_max_length = clip_max_len
    return clip_tok


def load_t5_tokenizer(t5_d: Path) -> Any:
    """transformers' T5 tokenizer of a folder (the fast class where ``tokenizer.json`` exists)."""
    import transformers

    t5_cls = getattr(transformers, "T5TokenizerFast", None) if (t5_d / "tokenizer.json").is_file() else None
    try:
        return (t5_cls or transformers.T5Tokenizer).from_pretrained(str(t5_d), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"The T5 tokenizer in {t5_d} cannot be loaded ({e}). Use ComfyUI's "
                             "comfy/text_encoders/t5_tokenizer or a diffusers Flux folder's tokenizer_2/.") from e
