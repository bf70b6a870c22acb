"""LoRA swaps on a compiled engine: exact results, zero recompiles, atomic refusals.

Every image is compared with a fresh, uncompiled diffusers pipeline that holds exactly the same
stack (loaded with diffusers' own ``load_lora_weights`` + ``set_adapters``): a recompile check alone
would not see a swap that silently did nothing. Tolerance: float32 everywhere, observed differences
are ~3e-7; we allow 1e-4 (the LoRA effects themselves are > 1e-2, checked too).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lora_keymaps as km
import pytest
import torch
from safetensors.torch import save_file

from fastlora_core.engine import FluxEngine
from fastlora_core.errors import LoraFitError, LoraFormatError
from fastlora_core.reference import reference_images
from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource

TOL = 1e-4
CPU = EngineOptions(dtype="float32", device="cpu", compile="off", max_rank=32)


@pytest.fixture(scope="module")
def refs(tiny_source: ModelSource):  # type: ignore[no-untyped-def]
    """Reference images by stack, computed once per module."""
    cache: dict[tuple[LoraStack, GenerateRequest], torch.Tensor] = {}

    def get(stack: LoraStack, request: GenerateRequest) -> torch.Tensor:
        if (stack, request) not in cache:
            cache[(stack, request)] = reference_images(tiny_source, stack, request)
        return cache[(stack, request)]

    return get


@pytest.fixture(scope="module", params=["fused", "adapter"])
def compiled_engine(request: pytest.FixtureRequest, tiny_source: ModelSource, tiny_loras: dict[str, str]):  # type: ignore[no-untyped-def]
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, compile="regional", swap_strategy=request.param))
    if request.param == "adapter":
        # PadDummyLora: a zero adapter on the union of the LoRAs we will use.
        engine.prepare_slot([tiny_loras[n] for n in ("fastlora-tiny-style", "fastlora-tiny-character",
                                                     "fastlora-tiny-wide")])
    yield engine
    engine.release()


def _stack(loras: dict[str, str], *items: tuple[str, float]) -> LoraStack:
    return LoraStack.of(*((loras[f"fastlora-tiny-{n}"], s) for n, s in items))


@pytest.mark.slow
def test_every_swap_matches_a_fresh_pipeline_with_zero_recompiles(
        compiled_engine: FluxEngine, tiny_loras: dict[str, str], tiny_request: GenerateRequest, refs) -> None:  # type: ignore[no-untyped-def]
    engine = compiled_engine
    base = engine.generate(tiny_request, LoraStack())  # compiles (once per graph) here
    sequence = [
        ("narrow targets", (("style", 1.0),)),
        ("wider targets", (("character", 1.0),)),
        ("widest targets, higher rank", (("wide", 1.0),)),
        ("back to narrow", (("style", 1.0),)),
        ("strength change", (("style", 0.35),)),
        ("negative strength", (("style", -0.8),)),
        ("stack of two", (("style", 1.0), ("character", 0.7))),
        ("same stack, other strengths", (("style", 0.5), ("character", 1.2))),
        ("shorter stack", (("character", 0.7),)),
        ("A", (("character", 1.0),)),
        ("B", (("wide", 1.0),)),
        ("A again", (("character", 1.0),)),
        ("no LoRA", ()),
    ]
    images: dict[LoraStack, torch.Tensor] = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for label, items in sequence:
            stack = _stack(tiny_loras, *items)
            result = engine.generate(tiny_request, stack)
            assert result.new_compiles == 0, label
            expected = refs(stack, tiny_request)
            diff = float((result.images - expected).abs().max())
            assert diff <= TOL, f"{label}: max abs diff {diff}"
            if items:
                effect = float((expected - base.images).abs().max())
                assert effect > 100 * TOL, f"{label}: the LoRA should visibly change the image"
            if stack in images:  # round trip: bit for bit
                assert torch.equal(images[stack], result.images), label
            images[stack] = result.images
    assert torch.equal(images[LoraStack()], base.images)


@pytest.mark.slow
def test_refused_loras_leave_the_compiled_engine_serving_the_previous_stack(
        compiled_engine: FluxEngine, tiny_loras: dict[str, str], tiny_request: GenerateRequest,
        tmp_path: Path) -> None:
    engine = compiled_engine
    good = _stack(tiny_loras, ("character", 0.9))
    before = engine.generate(tiny_request, good).images
    bad_files = _bad_lora_files(tmp_path, engine, tiny_loras)
    if engine.options.swap_strategy == "adapter":
        lokr = tmp_path / "lokr.safetensors"
        save_file({"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.randn(4, 4),
                   "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": torch.randn(8, 8)}, str(lokr))
        bad_files["LoKr under adapter"] = (str(lokr), LoraFitError, r"lokr\.safetensors \(LoKr\).*swap_strategy=fused")
        bad_files["rank above max_rank"] = (_random_lora(tmp_path / "r64.safetensors", engine,
                                                         ["transformer_blocks.0.attn.to_q"], rank=64),
                                            LoraFitError, "max_rank")
        bad_files["layers outside the slot"] = (tiny_loras["fastlora-tiny-single"], LoraFitError, "PadDummyLora")
        bad_files["stack rank above max_rank"] = (
            [(tiny_loras["fastlora-tiny-wide"], 1.0), (tiny_loras["fastlora-tiny-wide"], 0.5),
             (tiny_loras["fastlora-tiny-character"], 1.0)], LoraFitError, "combined rank")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for label, (bad, error, needle) in bad_files.items():
            stack = LoraStack.of(*bad) if isinstance(bad, list) else good.plus(LoraStack.of((bad, 1.0)).entries[0])
            with pytest.raises(error, match=needle):
                engine.generate(tiny_request, stack)
            assert engine.loaded_stack == good, label
            after = engine.generate(tiny_request, good)
            assert after.swap is not None and not after.swap.changed
            assert torch.equal(after.images, before), f"{label}: engine changed after a refused LoRA"
            assert after.new_compiles == 0


def _random_lora(path: Path, engine: FluxEngine, targets: list[str], rank: int,
                 shape_override: tuple[int, int] | None = None) -> str:
    from fastlora_core.tiny import random_lora_state_dict

    base = {n: m for n, m in engine.transformer.named_modules()}
    shapes = {}
    for t in targets:
        m = getattr(base[t], "base_layer", base[t])
        shapes[t] = shape_override or (m.out_features, m.in_features)
    save_file(random_lora_state_dict(shapes, rank, seed=5), str(path))
    return str(path)


def _bad_lora_files(tmp_path: Path, engine: FluxEngine, loras: dict[str, str]) -> dict[str, tuple]:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(Path(loras["fastlora-tiny-style"]).read_bytes()[:-100])
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(sdxl))
    oft = tmp_path / "oft.safetensors"
    save_file({"lycoris_transformer_blocks_0_attn_to_q.oft_blocks": torch.zeros(4, 8, 8),
               "lycoris_transformer_blocks_0_attn_to_q.alpha": torch.tensor(1.0)}, str(oft))
    glora = tmp_path / "glora.safetensors"
    save_file({f"lora_unet_double_blocks_0_img_attn_proj.{k}.weight": torch.ones(2, 2) for k in ("a1", "a2", "b1", "b2")},
              str(glora))
    return {
        "OFT (a type FastLoRA cannot apply)": (str(oft), LoraFormatError, "oft.safetensors.*OFT"),
        "GLoRA (a type FastLoRA cannot apply)": (str(glora), LoraFormatError, "glora.safetensors.*GLoRA"),
        "missing file": (str(tmp_path / "nope.safetensors"), LoraFormatError, "not found"),
        "corrupt file": (str(corrupt), LoraFormatError, "corrupt.safetensors"),
        "another model family": (str(sdxl), LoraFormatError, "sdxl.safetensors"),
        "Flux of another size": (_random_lora(tmp_path / "big.safetensors", engine,
                                              ["transformer_blocks.0.attn.to_q"], 4, (3072, 3072)),
                                 LoraFitError, "another size|3072"),
    }


def test_adapter_slot_from_first_lora_refuses_wider_lora_with_advice(
        tiny_source: ModelSource, tiny_loras: dict[str, str], tiny_request: GenerateRequest) -> None:
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, swap_strategy="adapter"))
    style = _stack(tiny_loras, ("style", 1.0))
    first = engine.generate(tiny_request, style).images
    with pytest.raises(LoraFitError, match="PadDummyLora") as info:
        engine.apply(_stack(tiny_loras, ("wide", 1.0)))
    assert "fastlora-tiny-wide" in str(info.value) and "fused" in str(info.value)
    assert torch.equal(engine.generate(tiny_request, style).images, first)
    # PadDummyLora afterwards widens the slot; the loaded stack is re-applied and the wide LoRA fits.
    engine.prepare_slot(all_layers=True)
    assert torch.equal(engine.generate(tiny_request).images, first)
    engine.apply(_stack(tiny_loras, ("wide", 1.0)))


def test_fused_failure_midway_restores_previous_weights(
        tiny_source: ModelSource, tiny_loras: dict[str, str], tiny_request: GenerateRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FluxEngine(tiny_source, CPU)
    good = _stack(tiny_loras, ("style", 1.0))
    before = engine.generate(tiny_request, good).images
    strategy = engine.strategy
    real_write = strategy._write
    calls = {"n": 0}

    def flaky(key, items, *feed):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_write(key, items, *feed)

    monkeypatch.setattr(strategy, "_write", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.apply(_stack(tiny_loras, ("wide", 1.0)))
    monkeypatch.setattr(strategy, "_write", real_write)
    assert engine.loaded_stack == good
    assert torch.equal(engine.generate(tiny_request, good).images, before)
    # and the engine still swaps correctly afterwards
    engine.apply(LoraStack())
    plain = FluxEngine(tiny_source, CPU).generate(tiny_request).images
    assert torch.equal(engine.generate(tiny_request).images, plain)


def test_same_stack_is_free_and_parsed_files_come_from_ram(
        tiny_source: ModelSource, tiny_loras: dict[str, str], tmp_path: Path) -> None:
    from fastlora_core.lora.cache import LoraCache

    cache = LoraCache()
    engine = FluxEngine(tiny_source, CPU, lora_cache=cache)
    a, b = _stack(tiny_loras, ("style", 1.0)), _stack(tiny_loras, ("character", 1.0))
    first = engine.apply(a)
    assert first.changed and not first.from_cache
    # The report splits the swap: reading the file is part of it; nothing is staged on a CPU engine.
    assert 0.0 < first.read_ms <= first.swap_ms and first.stage_ms < first.swap_ms
    assert {"read_ms", "stage_ms"} <= set(first.as_dict())
    again = engine.apply(a)
    assert not again.changed and again.swap_ms == 0.0
    engine.apply(b)
    back = engine.apply(a)
    assert back.changed and back.from_cache and cache.misses == 2
    # A file rewritten in place is read again.
    path = tmp_path / "edited.safetensors"
    path.write_bytes(Path(tiny_loras["fastlora-tiny-style"]).read_bytes())
    engine.apply(LoraStack.of((str(path), 1.0)))
    path.write_bytes(Path(tiny_loras["fastlora-tiny-character"]).read_bytes())
    engine.apply(LoraStack.of((str(path), 0.9)))
    assert cache.misses == 4


@pytest.mark.parametrize("strategy", ["fused", "adapter"])
def test_kohya_xlabs_and_bfl_files_give_the_same_image_as_the_diffusers_original(
        tiny_source: ModelSource, tiny_request: GenerateRequest, tmp_path: Path, strategy: str) -> None:
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, swap_strategy=strategy))
    ref = km.make_reference(engine.transformer, seed=11)
    engine.prepare_slot(all_layers=True)
    xl = km.RefLora({n: ref.transformer[n] for n in km.xlabs_layers(ref)}, {}, {}, ref.num_double, ref.num_single)
    files = {
        "diffusers": (km.to_diffusers(ref), "full"),
        "kohya": (km.to_kohya(ref), "full"),
        "bfl-lora_AB": (km.to_bfl(ref), "full"),
        "bfl-lora_down": (km.to_bfl(ref, names="lora_down", prefix=""), "full"),
        "diffusers-xlabs-subset": (km.to_diffusers(xl), "xlabs"),
        "xlabs": (km.to_xlabs(xl), "xlabs"),
    }
    images: dict[str, torch.Tensor] = {}
    for name, (sd, _) in files.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        images[name] = engine.generate(tiny_request, LoraStack.of((str(path), 0.8))).images
    plain = engine.generate(tiny_request, LoraStack()).images
    assert float((images["diffusers"] - plain).abs().max()) > 1e-2
    for name, (_, group) in files.items():
        original = images["diffusers" if group == "full" else "diffusers-xlabs-subset"]
        assert float((images[name] - original).abs().max()) <= 1e-5, name


def test_text_encoder_part_applied_with_fused_and_reported_with_adapter(
        tiny_source: ModelSource, tiny_request: GenerateRequest, tmp_path: Path, caplog, refs) -> None:  # type: ignore[no-untyped-def]
    engine = FluxEngine(tiny_source, CPU)
    clip_shapes = {n: (m.out_features, m.in_features) for n, m in engine.pipe.text_encoder.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers.0." in n}
    ref = km.make_reference(engine.transformer, seed=4, clip_shapes={
        ("text_model." + n if not n.startswith("text_model.") else n): s for n, s in clip_shapes.items()})
    path = tmp_path / "with_te.safetensors"
    # Alphas baked into the up matrices: diffusers 0.42 mis-scales files that mix layers with and
    # without ``.alpha`` (see lora/formats.py), and diffusers is our independent reference here.
    save_file(km.to_diffusers(ref, with_alpha=False), str(path))
    transformer_only = tmp_path / "no_te.safetensors"
    save_file(km.to_diffusers(ref, with_alpha=False, with_text_encoders=False), str(transformer_only))
    with_te = engine.generate(tiny_request, LoraStack.of((str(path), 1.0))).images
    without = engine.generate(tiny_request, LoraStack.of((str(transformer_only), 1.0))).images
    assert float((with_te - without).abs().max()) > 1e-3, "the CLIP part changed nothing"
    expected = refs(LoraStack.of((str(path), 1.0)), tiny_request)
    assert float((with_te - expected).abs().max()) <= TOL
    adapter = FluxEngine(tiny_source, dataclasses.replace(CPU, swap_strategy="adapter"))
    report = adapter.apply(LoraStack.of((str(path), 1.0)))
    assert any("text-encoder layers are ignored" in w for w in report.warnings)
    assert torch.allclose(adapter.generate(tiny_request).images, without, atol=TOL)


def test_fused_requantises_touched_layers_and_restores_original_bytes(
        tiny_source: ModelSource, tiny_loras: dict[str, str], tiny_request: GenerateRequest) -> None:
    from fastlora_core.lora.quantized import clone_quantized, requantize_like

    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, quantization="int8_weight_only"))
    name = "transformer_blocks.0.attn.to_q"
    weight = dict(engine.transformer.named_modules())[name].weight
    original = clone_quantized(weight, "cpu")
    plain = engine.generate(tiny_request).images
    engine.apply(_stack(tiny_loras, ("style", 0.7)))
    _, lora = engine.lora_cache.get(tiny_loras["fastlora-tiny-style"])
    master = engine.strategy._hp_master[name]
    layer = lora.transformer[name]
    merged = master.clone().addmm_(layer.up, layer.down, alpha=0.7 * layer.scale)
    expected = requantize_like(weight, merged, "int8_weight_only")
    for k, v in clone_quantized(expected, "cpu").items():
        assert torch.equal(clone_quantized(weight, "cpu")[k], v), k
    assert not torch.equal(engine.generate(tiny_request).images, plain)
    engine.apply(LoraStack())
    for k, v in clone_quantized(weight, "cpu").items():
        assert torch.equal(v, original[k]), k
    assert torch.equal(engine.generate(tiny_request).images, plain)


def test_t5_part_of_a_lora_is_reported_when_t5_is_quantised(
        tiny_source: ModelSource, tiny_request: GenerateRequest, tmp_path: Path) -> None:
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, t5_quantization="nf4"))
    ref = km.make_reference(engine.transformer, seed=6, t5_shapes={
        "encoder.block.0.layer.0.SelfAttention.q": (32, 32), "encoder.block.1.layer.1.DenseReluDense.wi_0": (64, 32)})
    path = tmp_path / "with_t5.safetensors"
    save_file(km.to_diffusers(ref), str(path))
    report = engine.apply(LoraStack.of((str(path), 1.0)))
    assert any("T5" in w and "t5_quantization=none" in w for w in report.warnings), report.warnings
    assert engine.generate(tiny_request).images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("strategy", ["fused", "adapter"])
def test_bf16_lora_file_gives_the_same_image_as_its_float32_copy(
        tiny_source: ModelSource, tiny_request: GenerateRequest, tiny_loras: dict[str, str], tmp_path: Path,
        strategy: str) -> None:
    from safetensors.torch import load_file

    sd = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_loras["fastlora-tiny-character"]).items()}
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    save_file({k: v.float() for k, v in sd.items()}, str(tmp_path / "fp32.safetensors"))
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, swap_strategy=strategy))
    a = engine.generate(tiny_request, LoraStack.of((str(tmp_path / "bf16.safetensors"), 0.9))).images
    b = engine.generate(tiny_request, LoraStack.of((str(tmp_path / "fp32.safetensors"), 0.9))).images
    assert torch.equal(a, b)
    _, lora = engine.lora_cache.get(str(tmp_path / "bf16.safetensors"))
    assert next(iter(lora.transformer.values())).up.dtype == torch.bfloat16  # half the RAM of fp32


def test_adapter_rank_errors_name_the_files(tiny_source: ModelSource, tmp_path: Path) -> None:
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, swap_strategy="adapter"))
    layer = "transformer_blocks.0.attn.to_q"
    big = _random_lora(tmp_path / "rank64.safetensors", engine, [layer], rank=64)
    with pytest.raises(LoraFitError) as info:
        engine.apply(LoraStack.of((big, 1.0)))
    assert big in str(info.value) and layer in str(info.value) and "max_rank 32" in str(info.value)
    a = _random_lora(tmp_path / "a20.safetensors", engine, [layer], rank=20)
    b = _random_lora(tmp_path / "b20.safetensors", engine, [layer], rank=20)
    with pytest.raises(LoraFitError, match="combined rank") as info:
        engine.apply(LoraStack.of((a, 1.0), (b, 1.0)))
    assert a in str(info.value) and b in str(info.value), str(info.value)


def test_an_adapter_slot_on_fp8_layers_does_not_print_peft_merge_warning() -> None:
    """PEFT warns, for a LoRA layer on a torchao fp8 base layer, that merge() would fail; the slot never
    merges, so a ComfyUI console should not show it (other warnings still do)."""
    import warnings

    pytest.importorskip("torchao")
    from torchao.quantization import Float8Tensor, PerRow

    from fastlora_core.lora.adapter import AdapterStrategy

    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(32, 48).to(torch.bfloat16).requires_grad_(False)
    holder.proj.weight = torch.nn.Parameter(Float8Tensor.from_hp(holder.proj.weight.detach(), granularity=PerRow()),
                                            requires_grad=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        AdapterStrategy(holder, max_rank=4, dtype=torch.bfloat16).prepare_slot(frozenset({"proj"}), 4)
        warnings.warn("still shown", UserWarning, stacklevel=1)
    assert type(holder.proj).__name__ == "TorchaoLoraLinear"  # the layer PEFT warns about
    assert [str(w.message) for w in seen if "get_apply_tensor_subclass" in str(w.message)] == []
    assert any(str(w.message) == "still shown" for w in seen)
