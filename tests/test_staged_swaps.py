"""Swaps that start merging while a new LoRA is still being staged (ARCHITECTURE decision 33).

On a GPU the engine stages a new LoRA on a side stream and the fused strategy merges each layer as
soon as its tensors have arrived. These tests run the same path on the CPU: the engine's device
cache is switched on there with a stager whose chunks are announced late, so a merge that read a
layer before ``ready`` said it had arrived would read unfilled memory. What users rely on: the
weights equal those of a swap that waited for everything; a NaN found once every tensor has arrived
(after most layers were merged) leaves the previous weights bit for bit, names the file's tensor,
keeps no staged copy, and the engine keeps working.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlora_core.engine import FluxEngine
from fastlora_core.errors import LoraFormatError
from fastlora_core.lora import staging
from fastlora_core.lora.cache import DeviceLoraCache, LoraCache
from fastlora_core.specs import EngineOptions, LoraSpec, LoraStack, ModelSource
from fastlora_core.tiny import TINY_LORAS

CPU = EngineOptions(dtype="float32", device="cpu", compile="off", max_rank=32)


def _staging_on_cpu(engine: FluxEngine, monkeypatch: pytest.MonkeyPatch) -> DeviceLoraCache:
    """The engine's device cache, switched on for the CPU, with small chunks announced late."""
    cache = DeviceLoraCache(engine.device, engine.dtype)
    cache.enabled = True
    cache.stager = staging.PinnedStager(engine.device, chunk_bytes=512, threads=1)
    monkeypatch.setattr(cache, "budget_bytes", lambda: 1 << 30)
    engine.device_loras = cache
    real = staging.StagingJob._arrived

    def late(self: staging.StagingJob, upto: int, event: object) -> None:
        time.sleep(0.002)
        real(self, upto, event)  # type: ignore[arg-type]

    monkeypatch.setattr(staging.StagingJob, "_arrived", late)
    return cache


def _weights(engine: FluxEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.transformer.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_merging_while_staging_gives_the_weights_of_a_swap_that_waited(
        tiny_source: ModelSource, tiny_loras: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    stacks = [LoraStack.of((tiny_loras["fastlora-tiny-wide"], 0.8), (tiny_loras["fastlora-tiny-character"], -0.5)),
              LoraStack.of((tiny_loras["fastlora-tiny-style"], 1.0)),
              LoraStack.of((tiny_loras["fastlora-tiny-wide"], 0.3))]
    waited = FluxEngine(tiny_source, CPU, lora_cache=LoraCache())
    staged = FluxEngine(tiny_source, CPU, lora_cache=LoraCache())
    cache = _staging_on_cpu(staged, monkeypatch)
    for stack in stacks:
        waited.apply(stack)
        report = staged.apply(stack)
        _assert_same(_weights(staged), _weights(waited))
    assert report.stage_ms == 0.0  # the last stack's LoRA was staged before: nothing new to copy
    assert len(cache._loras) == 3


def test_a_nan_found_after_the_merge_began_restores_the_previous_weights(
        tiny_source: ModelSource, tiny_loras: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine = FluxEngine(tiny_source, CPU, lora_cache=LoraCache())
    cache = _staging_on_cpu(engine, monkeypatch)
    good = LoraStack.of((tiny_loras["fastlora-tiny-style"], 1.0))
    engine.apply(good)
    before = _weights(engine)
    tensors = load_file(tiny_loras["fastlora-tiny-wide"])
    key = sorted(tensors)[-1]
    tensors[key].view(-1)[-1] = math.nan
    bad = tmp_path / "diverged.safetensors"
    save_file(tensors, str(bad))
    written: list[str] = []
    real_write = type(engine.strategy)._write
    monkeypatch.setattr(type(engine.strategy), "_write",
                        lambda self, k, items: written.append(k[1]) or real_write(self, k, items))
    with pytest.raises(LoraFormatError, match="NaN") as info:
        engine.apply(good.plus(LoraSpec.of(bad, 0.5)))
    assert str(bad) in str(info.value) and key in str(info.value)
    assert set(written) >= set(TINY_LORAS["fastlora-tiny-wide"]["targets"])  # merged, then rolled back
    _assert_same(_weights(engine), before)
    assert engine.loaded_stack == good
    assert all(Path(k.path) != bad for k in cache._loras)  # no staged copy of the refused file kept
    monkeypatch.setattr(type(engine.strategy), "_write", real_write)
    other = LoraStack.of((tiny_loras["fastlora-tiny-character"], 0.7))
    engine.apply(other)
    reference = FluxEngine(tiny_source, CPU, lora_cache=LoraCache())
    reference.apply(other)
    _assert_same(_weights(engine), _weights(reference))
