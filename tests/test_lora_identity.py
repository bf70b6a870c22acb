"""A LoRA file rewritten under the same name is noticed (fastlora_core.lora.cache.file_key).

Users re-train or re-download a LoRA under the same name and queue again: the next image must use
the new weights, even when the new file has the same size and modification time as the old one
(and the stack asked for is exactly the one already loaded). One path rewritten many times keeps
one version in RAM. Images are compared exactly: one process, same kernels, and the engine's
contract makes A -> B equal to B.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlora_core.engine import FluxEngine
from fastlora_core.lora import cache as cache_mod
from fastlora_core.lora.cache import LoraCache, file_key
from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource

CPU = EngineOptions(dtype="float32", device="cpu", compile="off", max_rank=32)


def rewrite_same_size_and_mtime(path: Path, scale: float) -> None:
    """Overwrite ``path`` in place with its tensors times ``scale`` (same header, so the same
    size), then restore the old access and modification times."""
    st = path.stat()
    tensors = load_file(str(path))
    save_file({k: v * scale for k, v in tensors.items()}, str(path))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("strategy", ["fused", "adapter"])
def test_rewritten_lora_gives_the_new_image_for_the_same_stack(
        tiny_source: ModelSource, tiny_loras: dict[str, str], tiny_request: GenerateRequest, tmp_path: Path,
        strategy: str) -> None:
    options = dataclasses.replace(CPU, swap_strategy=strategy)
    path = tmp_path / "mine.safetensors"
    path.write_bytes(Path(tiny_loras["fastlora-tiny-style"]).read_bytes())
    stack = LoraStack.of((str(path), 1.0))
    engine = FluxEngine(tiny_source, options, lora_cache=LoraCache())
    old = engine.generate(tiny_request, stack).images
    rewrite_same_size_and_mtime(path, -2.0)
    result = engine.generate(tiny_request, stack)
    assert result.swap is not None and result.swap.changed and not result.swap.from_cache
    fresh = FluxEngine(tiny_source, options, lora_cache=LoraCache()).generate(tiny_request, stack).images
    assert (result.images - old).abs().max() > 1e-3  # the LoRA's effect changed visibly
    assert torch.equal(result.images, fresh)
    again = engine.apply(stack)  # nothing changed since: free
    assert not again.changed


def test_one_path_rewritten_many_times_keeps_one_version(tiny_loras: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "retrained.safetensors"
    path.write_bytes(Path(tiny_loras["fastlora-tiny-style"]).read_bytes())
    cache = LoraCache()
    _, first = cache.get(str(path))
    keys = set()
    name = next(iter(first.transformer))
    expected = first.transformer[name].up
    for i in range(5):
        rewrite_same_size_and_mtime(path, 2.0 + i)
        expected = expected * (2.0 + i)
        key, lora = cache.get(str(path))
        keys.add(key)
        assert torch.equal(lora.transformer[name].up, expected)
    assert len(keys) == 5 and cache.misses == 6
    assert len(cache) == 1 and cache._bytes == first.nbytes()
    _, other = cache.get(tiny_loras["fastlora-tiny-character"])  # other paths are kept side by side
    assert len(cache) == 2 and cache._bytes == first.nbytes() + other.nbytes()


def test_content_fingerprint_sees_a_rewrite_that_stat_cannot(tiny_loras: dict[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``st_ctime`` is the creation time (Windows) and the inode stays, a rewrite with the
    same size and mtime leaves every ``stat`` field equal: the content fingerprint still differs."""
    path = tmp_path / "same_stat.safetensors"
    path.write_bytes(Path(tiny_loras["fastlora-tiny-wide"]).read_bytes())
    frozen = os.stat(path)
    monkeypatch.setattr(cache_mod.os, "fstat", lambda fd: frozen)
    before = file_key(str(path))
    assert file_key(str(path)) == before
    save_file({k: v * 1.5 for k, v in load_file(str(path)).items()}, str(path))  # "re-trained": new values
    after = file_key(str(path))
    assert after[:5] == before[:5] and after.fingerprint != before.fingerprint
