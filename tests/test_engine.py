"""The engine without LoRAs: options, determinism, registry, compilation, cancellation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fastlora_core import registry
from fastlora_core.engine import FluxEngine
from fastlora_core.errors import EngineReleasedError, OptionsError
from fastlora_core.optimize import room_for_masters
from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource

ROOT = Path(__file__).resolve().parents[1]

CPU = EngineOptions(dtype="float32", device="cpu", compile="off")


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"quantization": "fp8", "dtype": "bfloat16"}, "GPU"),
        ({"quantization": "fp8"}, "bfloat16"),
        ({"quantization": "fp8", "offload": "model", "dtype": "bfloat16"}, "offload"),
        ({"offload": "sequential", "compile": "full"}, "sequential"),
        ({"offload": "model", "compile": "off"}, "offload=model"),
        ({"quantization": "int4"}, "quantization"),
        ({"attention": "sage"}, "attention"),
        ({"max_rank": 0}, "max_rank"),
        ({"device": "tpu"}, "device"),
        ({"attention": "sdpa_cudnn"}, "not available"),
        ({"dtype": "float16"}, "float16"),
    ],
)
def test_impossible_options_are_refused_before_loading(tiny_source: ModelSource, changes: dict,
                                                       needle: str) -> None:
    with pytest.raises(OptionsError, match=needle):  # static problems: when the options are made
        FluxEngine(tiny_source, dataclasses.replace(CPU, **changes))


def test_options_are_hashable_and_validated_statically() -> None:
    a = EngineOptions(quantization="fp8", compile="regional")
    assert hash(a) == hash(EngineOptions(quantization="fp8", compile="regional"))
    with pytest.raises(OptionsError, match="what|offload"):
        EngineOptions(quantization="int8_weight_only", offload="model")  # valid by construction
    with pytest.raises(OptionsError, match="max_rank"):
        EngineOptions(max_rank=0)
    with pytest.raises(OptionsError, match="steps"):
        GenerateRequest(steps=0).validate()
    with pytest.raises(OptionsError, match="multiple of 16"):
        GenerateRequest(width=1000).validate()


def _quantization(optimize, options: EngineOptions, device: torch.device) -> str:  # type: ignore[no-untyped-def]
    return optimize.resolve_options(options, device).quantization


def _t5(optimize, options: EngineOptions, device: torch.device) -> str:  # type: ignore[no-untyped-def]
    return optimize.resolve_options(options, device).t5_quantization


def test_auto_quantization_is_fp8_only_where_fp8_is_fast_and_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from fastlora_core import optimize

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test GPU")
    cuda = torch.device("cuda", 0)
    assert EngineOptions().quantization == "auto"
    auto = EngineOptions(t5_quantization="none")  # only the transformer rule under test
    assert _quantization(optimize, auto, cuda) == "fp8"  # Hopper
    capability[0] = (8, 9)
    assert _quantization(optimize, auto, cuda) == "fp8"  # Ada
    capability[0] = (8, 6)
    assert _quantization(optimize, auto, cuda) == "none"  # Ampere: no fp8 tensor cores
    capability[0] = (9, 0)
    assert _quantization(optimize, auto, torch.device("cpu")) == "none"
    assert _quantization(optimize, dataclasses.replace(auto, dtype="float16"), cuda) == "none"
    with_offload = dataclasses.replace(auto, offload="model")
    with_offload.validate()  # auto never conflicts with offload: it resolves to none there
    assert _quantization(optimize, with_offload, cuda) == "none"
    for explicit in ("none", "fp8", "int8_weight_only"):
        assert _quantization(optimize, dataclasses.replace(auto, quantization=explicit), cuda) == explicit
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real_find_spec(name, *a))
    optimize.deps.usable.cache_clear()  # (conftest clears it again after the test)
    assert _quantization(optimize, auto, cuda) == "none"


def test_auto_t5_quantization_is_nf4_only_on_small_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import types

    from fastlora_core import optimize

    gib = [24.0]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=int(gib[0] * 2**30)))
    cuda = torch.device("cuda", 0)
    assert EngineOptions().t5_quantization == "auto"
    auto = EngineOptions(quantization="none")  # only the T5 rule under test
    assert _t5(optimize, auto, cuda) == "nf4"  # RTX 4090: 23.99 GiB
    gib[0] = 79.6
    assert _t5(optimize, auto, cuda) == "none"  # H100 80 GB
    gib[0] = 24.0
    assert _t5(optimize, auto, torch.device("cpu")) == "none"
    assert _t5(optimize, dataclasses.replace(auto, offload="model"), cuda) == "none"
    for explicit in ("none", "int8"):
        assert _t5(optimize, dataclasses.replace(auto, t5_quantization=explicit), cuda) == explicit
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    optimize.deps.usable.cache_clear()  # (conftest clears it again after the test)
    assert _t5(optimize, auto, cuda) == "none"


def test_engine_reports_the_quantization_it_resolved(tiny_source: ModelSource,
                                                     tiny_request: GenerateRequest) -> None:
    engine = FluxEngine(tiny_source, CPU)  # quantization left at auto
    assert engine.key.options.quantization == "auto", "the registry key keeps what was asked for"
    assert engine.options.quantization == "none", "auto on a CPU is no quantisation"
    assert engine.key.options.t5_quantization == "auto" and engine.options.t5_quantization == "none"
    assert "text_encoder_2" in engine.strategy._modules, "an unquantised T5 takes LoRA layers"
    explicit = FluxEngine(tiny_source, dataclasses.replace(CPU, quantization="none"))
    assert torch.equal(engine.generate(tiny_request).images, explicit.generate(tiny_request).images)


def test_model_source_needs_all_four_single_files() -> None:
    with pytest.raises(OptionsError, match="missing: clip_l, t5xxl, vae"):
        ModelSource(transformer="/x/flux.safetensors")
    with pytest.raises(OptionsError, match="not both"):
        ModelSource(diffusers_dir="/x", vae="/y")
    with pytest.raises(OptionsError, match="exactly one"):
        ModelSource(transformer="/x/flux.safetensors", vae="/y", transformer_only=True)


# -- generation ------------------------------------------------------------------------------------
def test_engine_from_a_pipeline_serves_that_pipeline_like_a_loaded_one(tiny_source: ModelSource,
                                                                        tiny_request: GenerateRequest) -> None:
    from fastlora_core.loading import load_pipeline

    loaded = FluxEngine(tiny_source, CPU).generate(tiny_request).images
    pipe = load_pipeline(tiny_source, torch.float32)
    engine = FluxEngine.from_pipeline(pipe, CPU, label="tiny in memory")
    assert engine.pipe is pipe and engine.key.source.describe() == "tiny in memory"
    assert torch.equal(engine.generate(tiny_request).images, loaded)


def test_resident_bytes_counts_each_tensor_on_the_device_once() -> None:
    """What a pipeline already holds on the engine's device: every parameter and buffer there, a
    tensor shared by two modules (tied weights) once, nothing on another device."""
    from fastlora_core.optimize import resident_bytes

    a = torch.nn.Linear(8, 4)  # 32 + 4 float32
    b = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.BatchNorm1d(2))  # 8; 4 x 2 + an int64
    tied = torch.nn.Linear(8, 4)
    tied.weight = a.weight  # shared with ``a``: only its bias (4) counts
    expected = 4 * ((32 + 4) + 8 + 4 * 2 + 4) + 8
    assert resident_bytes([a, b, tied], torch.device("cpu")) == expected
    assert resident_bytes([a, b, tied], torch.device("meta")) == 0


def test_a_pipeline_already_on_the_gpu_counts_as_room_for_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from_pipeline`` with a pipeline that already sits on the GPU: its weights become the
    engine's own (the fused masters are those very tensors), so they count as room. Measured on an
    H100 80GB (2026-12-07): the bf16 pipeline left 47 GiB free, the engine put the masters in CPU
    RAM and fused swaps took 0.7 s instead of ~40 ms."""
    import types

    from fastlora_core import engine as engine_mod

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (47 * gib, 79 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        total_memory=79 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    asked = []

    def resident(modules, device):
        asked.append((list(modules), device))
        return 32 * gib

    monkeypatch.setattr(engine_mod, "resident_bytes", resident)
    gpu = torch.device("cuda", 0)
    fake = types.SimpleNamespace(device=gpu, options=types.SimpleNamespace(offload="none"),
                                 _modules=FluxEngine._modules)
    pipe = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2), text_encoder=None, text_encoder_2=None,
                                 vae=torch.nn.Linear(2, 2))
    whole = room_for_masters(transformer_only=False, quantization="fp8")
    assert FluxEngine._free_bytes(fake) <= whole  # a load from files: 47 GiB free is not enough
    assert FluxEngine._free_bytes(fake, pipe) > whole  # 47 free + 32 already the engine's
    assert asked == [([pipe.transformer, pipe.vae], gpu)]


