"""The single blocks' fp8 output projection with its input made in one kernel (decision 44).

On the CPU the op runs its torch rule (:func:`fp8_projection.reference`), so what these tests check
there is the plumbing a user relies on: the block gives torchao's own answer bit for bit, a block
whose ``proj_out`` was replaced later falls back, layers it cannot stand in for are refused, the
block still compiles as one graph, and a saved graph of one form is never loaded for the other. The
Triton kernel itself is checked against the rule on a GPU (last test).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fastlora_core import block_keys, fp8_projection
from fastlora_core.optimize import _is_quantizable_linear, torchao_config
from fastlora_core.runtime.flux import FluxSingleTransformerBlock


@pytest.fixture
def fp8_block(monkeypatch: pytest.MonkeyPatch) -> FluxSingleTransformerBlock:
    """A small single block with the engine's fp8 layers (torchao refuses fp8 on a CPU only in its
    hardware check; the tensors and their CPU kernels are the same)."""
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import quantize_

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    torch.manual_seed(0)
    block = FluxSingleTransformerBlock(64, 2, 32).to(torch.bfloat16)
    quantize_(block, torchao_config("fp8"), filter_fn=_is_quantizable_linear)
    try:
        with torch.inference_mode():
            block.proj_out(torch.ones(2, 64 * 5, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError) as exc:  # torch before 2.13 had no CPU row-wise fp8 matmul
        pytest.skip(f"this torch {torch.__version__} cannot run a row-wise fp8 linear on the CPU: {exc}")
    return block


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 24, 64, generator=g).bfloat16(), torch.randn(1, 8, 64, generator=g).bfloat16(),
            torch.randn(1, 64, generator=g).bfloat16())


def _counting(calls: list[int]):
    def out_projection(linear, attn, mlp):  # type: ignore[no-untyped-def]
        calls.append(1)
        return fp8_projection.project(linear, attn, mlp)

    return out_projection


def test_the_block_with_the_fused_projection_gives_torchaos_answer_bit_for_bit(fp8_block) -> None:  # type: ignore[no-untyped-def]
    why = fp8_projection.why_not(fp8_block.proj_out, fp8_block.act_mlp)
    assert why is None, why
    calls: list[int] = []
    with torch.inference_mode():
        plain = fp8_block(*_inputs())
        fp8_block.out_projection = _counting(calls)
        fused = fp8_block(*_inputs())
    assert calls == [1]
    for a, b in zip(plain, fused):
        assert torch.equal(a, b), f"max difference {(a.float() - b.float()).abs().max().item()}"


def test_the_engines_fp8_layers_keep_torchaos_torch_kernels_whatever_is_installed(
        fp8_block, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """torchao's default picks MSLK's kernels wherever that package imports, and asks the import system
    in every uncompiled fp8 linear call. The engine pins the torch path that its swap kernels and this
    projection reproduce: the same quantised weights as torchao's default where MSLK is absent, no
    import-path search per call, and the fused projection still used where MSLK is installed."""
    import importlib.util

    from torchao.quantization import Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows.float8 import float8_tensor

    weight = fp8_block.proj_out.weight
    hp = weight.dequantize()
    default = Float8Tensor.from_hp(hp, granularity=PerRow())
    pinned = Float8Tensor.from_hp(hp, granularity=PerRow(), kernel_preference=weight.kernel_preference)
    assert torch.equal(default.qdata.view(torch.uint8), pinned.qdata.view(torch.uint8))
    assert torch.equal(default.scale, pinned.scale)

    searched: list[str] = []
    find_spec = importlib.util.find_spec

    def recording(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        searched.append(name)
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", recording)
    with torch.inference_mode():
        fp8_block.proj_out(torch.ones(2, 64 * 5, dtype=torch.bfloat16))
    assert "mslk" not in searched

    monkeypatch.setattr(float8_tensor, "_is_mslk_available", lambda: True)  # as where MSLK is installed
    assert fp8_projection.why_not(fp8_block.proj_out, fp8_block.act_mlp) is None


def test_a_proj_out_replaced_after_install_falls_back_to_the_plain_path(fp8_block) -> None:  # type: ignore[no-untyped-def]
    class Wrapped(torch.nn.Module):  # what a LoRA layer put in place of proj_out looks like to the block
        def __init__(self, base: torch.nn.Module) -> None:
            super().__init__()
            self.base = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + 1

    calls: list[int] = []
    with torch.inference_mode():
        plain = fp8_block(*_inputs())
        fp8_block.out_projection = _counting(calls)
        fp8_block.proj_out = Wrapped(fp8_block.proj_out)
        wrapped = fp8_block(*_inputs())
    assert calls == []
    assert not torch.equal(plain[1], wrapped[1])  # the wrapper's +1, gated, reached the output


def test_layers_the_kernel_cannot_stand_in_for_are_refused_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    tanh, erf = torch.nn.GELU(approximate="tanh"), torch.nn.GELU()
    bf16 = torch.nn.Linear(64, 32).bfloat16()
    assert "Float8Tensor" in str(fp8_projection.why_not(bf16, tanh))
    per_tensor = torch.nn.Linear(64, 32).bfloat16()
    quantize_(per_tensor, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False))
    assert "row-wise" in str(fp8_projection.why_not(per_tensor, tanh))
    per_row = torch.nn.Linear(64, 32).bfloat16()
    quantize_(per_row, torchao_config("fp8"))
    assert fp8_projection.why_not(per_row, tanh) is None
    assert "GELU" in str(fp8_projection.why_not(per_row, erf))


def test_install_sets_nothing_off_a_cuda_gpu(fp8_block) -> None:  # type: ignore[no-untyped-def]
    holder = torch.nn.Module()
    holder.single_transformer_blocks = torch.nn.ModuleList([fp8_block])
    assert fp8_projection.install(holder, torch.device("cpu")) == 0
    assert fp8_block.out_projection is None


def test_a_kernel_that_is_not_the_rule_bit_for_bit_is_never_installed(fp8_block, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    cpu = torch.device("cpu")
    monkeypatch.setattr(fp8_projection, "_kernel_ok", {})
    assert fp8_projection.kernel_ok(cpu)  # on the CPU ``_run`` is the rule itself

    def off_by_one_scale(attn, mlp):  # type: ignore[no-untyped-def]
        q, scale = fp8_projection.reference(attn, mlp)
        return q, torch.nextafter(scale, torch.full_like(scale, 1.0))

    def broken(attn, mlp):  # type: ignore[no-untyped-def]
        raise RuntimeError("no kernel image for this GPU")

    for run in (off_by_one_scale, broken):
        monkeypatch.setattr(fp8_projection, "_kernel_ok", {})
        monkeypatch.setattr(fp8_projection, "_run", run)
        assert fp8_projection.kernel_ok(cpu) is False
    # install asks the check before it sets a single slot
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    holder = torch.nn.Module()
    holder.single_transformer_blocks = torch.nn.ModuleList([fp8_block])
    monkeypatch.setattr(fp8_projection, "kernel_ok", lambda device: False)
    assert fp8_projection.install(holder, torch.device("cuda", 0)) == 0 and fp8_block.out_projection is None
    monkeypatch.setattr(fp8_projection, "kernel_ok", lambda device: True)
    assert fp8_projection.install(holder, torch.device("cuda", 0)) == 1
    assert fp8_block.out_projection is fp8_projection.project


def test_the_expected_compiles_specimen_sets_the_slot_without_building_the_kernel(fp8_block, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Decision 47's worker fingerprints its specimen as the serving process's blocks will be; the kernel's
    check (a Triton build on a cold start, on the announcement's critical path) is left to that process."""
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))

    def no_check(device):  # type: ignore[no-untyped-def]
        raise AssertionError("the kernel was checked")

    monkeypatch.setattr(fp8_projection, "kernel_ok", no_check)
    holder = torch.nn.Module()
    holder.single_transformer_blocks = torch.nn.ModuleList([fp8_block])
    assert fp8_projection.install(holder, torch.device("cuda", 0), check_kernel=False) == 1
    assert fp8_block.out_projection is fp8_projection.project


