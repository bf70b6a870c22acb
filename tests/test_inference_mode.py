"""Swaps work whatever autograd mode the caller is in.

ComfyUI runs every node under ``torch.inference_mode()`` (so an engine built or swapped there creates
inference tensors), a script or server using the library calls it in plain mode, and one process may
do both (a headless API process, a benchmark, a custom node calling the library). Tensors an engine
keeps between calls (fused scratch buffers and masters, adapter slots, the weights themselves) must not
make a later swap fail because an earlier call ran in the other mode.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from test_engine_external import inputs  # tests/ is on sys.path

from fastlora_core import registry
from fastlora_core.specs import EngineOptions, LoraStack, ModelSource

MODES = {"inference": torch.inference_mode, "plain": contextlib.nullcontext}


@pytest.mark.parametrize("strategy", ["fused", "adapter"])
@pytest.mark.parametrize("order", [("inference", "plain"), ("plain", "inference")])
def test_swaps_in_either_autograd_mode_after_the_other(tiny_dir: Path, tiny_loras: dict[str, str], strategy: str,
                                                       order: tuple[str, str]) -> None:
    first, then = (MODES[m] for m in order)
    options = EngineOptions(dtype="float32", device="cpu", compile="off", swap_strategy=strategy, max_rank=16)
    with first():  # the engine is built (and first swapped) in the first mode
        engine = registry.get_engine(ModelSource.transformer_alone(tiny_dir), options)
        engine.prepare_slot(list(tiny_loras.values())[:2]) if strategy == "adapter" else None
    x = inputs(engine, seed=3)
    a, b = (LoraStack.of((p, 0.8)) for p in list(tiny_loras.values())[:2])
    with torch.inference_mode():
        base = engine.run_transformer(**x)
    with first():
        engine.prepare_external(a)
    with torch.inference_mode():
        with_a = engine.run_transformer(**x)
    with then():  # the next swaps come in the other mode
        engine.prepare_external(b)
        engine.prepare_external(a)
    with torch.inference_mode():
        again = engine.run_transformer(**x)
    with then():
        engine.prepare_external(LoraStack())
    with torch.inference_mode():
        back = engine.run_transformer(**x)
    assert not torch.equal(with_a, base)
    assert torch.equal(again, with_a) and torch.equal(back, base)
