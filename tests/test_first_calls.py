"""The text encoders' and VAE's first calls made on a thread during the build (``fastlora_core.first_calls``,
ARCHITECTURE decision 55).

What a user relies on: the calls run beside the loader, not on the caller's thread; they change nothing
a generation sees (no weight written, no random number drawn, the same images); a failure among them
costs nothing but the head start; and they are made only where they cannot get in the way. On a GPU
they save the first image its kernels' loading and cuDNN's plans; here, on the CPU, the tests force
them on to check the contract.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from fastlora_core import first_calls
from fastlora_core.engine import FluxEngine
from fastlora_core.loading import load_pipeline
from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource

CPU = EngineOptions(dtype="float32", device="cpu", compile="off")
GPU = torch.device("cuda")
SMALL = GenerateRequest(prompt="", width=64, height=64, max_sequence_length=16)


@pytest.fixture(scope="module")
def own_pipe(tiny_dir: Path):  # type: ignore[no-untyped-def]
    return load_pipeline(ModelSource.from_diffusers(tiny_dir), torch.float32, own_modules=True)


def test_they_are_made_only_on_a_gpu_with_room_and_fastloras_own_modules_there(own_pipe) -> None:  # type: ignore[no-untyped-def]
    options = EngineOptions(dtype="bfloat16", t5_quantization="none")  # as the engine passes them: resolved
    assert "not on a GPU" in first_calls.why_not(own_pipe, options, torch.device("cpu"), True)
    assert "room" in first_calls.why_not(own_pipe, options, GPU, False)
    assert "offload" in first_calls.why_not(own_pipe, dataclasses.replace(options, offload="model"), GPU, True)
    assert "T5" in first_calls.why_not(own_pipe, dataclasses.replace(options, t5_quantization="nf4"), GPU, True)
    assert "diffusers" in first_calls.why_not(object(), options, GPU, True)
    # weights still in CPU memory (an engine built around a pipeline the caller holds): the build moves them
    assert "not on the GPU" in first_calls.why_not(own_pipe, options, GPU, True)
    assert first_calls.FirstCalls.start(own_pipe, options, torch.device("cpu"), True) is None


def test_the_calls_run_on_their_own_thread_and_change_no_weight_and_no_random_state(own_pipe) -> None:  # type: ignore[no-untyped-def]
    threads: dict[str, int] = {}

    def note(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            threads[name] = threading.get_ident()
        return hook

    hooks = [module.register_forward_hook(note(name))
             for name, module in (("clip", own_pipe.text_encoder), ("t5", own_pipe.text_encoder_2),
                                  ("vae", own_pipe.vae.decoder))]
    weights = {name: t.clone() for m in own_pipe.modules() for name, t in m.state_dict().items()}
    rng = torch.get_rng_state()
    try:
        calls = first_calls.FirstCalls(own_pipe, torch.device("cpu"), SMALL)
        calls._thread.start()
        calls.wait()
    finally:
        for h in hooks:
            h.remove()
    assert set(threads) == {"clip", "t5", "vae"}
    assert threading.get_ident() not in threads.values()
    assert calls.seconds is not None and calls.seconds > 0
    assert torch.equal(torch.get_rng_state(), rng)
    after = {name: t for m in own_pipe.modules() for name, t in m.state_dict().items()}
    assert all(torch.equal(weights[name], after[name]) for name in weights)


def test_an_engine_with_the_calls_made_ahead_makes_the_same_images(
        tiny_source: ModelSource, tiny_request: GenerateRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = FluxEngine(tiny_source, CPU)
    assert plain.first_calls_ahead_s is None and plain._first_calls is None  # the CPU: not made ahead
    expected = plain.generate(tiny_request).images
    monkeypatch.setattr(first_calls, "why_not", lambda *args: "")
    monkeypatch.setattr(first_calls, "EXPECTED", SMALL)
    ahead = FluxEngine(tiny_source, CPU)
    assert ahead._first_calls is not None  # started by the build
    images = ahead.generate(tiny_request).images
    assert ahead._first_calls is None and ahead.first_calls_ahead_s is not None  # waited for before sampling
    assert torch.equal(images, expected)


def test_a_failure_among_the_calls_leaves_the_engine_working(
        tiny_source: ModelSource, tiny_request: GenerateRequest, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    expected = FluxEngine(tiny_source, CPU).generate(tiny_request).images
    from fastlora_core.runtime.pipeline import FluxRuntimePipeline

    encode = FluxRuntimePipeline.encode_prompt

    def failing_on_the_thread(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "fastlora-first-calls":
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(FluxRuntimePipeline, "encode_prompt", failing_on_the_thread)
    monkeypatch.setattr(first_calls, "why_not", lambda *args: "")
    monkeypatch.setattr(first_calls, "EXPECTED", SMALL)
    with caplog.at_level("INFO", logger="fastlora_core.first_calls"):
        engine = FluxEngine(tiny_source, CPU)
        images = engine.generate(tiny_request).images
    assert engine.first_calls_ahead_s is None
    assert "first calls ahead failed" in caplog.text
    assert torch.equal(images, expected)


def test_release_waits_for_the_calls_before_freeing(tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    finished = threading.Event()
    run = first_calls.FirstCalls._run

    def slow_run(self: first_calls.FirstCalls) -> None:
        gate.wait(10)
        run(self)
        finished.set()

    monkeypatch.setattr(first_calls, "why_not", lambda *args: "")
    monkeypatch.setattr(first_calls, "EXPECTED", SMALL)
    monkeypatch.setattr(first_calls.FirstCalls, "_run", slow_run)
    engine = FluxEngine(tiny_source, CPU)
    threading.Timer(0.2, gate.set).start()
    engine.release()
    assert finished.is_set()
