"""The last first request's saved block graphs, loaded while the weights are read (decision 48,
``fastlora_core.preload_blocks``).

What a user relies on: a restart with the same model and options finds its first image's graphs
already loaded, and those graphs compute exactly what the files hold; a preloaded graph that is not
the one a block asks for (another size, another model) is never used; a missing or damaged file in
the record costs nothing but the usual load or compile. CPU, float32, tiny blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlora_core.precompile import PrecompiledBlocks
from fastlora_core.preload_blocks import FirstGraphs, tag_of
from fastlora_core.runtime.flux import FluxSingleTransformerBlock, FluxTransformerBlock

pytestmark = pytest.mark.slow  # each test compiles a block (seconds on the CPU)

DIM, HEADS, HEAD_DIM = 32, 2, 16
CPU = torch.device("cpu")


def _blocks(seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [FluxTransformerBlock(DIM, HEADS, HEAD_DIM).eval().requires_grad_(False),
            FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM).eval().requires_grad_(False)]


def _inputs(img: int = 16, txt: int = 8) -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    rope = (torch.randn(txt + img, HEAD_DIM, generator=g), torch.randn(txt + img, HEAD_DIM, generator=g))
    return {"hidden_states": torch.randn(1, img, DIM, generator=g),
            "encoder_hidden_states": torch.randn(1, txt, DIM, generator=g),
            "temb": torch.randn(1, DIM, generator=g), "image_rotary_emb": rope}


def _run_all(blocks: list[torch.nn.Module], inputs: dict[str, object]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [t for block in blocks for t in block(**inputs)]


def _first_process(folder: Path, tag: str, inputs: dict[str, object]) -> list[torch.Tensor]:
    blocks = _blocks()
    dispatcher = PrecompiledBlocks(folder, CPU, first=FirstGraphs(folder, tag, CPU))
    dispatcher.install(blocks)
    out = _run_all(blocks, inputs)
    assert dispatcher.stats.compiled == 2
    return out


def test_a_restart_takes_its_first_graphs_preloaded_and_computes_what_the_files_hold(tmp_path: Path) -> None:
    inputs = _inputs()
    out = _first_process(tmp_path, "engine-a", inputs)
    record = json.loads((tmp_path / "first-engine-a.json").read_text())["files"]
    assert sorted(record) == ["FluxSingleTransformerBlock", "FluxTransformerBlock"]
    assert all((tmp_path / e["file"]).is_file() and e["inference"] for e in record.values())

    first = FirstGraphs(tmp_path, "engine-a", CPU)  # what the next process does while it reads
    assert first.load() == 2
    blocks = _blocks()
    dispatcher = PrecompiledBlocks(tmp_path, CPU, first=first)
    dispatcher.install(blocks)
    again = _run_all(blocks, inputs)
    stats = dispatcher.stats
    assert (stats.compiled, stats.loaded, stats.preloaded) == (0, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(again, out, strict=True))  # the same compiled code
    assert first.take(tmp_path / record["FluxTransformerBlock"]["file"]) is None  # handed over once


def test_a_preloaded_graph_for_another_size_is_not_used_and_is_dropped(tmp_path: Path) -> None:
    _first_process(tmp_path, "engine-a", _inputs(img=16))
    first = FirstGraphs(tmp_path, "engine-a", CPU)
    assert first.load() == 2
    blocks = _blocks()
    dispatcher = PrecompiledBlocks(tmp_path, CPU, first=first)
    dispatcher.install(blocks)
    bigger = _inputs(img=24)
    out = _run_all(blocks, bigger)
    assert (dispatcher.stats.preloaded, dispatcher.stats.compiled) == (0, 2)
    with torch.inference_mode():
        eager = [t for block in blocks for t in type(block).forward(block, **bigger)]
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(out, eager, strict=True))
    assert not first._loaded  # the unused graphs are gone once every class has its first graph
    # the record now names this process's first files, for the next start
    record = json.loads((tmp_path / "first-engine-a.json").read_text())["files"]
    assert {e["file"] for e in record.values()} == {dispatcher.path(slot).name for slot in dispatcher._functions}


def test_another_engine_tag_preloads_nothing_and_a_bad_record_or_file_costs_nothing(tmp_path: Path) -> None:
    inputs = _inputs()
    _first_process(tmp_path, "engine-a", inputs)
    assert FirstGraphs(tmp_path, "engine-b", CPU).load() == 0
    (tmp_path / "first-broken.json").write_text("{not json")
    assert FirstGraphs(tmp_path, "broken", CPU).load() == 0
    (tmp_path / "first-outside.json").write_text(json.dumps({"files": {
        "X": {"file": "../elsewhere.bin", "inference": True}, "Y": {"file": "gone.bin", "inference": True}}}))
    assert FirstGraphs(tmp_path, "outside", CPU).load() == 0
    # a damaged file is not preloaded; the first call compiles it again, as without preloading
    record = json.loads((tmp_path / "first-engine-a.json").read_text())["files"]
    (tmp_path / record["FluxTransformerBlock"]["file"]).write_bytes(b"damaged")
    first = FirstGraphs(tmp_path, "engine-a", CPU)
    assert first.load() == 1
    blocks = _blocks()
    dispatcher = PrecompiledBlocks(tmp_path, CPU, first=first)
    dispatcher.install(blocks)
    _run_all(blocks, inputs)
    assert (dispatcher.stats.preloaded, dispatcher.stats.compiled) == (1, 1)


def test_a_preload_that_outlives_the_first_calls_keeps_nothing(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 49 may run the preload on a thread of its own, still loading when the first image has
    taken every block class's graph: what it loads then is never used, so it must not be kept."""
    folder = tmp_path / "blocks"
    folder.mkdir()
    for name in ("a.bin", "b.bin"):
        (folder / name).write_bytes(b"graph")
    first = FirstGraphs(folder, "t", CPU)
    first.first_call("A", folder / "a.bin", True, 2)
    first.first_call("B", folder / "b.bin", True, 2)  # the record is written; the first calls are over
    monkeypatch.setattr(torch.compiler, "load_compiled_function", lambda f: object())
    assert FirstGraphs(folder, "t", CPU).load() == 2  # a new process keeps what it loads
    assert first.load() == 0 and first.take(folder / "a.bin") is None  # this one has settled


