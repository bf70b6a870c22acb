"""The fused strategy's grouped fp8 path (ARCHITECTURE decision 34), its bookkeeping on the CPU.

On a GPU, per-row fp8 layers whose masters live on the GPU are merged into slices of one scratch
buffer and requantised one group per Triton launch. That needs CUDA; here the two GPU pieces are
replaced by their definitions (``groupable`` without the device test, and a requantisation that
runs torchao's own ``Float8Tensor.from_hp`` on each merged slice), so what the CPU checks is
everything around them: which layers join a group, where a group ends, the slices and the launch
tables, originals restored from the masters, and that the result equals the per-layer path bit for bit.
``tests/test_gpu.py`` runs the real kernels against torchao on the H200.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fastlora_core.lora import fused
from fastlora_core.lora.base import ResolvedEntry
from fastlora_core.lora.cache import FileKey
from fastlora_core.lora.types import LoraLayer, NormalizedLora

SHAPES = [(48, 32), (16, 64), (96, 32), (32, 48), (64, 16), (16, 32)]  # (out, in); widths multiples of 16


class _CpuGroup:
    """Stands in for ``kernels.QuantGroup``: the same offsets check, and the merged slices kept."""

    def __init__(self, x_base: torch.Tensor, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.items = items
        self.offsets = [x.data_ptr() - x_base.data_ptr() for x, _, _ in items]


def _cpu_rowwise(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> None:
    """What both kernels compute: torchao's per-row float8 quantisation of ``x``, into ``qdata`` / ``scale``."""
    from torchao.quantization import Float8Tensor, PerRow

    ref = Float8Tensor.from_hp(x, granularity=PerRow())
    qdata.copy_(ref.qdata)
    scale.copy_(ref.scale.reshape(-1))


def _cpu_requantise(group: _CpuGroup, x_base: torch.Tensor) -> None:
    """The grouped kernel on the CPU: each matrix read from ``x_base`` at the offset its table gives."""
    for (x, qdata, scale), off in zip(group.items, group.offsets):
        start = off // x.element_size()
        _cpu_rowwise(x_base[start:start + x.numel()].view(x.shape), qdata, scale)


