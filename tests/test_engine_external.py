"""The engine as an outside sampler's network (ComfyUI's MODEL path): transformer-only engines,
``prepare_external`` / ``run_transformer``, and LoRAs that never were files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastlora_core import registry
from fastlora_core.errors import OptionsError
from fastlora_core.lora.formats import read_lora
from fastlora_core.specs import EngineOptions, GenerateRequest, LoraSpec, LoraStack, ModelSource

CPU = EngineOptions(dtype="float32", device="cpu", compile="off")


def inputs(engine, seed: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    cfg = engine.transformer.config
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 16, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.7]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3),
            "guidance": torch.tensor([3.5])}


def test_transformer_only_engine_runs_the_same_transformer_without_encoders(tiny_dir: Path) -> None:
    full = registry.get_engine(ModelSource.from_diffusers(tiny_dir), CPU)
    with torch.inference_mode():
        want = full.run_transformer(**inputs(full))
    alone = registry.get_engine(ModelSource.transformer_alone(tiny_dir), CPU)  # releases `full`
    assert (alone.pipe.text_encoder, alone.pipe.text_encoder_2, alone.pipe.vae) == (None, None, None)
    with torch.inference_mode():
        got = alone.run_transformer(**inputs(alone))
    assert torch.equal(got, want)
    with pytest.raises(OptionsError, match="transformer only|MODEL output"):
        alone.generate(GenerateRequest(steps=1, width=64, height=64))


def test_in_memory_lora_swaps_like_its_file_and_back_exactly(tiny_dir: Path, tiny_loras: dict[str, str]) -> None:
    engine = registry.get_engine(ModelSource.transformer_alone(tiny_dir), CPU)
    x = inputs(engine, seed=1)
    with torch.inference_mode():
        engine.prepare_external(LoraStack())
        base = engine.run_transformer(**x)
        engine.prepare_external(LoraStack.of((tiny_loras["fastlora-tiny-wide"], 0.7)))
        from_file = engine.run_transformer(**x)
        path = engine.lora_cache.put(read_lora(tiny_loras["fastlora-tiny-wide"]))
        report = engine.prepare_external(LoraStack((LoraSpec(path, 0.7),)))
        in_memory = engine.run_transformer(**x)
        engine.prepare_external(LoraStack())
        back = engine.run_transformer(**x)
    assert report.changed and report.stack == [{"file": path, "strength": 0.7}]
    assert torch.equal(in_memory, from_file) and not torch.equal(in_memory, base)
    assert torch.equal(back, base)


def test_in_memory_lora_values_are_checked_once_before_any_weight_changes(tiny_dir: Path,
                                                                          tiny_loras: dict[str, str]) -> None:
    """A LoRA built in memory (ComfyUI's loaders) is checked for NaN / infinities by the engine where
    it is staged: a bad one is refused with its label, the weights stay as they were, and it is
    refused again next time; a good one is checked once (marked in the cache) and applied."""
    from dataclasses import replace

    from fastlora_core.errors import LoraFormatError
    from fastlora_core.lora.types import LoraLayer

    engine = registry.get_engine(ModelSource.transformer_alone(tiny_dir), CPU)
    x = inputs(engine, seed=2)
    good = replace(read_lora(tiny_loras["fastlora-tiny-wide"]), path="LoRA #1 on this MODEL", values_checked=False)
    name, layer = next(iter(good.transformer.items()))
    assert isinstance(layer, LoraLayer)
    up = layer.up.clone()
    up[0, 0] = float("nan")
    bad = replace(good, path="LoRA #2 on this MODEL", transformer={**good.transformer, name: replace(layer, up=up)})
    bad_path, good_path = engine.lora_cache.put(bad), engine.lora_cache.put(good)
    with torch.inference_mode():
        engine.prepare_external(LoraStack())
        base = engine.run_transformer(**x)
        for _ in range(2):
            with pytest.raises(LoraFormatError, match=rf"LoRA #2 on this MODEL: {name}.up holds 1 NaN"):
                engine.prepare_external(LoraStack((LoraSpec(bad_path, 1.0),)))
            assert torch.equal(engine.run_transformer(**x), base)
        assert not engine.lora_cache.get(good_path)[1].values_checked
        engine.prepare_external(LoraStack((LoraSpec(good_path, 1.0),)))
        assert engine.lora_cache.get(good_path)[1].values_checked
        assert not torch.equal(engine.run_transformer(**x), base)


def test_check_refuses_what_apply_would_and_changes_no_weight(tiny_dir: Path, tiny_loras: dict[str, str],
                                                              tmp_path: Path) -> None:
    """``check`` (what FastLoRA's LoRA node for MODEL runs when it adds a file) refuses a bad file
    naming it, accepts a good one, and leaves the weights and the applied stack alone either way."""
    from safetensors.torch import load_file, save_file

    from fastlora_core.errors import LoraFormatError

    engine = registry.get_engine(ModelSource.transformer_alone(tiny_dir), CPU)
    x = inputs(engine, seed=3)
    applied = LoraStack.of((tiny_loras["fastlora-tiny-style"], 1.0))
    with torch.inference_mode():
        engine.prepare_external(applied)
        before = engine.run_transformer(**x)
    sd = load_file(tiny_loras["fastlora-tiny-wide"])
    key = sorted(sd)[0]
    sd[key][0, 0] = float("nan")
    bad = tmp_path / "poisoned.safetensors"
    save_file(sd, str(bad))
    assert engine.check(LoraStack.of((tiny_loras["fastlora-tiny-wide"], 0.5))) == []
    with pytest.raises(LoraFormatError, match=r"poisoned\.safetensors.*NaN"):
        engine.check(LoraStack.of((str(bad), 1.0)))
    assert engine.loaded_stack == applied
    with torch.inference_mode():
        assert torch.equal(engine.run_transformer(**x), before)
