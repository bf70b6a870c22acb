"""Saved compiled blocks (``fastlora_core.precompile``, ARCHITECTURE decision 40).

Regional compilation of FastLoRA's own transformer saves each compiled block class and a later
process loads it without re-tracing. What a user relies on: the loaded graph computes what the block
computes with *its own, current* weights (LoRA swaps write in place); anything that would trace
differently gets its own graph instead of a stale one; a damaged file costs a compile, never an
error; hooks still run. CPU, float32, tiny blocks.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlora_core import block_keys, precompile
from fastlora_core.atomic_write import write_whole
from fastlora_core.block_keys import fingerprint
from fastlora_core.precompile import PrecompiledBlocks
from fastlora_core.runtime.flux import (
    FluxSingleTransformerBlock,
    FluxTransformer,
    FluxTransformerConfig,
    native_attention,
)

pytestmark = pytest.mark.slow  # each test compiles a block (seconds on the CPU)

DIM, HEADS, HEAD_DIM = 32, 2, 16
CPU = torch.device("cpu")


def _blocks(n: int = 2, seed: int = 0) -> list[FluxSingleTransformerBlock]:
    torch.manual_seed(seed)
    return [FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM).eval().requires_grad_(False) for _ in range(n)]


def _inputs(img: int = 16, txt: int = 8, seed: int = 1) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    rope = (torch.randn(txt + img, HEAD_DIM, generator=g), torch.randn(txt + img, HEAD_DIM, generator=g))
    return {"hidden_states": torch.randn(1, img, DIM, generator=g),
            "encoder_hidden_states": torch.randn(1, txt, DIM, generator=g),
            "temb": torch.randn(1, DIM, generator=g), "image_rotary_emb": rope}


def _run(block: torch.nn.Module, inputs: dict[str, object]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return tuple(block(**inputs))


def _eager(block: torch.nn.Module, inputs: dict[str, object]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return tuple(type(block).forward(block, **inputs))


def _close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.allclose(x, y, atol=1e-5, rtol=1e-5) for x, y in zip(a, b))  # inductor reorders sums


def test_a_compiled_block_is_saved_and_a_fresh_dispatcher_loads_it_without_compiling(tmp_path: Path) -> None:
    blocks, inputs = _blocks(), _inputs()
    first = PrecompiledBlocks(tmp_path, CPU)
    assert first.install(blocks) == 2
    out = _run(blocks[0], inputs)
    assert (first.stats.compiled, first.stats.saved, first.stats.loaded) == (1, 1, 0)
    assert _close(out, _eager(blocks[0], inputs))
    assert len(list(tmp_path.glob("FluxSingleTransformerBlock-*.bin"))) == 1

    again = PrecompiledBlocks(tmp_path, CPU)  # what a restarted process builds
    again.install(blocks)
    loaded = _run(blocks[0], inputs)
    assert (again.stats.compiled, again.stats.loaded) == (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(loaded, out))  # the same compiled code


def test_a_process_with_other_inductor_settings_compiles_its_own_graph(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor takes ``TORCHINDUCTOR_*`` variables as its settings (programmatic dependent launch,
    max-autotune...): a graph saved under other settings must not be loaded. Where inductor works (its
    cache folder, its number of compile processes) changes nothing and the saved graph still loads."""
    blocks, inputs = _blocks(), _inputs()
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    block_keys.software.cache_clear()
    try:
        first = PrecompiledBlocks(tmp_path, CPU)
        first.install(blocks)
        _run(blocks[0], inputs)
        assert (first.stats.compiled, first.stats.saved) == (1, 1)

        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
        block_keys.software.cache_clear()  # what a process started with this variable reads
        same = PrecompiledBlocks(tmp_path, CPU)
        same.install(blocks)
        _run(blocks[0], inputs)
        assert (same.stats.compiled, same.stats.loaded) == (0, 1)

        monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "1")
        block_keys.software.cache_clear()
        other = PrecompiledBlocks(tmp_path, CPU)
        other.install(blocks)
        _run(blocks[0], inputs)
        assert (other.stats.compiled, other.stats.loaded) == (1, 0)
        assert len(list(tmp_path.glob("FluxSingleTransformerBlock-*.bin"))) == 2
    finally:
        monkeypatch.undo()
        block_keys.software.cache_clear()


