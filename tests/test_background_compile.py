"""Compiling a missing block graph in a worker process (``FASTLORA_BACKGROUND_COMPILE=1``, decision 41).

What a user relies on: while a worker compiles, the blocks run uncompiled and compute exactly what the
eager block computes; once the worker has saved the graph, the next call loads it (no compile in the
serving process); a worker that fails or dies costs a compile in the serving process, never an error
or a stale graph; the worker rebuilds the block from its structure alone (no weights are sent) under
the name the pack was imported as (inside ComfyUI: a path). CPU, float32, tiny blocks.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_precompile import _blocks, _close, _eager, _inputs, _run  # tests/ is on sys.path

from fastlora_core import background_compile
from fastlora_core.background_compile import BackgroundCompiler, TensorSpec, rebuild, skeleton
from fastlora_core.block_keys import fingerprint
from fastlora_core.optimize import quantize_transformer
from fastlora_core.precompile import PrecompiledBlocks
from fastlora_core.runtime.flux import FluxTransformer, FluxTransformerConfig

pytestmark = pytest.mark.slow  # each test starts a worker process that compiles a block

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def _tiny_transformer() -> FluxTransformer:
    torch.manual_seed(0)
    return FluxTransformer(FluxTransformerConfig(
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))).eval().requires_grad_(False)


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a quantised tensor's inner tensors)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    return [x for name in flatten()[0] for x in _plain(getattr(t, name))]


@pytest.mark.parametrize("quantization", ["none", "int8_weight_only", "fp8_weight_only"])
def test_a_block_travels_without_its_weights_and_rebuilds_to_the_same_fingerprint(quantization: str,
                                                                                  tmp_path: Path) -> None:
    model = _tiny_transformer()
    if quantization != "none":
        pytest.importorskip("torchao")
        quantize_transformer(model, quantization, CPU)
    blocks = (model.transformer_blocks[0], model.single_transformer_blocks[0])
    PrecompiledBlocks(tmp_path, CPU).install(blocks)  # as the engine's blocks are when handed over
    for block in blocks:
        payload = pickle.dumps(skeleton(block))
        weight_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
        assert len(payload) < weight_bytes / 4  # structure only
        rebuilt = rebuild(pickle.loads(payload), CPU)
        assert fingerprint(rebuilt).digest == fingerprint(block).digest
        ours = {t.data_ptr() for p in block.parameters() for t in _plain(p)}
        assert not ours & {t.data_ptr() for p in rebuilt.parameters() for t in _plain(p)}  # its own tensors


def test_an_input_keeps_its_strides_offset_view_and_inference_flag() -> None:
    with torch.inference_mode():
        base = torch.randn(1, 24, 32)
        view = base[:, 8:]  # what the single blocks get: a slice of text + image
    built = TensorSpec.of(view).build(CPU)
    assert (built.shape, built.stride(), built.storage_offset(), built.is_inference()) == (
        view.shape, view.stride(), view.storage_offset(), True)
    assert built._base is None and view._base is None  # inference tensors keep no base
    base = torch.randn(1, 24, 32)
    view = base[:, 8:]
    built = TensorSpec.of(view).build(CPU)  # Dynamo guards a view's base with dynamic shapes
    assert built._base is not None and built._base.shape == base.shape and built.stride() == view.stride()
    plain = TensorSpec.of(torch.empty_strided((3, 4), (1, 3)).normal_()).build(CPU)
    assert plain._base is None and plain.stride() == (1, 3)


def test_blocks_run_uncompiled_while_a_worker_compiles_then_load_its_graph(tmp_path: Path) -> None:
    blocks, inputs = _blocks(), _inputs()
    background = BackgroundCompiler(CPU)
    try:
        dispatch = PrecompiledBlocks(tmp_path, CPU, background)
        dispatch.install(blocks)
        first = _run(blocks[0], inputs)
        assert dispatch.stats.eager_calls == 1 and dispatch.stats.compiled == 0
        assert all(torch.equal(a, b) for a, b in zip(first, _eager(blocks[0], inputs)))  # the eager block
        assert dispatch.settle(timeout=300)
        second = _run(blocks[1], inputs)
        assert (dispatch.stats.background, dispatch.stats.loaded, dispatch.stats.compiled) == (1, 1, 0)
        assert _close(second, _eager(blocks[1], inputs))  # the worker's graph, with this block's weights
        assert len(list(tmp_path.glob("FluxSingleTransformerBlock-*.bin"))) == 1
    finally:
        background.close()


def test_a_worker_that_dies_leaves_the_compile_to_the_serving_process(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    blocks, inputs = _blocks(1), _inputs()
    background = BackgroundCompiler(CPU)
    try:
        dispatch = PrecompiledBlocks(tmp_path, CPU, background)
        dispatch.install(blocks)
        _run(blocks[0], inputs)
        for worker in background._workers:
            worker.process.kill()
        assert dispatch.settle(timeout=60)
        with caplog.at_level("WARNING"):
            out = _run(blocks[0], inputs)
        assert "compile worker exited" in caplog.text and "compiling it here" in caplog.text
        assert dispatch.stats.compiled == 1 and dispatch.stats.background == 0
        assert _close(out, _eager(blocks[0], inputs))
    finally:
        background.close()


_UNDER_ANOTHER_NAME = """
import sys, types, importlib, torch
name, folder, cache = sys.argv[1], sys.argv[2], sys.argv[3]
pack = types.ModuleType(name)  # ComfyUI registers a custom node folder under its path
pack.__path__ = [folder]
sys.modules[name] = pack
prefix = name + "."
flux = importlib.import_module(prefix + "fastlora_core.runtime.flux")
pre = importlib.import_module(prefix + "fastlora_core.precompile")
bg = importlib.import_module(prefix + "fastlora_core.background_compile")
torch.manual_seed(0)
block = flux.FluxSingleTransformerBlock(32, 2, 16).eval().requires_grad_(False)
inputs = {"hidden_states": torch.randn(1, 16, 32), "encoder_hidden_states": torch.randn(1, 8, 32),
          "temb": torch.randn(1, 32), "image_rotary_emb": (torch.randn(24, 16), torch.randn(24, 16))}
