"""Tensors moved to system RAM through two chunks (decision 65: the fused masters, when ComfyUI needs
the GPU memory back). The CUDA path is in tests/test_gpu.py; here the same pieces and chunks run on
the CPU, synchronously."""

from __future__ import annotations

import pytest
import torch

from fastlora_core.lora import spill


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1000, 2**20])  # a byte at a time, odd sizes, one chunk
def test_every_piece_lands_in_its_tensor_bit_for_bit(chunk_bytes: int) -> None:
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(5, 7, generator=g).to(torch.bfloat16), torch.randn(3, generator=g),
               torch.randint(0, 255, (11,), dtype=torch.uint8, generator=g), torch.randn(2, 2, 3, generator=g)]
    out = [torch.zeros_like(t) for t in sources]
    todo = spill.pieces(list(zip(sources, out, strict=True)), chunk_bytes)
    assert sum(src.numel() for src, _ in todo) == sum(t.numel() * t.element_size() for t in sources)
    assert max(src.numel() for src, _ in todo) <= chunk_bytes
    assert spill.copy_pieces(todo)
    for got, want in zip(out, sources, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_cpu_tensors_are_returned_as_they_are_and_views_are_copied_whole() -> None:
    t = torch.arange(12.0)
    assert spill.to_ram([t])[0] is t
    view = torch.arange(24.0).reshape(4, 6)[:, ::2]  # not contiguous: the copy is of the values
    (got,) = spill.to_ram([view])
    assert got.is_contiguous() and torch.equal(got, view)


def test_no_chunk_to_be_had_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.empty

    def empty(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("dtype") is torch.uint8:
            raise RuntimeError("out of pinned memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    src = torch.arange(8.0)
    assert spill.copy_pieces(spill.pieces([(src, torch.zeros(8))], 16)) is False