def test_one_graph_serves_every_block_with_its_own_weights_and_sees_in_place_writes(tmp_path: Path) -> None:
    blocks, inputs = _blocks(3), _inputs()
    dispatch = PrecompiledBlocks(tmp_path, CPU)
    dispatch.install(blocks)
    for block in blocks:
        assert _close(_run(block, inputs), _eager(block, inputs))
    before = _run(blocks[2], inputs)
    with torch.no_grad():  # what a fused LoRA swap does: write into the weight
        blocks[2].proj_out.weight.mul_(1.5)
    after = _run(blocks[2], inputs)
    assert not _close(after, before)
    assert _close(after, _eager(blocks[2], inputs))
    assert dispatch.stats.compiled == 1


def test_blocks_with_an_adapter_slot_still_share_one_graph(tmp_path: Path) -> None:
    """``swap_strategy=adapter`` wraps every targeted linear in a PEFT LoRA layer, which keeps its own
    module name among its attributes; the blocks must still share their class's graph (they compiled
    one each, 57 on a full-size Flux), and each must compute with its own LoRA weights."""
    from fastlora_core.lora.adapter import ADAPTER_NAME, AdapterStrategy
    from fastlora_core.lora.fit import linear_modules

    holder = torch.nn.Module()
    holder.single_transformer_blocks = torch.nn.ModuleList(_blocks(3))
    strategy = AdapterStrategy(holder, max_rank=4, dtype=torch.float32)
    strategy.prepare_slot(frozenset(linear_modules(holder)), 4)
    torch.manual_seed(2)
    with torch.no_grad():  # what a swap writes: different LoRA weights in every layer
        for module in linear_modules(holder).values():
            module.lora_A[ADAPTER_NAME].weight.normal_()  # type: ignore[index]
            module.lora_B[ADAPTER_NAME].weight.normal_(std=0.1)  # type: ignore[index]
    blocks, inputs = list(holder.single_transformer_blocks), _inputs()
    dispatch = PrecompiledBlocks(tmp_path, CPU)
    dispatch.install(blocks)
    outputs = [_run(block, inputs) for block in blocks]
    assert dispatch.stats.compiled == 1, dispatch.stats
    for block, out in zip(blocks, outputs):
        assert _close(out, _eager(block, inputs))
    assert not _close(outputs[0], outputs[1])


def test_a_new_attention_kernel_gets_its_own_graph_not_a_stale_one(tmp_path: Path) -> None:
    blocks, inputs = _blocks(1), _inputs()
    dispatch = PrecompiledBlocks(tmp_path, CPU)
    dispatch.install(blocks)
    plain = _run(blocks[0], inputs)

    def doubled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return 2 * native_attention(q, k, v)

    blocks[0].attn.attention_fn = doubled  # a Python function: Dynamo's own guard on it cannot be saved
    changed = _run(blocks[0], inputs)
    assert not _close(changed, plain)
    assert _close(changed, _eager(blocks[0], inputs))
    assert dispatch.stats.compiled == 2
    assert len(list(tmp_path.glob("*.bin"))) == 2