def test_the_tag_is_a_short_stable_digest() -> None:
    assert tag_of("EngineKey(a)") == tag_of("EngineKey(a)") != tag_of("EngineKey(b)")
    assert len(tag_of("x")) == 20


_CHILD = """
import json, sys, torch
torch.set_num_threads(2)
from fastlora_core.engine import FluxEngine
from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource
engine = FluxEngine(ModelSource.from_diffusers(sys.argv[1]),
                    EngineOptions(dtype="float32", device="cpu", compile="regional", compile_cache_dir=sys.argv[2]))
# the work the loader does while it waits for a background read (a GPU's; the CPU reads no file in
# the background), run here before the first image as the loader would have run it
tasks = [t.__name__ for t in engine._work_while_reading()]
for task in engine._work_while_reading():
    task()
result = engine.generate(GenerateRequest(prompt="a red fox", seed=7, steps=2, width=64, height=64,
                                         max_sequence_length=16))
torch.save(result.images, sys.argv[3])
print(json.dumps({"tasks": tasks, "new_compiles": result.new_compiles, **vars(engine.precompiled.stats)}))
"""


def test_a_restarted_engine_preloads_its_first_graphs_while_reading_and_makes_the_same_image(
        tiny_dir: Path, tmp_path: Path) -> None:
    """The first process runs without the switch (the record is kept anyway), the second with it."""
    runs = []
    for i in range(2):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_dir), str(tmp_path / "cache"),
                               str(tmp_path / f"image{i}.pt")], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "FASTLORA_PRELOAD_BLOCKS": str(i)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "preload_first_graphs" not in runs[0]["tasks"] and "preload_first_graphs" in runs[1]["tasks"]
    assert runs[0]["compiled"] == 2 and runs[0]["preloaded"] == 0
    assert runs[1]["compiled"] == 0 and runs[1]["loaded"] == 2 and runs[1]["preloaded"] == 2
    assert runs[1]["new_compiles"] == 0
    first, second = (torch.load(tmp_path / f"image{i}.pt") for i in range(2))
    assert torch.equal(first, second)  # the same saved graphs, the same machine and thread count
