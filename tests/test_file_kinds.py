"""Valid safetensors files are never mistaken for pickles (fastlora_core.filekind).

A safetensors file starts with its 8-byte little-endian header length, so its first byte is the
low byte of that length: 0x80 (a pickle's first byte) for about one file in 32, and ``PK`` (a zip
archive's first bytes) for a header of exactly 0x4B50 bytes. These tests write such files for a
LoRA and for every model file kind (transformer, CLIP-L, T5, autoencoder, a diffusers component)
and check that each is read; real pickles, zips and GGUF files are still refused.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from fastlora_core.errors import LoraFormatError, ModelLoadError
from fastlora_core.filekind import sniff
from fastlora_core.loading import load_pipeline, read_header, write_single_files
from fastlora_core.lora.formats import read_lora
from fastlora_core.specs import ModelSource
from fastlora_core.tiny import build_tiny_pipeline, write_tiny_loras

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")

def LOW_BYTE_0X80(n: int) -> bool:  # noqa: N802 - a named predicate, used like a constant
    return n % 256 == 0x80


def ZIP_MAGIC(n: int) -> bool:  # noqa: N802
    return n == 0x4B50  # the header length's two low bytes read "PK"


def save_with_header_length(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
                            want: Callable[[int], bool]) -> Path:
    """Write a valid safetensors file whose header length satisfies ``want``, by padding an extra
    ``__metadata__`` entry (safetensors rounds the header up to a multiple of 8)."""
    base = struct.unpack("<Q", save(tensors, metadata=metadata | {"padding": ""})[:8])[0]
    start = 0x4B50 - base - 16 if want(0x4B50) else 0
    for extra in range(max(0, start), max(0, start) + 4096):
        data = save(tensors, metadata=metadata | {"padding": "x" * extra})
        if want(struct.unpack("<Q", data[:8])[0]):
            path.write_bytes(data)
            return path
    raise AssertionError("no padding gives the wanted header length")


def rewrite_with_header_length(src: Path, dst: Path, want: Callable[[int], bool]) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
    return save_with_header_length(load_file(str(src)), dst, meta, want)


@pytest.fixture(scope="module")
def tiny() -> Any:
    pipe = build_tiny_pipeline(0, torch.float32)
    for name in COMPONENTS:
        getattr(pipe, name).eval().requires_grad_(False)
    return pipe


def assert_same_weights(a: Any, b: Any) -> None:
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sorted(sa) == sorted(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.parametrize("want, first", [(LOW_BYTE_0X80, b"\x80"), (ZIP_MAGIC, b"PK")], ids=["0x80", "PK"])
def test_lora_whose_header_length_looks_like_a_pickle_is_read(tmp_path: Path, want: Callable[[int], bool],
                                                               first: bytes) -> None:
    src = write_tiny_loras(tmp_path / "src", names=["fastlora-tiny-style"])["fastlora-tiny-style"]
    path = rewrite_with_header_length(src, tmp_path / "odd.safetensors", want)
    assert path.read_bytes()[: len(first)] == first
    assert sniff(path) == "safetensors"
    got, ref = read_lora(path), read_lora(src)
    assert sorted(got.transformer) == sorted(ref.transformer)
    for name, layer in ref.transformer.items():
        assert torch.equal(got.transformer[name].down, layer.down) and torch.equal(got.transformer[name].up, layer.up)


def test_model_files_whose_header_length_looks_like_a_pickle_load(tiny: Any, tmp_path: Path) -> None:
    files = write_single_files(tiny, tmp_path / "bfl", "bfl")
    odd = dict(files)
    for role in ("transformer", "clip_l", "t5xxl", "vae"):
        odd[role] = rewrite_with_header_length(files[role], tmp_path / f"odd_{role}.safetensors", LOW_BYTE_0X80)
        assert odd[role].read_bytes()[:1] == b"\x80", role
        read_header(odd[role], role)
    pipe = load_pipeline(ModelSource.from_single_files(**odd), torch.float32)
    assert_same_weights(tiny, pipe)


def test_diffusers_component_whose_header_length_looks_like_a_pickle_loads(tiny: Any, tmp_path: Path) -> None:
    folder = tmp_path / "diffusers"
    tiny.save_pretrained(str(folder), safe_serialization=True)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    shutil.move(str(weights), tmp_path / "vae.safetensors")
    rewrite_with_header_length(tmp_path / "vae.safetensors", weights, LOW_BYTE_0X80)
    assert weights.read_bytes()[:1] == b"\x80"
    pipe = load_pipeline(ModelSource.from_diffusers(folder), torch.float32)
    assert_same_weights(tiny, pipe)


def test_real_pickles_zips_and_gguf_are_still_refused(tmp_path: Path) -> None:
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"a": torch.zeros(2)}, str(zipped))  # torch.save's default: a zip archive
    bare = tmp_path / "bare.safetensors"
    torch.save({"a": torch.zeros(2)}, str(bare), _use_new_zipfile_serialization=False)  # a bare pickle
    gguf = tmp_path / "model.safetensors"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    assert (sniff(zipped), sniff(bare), sniff(gguf)) == ("zip", "pickle", "gguf")
    for path in (zipped, bare):
        with pytest.raises(ModelLoadError, match="pickle"):
            read_header(path, "transformer")
        with pytest.raises(LoraFormatError, match="pickle"):
            read_lora(path)
    with pytest.raises(ModelLoadError, match="GGUF"):
        read_header(gguf, "transformer")
    with pytest.raises(LoraFormatError, match="GGUF"):
        read_lora(gguf)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert sniff(tmp_path / "plain.safetensors") == "safetensors"
