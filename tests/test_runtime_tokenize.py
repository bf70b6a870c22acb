"""FastLoRA's own tokenizer loaders (``fastlora_core.runtime.tokenize``) against transformers'.

The Flux pipeline pads CLIP prompts to 77 tokens and T5 prompts to ``max_sequence_length``; the same
folder must give the same ``input_ids`` with or without transformers, for the tiny tokenizers and
for the real CLIP-L / T5-XXL vocabularies ComfyUI ships (used when a ComfyUI checkout is present)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fastlora_core.loading import tokenizers
from fastlora_core.runtime.tokenize import TokenizerFilesError, load_clip_tokenizer, load_t5_tokenizer

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_DIR") or "COMFYUI_DIR-not-set")  # a ComfyUI checkout, if given
COMFY_CLIP = COMFYUI / "comfy" / "sd1_tokenizer"
COMFY_T5 = COMFYUI / "comfy" / "text_encoders" / "t5_tokenizer"
needs_comfy = pytest.mark.skipif(not (COMFY_CLIP / "vocab.json").is_file() or not (COMFY_T5 / "tokenizer.json").is_file(),
                                 reason="ComfyUI's bundled tokenizers not found (set COMFYUI_DIR)")

LONG = ("A highly detailed photograph of a red fox standing in fresh snow at dawn, golden light, "
        "bokeh, 85mm lens, f/1.8, National Geographic style; ") * 20  # > 77 CLIP and > 512 T5 tokens (~760)
PROMPTS = [
    "",
    "a red fox, snow",
    "Hello, world!!! (what?) [yes] {no} -- 'quoted' \"double\" #tag @user 50% & more...",
    "Café naïve résumé Ångström façade Łódź ß œ",
    "emoji 🦊🔥👍🏽 and 中文 日本語 한국어",
    "multiple   spaces\n\nnew lines\ttabs  \r\n end  ",
    "UPPER CASE Prompt With MiXeD case",
    "numbers 0 1 22 333 4444 3.14159 1,000,000 2024-06-01",
    "don't it's we're they've I'm you'll he'd",
    "literal <|endoftext|> and <|startoftext|> and </s> <pad> <unk> <extra_id_0> tokens</s>x",
    LONG,
]
# FLUX.1-dev's tokenizer/tokenizer_config.json (vocab.json + merges.txt beside it): pads with <|endoftext|>.
FLUX_CLIP_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "49406": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False, "special": True},
        "49407": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True}},
    "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True, "do_lower_case": True,
    "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
}


def _reference_clip(folder: Path) -> Any:
    """transformers' CLIP tokenizer, loaded as FastLoRA's single-file loader loads it."""
    return tokenizers.load_clip_tokenizer(folder, 77)


def _ids(tok: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    """As diffusers' FluxPipeline calls its tokenizers."""
    return tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_length=False,
               return_overflowing_tokens=False, return_tensors="pt").input_ids


def _backend_json(tok: Any) -> dict[str, Any]:
    """The Rust tokenizer as JSON, without the per-call padding / truncation settings."""
    data = json.loads(tok.to_str())
    data["padding"] = data["truncation"] = None
    return data