@pytest.mark.parametrize(
    ("usable_gib", "free_gib", "from_pipeline", "offload", "asks"),
    [
        (44.4, 35, False, "none", True),  # a 48 GB card where ComfyUI holds its T5 (measured 2026-12-07)
        (44.4, 41, False, "none", False),  # room enough already: nothing to unload
        (23.5, 8, False, "none", False),  # a 24 GB card never holds them: unloading would gain nothing
        (44.4, 35, True, "none", False),  # from_pipeline: the pipeline's weights are the engine's own
        (44.4, 35, False, "model", False),  # offloaded engines keep nothing on the GPU
    ],
)
def test_an_engine_asks_its_host_for_room_only_where_that_keeps_its_masters_on_the_gpu(
        monkeypatch: pytest.MonkeyPatch, usable_gib: float, free_gib: float, from_pipeline: bool, offload: str,
        asks: bool) -> None:
    """Decision 66: ComfyUI encodes the prompt before the loader runs, so on a 48 GB card its T5 took
    the room decision 64 gives the masters and every swap sent them from RAM (0.67-0.79 s through a
    real ComfyUI server, 2026-12-07). The engine asks its host (``make_room``) to unload models until
    the masters fit, where the card could hold them and only then; the room it then finds keeps them
    on the GPU."""
    import types

    from fastlora_core import engine as engine_mod

    gib = 2**30
    free = [free_gib * gib]
    cached = [0.0]  # bytes the host's dropped tensors left in PyTorch's cache
    asked: list[int] = []

    def make_room(needed: int) -> None:
        """As ComfyUI 0.3.64's ``free_memory``: it counts PyTorch's cache as free, unloads (part of) a
        model until needed + its reserve are free by that count, and leaves what it dropped cached."""
        asked.append(needed)
        cached[0] += max(0.0, needed + 0.4 * gib - free[0] - cached[0])

    def empty_cache() -> None:
        free[0] += cached[0]
        cached[0] = 0.0

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(engine_mod, "free_bytes", lambda device: int(free[0]))
    monkeypatch.setattr(engine_mod, "usable_bytes", lambda device: int(usable_gib * gib))
    monkeypatch.setattr(engine_mod, "resident_bytes", lambda modules, device: 0)
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), _modules=FluxEngine._modules,
                                 options=types.SimpleNamespace(offload=offload, quantization="fp8"),
                                 source=types.SimpleNamespace(transformer_only=True))
    fake._free_bytes = lambda pipeline=None: FluxEngine._free_bytes(fake, pipeline)
    pipe = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2), text_encoder=None, text_encoder_2=None,
                                 vae=None) if from_pipeline else None
    room = FluxEngine._room(fake, pipe, make_room)
    needed = room_for_masters(transformer_only=True, quantization="fp8")
    assert asked == ([needed] if asks else [])
    if asks:
        assert room > needed  # the masters stay on the GPU
    assert FluxEngine._room(fake, pipe, None) == room  # without a host nothing is asked