background = bg.BackgroundCompiler(torch.device("cpu"))
dispatch = pre.PrecompiledBlocks(__import__("pathlib").Path(cache), torch.device("cpu"), background)
dispatch.install([block])
with torch.inference_mode():
    block(**inputs)
    assert dispatch.settle(timeout=300)
    block(**inputs)
background.close()
print(dispatch.stats.background, dispatch.stats.compiled, dispatch.stats.failures)
"""


def test_the_worker_imports_the_pack_under_the_name_comfyui_gave_it(tmp_path: Path) -> None:
    """Inside ComfyUI the pack's modules are named after the custom node's path, and its top-level
    ``__init__`` imports ComfyUI: the worker must use the same names without running that file."""
    folder = tmp_path / "custom_nodes" / "My-Pack"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('the pack entry point needs ComfyUI')\n")
    (folder / "fastlora_core").symlink_to(ROOT / "fastlora_core")
    name = str(folder).replace(".", "_x_")  # as ComfyUI's load_custom_node names a folder
    proc = subprocess.run([sys.executable, "-c", _UNDER_ANOTHER_NAME, name, str(folder), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:2] == ["1", "0"], proc.stdout + proc.stderr[-3000:]


_ENGINE = """
import json, sys, torch
torch.set_num_threads(2)
from fastlora_core.engine import FluxEngine
from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource
engine = FluxEngine(ModelSource.from_diffusers(sys.argv[1]),
                    EngineOptions(dtype="float32", device="cpu", compile="regional", compile_cache_dir=sys.argv[2]))
request = GenerateRequest(prompt="a red fox", seed=7, steps=2, width=64, height=64, max_sequence_length=16)
first = engine.generate(request)
stats = dict(vars(engine.precompiled.stats))
assert engine.precompiled.settle(timeout=400)
second = engine.generate(request)
third = engine.generate(request)
print(json.dumps({"first": stats, "first_compiles": first.new_compiles, "later": vars(engine.precompiled.stats),
                  "later_compiles": second.new_compiles + third.new_compiles,
                  "eager_vs_compiled": (first.images - second.images).abs().max().item(),
                  "compiled_twice_equal": torch.equal(second.images, third.images),
                  "workers_left": len(engine._background._workers)}))
