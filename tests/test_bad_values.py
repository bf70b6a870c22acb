"""Non-finite and absurd values are refused before anything is written.

A LoRA holding NaN or infinite values, or a strength of NaN, +-inf or 1e30 (headless API calls can
send any number, whatever the widget's range), used to give an all-NaN (black) image without an
error. Now the file is refused (naming the file and the first bad tensor) when it is read, or, read by
the engine's LoRA cache, once where the engine stages it; the strength is refused when the spec is
built; the engine keeps serving its previous stack bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlora_core.engine import FluxEngine
from fastlora_core.errors import LoraFormatError, OptionsError
from fastlora_core.lora.cache import LoraCache
from fastlora_core.lora.formats import read_lora
from fastlora_core.specs import (
    MAX_LORA_STRENGTH,
    EngineOptions,
    GenerateRequest,
    LoraSpec,
    LoraStack,
    ModelSource,
)

CPU = EngineOptions(dtype="float32", device="cpu", compile="off", max_rank=32)


def _poisoned(src: str, dst: Path, value: float, which: int = -1) -> tuple[Path, str]:
    """A copy of ``src`` with one element of one tensor set to ``value``; returns (path, key)."""
    tensors = load_file(src)
    key = sorted(tensors)[which]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = value
    save_file(tensors, str(dst))
    return dst, key


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_lora_with_non_finite_values_is_refused_naming_file_and_tensor(
        tiny_loras: dict[str, str], tmp_path: Path, value: float) -> None:
    path, key = _poisoned(tiny_loras["fastlora-tiny-character"], tmp_path / "diverged.safetensors", value)
    with pytest.raises(LoraFormatError) as info:
        read_lora(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg and ("NaN" in msg if math.isnan(value) else "infinite" in msg), msg


def test_lora_with_nan_alpha_in_metadata_is_refused(tiny_loras: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "meta.safetensors"
    save_file(load_file(tiny_loras["fastlora-tiny-style"]), str(path),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": math.nan, "transformer.r": 4})})
    with pytest.raises(LoraFormatError, match=r"meta\.safetensors.*alpha nan"):
        read_lora(path)


@pytest.mark.parametrize("strategy", ["fused", "adapter"])
def test_engine_refuses_a_non_finite_lora_and_keeps_its_stack(
        tiny_source: ModelSource, tiny_loras: dict[str, str], tiny_request: GenerateRequest, tmp_path: Path,
        strategy: str) -> None:
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, swap_strategy=strategy), lora_cache=LoraCache())
    good = LoraStack.of((tiny_loras["fastlora-tiny-style"], 1.0))
    before = engine.generate(tiny_request, good).images
    path, key = _poisoned(tiny_loras["fastlora-tiny-style"], tmp_path / "nan.safetensors", math.nan, which=0)
    with pytest.raises(LoraFormatError, match="NaN") as info:
        engine.generate(tiny_request, good.plus(LoraSpec.of(path, 0.5)))
    assert str(path) in str(info.value) and key in str(info.value)  # the file's own tensor name
    assert engine.loaded_stack == good
    after = engine.generate(tiny_request, good).images
    assert torch.equal(after, before) and bool(torch.isfinite(after).all())


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf, 1e30, MAX_LORA_STRENGTH + 0.5, "abc", None, True])
def test_bad_strengths_are_refused_when_the_spec_is_built(tiny_loras: dict[str, str], strength: object) -> None:
    path = tiny_loras["fastlora-tiny-style"]
    with pytest.raises(OptionsError, match=r"strength=.*(out of range|not a number)") as info:
        LoraSpec.of(path, strength)  # type: ignore[arg-type]
    assert "fastlora-tiny-style.safetensors" in str(info.value)
    with pytest.raises(OptionsError):
        LoraSpec(path, strength)  # type: ignore[arg-type]  # the constructor itself checks too
    with pytest.raises(OptionsError):
        LoraStack.of((path, strength))  # type: ignore[arg-type]


def test_strengths_within_comfyuis_range_are_accepted(tiny_loras: dict[str, str]) -> None:
    path = tiny_loras["fastlora-tiny-style"]
    for s in (-MAX_LORA_STRENGTH, -1, 0, 0.5, 1, MAX_LORA_STRENGTH):
        assert LoraSpec.of(path, s).strength == float(s)


def test_finite_check_fast_path_never_hides_a_bad_value_or_flags_a_good_one() -> None:
    """first_non_finite sums first (NaN and infinities propagate through a sum) and checks element
    by element only when the sum is not finite: huge finite values whose float32 sum overflows are
    still accepted, one NaN or inf among millions is still found, fp8 tensors are read."""
    from fastlora_core.lora.formats import first_non_finite

    huge = torch.full((4,), 3.0e38, dtype=torch.bfloat16)  # sum overflows float32, values are finite
    assert first_non_finite({"a": huge, "b": torch.zeros(3)}) is None
    big = torch.randn(1000, 1000, dtype=torch.bfloat16)
    big[517, 3] = float("nan")
    assert first_non_finite({"z": torch.ones(2), "w": big}) == ("w", 1, "NaN")
    neg = torch.zeros(10, dtype=torch.float16)
    neg[2] = float("-inf")
    assert first_non_finite({"n": neg}) == ("n", 1, "infinite")
    fp8 = torch.randn(64, 64).to(torch.float8_e4m3fn)
    assert first_non_finite({"q": fp8}) is None
    assert first_non_finite({"q": torch.full((4,), float("nan")).to(torch.float8_e4m3fn)}) == ("q", 4, "NaN")
    assert first_non_finite({"i": torch.arange(5)}) is None  # integers have no NaN


def test_a_files_values_are_checked_once_where_the_engine_stages_them(
        tiny_source: ModelSource, tiny_loras: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's LoRA cache reads a file without the CPU check (~100 ms for a rank-64 Flux LoRA);
    the engine checks the staged copy (3-4 ms on a GPU) the first time, and never again."""
    from fastlora_core import engine as engine_module

    cache = LoraCache()
    engine = FluxEngine(tiny_source, CPU, lora_cache=cache)
    checked: list[str] = []
    real = engine_module.check_values
    monkeypatch.setattr(engine_module, "check_values", lambda lora: checked.append(lora.path) or real(lora))
    path = tiny_loras["fastlora-tiny-style"]
    assert not cache.get(path)[1].values_checked
    for strength in (1.0, 0.5, None, 1.0):
        engine.apply(LoraStack.of((path, strength)) if strength is not None else LoraStack())
    assert len(checked) == 1 and checked[0].endswith("fastlora-tiny-style.safetensors")
    assert cache.get(path)[1].values_checked