def test_a_saved_guard_that_fails_compiles_again_instead_of_running_a_stale_graph(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo's guards that a file can hold stay the second line of defence behind the fingerprint."""
    blocks, inputs = _blocks(1), _inputs()
    dispatch = PrecompiledBlocks(tmp_path, CPU)
    dispatch.install(blocks)
    plain = _run(blocks[0], inputs)
    monkeypatch.setattr(block_keys.Fingerprint, "still_valid", lambda self: True)  # a change it misses
    blocks[0].attn.attention_fn = lambda q, k, v: 2 * native_attention(q, k, v)
    changed = _run(blocks[0], inputs)
    assert not _close(changed, plain)
    assert _close(changed, _eager(blocks[0], inputs))
    assert dispatch.stats.compiled == 2


def test_fingerprint_follows_structure_and_types_not_values() -> None:
    a, b = _blocks(2)
    assert fingerprint(a).digest == fingerprint(b).digest  # other random weights, same graph
    fp = fingerprint(a)
    assert fp.still_valid()
    a.proj_out.weight = torch.nn.Parameter(a.proj_out.weight.to(torch.bfloat16), requires_grad=False)
    assert not fp.still_valid()
    assert fingerprint(a).digest != fingerprint(b).digest
    b.contiguous_outputs = True  # a constant the forward branches on
    assert fingerprint(b).digest != fingerprint(_blocks(1)[0]).digest
    c = _blocks(1)[0]
    fp = fingerprint(c)
    c.attn.attention_fn = native_attention  # an instance attribute shadowing the class default
    assert not fp.still_valid()
    fp = fingerprint(c)
    c.proj_mlp = torch.nn.Linear(DIM, 4 * DIM)  # a submodule replaced (an adapter slot does this)
    assert not fp.still_valid()


def test_an_attribute_described_by_its_address_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """An attribute whose description carries a memory address keys its block per object and process
    (the adapter slot's 57 graphs came from a per-layer value): the log names its type once."""

    class Opaque:
        pass

    blocks = _blocks(2)
    for block in blocks:
        block.helper = Opaque()
    with caplog.at_level(logging.WARNING, logger="fastlora_core.block_keys"):
        digests = {fingerprint(block).digest for block in blocks}
    assert len(digests) == 2  # one key per block: what the warning is about
    warned = [r.getMessage() for r in caplog.records if "memory address" in r.getMessage()]
    assert len(warned) == 1 and "Opaque" in warned[0], warned
    caplog.clear()
    fingerprint(_blocks(1)[0])  # a plain block: nothing to say
    assert not [r for r in caplog.records if "memory address" in r.getMessage()]


def test_a_quantised_weight_is_fingerprinted_without_its_torch_function_and_to_the_same_digest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A first image fingerprints every fp8 weight; torchao's ``__torch_function__`` ran Python for each
    attribute read. Skipping it must not change the digest: it names the saved files."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8Tensor, PerRow

    block = _blocks(1)[0]
    weight = block.proj_out.weight.detach().to(torch.bfloat16)
    block.proj_out.weight = torch.nn.Parameter(Float8Tensor.from_hp(weight, granularity=PerRow()), requires_grad=False)
    calls = []
    handler = Float8Tensor.__torch_function__.__func__  # type: ignore[attr-defined]

    def counting(cls: type, func: object, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        calls.append(func)
        return handler(cls, func, types, args, kwargs)

    monkeypatch.setattr(Float8Tensor, "__torch_function__", classmethod(counting))
    digest = fingerprint(block).digest
    assert calls == []
    through_handler = block_keys._fingerprint(block)  # the same walk with the handler answering
    assert calls, "the comparison must have gone through torchao's handler"
    assert through_handler.digest == digest


def test_a_damaged_saved_file_costs_a_compile_and_is_replaced(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    blocks, inputs = _blocks(1), _inputs()
    PrecompiledBlocks(tmp_path, CPU).install(blocks)
    expected = _run(blocks[0], inputs)
    (saved,) = tmp_path.glob("*.bin")
    saved.write_bytes(b"not a compiled block")
    damaged = PrecompiledBlocks(tmp_path, CPU)
    damaged.install(blocks)
    with caplog.at_level(logging.WARNING, logger="fastlora_core.precompile"):
        out = _run(blocks[0], inputs)
    assert "could not load the compiled block" in caplog.text and str(saved) in caplog.text
    assert (damaged.stats.loaded, damaged.stats.compiled) == (0, 1)
    assert _close(out, expected)
    repaired = PrecompiledBlocks(tmp_path, CPU)
    repaired.install(blocks)
    _run(blocks[0], inputs)
    assert (repaired.stats.loaded, repaired.stats.compiled) == (1, 0)


def test_a_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    """Another process (a second server sharing the cache, the serving process of a background
    worker) must never load a half-written file, and a writer that fails midway leaves nothing under
    the real name: the next process compiles instead of tripping over a damaged file."""

    class Compiled:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def save_compiled_function(self, path: str) -> None:
            Path(path).write_bytes(b"half")
            assert not target.exists(), "written under the real name before it was complete"
            if self.fail:
                raise OSError("No space left on device")
            Path(path).write_bytes(b"whole")

    target = tmp_path / "blocks" / "FluxSingleTransformerBlock-a-b.bin"
    with pytest.raises(OSError, match="No space"):
        write_whole(target, Compiled(fail=True).save_compiled_function)
    assert list(target.parent.iterdir()) == []
    write_whole(target, Compiled(fail=False).save_compiled_function)
    assert target.read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == [target.name]


def test_files_unused_for_a_month_are_deleted_when_a_block_is_saved_and_loads_count_as_use(
        tmp_path: Path) -> None:
    """An upgrade (or other options, another GPU) leaves files no process will load again: the next
    save deletes those neither loaded nor written for UNUSED_DAYS, and a temporary file a killed writer
    left, and the first-request records an earlier version wrote (decision 48, removed). A file that is
    loaded stays, however old it was; other files in the folder are not touched."""
    import os
    import time

    old = time.time() - (precompile.UNUSED_DAYS + 1) * 86400
    tmp_path.mkdir(exist_ok=True)
    stale, orphan, young_part, foreign, record = (
        tmp_path / "FluxTransformerBlock-old-x.bin", tmp_path / ".a.bin.1-2.part", tmp_path / ".b.bin.3-4.part",
        tmp_path / "notes.txt", tmp_path / "first-0123abcd.json")
    for f in (stale, orphan, young_part, foreign, record):
        f.write_bytes(b"x")
    for f in (stale, orphan, foreign, record):
        os.utime(f, (old, old))
    blocks, inputs = _blocks(1), _inputs()
    PrecompiledBlocks(tmp_path, CPU).install(blocks)
    _run(blocks[0], inputs)  # compiles and saves: the folder is pruned
    (saved,) = tmp_path.glob("FluxSingleTransformerBlock-*.bin")
    assert not stale.exists() and not orphan.exists() and not record.exists()
    assert young_part.exists() and foreign.exists()

    os.utime(saved, (old, old))
    restarted = PrecompiledBlocks(tmp_path, CPU)
    restarted.install(blocks)
    _run(blocks[0], inputs)
    assert restarted.stats.loaded == 1
    assert precompile.prune(tmp_path) == 0 and saved.exists()  # loading it counted as use


def test_a_second_size_compiles_one_dynamic_graph_that_later_sizes_reuse(tmp_path: Path) -> None:
    blocks = _blocks(1)
    dispatch = PrecompiledBlocks(tmp_path, CPU)
    dispatch.install(blocks)
    for img in (16, 24, 40, 16):
        inputs = _inputs(img=img)
        assert _close(_run(blocks[0], inputs), _eager(blocks[0], inputs))
    assert dispatch.stats.compiled == 2  # 16 tokens exactly, then any size
    later = PrecompiledBlocks(tmp_path, CPU)  # a restart serves a size never seen from the saved dynamic graph
    later.install(blocks)
    _run(blocks[0], _inputs(img=16))
    _run(blocks[0], _inputs(img=48))
    assert (later.stats.compiled, later.stats.loaded) == (0, 2)


def test_a_dynamic_graph_traced_with_the_text_as_long_as_the_head_serves_other_text_lengths(tmp_path: Path) -> None:
    """Sizes equal by chance when the dynamic graph is traced (here the text length and the head size,
    which the weights fix) stay separate: later text lengths reuse the graph instead of compiling one
    graph per size, in this process and in a restarted one."""
    blocks = _blocks(1)
    dispatch = PrecompiledBlocks(tmp_path, CPU)
    dispatch.install(blocks)
    for img, txt in ((16, HEAD_DIM), (24, HEAD_DIM), (16, 12), (40, 20)):
        inputs = _inputs(img=img, txt=txt)
        assert _close(_run(blocks[0], inputs), _eager(blocks[0], inputs))
    assert dispatch.stats.compiled == 2  # the first size exactly, then one dynamic graph
    later = PrecompiledBlocks(tmp_path, CPU)
    later.install(blocks)
    inputs = _inputs(img=32, txt=24)
    assert _close(_run(blocks[0], inputs), _eager(blocks[0], inputs))
    assert (later.stats.compiled, later.stats.loaded) == (0, 1)


def test_blocks_with_hooks_run_eagerly_with_their_hooks(tmp_path: Path) -> None:
    blocks, inputs = _blocks(1), _inputs()
    dispatch = PrecompiledBlocks(tmp_path, CPU)
    dispatch.install(blocks)
    calls: list[int] = []
    blocks[0].register_forward_hook(lambda module, args, output: calls.append(1))
    assert _close(_run(blocks[0], inputs), _eager(blocks[0], inputs))
    assert calls == [1] and dispatch.stats.compiled == 0


def test_why_not_names_what_keeps_plain_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    own = FluxTransformer(FluxTransformerConfig(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                                num_attention_heads=2, joint_attention_dim=32,
                                                pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)))
    assert precompile.why_not(own, dynamic=False) == ""
    assert "dynamic" in precompile.why_not(own, dynamic=True)
    assert "own Flux transformer" in precompile.why_not(torch.nn.Linear(2, 2), dynamic=False)
    monkeypatch.setenv("FASTLORA_PRECOMPILE", "0")
    assert "FASTLORA_PRECOMPILE=0" in precompile.why_not(own, dynamic=False)
    assert len(precompile.repeated_blocks(own)) == 2


_CHILD = """
import json, sys, torch
torch.set_num_threads(2)
from fastlora_core.engine import FluxEngine
from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource
engine = FluxEngine(ModelSource.from_diffusers(sys.argv[1]),
                    EngineOptions(dtype="float32", device="cpu", compile="regional", compile_cache_dir=sys.argv[2]))
result = engine.generate(GenerateRequest(prompt="a red fox", seed=7, steps=2, width=64, height=64,
                                         max_sequence_length=16))
torch.save(result.images, sys.argv[3])
print(json.dumps({"new_compiles": result.new_compiles, **vars(engine.precompiled.stats)}))
"""


def test_a_restarted_process_loads_the_blocks_and_makes_the_same_image(tiny_dir: Path, tmp_path: Path) -> None:
    """The user-visible promise: the second process compiles nothing and its image is the first's."""
    runs = []
    for i in range(2):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_dir), str(tmp_path / "cache"),
                               str(tmp_path / f"image{i}.pt")], capture_output=True, text=True, timeout=600,
                              env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["compiled"] == 2 and runs[0]["saved"] == 2 and runs[0]["new_compiles"] == 2
    assert runs[1]["compiled"] == 0 and runs[1]["loaded"] == 2 and runs[1]["new_compiles"] == 0
    first, second = (torch.load(tmp_path / f"image{i}.pt") for i in range(2))
    assert torch.equal(first, second)  # the same saved graphs, the same machine and thread count