"""


def test_an_engine_makes_its_first_image_uncompiled_and_later_ones_with_the_workers_graphs(
        tiny_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _ENGINE, str(tiny_dir), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "FASTLORA_BACKGROUND_COMPILE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["first"]["compiled"] == 0 and run["first"]["eager_calls"] > 0 and run["first_compiles"] == 0
    assert run["later"]["background"] == 2 and run["later"]["compiled"] == 0 and run["later_compiles"] == 0
    assert run["eager_vs_compiled"] < 1e-3  # float32: inductor only reorders sums
    assert run["compiled_twice_equal"]
    assert run["workers_left"] == 0  # idle workers exit after an image: no process is left behind


def test_a_worker_that_cannot_start_leaves_the_compile_to_the_serving_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks, inputs = _blocks(1), _inputs()
    def cannot_start(self: object, device: torch.device) -> None:
        raise FileNotFoundError("no Python executable to start a worker with")

    monkeypatch.setattr(background_compile._Worker, "__init__", cannot_start)
    dispatch = PrecompiledBlocks(tmp_path, CPU, BackgroundCompiler(CPU))
    dispatch.install(blocks)
    out = _run(blocks[0], inputs)
    assert (dispatch.stats.compiled, dispatch.stats.eager_calls) == (1, 0)
    assert _close(out, _eager(blocks[0], inputs))


def test_a_second_size_is_handed_over_as_one_dynamic_graph_that_later_sizes_reuse(tmp_path: Path) -> None:
    blocks = _blocks(1)
    background = BackgroundCompiler(CPU)
    try:
        dispatch = PrecompiledBlocks(tmp_path, CPU, background)
        dispatch.install(blocks)
        for img in (16, 24):  # the first size, then a second one: each handed over, then loaded
            inputs = _inputs(img=img)
            assert all(torch.equal(a, b) for a, b in zip(_run(blocks[0], inputs), _eager(blocks[0], inputs)))
            assert dispatch.settle(timeout=300)
            assert _close(_run(blocks[0], inputs), _eager(blocks[0], inputs))
        inputs = _inputs(img=40)  # a third size: the dynamic graph, nothing handed over
        assert _close(_run(blocks[0], inputs), _eager(blocks[0], inputs))
        assert (dispatch.stats.background, dispatch.stats.eager_calls, dispatch.stats.compiled) == (2, 2, 0)
        assert len(list(tmp_path.glob("*.bin"))) == 2
    finally:
        background.close()


def test_ahead_the_other_block_class_is_compiled_by_a_worker_and_its_blocks_wait_for_it(tmp_path: Path) -> None:
    """Decision 45 (the default on a GPU with ample room): while the serving process compiles the
    first block class, a worker compiles the other one for the same inputs; that class's blocks wait
    for its graph and load it, so no block ever runs uncompiled and nothing is compiled twice."""
    from test_precompile import DIM, HEAD_DIM, HEADS

    from fastlora_core.runtime.flux import FluxTransformerBlock

    torch.manual_seed(0)
    double = FluxTransformerBlock(DIM, HEADS, HEAD_DIM).eval().requires_grad_(False)
    single, inputs = _blocks(1)[0], _inputs()  # Flux calls both classes with inputs of one signature
    background = BackgroundCompiler(CPU)
    try:
        dispatch = PrecompiledBlocks(tmp_path, CPU, background, ahead=True)
        dispatch.install([double, single])
        first = _run(double, inputs)
        assert dispatch.stats.compiled == 1 and dispatch.report()["compiling_in_background"] == 1
        second = _run(single, inputs)
        stats = dispatch.stats
        assert (stats.compiled, stats.background, stats.loaded, stats.eager_calls) == (1, 1, 1, 0)
        assert _close(first, _eager(double, inputs)) and _close(second, _eager(single, inputs))
        assert {p.name.split("-")[0] for p in tmp_path.glob("*.bin")} == {"FluxTransformerBlock",
                                                                         "FluxSingleTransformerBlock"}
    finally:
        background.close()


def test_ahead_a_worker_that_never_replies_costs_a_compile_here_not_a_hang(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that takes the job and then hangs must not hang the image: after ``AHEAD_WAIT_S`` the
    waiting block class compiles in the serving process, and its output is the eager block's."""
    from test_precompile import DIM, HEAD_DIM, HEADS

    from fastlora_core import precompile
    from fastlora_core.background_compile import Job
    from fastlora_core.runtime.flux import FluxTransformerBlock

    class Silent:  # takes every job and never answers
        def submit(self, block, digest, path, args, kwargs, dynamic):  # type: ignore[no-untyped-def]
            return Job(type(block).__name__, str(path))

    monkeypatch.setattr(precompile, "AHEAD_WAIT_S", 0.5)
    torch.manual_seed(0)
    double = FluxTransformerBlock(DIM, HEADS, HEAD_DIM).eval().requires_grad_(False)
    single, inputs = _blocks(1)[0], _inputs()
    dispatch = PrecompiledBlocks(tmp_path, CPU, Silent(), ahead=True)  # type: ignore[arg-type]
    dispatch.install([double, single])
    _run(double, inputs)
    second = _run(single, inputs)
    stats = dispatch.stats
    assert (stats.compiled, stats.background, stats.eager_calls) == (2, 0, 0)
    assert stats.waited_seconds >= 0.5
    assert _close(second, _eager(single, inputs))