@pytest.fixture
def cpu_grouped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The grouped path enabled on the CPU; returns the list of group sizes launched."""
    from fastlora_core import kernels

    launched: list[int] = []

    def requantise(group: _CpuGroup, x_base: torch.Tensor) -> None:
        launched.append(len(group.items))
        _cpu_requantise(group, x_base)

    monkeypatch.setattr(fused.FusedStrategy, "_triton_fp8", lambda self, weight, master: True)
    monkeypatch.setattr(fused, "QuantGroup", _CpuGroup)
    monkeypatch.setattr(kernels, "groupable", lambda x, q, s: x.dtype == torch.bfloat16 and q.shape == x.shape
                        and x.shape[1] % 16 == 0)
    monkeypatch.setattr(kernels, "grouped_rowwise_fp8_quant", requantise)
    monkeypatch.setattr(kernels, "rowwise_fp8_quant_into", _cpu_rowwise)  # the per-layer path (and rollbacks)
    return launched


def _strategy(seed: int = 0) -> tuple[fused.FusedStrategy, torch.nn.Module]:
    from torchao.quantization import Float8Tensor, PerRow

    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    masters = {}
    for i, (o, n) in enumerate(SHAPES):
        lin = torch.nn.Linear(n, o, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, n, generator=g) * 0.1)
        masters[f"l{i}"] = lin.weight.detach().clone()
        lin.weight = torch.nn.Parameter(Float8Tensor.from_hp(lin.weight.detach(), granularity=PerRow()),
                                        requires_grad=False)
        model.add_module(f"l{i}", lin)
    strategy = fused.FusedStrategy({"transformer": model}, "fp8", "cpu")
    strategy._hp_master = masters  # what capture_hp_masters keeps before quantisation
    return strategy, model


def _lora(name: str, seed: int, layers: list[int]) -> NormalizedLora:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        o, n = SHAPES[i]
        out[f"l{i}"] = LoraLayer(torch.randn(4, n, generator=g).to(torch.bfloat16),
                                 torch.randn(o, 4, generator=g).to(torch.bfloat16), 0.5)
    return NormalizedLora(name, "diffusers", out)


def _entry(lora: NormalizedLora, strength: float) -> ResolvedEntry:
    return ResolvedEntry(FileKey(lora.path, 0, 0, 0, 0, lora.path), lora, strength)


def _weights(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.weight.qdata.view(torch.uint8).clone(), m.weight.scale.clone())  # type: ignore[union-attr]
            for n, m in model.named_children()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


A = _lora("a", 1, [0, 1, 2, 3, 4, 5])
B = _lora("b", 2, [1, 3, 5])


@pytest.mark.parametrize("group_bytes", [1, 6000, fused.GROUP_BYTES])  # a layer per group, a few, all
def test_grouped_merge_equals_the_per_layer_merge_bit_for_bit(cpu_grouped: list[int], group_bytes: int) -> None:
    grouped, model = _strategy()
    grouped.group_bytes = group_bytes
    per_layer, reference = _strategy()
    per_layer._grouped_target = lambda key, items: None  # type: ignore[method-assign]
    originals = _weights(model)
    for stack in ([_entry(A, 0.7), _entry(B, -0.4)], [_entry(B, 1.0)], [_entry(A, 0.7), _entry(B, -0.4)], []):
        grouped.apply(stack)
        per_layer.apply(stack)
        assert _same(_weights(model), _weights(reference))
    assert _same(_weights(model), originals)  # the empty stack: the exact originals back
    assert cpu_grouped, "the grouped path was not taken"
    if group_bytes == 1:
        assert set(cpu_grouped) == {1}
    elif group_bytes == fused.GROUP_BYTES:
        assert cpu_grouped[0] == len(SHAPES)  # the first stack touches every layer: one launch
    else:
        assert max(cpu_grouped) < len(SHAPES) and max(cpu_grouped) > 1


def test_a_then_b_then_a_is_bit_identical_and_tables_are_reused(cpu_grouped: list[int]) -> None:
    strategy, model = _strategy()
    strategy.apply([_entry(A, 1.0)])
    after_a = _weights(model)
    tables = dict(strategy._groups)
    strategy.apply([_entry(B, 0.5)])
    strategy.apply([_entry(A, 1.0)])
    assert _same(_weights(model), after_a)
    assert all(strategy._groups[k] is v for k, v in tables.items())  # the same layers: the same table


def test_a_failed_group_rolls_every_layer_back(cpu_grouped: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    from fastlora_core import kernels

    strategy, model = _strategy()
    strategy.apply([_entry(B, 1.0)])
    before = _weights(model)
    calls = {"n": 0}

    def fail_second(group: _CpuGroup, x_base: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("test: out of memory in the second group")
        _cpu_requantise(group, x_base)

    monkeypatch.setattr(kernels, "grouped_rowwise_fp8_quant", fail_second)
    strategy.group_bytes = 6000
    with pytest.raises(torch.OutOfMemoryError):
        strategy.apply([_entry(A, 1.0)])
    assert _same(_weights(model), before)


@pytest.mark.parametrize("path", ["grouped", "per_layer"])
def test_quantised_layers_are_restored_from_their_masters_with_no_second_copy(
        cpu_grouped: list[int], path: str) -> None:
    """A quantised layer's original bytes are its master quantised again, so the strategy keeps no
    copy of them: for Flux.1-dev's 418 LoRA layers that copy was 8.6 GB (on the GPU beside GPU masters,
    in system RAM beside RAM masters, where the first LoRA also had to copy every layer's fp8 bytes
    out). A restore still gives the original bytes exactly."""
    strategy, model = _strategy()
    if path == "per_layer":
        strategy._grouped_target = lambda key, items: None  # type: ignore[method-assign]
    originals = _weights(model)
    strategy.apply([_entry(A, 0.8)])
    strategy.apply([_entry(B, 1.0)])  # layers 0, 2 and 4 go back to their originals here
    assert strategy._orig == {}
    assert all(_same({n: _weights(model)[n]}, {n: originals[n]}) for n in ("l0", "l2", "l4"))
    strategy.apply([])
    assert _same(_weights(model), originals)


def test_with_masters_in_ram_restored_layers_take_their_masters_from_the_feed(
        cpu_grouped: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Masters in system RAM (the 24 GB and 16 GB ``fused`` tiers): a swap's feed plans the layers it
    restores as well as those it merges, so every master crosses once, in groups, and the restored
    layers get their original bytes from it. (The feed needs a GPU; here it runs on the CPU's stager.)"""
    from fastlora_core.lora.master_feed import MasterFeed
    from fastlora_core.lora.staging import PinnedStager

    strategy, model = _strategy()
    strategy._grouped_target = lambda key, items: None  # type: ignore[method-assign]  # RAM masters: per layer
    by_ptr = {t.data_ptr(): n for n, t in strategy._hp_master.items()}
    stager = PinnedStager("cpu")
    sent: list[str] = []

    def counting(wanted):  # type: ignore[no-untyped-def]
        sent.extend(by_ptr[t.data_ptr()] for t, _ in wanted)
        return stager(wanted)

    def feed(self: fused.FusedStrategy, keys: list[tuple[str, str]]) -> MasterFeed:
        return MasterFeed(self._hp_master, [n for part, n in keys if n in self._hp_master],
                          torch.device("cpu"), counting)  # type: ignore[arg-type]

    monkeypatch.setattr(fused.FusedStrategy, "_master_feed", feed)
    originals = _weights(model)
    strategy.apply([_entry(A, 0.8)])
    sent.clear()
    strategy.apply([_entry(B, 1.0)])  # l1, l3 and l5 merged again, l0, l2 and l4 restored
    assert sorted(sent) == [f"l{i}" for i in range(len(SHAPES))]  # each master sent once, restored ones too
    assert all(_same({n: _weights(model)[n]}, {n: originals[n]}) for n in ("l0", "l2", "l4"))
    strategy.apply([])
    assert _same(_weights(model), originals)
