"""Staging a LoRA's tensors through reusable chunks (``lora/staging.py``) gives exactly the tensors
one ``tensor.to`` each would: same values, dtypes and shapes, whatever the chunk boundaries. On the
CPU the chunks are ordinary memory; the GPU path differs only in pinning and asynchronous copies."""

from __future__ import annotations

import pytest
import torch

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
