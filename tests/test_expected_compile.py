"""Compiling the expected first request's graphs while the weights are read (decision 47).

What a user relies on: with an empty compile cache, the graphs that workers compile from a specimen
(config and options only, no weight) are the ones the engine's blocks ask for on a first request of
the expected size, so the first image loads them instead of compiling; a first request of another
size (or blocks that differ from the specimen) cancels those workers and compiles as before, with
nothing left waiting. CPU, tiny models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_precompile import (  # tests/ is on sys.path
    DIM,
    HEAD_DIM,
    HEADS,
    _blocks,
    _close,
    _eager,
    _inputs,
    _run,
)

from fastlora_core import expected_compile
from fastlora_core.background_compile import Job
from fastlora_core.block_keys import call_signature, fingerprint
from fastlora_core.engine import FluxEngine
from fastlora_core.precompile import PrecompiledBlocks, repeated_blocks
from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource

CPU = torch.device("cpu")
SMALL = GenerateRequest(prompt="a red fox", seed=7, steps=2, width=32, height=48, max_sequence_length=16)


_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize(("device", "dtype", "quantization"), [
    ("cpu", "float32", "none"), ("cpu", "float32", "int8_weight_only"),
    # the default on a GPU: fp8 weights and the single blocks' fused fp8 projection (decision 44)
    pytest.param("cuda", "bfloat16", "fp8", marks=pytest.mark.skipif(not _FP8_GPU, reason="needs an fp8 GPU")),
])
def test_the_specimen_asks_for_the_same_graphs_as_the_engines_blocks(tiny_source: ModelSource, tmp_path: Path,
                                                                     device: str, dtype: str, quantization: str) -> None:
    """The file a worker compiles for the expected request is named by its specimen block's
    fingerprint and inputs: both must equal what the engine's own blocks present on that request,
    or the worker's graph would never be loaded."""
    engine = FluxEngine(tiny_source, EngineOptions(device=device, dtype=dtype, quantization=quantization,  # type: ignore[arg-type]
                                                   compile="regional", compile_cache_dir=str(tmp_path)))
    engine._ensure_compiled()
    assert engine.precompiled is not None
    asked: dict[str, tuple] = {}

    def record(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:  # the dispatch's own slot
        asked.setdefault(type(block).__name__,
                         (type(block), engine.precompiled._digest(block), call_signature(args, kwargs)))

    hooks = [b.register_forward_pre_hook(record, with_kwargs=True) for b in repeated_blocks(engine.transformer)]
    engine.generate(SMALL)  # with hooks the blocks run uncompiled: nothing is compiled here
    for hook in hooks:
        hook.remove()

    shapes = expected_compile.model_shapes(tiny_source)
    assert shapes is not None
    config, vae_scale_factor = shapes
    specimen = expected_compile.specimen(config, engine.options, engine.dtype, engine.device)
    assert len(repeated_blocks(specimen)) == 2  # one block of each class, not the model's
    seen = expected_compile.block_inputs(
        specimen, expected_compile.step_inputs(specimen, SMALL, vae_scale_factor, engine.dtype, engine.device))
    with torch.inference_mode():
        made = {type(b).__name__: (type(b), fingerprint(b).digest, call_signature(*seen[type(b).__name__]))
                for b in repeated_blocks(specimen)}
    assert set(made) == set(asked) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    for name in made:
        assert made[name][1] == asked[name][1], f"{name}: the specimen block fingerprints differently"
        assert made[name][2] == asked[name][2], f"{name}: the specimen's inputs differ from the first request's"


def test_a_request_of_another_size_cancels_the_expected_jobs_and_compiles_here(tmp_path: Path) -> None:
    """A first request that is not the expected one must not wait for graphs no block asks for: the
    announced names differ, the jobs are cancelled (their workers' CPU freed), and each block class
    compiles as without them."""
    from fastlora_core.runtime.flux import FluxTransformerBlock

    class Recording:  # the workers' side: hands nothing over, records cancels
        def __init__(self) -> None:
            self.cancelled: list[Job] = []

        def submit(self, *args: object) -> None:
            return None

        def cancel(self, job: Job) -> None:
            self.cancelled.append(job)

    expected = [Job("FluxTransformerBlock", ""), Job("FluxSingleTransformerBlock", "")]
    for job in expected:  # announced: each compiles a file for another request
        job.path = str(tmp_path / f"{job.block}-for-another-size.bin")
        job.announced.set()
    torch.manual_seed(0)
    double = FluxTransformerBlock(DIM, HEADS, HEAD_DIM).eval().requires_grad_(False)
    single, inputs = _blocks(1)[0], _inputs()
    background = Recording()
    dispatch = PrecompiledBlocks(tmp_path, CPU, background, ahead=True, expected=expected)  # type: ignore[arg-type]
    dispatch.install([double, single])
    first, second = _run(double, inputs), _run(single, inputs)
    assert (dispatch.stats.compiled, dispatch.stats.background) == (2, 0)
    assert background.cancelled == expected
    assert _close(first, _eager(double, inputs)) and _close(second, _eager(single, inputs))


_ENGINE = """
import json, sys, torch
torch.set_num_threads(2)
from fastlora_core import background_compile, expected_compile
from fastlora_core.engine import FluxEngine
from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource
# as on a GPU with ample room and an empty cache: workers compile ahead (decisions 45-47)
background_compile.mode = lambda ample_room: "ahead"
FluxEngine._first_image_compiles = lambda self: True
request = GenerateRequest(prompt="a red fox", seed=7, steps=2, width=32, height=48, max_sequence_length=16)
expected_compile.EXPECTED = request
engine = FluxEngine(ModelSource.from_diffusers(sys.argv[1]),
                    EngineOptions(dtype="float32", device="cpu", compile="regional", compile_cache_dir=sys.argv[2]))
jobs = [job.block for job in engine._expected]
first = engine.generate(request)
second = engine.generate(request)
print(json.dumps({"jobs": jobs, "stats": vars(engine.precompiled.stats), "first_compiles": first.new_compiles,
                  "repeat_equal": torch.equal(first.images, second.images),
                  "workers_left": len(engine._background._workers)}))
"""


@pytest.mark.slow  # two worker processes each compile a block class
def test_an_engine_loads_the_graphs_its_workers_compiled_while_it_read(tiny_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _ENGINE, str(tiny_dir), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["jobs"] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    stats = run["stats"]
    # both classes loaded from the workers' files; nothing compiled or run uncompiled in the engine
    assert (stats["compiled"], stats["background"], stats["loaded"], stats["eager_calls"]) == (0, 2, 2, 0), stats
    assert run["first_compiles"] == 0
    for job in stats["workers"]:  # each worker's timeline (GET /fastlora/stats): ready, named its file, replied
        # (a file found before the worker's reply was read has no reply time yet)
        assert 0 < job["ready_s"] <= job["announced_s"] <= job.get("finished_s", job["announced_s"]), job
        assert {"boot", "compiler"} <= set(job["ready_steps"]), job
        assert set(job["specimen_steps"]) == {"build", "quantise", "finish", "inputs"}, job  # before announcing
    assert run["repeat_equal"]  # every image compiled: the first request repeats bit for bit
    assert run["workers_left"] == 0


def test_workers_started_before_the_checks_never_outlive_a_refusal(tiny_source: ModelSource, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry starts a cold start's compile workers before its checks; options the checks
    refuse, or an engine whose own checks do not want workers, must leave no worker process (each
    holds a CUDA context and a pool of compile processes)."""
    from fastlora_core import registry
    from fastlora_core.background_compile import BackgroundCompiler
    from fastlora_core.errors import OptionsError

    made: list[BackgroundCompiler] = []

    def early(source: ModelSource, options: EngineOptions) -> BackgroundCompiler:
        made.append(BackgroundCompiler(CPU))  # no process: what matters is that it is closed
        return made[-1]

    def refuse(options: EngineOptions) -> None:
        raise OptionsError("refused by the device checks")

    monkeypatch.setattr(registry, "workers_before_checks", early)
    with monkeypatch.context() as m:
        m.setattr(registry, "resolve", refuse)
        with pytest.raises(OptionsError):
            registry.get_engine(tiny_source, EngineOptions(device="cpu", dtype="float32", compile="off"))
    assert len(made) == 1 and made[0].closed
    try:  # a CPU engine takes no workers: it closes the ones it was given
        registry.get_engine(tiny_source, EngineOptions(device="cpu", dtype="float32", compile="regional",
                                                       compile_cache_dir=str(tmp_path)))
        assert len(made) == 2 and made[1].closed
    finally:
        registry.release_all()


def test_a_first_request_of_another_size_stops_the_expected_workers_before_it_samples(
        tiny_source: ModelSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``generate`` knows its request's size before anything runs: a size other than the expected one
    cancels the workers compiling for it at once and gets one worker ready for the hand-over
    (decision 45) while the LoRA is applied and the prompt encoded; the expected size keeps them."""

    class Recording:
        def __init__(self) -> None:
            self.cancelled: list[Job] = []
            self.started = 0

        def cancel(self, job: Job) -> None:
            self.cancelled.append(job)

        def start(self, count: int = 1) -> None:
            self.started += count

        def release_idle(self) -> None:
            pass

        def close(self) -> None:
            pass

    engine = FluxEngine(tiny_source, EngineOptions(device="cpu", dtype="float32", compile="off"))
    workers = Recording()
    engine._background = workers  # type: ignore[assignment]
    expected = [Job("FluxTransformerBlock", ""), Job("FluxSingleTransformerBlock", "")]
    engine._expected = list(expected)
    same_size = GenerateRequest(**{**vars(SMALL), "width": expected_compile.EXPECTED.width,
                                   "height": expected_compile.EXPECTED.height,
                                   "max_sequence_length": expected_compile.EXPECTED.max_sequence_length})
    assert expected_compile.matches(same_size) and not expected_compile.matches(SMALL)
    engine.generate(SMALL)
    assert workers.cancelled == expected and workers.started == 1 and engine._expected == []
    monkeypatch.setattr(expected_compile, "EXPECTED", SMALL)  # now SMALL is the expected request
    engine._expected = kept = [Job("FluxTransformerBlock", "")]
    engine.generate(SMALL)
    assert workers.cancelled == expected and workers.started == 1 and engine._expected == kept