def test_the_block_compiles_as_one_graph_and_its_saved_graph_key_names_the_form(fp8_block) -> None:  # type: ignore[no-untyped-def]
    plain_key = block_keys.fingerprint(fp8_block).digest
    fp8_block.out_projection = fp8_projection.project
    assert block_keys.fingerprint(fp8_block).digest != plain_key  # a saved plain graph is never loaded for it
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = fp8_block(*_inputs())
        compiled = torch.compile(fp8_block, fullgraph=True)(*_inputs())
    # inductor's CPU code rounds differently from eager (fused gelu and scales): a stated tolerance
    for a, b in zip(eager, compiled):
        assert (a.float() - b.float()).norm() / a.float().norm() < 0.02


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs an NVIDIA GPU with fp8")
def test_the_triton_kernel_is_the_torch_rule_bit_for_bit_on_the_gpu() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    # Flux's single block at 1024x1024 (4608 rows of 3072 + 12288), and a ragged small case; the
    # attention output as a non-contiguous view, as a transpose would hand it over
    for rows, ka, km in ((4608, 3072, 12288), (37, 48, 112)):
        attn = (torch.randn(ka, rows, device="cuda", generator=g) * 3).bfloat16().t()[None]
        mlp = (torch.randn(1, rows, km, device="cuda", generator=g) * 2).bfloat16()
        attn[0, 5, 7] = 300.0  # a row whose maximum is in the attention part
        q, scale = fp8_projection.gelu_cat_fp8(attn, mlp)
        ref_q, ref_scale = fp8_projection.reference(attn, mlp)
        assert torch.equal(scale, ref_scale)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