@pytest.mark.parametrize(
    ("free_gib", "transformer_only", "quantization", "masters_on_gpu", "workers"),
    [
        (44, True, "int8_weight_only", True, False),  # a 48 GB card on ComfyUI's MODEL path (decision 64)
        (44, True, "none", False, False),  # two bf16 copies of the transformer: 44 GiB, no room
        (44, False, "int8_weight_only", False, False),  # the whole pipeline adds T5 (9.5 GiB) and the VAE
        (38, True, "int8_weight_only", False, False),  # a 48 GB card where ComfyUI already holds its T5
        (70, False, "int8_weight_only", True, True),  # an 80 GB card: all on the GPU, workers compile ahead
        (70, True, "none", True, True),
    ],
)
def test_the_masters_stay_on_the_gpu_where_this_engine_has_room_for_them(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch, tmp_path, free_gib: int,
        transformer_only: bool, quantization: str, masters_on_gpu: bool, workers: bool) -> None:
    """Decision 64: the room the fused strategy's masters need depends on what the engine holds. A
    transformer-only engine with one-byte weights needs 40 GiB, not the whole pipeline's 64: on a
    48 GB card (~44 GiB free) its swaps are then merges on the GPU (~45 ms) instead of masters sent
    from RAM (~0.7 s). Compile workers (one more process and CUDA context, decision 45) keep the
    whole-pipeline rule. On the CPU the decision shows in ``_ample_room`` and in the workers' mode."""
    monkeypatch.delenv("FASTLORA_BACKGROUND_COMPILE", raising=False)
    monkeypatch.setattr(FluxEngine, "_free_bytes", lambda self, pipeline=None: free_gib * 2**30)
    source = dataclasses.replace(tiny_source, transformer_only=transformer_only)
    opts = dataclasses.replace(CPU, quantization=quantization, compile="regional",
                               compile_cache_dir=str(tmp_path / "c"))
    engine = FluxEngine(source, opts)
    try:
        assert engine._ample_room is masters_on_gpu
        assert (engine._background_mode == "ahead") is workers
    finally:
        engine.release()