def test_a_worker_started_early_is_the_one_that_takes_the_first_job(tmp_path: Path) -> None:
    """Decision 46: a worker started while the weights are read (``start``) gets ready without a job and
    takes the first hand-over; starting again while it is idle starts no second process."""
    from test_precompile import DIM, HEAD_DIM, HEADS

    from fastlora_core.runtime.flux import FluxTransformerBlock

    torch.manual_seed(0)
    double = FluxTransformerBlock(DIM, HEADS, HEAD_DIM).eval().requires_grad_(False)
    single, inputs = _blocks(1)[0], _inputs()
    background = BackgroundCompiler(CPU)
    try:
        background.start()
        background.start()
        assert len(background._workers) == 1
        pid = background._workers[0].process.pid
        dispatch = PrecompiledBlocks(tmp_path, CPU, background, ahead=True)
        dispatch.install([double, single])
        _run(double, inputs)
        second = _run(single, inputs)
        assert (dispatch.stats.compiled, dispatch.stats.background, dispatch.stats.eager_calls) == (1, 1, 0)
        assert [w.process.pid for w in background._workers] == [pid]
        assert _close(second, _eager(single, inputs))
    finally:
        background.close()


def test_a_failed_load_closes_the_worker_started_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that fails after a worker was started early (a bad model file) leaves no process behind:
    in a server a leaked worker would keep a CUDA context and a pool of compile processes alive."""
    from fastlora_core.engine import FluxEngine
    from fastlora_core.errors import ModelLoadError
    from fastlora_core.specs import EngineOptions, ModelSource

    made: list[BackgroundCompiler] = []

    class Recorded(BackgroundCompiler):
        def __init__(self, device: torch.device) -> None:
            super().__init__(device)
            made.append(self)

    # On this CPU: workers as on a GPU with ample room, and a cache without saved blocks
    monkeypatch.setattr(background_compile, "BackgroundCompiler", Recorded)
    monkeypatch.setattr(background_compile, "mode", lambda ample_room: "ahead")
    monkeypatch.setattr(FluxEngine, "_first_image_compiles", lambda self: True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')  # and nothing else
    with pytest.raises(ModelLoadError):
        FluxEngine(ModelSource.from_diffusers(model), EngineOptions(device="cpu", dtype="float32",
                                                                    compile="regional",
                                                                    compile_cache_dir=str(tmp_path / "cache")))
    assert len(made) == 1 and made[0].closed
    assert not made[0]._workers
