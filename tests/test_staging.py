"""Staging a LoRA's tensors through reusable chunks (``lora/staging.py``) gives exactly the tensors
one ``tensor.to`` each would: same values, dtypes and shapes, whatever the chunk boundaries. On the
CPU the chunks are ordinary memory; the GPU path differs only in pinning and asynchronous copies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from fastlora_core.lora import staging
from fastlora_core.lora.staging import PinnedStager
from fastlora_core.lora.types import DenseLayer, LoraLayer, NormalizedLora


def _lora() -> NormalizedLora:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    transformer = {f"layer{i}": LoraLayer(r(3 + i, 17), r(23, 3 + i, dtype=torch.float16), 0.5) for i in range(7)}
    transformer["dense"] = DenseLayer("lora", {"down": r(4, 9), "up": r(11, 4)}, 1.0, (11, 9),
                                      magnitude=r(11, dtype=torch.bfloat16), bias=r(11))
    return NormalizedLora("test", "diffusers", transformer, {"clip": LoraLayer(r(2, 5), r(5, 2), 1.0)})


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])  # a chunk smaller than one tensor, odd, larger than all
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_staging_equals_per_tensor_copies(chunk_bytes: int, dtype: torch.dtype) -> None:
    lora = _lora()
    want = lora.to("cpu", dtype)
    stager = PinnedStager("cpu", chunk_bytes=chunk_bytes)
    for _ in range(2):  # the chunks are reused
        got = lora.to("cpu", dtype, copy_many=stager)
        want_t, got_t = want.tensors(), got.tensors()
        assert list(got_t) == list(want_t)
        for k, t in want_t.items():
            assert got_t[k].dtype == t.dtype and got_t[k].shape == t.shape, k
            assert torch.equal(got_t[k], t), k
    dense = got.transformer["dense"]
    assert isinstance(dense, DenseLayer) and dense.magnitude is not None and dense.magnitude.dtype == torch.float32
    assert got.transformer["layer0"].scale == 0.5 and got.values_checked == lora.values_checked


def test_staging_packs_with_threads_and_across_autograd_modes() -> None:
    """Chunks packed by several threads hold exactly what one thread packs; a stager first used under
    ``torch.inference_mode()`` (as ComfyUI runs nodes) keeps working from plain Python and back."""
    lora = _lora()
    want = lora.to("cpu", torch.bfloat16)
    stager = PinnedStager("cpu", chunk_bytes=1000, threads=3)
    assert stager._pool is not None
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad, torch.inference_mode):
        with mode():
            got = lora.to("cpu", torch.bfloat16, copy_many=stager)
        for k, t in want.tensors().items():
            assert torch.equal(got.tensors()[k], t), (mode, k)


# -- memory-mapped tensors read from their files (Linux: os.preadv + /proc/self/pagemap) -------------------
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")


def _mapped_lora(path: Path, seed: int = 0) -> tuple[NormalizedLora, dict[str, torch.Tensor]]:
    """A LoRA whose tensors are memory-mapped from a safetensors file, as ComfyUI's loaders hold them
    (``safe_open`` under inference mode), and a private copy of its values."""
    if not path.exists():
        g = torch.Generator().manual_seed(seed)
        save_file({f"l{i}.{p}": torch.randn(*s, generator=g).to(torch.bfloat16)
                   for i in range(6) for p, s in (("down", (4, 300 + i)), ("up", (200 + i, 4)))}, str(path))
    with torch.inference_mode(), safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    lora = NormalizedLora("mapped", "comfyui", {f"l{i}": LoraLayer(t[f"l{i}.down"], t[f"l{i}.up"]) for i in range(6)},
                          values_checked=False)
    return lora, {k: v.clone() for k, v in t.items()}


def _assert_equal(got: NormalizedLora, want: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for name, layer in got.transformer.items():
        assert isinstance(layer, LoraLayer)
        for part, tensor in (("down", layer.down), ("up", layer.up)):
            assert tensor.dtype == dtype and torch.equal(tensor, want[f"{name}.{part}"].to(dtype)), (name, part)


@linux_only
@pytest.mark.parametrize("chunk_bytes,threads", [(1000, 1), (1000, 3), (1 << 20, 2)])
def test_mapped_tensors_are_read_from_their_file(tmp_path: Path, chunk_bytes: int, threads: int) -> None:
    """Tensors mapped from a file and unchanged are read from it with preadv (every byte), bit for bit."""
    lora, want = _mapped_lora(tmp_path / "a.safetensors")
    stager = PinnedStager("cpu", chunk_bytes=chunk_bytes, threads=threads)
    got = lora.to("cpu", torch.bfloat16, copy_many=stager)
    _assert_equal(got, want, torch.bfloat16)
    assert stager.last_read_bytes == lora.nbytes() and stager.last_copied_bytes == 0


@linux_only
def test_what_the_file_no_longer_holds_is_copied_from_memory(tmp_path: Path) -> None:
    """A tensor written in place since it was mapped, a file replaced since, a dtype conversion, or a
    read that fails: the tensor's memory is the truth."""
    path = tmp_path / "a.safetensors"
    lora, want = _mapped_lora(path)
    with torch.inference_mode():  # no version counter: only its private page shows the write
        lora.transformer["l0"].up[-1, -1] += 1.0
        want["l0.up"][-1, -1] += 1.0
    stager = PinnedStager("cpu", chunk_bytes=1000, threads=2)
    _assert_equal(lora.to("cpu", torch.bfloat16, copy_many=stager), want, torch.bfloat16)
    up0 = lora.transformer["l0"].up
    assert stager.last_copied_bytes >= up0.numel() * up0.element_size() and stager.last_read_bytes > 0

    _assert_equal(lora.to("cpu", torch.float32, copy_many=stager), want, torch.float32)  # converted: copied
    assert stager.last_read_bytes == 0

    lora, want = _mapped_lora(path)
    tmp = tmp_path / "b.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in want.items()}, str(tmp))
    os.replace(tmp, path)  # the path now names another file (another inode)
    _assert_equal(lora.to("cpu", torch.bfloat16, copy_many=stager), want, torch.bfloat16)
    assert stager.last_read_bytes == 0 and stager.last_copied_bytes == lora.nbytes()


@linux_only
def test_a_failed_read_falls_back_to_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lora, want = _mapped_lora(tmp_path / "a.safetensors")

    def short(*_: object) -> None:
        raise OSError("unexpected end of file")

    monkeypatch.setattr(staging, "read_exactly", short)
    stager = PinnedStager("cpu", chunk_bytes=1000, threads=2)
    _assert_equal(lora.to("cpu", torch.bfloat16, copy_many=stager), want, torch.bfloat16)
    assert stager.last_read_bytes == 0 and stager.last_copied_bytes == lora.nbytes()


@linux_only
def test_a_files_tensors_are_read_in_a_few_large_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors mapped from one file are placed in address order, so consecutive ones are read with
    one ``preadv`` per packing thread and chunk, not one per tensor."""
    lora, want = _mapped_lora(tmp_path / "a.safetensors")
    reads: list[int] = []
    real = staging.read_exactly

    def counted(path: str, fd: int, view: memoryview, offset: int) -> None:
        reads.append(len(view))
        real(path, fd, view, offset)

    monkeypatch.setattr(staging, "read_exactly", counted)
    stager = PinnedStager("cpu", chunk_bytes=1 << 20, threads=2)
    _assert_equal(lora.to("cpu", torch.bfloat16, copy_many=stager), want, torch.bfloat16)
    assert sum(reads) == lora.nbytes() and len(reads) <= 2, reads  # 12 tensors, one chunk, two threads