def test_same_seed_same_image_and_other_seed_other_image(tiny_source: ModelSource,
                                                         tiny_request: GenerateRequest) -> None:
    engine = FluxEngine(tiny_source, CPU)
    a = engine.generate(tiny_request).images
    b = engine.generate(tiny_request).images
    c = engine.generate(dataclasses.replace(tiny_request, seed=8)).images
    assert a.shape == (1, 64, 64, 3) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    batch = engine.generate(dataclasses.replace(tiny_request, batch=2)).images
    assert batch.shape == (2, 64, 64, 3)


def test_cancellation_stops_within_a_step_and_engine_stays_usable(tiny_source: ModelSource,
                                                                  tiny_request: GenerateRequest) -> None:
    engine = FluxEngine(tiny_source, CPU)
    request = dataclasses.replace(tiny_request, steps=4)
    expected = engine.generate(request).images
    seen: list[int] = []

    class Stop(Exception):
        pass

    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        engine.generate(request, on_step=on_step)
    assert seen == [1, 2]
    progress: list[tuple[int, int]] = []
    again = engine.generate(request, on_step=lambda s, t: progress.append((s, t))).images
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert torch.equal(again, expected)


def test_weight_only_int8_and_nf4_t5_run_on_cpu(tiny_source: ModelSource, tiny_request: GenerateRequest) -> None:
    import bitsandbytes as bnb

    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, quantization="int8_weight_only",
                                                         t5_quantization="nf4"))
    assert engine.options.t5_quantization == "nf4"
    # FastLoRA's own modules (decision 60): saved compiled blocks and the fast start on 24 GB cards too
    from fastlora_core.runtime.pipeline import FluxRuntimePipeline

    assert isinstance(engine.pipe, FluxRuntimePipeline)
    # The tiny T5 is too narrow for bitsandbytes but for its feed-forward outputs (``wo``, 64 wide),
    # which stay unquantised like transformers' own NF4 loading does (decision 60; what NF4 does
    # to a T5 wide enough: tests/test_t5_quantization.py).
    t5 = engine.pipe.text_encoder_2
    assert not [m for m in t5.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(type(block.layer[-1].DenseReluDense.wo) is torch.nn.Linear for block in t5.encoder.block)
    weight = engine.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight) is not torch.nn.Parameter and hasattr(weight, "__tensor_flatten__")
    images = engine.generate(tiny_request).images
    plain = FluxEngine(tiny_source, CPU).generate(tiny_request).images
    assert images.shape == plain.shape
    # Quantisation changes the numbers a little, not the picture.
    assert float((images - plain).abs().mean()) < 0.05