def _folder(root: Path, name: str, src: Path, files: list[str], config: dict[str, Any] | None) -> Path:
    out = root / name
    out.mkdir()
    for f in files:
        shutil.copy(src / f, out / f)
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tiny_vocab_merges(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP tokenizer as vocab.json + merges.txt (the FLUX.1-dev / ComfyUI form)."""
    src = tiny_dir / "tokenizer"
    model = json.loads((src / "tokenizer.json").read_text())["model"]
    out = tmp_path_factory.mktemp("tiny_clip_vm")
    (out / "vocab.json").write_text(json.dumps(model["vocab"]))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in model["merges"]))
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="module")
def comfy_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-vocabulary folders in the forms users have: ComfyUI's own, FLUX.1-dev's tokenizer config,
    an SD-style pad token, no config at all, a tokenizer.json written by transformers, a T5 folder
    without tokenizer_config.json and one with only special_tokens_map.json (the legacy path)."""
    import transformers

    root = tmp_path_factory.mktemp("tok_variants")
    vm = ["vocab.json", "merges.txt"]
    t5_cfg = json.loads((COMFY_T5 / "tokenizer_config.json").read_text())
    out = {
        "clip-comfy": COMFY_CLIP,
        "clip-flux1-dev": _folder(root, "flux", COMFY_CLIP, [*vm, "special_tokens_map.json"], FLUX_CLIP_CONFIG),
        "clip-pad-!": _folder(root, "sdpad", COMFY_CLIP, vm, {**FLUX_CLIP_CONFIG, "pad_token": "!"}),
        "clip-no-config": _folder(root, "noconfig", COMFY_CLIP, vm, None),
        "t5-comfy": COMFY_T5,
        "t5-no-config": _folder(root, "t5noconfig", COMFY_T5, ["tokenizer.json"], None),
        "t5-special-map": _folder(root, "t5map", COMFY_T5, ["tokenizer.json", "special_tokens_map.json"],
                                  {k: v for k, v in t5_cfg.items() if k != "added_tokens_decoder"}),
    }
    saved = root / "clip_saved"
    transformers.CLIPTokenizer.from_pretrained(str(COMFY_CLIP)).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file()
    out["clip-tokenizer-json"] = saved
    return out


def _check_clip(folder: Path) -> None:
    ref = _reference_clip(folder)
    ours = load_clip_tokenizer(folder)
    assert _backend_json(ours.backend_tokenizer) == _backend_json(ref.backend_tokenizer)
    assert (ours.pad_token, ours.pad_token_id, ours.model_max_length, len(ours)) == (
        ref.pad_token, ref.pad_token_id, ref.model_max_length, len(ref))
    expected, got = _ids(ref, PROMPTS, 77), ours(PROMPTS, 77)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    assert torch.equal(got, expected), folder
    eos = ref.eos_token_id
    assert got[-1, -1] == eos and got[0, 0] == ref.bos_token_id  # truncation keeps <|endoftext|>
    assert (got[0, 1] == eos) and (got[0, 2:] == ref.pad_token_id).all()  # "" -> bos, eos, pad...


def _check_t5(folder: Path) -> None:
    ref = tokenizers.load_t5_tokenizer(folder)
    ours = load_t5_tokenizer(folder)
    assert _backend_json(ours.backend_tokenizer) == _backend_json(ref.backend_tokenizer)
    assert (ours.pad_token, ours.pad_token_id, ours.model_max_length, len(ours)) == (
        ref.pad_token, ref.pad_token_id, ref.model_max_length, len(ref))
    for max_length in (16, 256, 512):
        expected, got = _ids(ref, PROMPTS, max_length), ours(PROMPTS, max_length)
        assert got.dtype == torch.long and got.shape == (len(PROMPTS), max_length)
        assert torch.equal(got, expected), (folder, max_length)
        assert got[-1, -1] == ref.eos_token_id  # the long prompt is truncated, </s> kept
        assert got[0, 0] == ref.eos_token_id and (got[0, 1:] == ref.pad_token_id).all()


# -------------------------------------------------------------------------------------- tiny model


def test_tiny_clip_tokenizer_json_matches_transformers(tiny_dir: Path) -> None:
    _check_clip(tiny_dir / "tokenizer")


def test_tiny_clip_vocab_merges_matches_transformers(tiny_vocab_merges: Path) -> None:
    _check_clip(tiny_vocab_merges)


def test_tiny_t5_tokenizer_json_matches_transformers(tiny_dir: Path) -> None:
    _check_t5(tiny_dir / "tokenizer_2")


# ------------------------------------------------------------------------ ComfyUI's real vocabularies


@needs_comfy
@pytest.mark.parametrize("variant", ["clip-comfy", "clip-flux1-dev", "clip-pad-!", "clip-no-config",
                                     "clip-tokenizer-json"])
def test_real_clip_tokenizers_match_transformers(comfy_variants: dict[str, Path], variant: str) -> None:
    _check_clip(comfy_variants[variant])


@needs_comfy
@pytest.mark.parametrize("variant", ["t5-comfy", "t5-no-config", "t5-special-map"])
def test_real_t5_tokenizers_match_transformers(comfy_variants: dict[str, Path], variant: str) -> None:
    _check_t5(comfy_variants[variant])


@needs_comfy
def test_pad_token_and_length_come_from_the_config(comfy_variants: dict[str, Path]) -> None:
    """FLUX.1-dev pads CLIP with <|endoftext|> (49407), an SD-style config with "!" (0); ComfyUI's
    config says model_max_length 8192, which the pipeline would pad to: lowered to 77."""
    flux = load_clip_tokenizer(comfy_variants["clip-flux1-dev"])
    sd = load_clip_tokenizer(comfy_variants["clip-pad-!"])
    assert (flux.pad_token_id, sd.pad_token_id) == (49407, 0)
    assert flux("a fox", 77)[0, 3:].unique().tolist() == [49407]  # <|startoftext|> a fox <|endoftext|> ...
    assert sd("a fox", 77)[0, 4:].unique().tolist() == [0] and sd("a fox", 77)[0, 3] == 49407
    assert load_clip_tokenizer(COMFY_CLIP).model_max_length == 77
    assert load_clip_tokenizer(COMFY_CLIP, max_length=64).model_max_length == 64
    assert load_t5_tokenizer(COMFY_T5).model_max_length == 512


@needs_comfy
def test_truncation_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    tok = load_clip_tokenizer(COMFY_CLIP)
    with caplog.at_level(logging.WARNING, logger="fastlora_core.runtime.tokenize"):
        tok(["short", LONG], 77)
    assert any("prompt 1 is longer than 77 tokens" in r.getMessage() for r in caplog.records)
    assert not any("prompt 0" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ errors


def test_folders_without_usable_files_are_named(tmp_path: Path) -> None:
    """The caller falls back to transformers on TokenizerFilesError; the message names the folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerFilesError, match="vocab.json") as err:
        load_clip_tokenizer(empty)
    assert str(empty) in str(err.value)
    spm_only = tmp_path / "spm_only"
    spm_only.mkdir()
    (spm_only / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerFilesError, match="spiece.model") as err:
        load_t5_tokenizer(spm_only)
    assert str(spm_only) in str(err.value)
    with pytest.raises(TokenizerFilesError, match="does not exist"):
        load_t5_tokenizer(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerFilesError, match="not a BPE"):
        load_clip_tokenizer(bad)
    with pytest.raises(TokenizerFilesError, match="not a Unigram"):
        load_t5_tokenizer(bad)


def test_the_module_imports_no_diffusers_or_transformers() -> None:
    code = ("import sys, fastlora_core.runtime.tokenize; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
