"""Flux.1's CLIP and T5 tokenizers without transformers, on the ``tokenizers`` library alone.

``FluxPipeline`` tokenizes with transformers' ``CLIPTokenizer`` / ``T5Tokenizer``
(``tokenizer(prompts, padding="max_length", max_length=..., truncation=True, return_tensors="pt")``).
Importing transformers' tokenizer classes costs seconds of start-up; these loaders build the very
same Rust ``tokenizers.Tokenizer`` transformers 5.25 builds from a tokenizer folder, so the
``input_ids`` are the same (``tests/test_runtime_tokenize.py`` compares them, and the built
tokenizers' JSON, with transformers'):

- transformers 5 does not use a ``tokenizer.json`` as saved: ``CLIPTokenizer`` and ``T5Tokenizer``
  take only its vocabulary (and merges, T5's precompiled character map, padding / truncation
  sides) and rebuild their own normalizer, pre-tokenizer and post-processor. So do we. (A real T5
  ``tokenizer.json`` says ``Metaspace(prepend_scheme="first")`` plus a ``"  " -> "▁"`` rule;
  transformers 5 tokenizes with ``WhitespaceSplit`` + ``Metaspace(prepend_scheme="always")``, which
  differs from the file's own pipeline after an added token: ``"x</s>y"`` gives ``▁y``, not ``y``.)
- CLIP from ``vocab.json`` + ``merges.txt`` (FLUX.1-dev's ``tokenizer/``, ComfyUI's
  ``comfy/sd1_tokenizer``) gets the same pipeline.
- special and added tokens (which ones, their ``normalized`` / ``special`` flags, the pad token)
  come from ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``tokenizer.json`` the way
  transformers' ``from_pretrained`` reads them, and are added in the same order.

A folder these loaders cannot read (T5 with only ``spiece.model``, a non-BPE CLIP ``tokenizer.json``)
raises :class:`TokenizerFilesError`; the caller then uses transformers.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

__all__ = ["FluxTokenizer", "TokenizerFilesError", "load_clip_tokenizer", "load_t5_tokenizer"]

#: transformers' ``VERY_LARGE_INTEGER``: ``model_max_length`` when the config has none.
_NO_MAX_LENGTH = int(1e30)
#: transformers' ``SPECIAL_TOKENS_ATTRIBUTES``, in its order (the order tokens are added in).
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: CLIPTokenizer's pre-tokenizer split (transformers 5.25 ``tokenization_clip.py``).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerFilesError(ModelLoadError):
    """A tokenizer folder without files these loaders read (the caller may use transformers)."""


class FluxTokenizer:
    """A padded, truncated tokenizer call as the Flux pipeline makes it: ``tok(prompts, max_length)``
    -> ``LongTensor [len(prompts), max_length]`` (special tokens added, right-padded with the pad
    token, truncated keeping the end token). ``model_max_length`` is the tokenizer config's."""

    def __init__(self, tokenizer: Tokenizer, *, pad_token: str, pad_token_id: int, model_max_length: int,
                 padding_side: str = "right", truncation_side: str = "right", name: str = "") -> None:
        self.backend_tokenizer = tokenizer
        self.pad_token = pad_token
        self.pad_token_id = pad_token_id
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.name = name
        self._lock = threading.Lock()

    def __call__(self, prompts: str | Sequence[str], max_length: int) -> torch.Tensor:
        """``input_ids [len(prompts), max_length]`` (int64), as transformers' tokenizer called with
        ``padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"``."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            return torch.empty((0, max_length), dtype=torch.long)
        with self._lock:  # truncation / padding are settings of the shared Rust tokenizer
            tok = self.backend_tokenizer
            tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
            tok.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                               pad_token=self.pad_token, length=max_length, pad_to_multiple_of=None)
            encodings = tok.encode_batch(batch, add_special_tokens=True)
        for i, enc in enumerate(encodings):
            if enc.overflowing:
                logger.warning("%s: prompt %d is longer than %d tokens; its end is ignored.",
                               self.name or "tokenizer", i, max_length)
        return torch.tensor([enc.ids for enc in encodings], dtype=torch.long)

    def __len__(self) -> int:
        """The vocabulary size with added tokens (transformers' ``len(tokenizer)``)."""
        return int(self.backend_tokenizer.get_vocab_size(with_added_tokens=True))

    def __repr__(self) -> str:
        return (f"FluxTokenizer({self.name!r}, vocab={self.backend_tokenizer.get_vocab_size()}, "
                f"pad={self.pad_token!r}/{self.pad_token_id}, model_max_length={self.model_max_length})")


# --------------------------------------------------------------------------------------------------
# Reading a tokenizer folder as transformers' from_pretrained does
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _to_added_token(value: Any) -> Any:
    """``{"__type": "AddedToken", ...}`` (old tokenizer configs) -> ``AddedToken``, recursively
    (transformers' ``convert_added_tokens``)."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        fields = {k: v for k, v in value.items() if k != "__type"}
        return AddedToken(**fields)
    if isinstance(value, (list, tuple)):
        return [_to_added_token(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_added_token(v) for k, v in value.items()}
    return value


def _added_token_from_dict(fields: Mapping[str, Any]) -> AddedToken:
    """A special token written as a dict in a list of extra special tokens."""
    return AddedToken(**{k: v for k, v in fields.items() if k not in ("special", "__type")}, special=True)


class _Special:
    """The special and added tokens of a folder, resolved as transformers' ``_from_pretrained``
    and ``PreTrainedTokenizerBase.__init__`` resolve them (before the class applies its defaults)."""

    def __init__(self, folder: Path, tokenizer_json: Mapping[str, Any] | None) -> None:
        has_tokenizer_json = tokenizer_json is not None
        cfg_path = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = dict(_read_json(cfg_path)) if cfg_path.is_file() else {}
        cfg.pop("tokenizer_class", None)
        cfg.pop("init_inputs", None)
        if has_tokenizer_json:
            cfg.pop("add_bos_token", None)
            cfg.pop("add_eos_token", None)
        if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
            cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
        added: dict[int, AddedToken] = {}
        by_content: dict[str, AddedToken] = {}
        if "added_tokens_decoder" in cfg:
            for idx, token in cfg["added_tokens_decoder"].items():
                tok = AddedToken(**token) if isinstance(token, dict) else token
                added[int(idx)] = tok
                by_content[str(tok)] = tok
        else:
            map_path = folder / "special_tokens_map.json"
            if map_path.is_file():
                for key, value in _read_json(map_path).items():
                    if isinstance(value, dict) and key != "extra_special_tokens":
                        fields = {k: v for k, v in value.items() if k not in ("special", "__type")}
                        value = AddedToken(**fields, special=True)
                    elif key == "extra_special_tokens" and isinstance(value, list):
                        merged = list(cfg.get("extra_special_tokens") or [])
                        for tok in value:
                            tok = AddedToken(**tok, special=True) if isinstance(tok, dict) else tok
                            if tok not in merged:
                                merged.append(tok)
                        value = merged
                    cfg[key] = value
            added_path = folder / "added_tokens.json"
            if added_path.is_file():
                specials = {str(cfg[k]) for k in _SPECIAL_ATTRS if cfg.get(k)}
                specials.update(str(t) for t in (cfg.get("extra_special_tokens") or []))
                for content, index in _read_json(added_path).items():
                    is_special = content in specials
                    added[int(index)] = AddedToken(content, rstrip=False, lstrip=False, normalized=not is_special,
                                                   special=is_special)
                    by_content[content] = added[int(index)]
            if tokenizer_json is not None:
                for serialized in tokenizer_json.get("added_tokens", []):
                    fields = {k: v for k, v in serialized.items() if k != "id"}
                    added[int(serialized["id"])] = AddedToken(**fields)
                    by_content[str(added[int(serialized["id"])])] = added[int(serialized["id"])]
        cfg.pop("added_tokens_decoder", None)
        cfg = _to_added_token(cfg)
        for key in _SPECIAL_ATTRS:
            if cfg.get(key) is not None and by_content:
                cfg[key] = by_content.get(str(cfg[key]), cfg[key])
        self.config = cfg
        self.added_tokens_decoder = added

    def named(self, defaults: Mapping[str, str]) -> dict[str, Any]:
        """The named special tokens in transformers' order: the class's arguments (``defaults``,
        overridden by the config), the config's other standard ones, then model-specific
        ``*_token`` keys."""
        named: dict[str, Any] = dict.fromkeys(_SPECIAL_ATTRS)
        for key in _SPECIAL_ATTRS:
            value = self.config.get(key, defaults.get(key))
            if isinstance(value, (str, AddedToken)):
                named[key] = value
        for key, value in self.config.items():
            if key.endswith("_token") and key not in named and isinstance(value, (str, AddedToken)):
                named[key] = value
        return named

    def extras(self, default: list[Any]) -> list[Any]:
        """``extra_special_tokens`` (``additional_special_tokens`` before transformers 5)."""
        for key in ("extra_special_tokens", "additional_special_tokens"):
            value = self.config.get(key)
            if isinstance(value, (list, tuple)) and (value or key == "extra_special_tokens"):
                return [_added_token_from_dict(t) if isinstance(t, dict) else t for t in value]
        return default

    def side(self, key: str, from_json: Mapping[str, Any] | None) -> str:
        """``padding_side`` / ``truncation_side``: the config's, else ``tokenizer.json``'s, else right."""
        value = self.config.get(key) or (from_json or {}).get("direction") or "right"
        side = str(value).lower()
        if side not in ("left", "right"):
            raise TokenizerFilesError(f"The tokenizer config says {key}={value!r}; expected 'left' or 'right'.")
        return side

    def model_max_length(self) -> int:
        value = self.config.get("model_max_length", self.config.get("max_len"))
        return int(value) if value is not None else _NO_MAX_LENGTH


def _add_tokens(tok: Tokenizer, special: _Special, named: Mapping[str, Any], extras: Iterable[Any]) -> None:
    """Add the folder's added and special tokens to ``tok`` in the order and with the flags
    transformers' ``TokenizersBackend.__init__`` uses (flags of a token added twice: the last)."""
    to_add: list[Any] = [t for _, t in sorted(special.added_tokens_decoder.items(), key=lambda x: x[0])]
    existing = tok.get_added_tokens_decoder().values()  # none yet: the tokenizer was just built
    encoder = [str(t) for t in existing] + [str(t) for t in to_add]
    for value in list(named.values()) + list(extras):
        if value is None:
            continue
        if str(value) not in encoder and value not in to_add:
            to_add.append(value)
    if not to_add:
        return
    names = [str(t) for t in named.values() if t]
    tokens: list[AddedToken] = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif isinstance(token, AddedToken) and not token.special and str(token) in names:
            token.special = True
        tokens.append(token)
    tok.add_tokens(tokens)


def _token_id(tok: Tokenizer, token: Any, unk: Any) -> int:
    """``convert_tokens_to_ids``: the token's id, else the unknown token's."""
    found = tok.token_to_id(str(token))
    if found is None and unk is not None:
        found = tok.token_to_id(str(unk))
    if found is None:
        raise TokenizerFilesError(f"The token {str(token)!r} is not in the vocabulary.")
    return int(found)


def _json_model(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tokenizer.json, its "model")``."""
    try:
        data = _read_json(path)
    except (OSError, ValueError) as e:
        raise TokenizerFilesError(f"Cannot read {path} ({e}).") from e
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise TokenizerFilesError(f"{path} has no tokenizer model.")
    return data, model


def _settings(data: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The ``padding`` / ``truncation`` of a ``tokenizer.json`` (transformers takes their sides)."""
    if not data:
        return None, None
    return data.get("padding"), data.get("truncation")


def _folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise TokenizerFilesError(f"The tokenizer folder {path} does not exist.")
    return path


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------


def load_clip_tokenizer(folder: str | os.PathLike[str], max_length: int = 77) -> FluxTokenizer:
    """CLIP-L's tokenizer from a folder with ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``.

    The same tokenizer transformers 5.25's ``CLIPTokenizer.from_pretrained(folder)`` builds (NFC,
    whitespace runs to one space, lower case; CLIP's split and byte-level pre-tokenizer; BPE with
    ``</w>`` word ends; ``<|startoftext|> ... <|endoftext|>``), padded with the config's pad token
    (FLUX.1-dev's: ``<|endoftext|>``). ``model_max_length`` is the config's, lowered to
    ``max_length`` (ComfyUI's config says 8192; the pipeline pads CLIP prompts to it).

    Raises:
        TokenizerFilesError: neither form is in ``folder`` (or it cannot be read).
    """
    path = _folder(folder)
    json_path = path / "tokenizer.json"
    has_json = json_path.is_file()
    data: dict[str, Any] | None = None
    vocab: Any
    merges: Any
    if has_json:
        data, model = _json_model(json_path)
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), (dict, list)):
            raise TokenizerFilesError(f"{json_path} is not a BPE tokenizer (CLIP's); its model is "
                                      f"{model.get('type')!r}.")
        vocab = model["vocab"]
        if isinstance(vocab, list):
            vocab = {t[0] if isinstance(t, list) else t: i for i, t in enumerate(vocab)}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab, merges = str(path / "vocab.json"), str(path / "merges.txt")
    else:
        raise TokenizerFilesError(f"No CLIP tokenizer files in {path}: need tokenizer.json, or vocab.json + merges.txt.")
    special = _Special(path, data)
    defaults = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    named = special.named(defaults)
    unk, bos, eos, pad = named["unk_token"], named["bos_token"], named["eos_token"], named["pad_token"]
    try:
        tok = Tokenizer(BPE(vocab=vocab, merges=merges or [], dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=str(unk)))
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise TokenizerFilesError(f"The CLIP vocabulary in {path} cannot be read ({e}).") from e
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    _add_tokens(tok, special, named, special.extras([]))
    tok.post_processor = processors.RobertaProcessing((str(eos), _token_id(tok, eos, unk)),
                                                      (str(bos), _token_id(tok, bos, unk)), False, False)
    tok.encode_special_tokens = bool(special.config.get("split_special_tokens", False))
    padding, truncation = _settings(data)
    model_max = min(special.model_max_length(), max_length)
    flux_tok = FluxTokenizer(tok, pad_token=str(pad), pad_token_id=_token_id(tok, pad, unk), model_max_length=model_max,
                             padding_side=special.side("padding_side", padding),
                             truncation_side=special.side("truncation_side", truncation), name=f"CLIP tokenizer {path}")
    logger.debug("loaded %r", flux_tok)
    return flux_tok