def test_the_engine_size_counts_the_fused_masters_on_its_device(tiny_source: ModelSource,
                                                                tiny_loras: dict[str, str]) -> None:
    """ComfyUI's memory manager sizes a FastLoRA model by ``memory_bytes``. With one-byte weights the
    fused strategy's bf16 masters are twice the transformer's quantised bytes; where they sit on the
    engine's device (a GPU with room for them, decision 64; here the CPU engine's own RAM) they are
    part of the engine's size, counted once. Reporting the quantised weights alone hid 22 GiB of a
    48 GB card from ComfyUI."""
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, quantization="int8_weight_only"))
    try:
        modules = [t for m in engine._modules(engine.pipe) for t in (*m.parameters(), *m.buffers())]
        weights = sum(t.numel() * t.element_size() for t in modules)
        masters = engine.strategy.held_tensors()
        assert masters and all(t.device == engine.device for t in masters)
        master_bytes = sum(t.numel() * t.element_size() for t in masters)
        assert engine.memory_bytes() == weights + master_bytes
        engine.apply(LoraStack.of((tiny_loras["fastlora-tiny-style"], 1.0)))
        assert engine.memory_bytes() >= weights + master_bytes
    finally:
        engine.release()
    assert engine.memory_bytes() == 0


# -- registry --------------------------------------------------------------------------------------
def test_registry_reuses_same_key_and_releases_old_engine_first(tiny_source: ModelSource) -> None:
    a = registry.get_engine(tiny_source, CPU)
    assert registry.get_engine(tiny_source, CPU) is a
    b = registry.get_engine(tiny_source, dataclasses.replace(CPU, swap_strategy="adapter"))
    assert b is not a and a.released and not b.released
    assert registry.engines() == [b]
    with pytest.raises(OptionsError):
        registry.get_engine(tiny_source, dataclasses.replace(CPU, quantization="fp8", dtype="bfloat16"))
    assert not b.released, "a refused option must not cost the engine you have"
    assert registry.release_all() == 1 and b.released
    c = registry.get_engine(tiny_source, CPU)
    assert c is not a and not c.released


@pytest.mark.parametrize("call", ["generate", "apply", "prepare_slot"])
def test_release_while_a_call_waits_for_the_engine_gives_the_documented_error(
        tiny_source: ModelSource, tiny_request: GenerateRequest, call: str) -> None:
    """A call that passed its entry checks and then waited for the engine's lock while another
    thread released the engine gets EngineReleasedError, not AttributeError (no ``pipe``)."""
    engine = FluxEngine(tiny_source, CPU)
    real_lock = engine._lock
    waiting = threading.Event()

    class SignallingLock:  # tells the test when the worker is about to wait for the lock
        def __enter__(self) -> None:
            if threading.current_thread() is not threading.main_thread():
                waiting.set()
            real_lock.acquire()

        def __exit__(self, *exc: object) -> None:
            real_lock.release()

    engine._lock = SignallingLock()  # type: ignore[assignment]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            {"generate": lambda: engine.generate(tiny_request, LoraStack()),
             "apply": lambda: engine.apply(LoraStack()),
             "prepare_slot": lambda: engine.prepare_slot(all_layers=True)}[call]()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    with real_lock:
        thread = threading.Thread(target=worker)
        thread.start()
        assert waiting.wait(30)
        engine.release()  # same thread holds the (re-entrant) lock: runs now
    thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], EngineReleasedError), errors
    assert isinstance(errors[0], RuntimeError) and "released" in str(errors[0])
    assert engine.memory_bytes() == 0