@pytest.mark.parametrize("case", ["cold", "saved", "compile_off", "dynamic", "switched_off", "cpu"])
def test_only_a_first_image_that_will_compile_starts_the_compilers_early(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 46: the compilers (a worker, inductor's pool) start while the weights are read only when
    the first image will compile block graphs on a GPU: regional compile with saved blocks, none saved
    yet. A cache holding a saved block, other compile settings or the CPU start nothing early."""
    from types import SimpleNamespace

    from fastlora_core import precompile
    from fastlora_core.engine import FluxEngine
    from fastlora_core.specs import EngineOptions

    cache = tmp_path / "cache"
    precompile.folder_for(cache).mkdir(parents=True)
    if case == "saved":
        (precompile.folder_for(cache) / "FluxTransformerBlock-0-1.bin").write_bytes(b"")
    if case == "switched_off":
        monkeypatch.setenv(precompile.ENV_SWITCH, "0")
    options = EngineOptions(compile="off" if case == "compile_off" else "regional", dynamic_shapes=case == "dynamic")
    engine = SimpleNamespace(options=options, device=torch.device("cpu" if case == "cpu" else "cuda"),
                             _compile_cache=cache)
    assert FluxEngine._first_image_compiles(engine) is (case == "cold")  # type: ignore[arg-type]


def test_a_saved_graph_loads_without_starting_inductors_compile_pool(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 56: a load readies its already compiled kernels in this process (compile_threads 1), so
    it starts no pool of compile processes; the setting comes back after the load, also after a failed
    one, and only once the last of two overlapping loads (two engines on two threads) is done."""
    import torch._inductor.config as inductor_config

    seen: list[int] = []
    inner_done = []

    def load(f):  # type: ignore[no-untyped-def]
        seen.append(inductor_config.compile_threads)
        if f.name.endswith("outer.bin") and not inner_done:  # a second load starts and ends inside this one
            inner_done.append(precompile.load_saved(tmp_path / "inner.bin"))
            seen.append(inductor_config.compile_threads)
        if f.name.endswith("bad.bin"):
            raise RuntimeError("a damaged file")
        return f.name

    monkeypatch.setattr(torch.compiler, "load_compiled_function", load)
    for name in ("outer.bin", "inner.bin", "bad.bin"):
        (tmp_path / name).write_bytes(b"x")
    # torch's own patch for its config module (pytest's monkeypatch would delete the entry on undo)
    with inductor_config.patch(compile_threads=6):
        assert precompile.load_saved(tmp_path / "outer.bin").endswith("outer.bin")
        assert seen == [1, 1, 1]  # the outer load, the inner one, the outer after the inner ended
        assert inductor_config.compile_threads == 6
        with pytest.raises(RuntimeError, match="damaged"):
            precompile.load_saved(tmp_path / "bad.bin")
        assert inductor_config.compile_threads == 6


def test_compiles_leave_out_the_reductions_rescaled_and_benchmarked_in_every_process() -> None:
    """Decision 57: inductor's run-time halving of a reduction's block (benchmarked at the first call of
    every process, never saved) is off for FastLoRA's compiles, and the saved blocks' key says so."""
    import torch._inductor.config as inductor_config

    from fastlora_core import optimize

    if not hasattr(inductor_config, "dynamic_scale_rblock"):
        pytest.skip(f"torch {torch.__version__} has no run-time reduction rescaling")
    # torch's own patch restores every entry afterwards (pytest's monkeypatch would delete them on undo)
    with inductor_config.patch(dynamic_scale_rblock=True, fx_graph_cache=inductor_config.fx_graph_cache,
                               autotune_local_cache=inductor_config.autotune_local_cache):
        optimize.configure_worker_compile()  # the settings of the serving process's and the workers' compiles
        assert inductor_config.dynamic_scale_rblock is False
    assert block_keys.software()[0] == "format 2"  # files saved before the change are not loaded


@pytest.fixture(scope="module")
def deeper_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny Flux with three blocks of each class, and two LoRA files on every block linear."""
    from safetensors.torch import save_file

    from fastlora_core.tiny import build_tiny_pipeline, module_shapes, random_lora_state_dict

    folder = tmp_path_factory.mktemp("deeper")
    pipe = build_tiny_pipeline(transformer={"num_layers": 3, "num_single_layers": 3})
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    names = [n for n, m in pipe.transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n]
    loras = []
    for seed in (1, 2):
        path = folder / f"every-block-{seed}.safetensors"
        save_file(random_lora_state_dict(module_shapes(pipe.transformer, names), 4, seed), str(path))
        loras.append(str(path))
    return folder / "model", loras


@pytest.mark.parametrize("strategy", ["fused", "adapter"])
def test_every_swap_strategy_compiles_one_graph_per_block_class(
        strategy: str, deeper_tiny: tuple[Path, list[str]], tmp_path: Path) -> None:
    """What a first image costs: two graphs (one per block class) however many blocks there are and
    whichever strategy holds the LoRA; a full-size Flux has 19 + 38 blocks, and a key that differed per
    block cost the `adapter` strategy 57 compiles (H100, 2026-12-07). A swap then compiles nothing."""
    from fastlora_core.engine import FluxEngine
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource

    model, loras = deeper_tiny
    engine = FluxEngine(ModelSource.from_diffusers(model),
                        EngineOptions(dtype="float32", device="cpu", compile="regional", swap_strategy=strategy,
                                      compile_cache_dir=str(tmp_path / "cache")))
    request = GenerateRequest(prompt="a red fox", seed=7, steps=1, width=64, height=64, max_sequence_length=16)
    first = engine.generate(request, LoraStack.of((loras[0], 1.0)))
    assert engine.precompiled is not None
    assert (first.new_compiles, engine.precompiled.stats.compiled) == (2, 2), engine.precompiled.stats
    second = engine.generate(request, LoraStack.of((loras[1], 0.7)))
    assert second.new_compiles == 0
    assert not torch.equal(first.images, second.images)
    engine.release()