# --------------------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------------------


def _precompiled_charsmap(data: Mapping[str, Any]) -> bytes | None:
    """SentencePiece's normalisation table from a ``tokenizer.json`` normalizer, as transformers
    extracts it (the first ``Precompiled`` entry)."""
    config = data.get("normalizer")
    if not config:
        return None
    entries = config["normalizers"] if config.get("type") == "Sequence" else [config]
    for entry in entries:
        if entry.get("type") == "Precompiled" and "precompiled_charsmap" in entry:
            return base64.b64decode(entry["precompiled_charsmap"])
    return None


def load_t5_tokenizer(folder: str | os.PathLike[str]) -> FluxTokenizer:
    """T5's tokenizer from a folder's ``tokenizer.json``: the one transformers 5.25's
    ``T5Tokenizer.from_pretrained(folder)`` builds (Unigram over the file's vocabulary, unknown id 2,
    the file's precompiled SentencePiece normalisation, whitespace split + ``▁`` prefix on every
    word, ``</s>`` appended, padded with ``<pad>``). Truncation keeps the ``</s>``.

    Raises:
        TokenizerFilesError: no ``tokenizer.json`` (e.g. only ``spiece.model``) or not a Unigram one.
    """
    path = _folder(folder)
    json_path = path / "tokenizer.json"
    if not json_path.is_file():
        raise TokenizerFilesError(f"No T5 tokenizer.json in {path} (FastLoRA's own loader reads only that; "
                                  "spiece.model needs transformers).")
    data, model = _json_model(json_path)
    raw_vocab = model.get("vocab")
    if model.get("type") != "Unigram" or not isinstance(raw_vocab, list):
        raise TokenizerFilesError(f"{json_path} is not a Unigram tokenizer (T5's); its model is {model.get('type')!r}.")
    vocab = [tuple(item) for item in raw_vocab]
    special = _Special(path, data)
    named = special.named({"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    extra_ids = int(special.config.get("extra_ids", 100))
    extras = special.extras([f"<extra_id_{i}>" for i in range(extra_ids)])
    try:
        tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise TokenizerFilesError(f"The T5 vocabulary in {json_path} cannot be read ({e}).") from e
    charsmap = _precompiled_charsmap(data)
    if charsmap is not None:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    _add_tokens(tok, special, named, extras)
    unk, eos, pad = named["unk_token"], named["eos_token"], named["pad_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", _token_id(tok, eos, unk))],
    )
    tok.encode_special_tokens = bool(special.config.get("split_special_tokens", False))
    padding, truncation = _settings(data)
    flux_tok = FluxTokenizer(tok, pad_token=str(pad), pad_token_id=_token_id(tok, pad, unk),
                             model_max_length=special.model_max_length(),
                             padding_side=special.side("padding_side", padding),
                             truncation_side=special.side("truncation_side", truncation), name=f"T5 tokenizer {path}")
    logger.debug("loaded %r", flux_tok)
    return flux_tok