# -- compilation -----------------------------------------------------------------------------------
def _flux_with_blocks(double: int, single: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random Flux transformer with several blocks of each kind, and inputs for it."""
    from diffusers import FluxTransformer2DModel

    from fastlora_core.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": double, "num_single_layers": single})
    g = torch.Generator().manual_seed(1)
    tokens, text = 16, 5
    inputs = {"hidden_states": torch.randn(1, tokens, 16, generator=g),
              "encoder_hidden_states": torch.randn(1, text, 32, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
              "img_ids": torch.randn(tokens, 3, generator=g), "txt_ids": torch.zeros(text, 3),
              "guidance": torch.tensor([3.5])}
    return model.eval(), inputs


@pytest.mark.slow
def test_regional_compile_makes_one_graph_per_block_class() -> None:
    """Two graphs for any number of blocks: the first single block (fed by a double block) gets no
    graph of its own (it did while single blocks handed over slices with another batch stride)."""
    from fastlora_core.optimize import compile_transformer, dynamo_compile_count

    model, inputs = _flux_with_blocks(2, 3)
    with torch.no_grad():
        eager = model(**inputs).sample
        torch._dynamo.reset()
        compile_transformer(model, "regional", False)
        before = dynamo_compile_count()
        compiled = model(**inputs).sample
    assert dynamo_compile_count() - before == 2
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)  # inductor reorders float32 sums


def test_single_blocks_hand_over_tensors_with_standard_strides_and_the_same_values() -> None:
    from fastlora_core.optimize import hand_over_contiguous

    model, inputs = _flux_with_blocks(1, 2)
    block = model.single_transformer_blocks[0]
    name, keys = type(block).__name__, list(block.state_dict())
    g = torch.Generator().manual_seed(0)
    dim = block.proj_out.out_features
    hidden, text, temb = (torch.randn(*shape, generator=g) for shape in ((1, 16, dim), (1, 5, dim), (1, dim)))
    with torch.no_grad():
        before = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
        assert before[1].stride(0) == 21 * dim  # diffusers' own block: slices of one tensor
        assert hand_over_contiguous(model) == 2
        assert hand_over_contiguous(model) == 0  # once
        after = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
        assert torch.equal(model(**inputs).sample, model(**inputs).sample)
    assert type(block).__name__ == name and list(block.state_dict()) == keys
    assert [t.stride(0) for t in after] == [5 * dim, 16 * dim]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.slow
def test_compiled_engine_never_recompiles_for_new_prompt_seed_steps_guidance(
        tiny_source: ModelSource, tiny_request: GenerateRequest) -> None:
    eager = FluxEngine(tiny_source, CPU)
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, compile="regional"))
    first = engine.generate(tiny_request)
    # The blocks run compiled (0 new graphs when another test compiled them already), and the
    # engine counts what this run compiled.
    assert engine.transformer.transformer_blocks[0]._compiled_call_impl is not None
    assert engine.compiles == first.new_compiles
    assert torch.allclose(first.images, eager.generate(tiny_request).images, atol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for changes in ({"seed": 3}, {"prompt": "a blue whale at night"}, {"steps": 3},
                        {"guidance": 5.0}, {"seed": 11, "prompt": "x", "steps": 1, "guidance": 1.0}):
            result = engine.generate(dataclasses.replace(tiny_request, **changes))
            assert result.new_compiles == 0
    # A new resolution compiles at most once (dynamic shapes after the first change), and is
    # remembered: going back to an earlier size never compiles again.
    before = engine.compiles
    engine.generate(dataclasses.replace(tiny_request, width=80, height=48))
    engine.generate(dataclasses.replace(tiny_request, width=96, height=96))
    assert engine.compiles - before <= 2  # one per repeated-block graph, at most
    with torch._dynamo.config.patch(error_on_recompile=True):
        for w, h in ((64, 64), (80, 48), (96, 96), (112, 64)):
            engine.generate(dataclasses.replace(tiny_request, width=w, height=h))


def test_out_of_memory_is_reported_clearly_and_engine_stays_usable(
        tiny_source: ModelSource, tiny_request: GenerateRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastlora_core import engine as engine_module
    from fastlora_core.errors import EngineOutOfMemoryError

    engine = FluxEngine(tiny_source, CPU)
    expected = engine.generate(tiny_request).images
    real = engine_module.run_pipeline

    def oom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine_module, "run_pipeline", oom)
    with pytest.raises(EngineOutOfMemoryError, match="64x64.*fp8.*nf4") as info:
        engine.generate(tiny_request)
    assert isinstance(info.value, torch.OutOfMemoryError)  # ComfyUI's OOM recovery still sees it
    monkeypatch.setattr(engine_module, "run_pipeline", real)
    assert torch.equal(engine.generate(tiny_request).images, expected)


def test_out_of_memory_advice_skips_what_is_already_in_effect() -> None:
    from fastlora_core.errors import out_of_memory

    oom = torch.OutOfMemoryError("CUDA out of memory")
    plain = str(out_of_memory("generating", oom, EngineOptions(quantization="none", t5_quantization="none")))
    assert "quantization=fp8" in plain and "t5_quantization=nf4" in plain and "offload=model" in plain
    recipe = str(out_of_memory("generating", oom, EngineOptions(quantization="fp8", t5_quantization="nf4")))
    assert "quantization=fp8" not in recipe and "nf4" not in recipe and "offload" not in recipe
    assert "lower width/height" in recipe and "unload other models" in recipe


def test_compile_cache_goes_to_the_configured_folder(tiny_source: ModelSource, tmp_path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from fastlora_core.optimize import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    monkeypatch.delenv("_FASTLORA_SET_INDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "default"))
    assert compile_cache_dir(EngineOptions()) == tmp_path / "default" / "inductor"
    FluxEngine(tiny_source, dataclasses.replace(CPU, compile="regional", compile_cache_dir=str(tmp_path / "c")))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    # A folder the user chose through TORCHINDUCTOR_CACHE_DIR wins over our default.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "user"))
    FluxEngine(tiny_source, dataclasses.replace(CPU, compile="regional"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "user")
    # torch's own temporary default, written into the variable when a library (torchao, diffusers)
    # first touches inductor's cache, is not the user's choice: the persistent default is used.
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert cache_dir() == os.path.abspath(default_cache_dir()) == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    FluxEngine(tiny_source, dataclasses.replace(CPU, compile="regional"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "default" / "inductor")
    # A process started from this one inherits the variable FastLoRA wrote; with a FASTLORA_CACHE_DIR of
    # its own it must use that folder, not take the inherited one for the user's choice.
    code = ("import os; from fastlora_core.optimize import configure_compile_cache; "
            "from fastlora_core.specs import EngineOptions; "
            "print('DIR', configure_compile_cache(EngineOptions(compile='regional')), "
            "os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = dict(os.environ, FASTLORA_CACHE_DIR=str(tmp_path / "child"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == [str(tmp_path / "child" / "inductor")] * 2


def test_previews_arrive_every_step_and_change_nothing(tiny_source: ModelSource,
                                                       tiny_request: GenerateRequest) -> None:
    engine = FluxEngine(tiny_source, CPU)
    request = dataclasses.replace(tiny_request, steps=3, batch=2)
    plain = engine.generate(request).images
    previews: list[tuple[int, int, torch.Tensor]] = []
    with_previews = engine.generate(request, on_preview=lambda s, t, rgb: previews.append((s, t, rgb))).images
    assert torch.equal(plain, with_previews)
    assert [(s, t) for s, t, _ in previews] == [(1, 3), (2, 3), (3, 3)]
    for _, _, rgb in previews:
        assert rgb.dim() == 3 and rgb.shape[-1] == 3 and rgb.dtype == torch.float32
        assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0
    assert not torch.equal(previews[0][2], previews[-1][2])  # the preview follows the sampling


def test_int8_t5_quantises_every_t5_linear_but_the_feed_forward_outputs(
        tiny_source: ModelSource, tiny_request: GenerateRequest) -> None:
    import bitsandbytes as bnb

    from fastlora_core.optimize import T5_KEEP_UNQUANTISED

    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, t5_quantization="int8"))
    layers = [(n, m) for n, m in engine.pipe.text_encoder_2.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = [m for n, m in layers if n.rsplit(".", 1)[-1] in T5_KEEP_UNQUANTISED]
    quantised = [m for n, m in layers if n.rsplit(".", 1)[-1] not in T5_KEEP_UNQUANTISED]
    assert kept and all(type(m) is torch.nn.Linear for m in kept)  # as transformers' own int8 loading
    assert quantised and all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in quantised)
    assert engine.generate(tiny_request).images.shape == (1, 64, 64, 3)


def test_deterministic_option_switches_deterministic_algorithms_on_until_release(
        tiny_source: ModelSource, tiny_request: GenerateRequest) -> None:
    """``deterministic=True`` is process-wide PyTorch state (EngineOptions docstring): on while the
    engine lives, back to what it was when it is released."""
    assert not torch.are_deterministic_algorithms_enabled()
    engine = FluxEngine(tiny_source, EngineOptions(device="cpu", dtype="float32", compile="off", deterministic=True))
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.equal(engine.generate(tiny_request).images, engine.generate(tiny_request).images)
    finally:
        engine.release()
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    ("switch", "ample_room", "options", "mode"),
    [
        (None, True, {}, "ahead"),  # by default on an H200-class GPU: compiled ahead, every image compiled (45)
        (None, False, {}, None),  # smaller cards: one process, as before
        ("0", True, {}, None),
        ("1", True, {}, "eager"),  # the user's switch, on any device (decision 41)
        ("1", False, {}, "eager"),
        ("yes", True, {}, "ahead"),  # neither 1 nor 0: a warning, and the default
        ("1", True, {"deterministic": True}, None),  # the first image must equal the later ones
        (None, True, {"deterministic": True}, None),
        ("1", True, {"dynamic_shapes": True}, None),
        (None, True, {"compile": "full"}, None),
    ],
)
def test_background_compile_workers_start_by_the_rule_of_decisions_41_and_45(
        tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch, tmp_path, switch: str | None,
        ample_room: bool, options: dict, mode: str | None) -> None:
    """Decision 41: a cold start's first image can run uncompiled while workers compile (14.3 s instead
    of 23.9 s on the H200), but uncompiled images differ slightly from compiled ones, and a cold start
    that compiles first repeats a request bit for bit from its first image (A -> B -> A included). So
    that runs only with ``FASTLORA_BACKGROUND_COMPILE=1``. Decision 45: by default, on a GPU with ample
    room, a worker compiles the second block class while the process compiles the first and the
    blocks wait for it (every image compiled). Neither where an option needs every image compiled
    alike in every process, or without regional compilation."""
    if switch is None:
        monkeypatch.delenv("FASTLORA_BACKGROUND_COMPILE", raising=False)
    else:
        monkeypatch.setenv("FASTLORA_BACKGROUND_COMPILE", switch)
    monkeypatch.setattr(FluxEngine, "_free_bytes", lambda self, pipeline=None: (65 if ample_room else 0) * 2**30)
    opts = dataclasses.replace(CPU, **{"compile": "regional", "compile_cache_dir": str(tmp_path / "c"), **options})
    engine = FluxEngine(tiny_source, opts)
    try:
        assert (engine._background is not None) is (mode is not None)
        assert engine._background_mode == mode
    finally:
        engine.release()
