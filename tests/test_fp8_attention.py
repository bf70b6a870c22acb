"""``attention="cudnn_fp8"`` (``fastlora_core.fp8_attention``) on the CPU: it is refused before any
weight is read where it cannot run, and its router sends exactly the marked transformer's attention
calls to the FP8 kernel and every other call to diffusers unchanged. The kernel itself is checked on
the GPU (``tests/test_gpu.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastlora_core import fp8_attention, registry
from fastlora_core.errors import OptionsError
from fastlora_core.specs import EngineOptions, ModelSource
from fastlora_core.tiny import TINY_TRANSFORMER_CONFIG


def test_refused_on_the_cpu_before_anything_is_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = ModelSource.from_diffusers(str(tmp_path / "no-such-model"))
    with pytest.raises(OptionsError) as info:
        registry.get_engine(missing, EngineOptions(device="cpu", dtype="float32", compile="off",
                                                   attention="cudnn_fp8"))
    message = str(info.value)
    assert "compute capability 9.0" in message and "attention=auto" in message


def _transformer(seed: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG).eval()  # type: ignore[arg-type]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c = TINY_TRANSFORMER_CONFIG
    tokens, text = 64, 8
    return {
        "hidden_states": torch.randn(1, tokens, int(c["in_channels"]), generator=g),  # type: ignore[call-overload]
        "encoder_hidden_states": torch.randn(1, text, int(c["joint_attention_dim"]), generator=g),  # type: ignore[call-overload]
        "pooled_projections": torch.randn(1, int(c["pooled_projection_dim"]), generator=g),  # type: ignore[call-overload]
        "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3),
    }


def _run(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(**_inputs(), return_dict=False)[0]


def test_only_the_marked_transformers_attention_takes_the_fp8_kernel(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import diffusers.models.transformers.transformer_flux as flux

    # The router stays installed for the process in real use; here the test puts diffusers' function back.
    monkeypatch.setattr(flux, "dispatch_attention_fn", flux.dispatch_attention_fn)
    monkeypatch.setattr(fp8_attention, "check", lambda device: None)
    monkeypatch.setattr(fp8_attention, "probe", lambda device: None)
    calls: list[tuple[int, ...]] = []

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """What diffusers' native backend computes, so the marked model's output must not change."""
        calls.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))
        return out.permute(0, 2, 1, 3)

    monkeypatch.setattr(fp8_attention, "fp8_sdpa", kernel)
    marked, other = _transformer(0), _transformer(1)
    before_marked, before_other = _run(marked), _run(other)

    layers = fp8_attention.install(marked, torch.device("cpu"))
    assert fp8_attention.install(marked, torch.device("cpu")) == layers  # twice: one router, not two
    assert not hasattr(flux.dispatch_attention_fn.fastlora_original, "fastlora_original")
    blocks = int(TINY_TRANSFORMER_CONFIG["num_layers"]) + int(TINY_TRANSFORMER_CONFIG["num_single_layers"])  # type: ignore[call-overload]
    assert layers == blocks

    assert torch.equal(_run(marked), before_marked)
    assert len(calls) == blocks
    assert all(shape[2:] == (TINY_TRANSFORMER_CONFIG["num_attention_heads"],
                             TINY_TRANSFORMER_CONFIG["attention_head_dim"]) for shape in calls)
    calls.clear()
    assert torch.equal(_run(other), before_other)
    assert calls == []  # another Flux model in the process keeps diffusers' attention


def test_what_fp8_attention_cannot_do_runs_as_diffusers_would(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import diffusers.models.transformers.transformer_flux as flux

    original = flux.dispatch_attention_fn
    original = getattr(original, "fastlora_original", original)
    monkeypatch.setattr(fp8_attention, "fp8_sdpa", lambda q, k, v: pytest.fail("a masked call took the fp8 kernel"))
    router = fp8_attention._router(original)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
    mask = torch.rand(1, 1, 16, 16, generator=g) > 0.3
    got = router(q, k, v, attn_mask=mask, backend=fp8_attention.BACKEND)
    assert torch.equal(got, original(q, k, v, attn_mask=mask))
    assert torch.equal(router(q, k, v, is_causal=True, backend=fp8_attention.BACKEND),
                       original(q, k, v, is_causal=True))


def test_a_second_copy_of_the_module_reuses_the_registered_op(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ComfyUI imports the pack under its folder's name; a process that also imports it as
    ``fastlora_core`` holds two copies of this module, and the second must not fail registering the op."""
    import importlib
    import sys
    import types
    from pathlib import Path

    package = types.ModuleType("fastlora_second_copy")
    package.__path__ = [str(Path(fp8_attention.__file__).parent)]
    monkeypatch.setitem(sys.modules, "fastlora_second_copy", package)
    second = importlib.import_module("fastlora_second_copy.fp8_attention")
    monkeypatch.delitem(sys.modules, "fastlora_second_copy.fp8_attention")
    assert second is not fp8_attention
    assert str(second.cudnn_fp8_sdpa) == "fastlora.cudnn_fp8_sdpa"
