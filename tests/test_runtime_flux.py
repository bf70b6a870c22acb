"""FastLoRA's own Flux transformer (``fastlora_core.runtime.flux``) against diffusers'
``FluxTransformer2DModel``.

Same config and weights -> the same state dict layout, the same ``nn.Linear`` names (what LoRA
adapters target) and the same outputs, bit for bit in float32 (and in bfloat16 too) on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fastlora_core.runtime.flux import FluxAttention, FluxTransformer, native_attention
from fastlora_core.tiny import TINY_TRANSFORMER_CONFIG

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

# FLUX.1-schnell's layout in small: two double-stream and three single-stream blocks, no guidance.
SCHNELL_LIKE: dict[str, Any] = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 2,
                                "num_single_layers": 3, "attention_head_dim": 32, "num_attention_heads": 3,
                                "joint_attention_dim": 48, "pooled_projection_dim": 24, "guidance_embeds": False,
                                "axes_dims_rope": [8, 12, 12]}
# Keys only: out_channels and patch_size change proj_out's shape.
PATCHED: dict[str, Any] = {**SCHNELL_LIKE, "patch_size": 2, "out_channels": 8, "num_layers": 1,
                           "num_single_layers": 1}
CONFIGS = {"tiny": dict(TINY_TRANSFORMER_CONFIG), "schnell_like": SCHNELL_LIKE, "patched": PATCHED}


def _reference(cfg: dict[str, Any], seed: int = 0) -> Any:
    """diffusers' model, seeded random weights plus seeded noise on every parameter (so RMSNorm scales
    are not all ones and a swapped or skipped weight shows)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model: Any = FluxTransformer2DModel(**cfg)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _ours_like(ref: Any) -> FluxTransformer:
    ours = FluxTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def _inputs(cfg: dict[str, Any], *, batch: int = 2, height: int = 6, width: int = 8, text: int = 7,
            guidance: bool, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Random latents / embeddings and position ids as ``FluxPipeline`` makes them (image ids: row and
    column of each 2x2 latent patch; text ids: zeros)."""
    gen = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(height)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(width)[None, :]
    return {
        "hidden_states": torch.randn(batch, height * width, cfg["in_channels"], generator=gen).to(dtype),
        "encoder_hidden_states": torch.randn(batch, text, cfg["joint_attention_dim"], generator=gen).to(dtype),
        "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], generator=gen).to(dtype),
        "timestep": torch.tensor([0.75, 0.3])[:batch].to(dtype),
        "img_ids": img_ids.reshape(height * width, 3).to(dtype),
        "txt_ids": torch.zeros(text, 3).to(dtype),
        "guidance": torch.full([batch], 3.5, dtype=torch.float32) if guidance else None,
    }


def _run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, joint_attention_kwargs={}, return_dict=False)[0]


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[Any, FluxTransformer]:
    ref = _reference(CONFIGS["tiny"], seed=3)
    return ref, _ours_like(ref)


@pytest.fixture(scope="module")
def schnell_pair() -> tuple[Any, FluxTransformer]:
    ref = _reference(SCHNELL_LIKE, seed=4)
    return ref, _ours_like(ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_and_shapes_match_diffusers(name: str) -> None:
    """A diffusers checkpoint loads into ours unchanged: the same keys in the same order, the same
    shapes, and nothing extra (no buffers)."""
    from diffusers import FluxTransformer2DModel

    cfg = CONFIGS[name]
    with torch.device("meta"):
        ref: Any = FluxTransformer2DModel(**cfg)
        ours = FluxTransformer.from_config({**cfg, "_class_name": "FluxTransformer2DModel",
                                            "_diffusers_version": "0.42.1"})
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert list(ours.named_buffers()) == []
    assert len(our_sd) > 20


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_module_names_match_diffusers(name: str) -> None:
    """LoRA adapters target Linear layers by module name: ours has exactly diffusers' (with the same
    in / out features and bias), e.g. ``transformer_blocks.0.ff.net.0.proj``."""
    from diffusers import FluxTransformer2DModel

    cfg = CONFIGS[name]

    def linears(model: torch.nn.Module) -> dict[str, tuple[int, int, bool]]:
        return {n: (m.in_features, m.out_features, m.bias is not None)
                for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    with torch.device("meta"):
        ref: Any = FluxTransformer2DModel(**cfg)
        ours = FluxTransformer.from_config(cfg)
    assert linears(ours) == linears(ref)
    assert "transformer_blocks.0.attn.to_out.0" in linears(ours)
    assert "single_transformer_blocks.0.proj_mlp" in linears(ours)
    # The whole module tree has diffusers' names (Dropout / SiLU leaves included).
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]


def test_config_and_properties(tiny_pair: tuple[Any, FluxTransformer]) -> None:
    """The pipeline and the engine read ``transformer.config.<key>``, ``.dtype`` and ``.device``."""
    ref, ours = tiny_pair
    for key in ("in_channels", "guidance_embeds", "num_layers", "num_single_layers", "pooled_projection_dim"):
        assert getattr(ours.config, key) == getattr(ref.config, key)
        assert ours.config[key] == ref.config[key]
    assert list(ours.config.axes_dims_rope) == list(ref.config.axes_dims_rope)
    assert ours.out_channels == ref.out_channels and ours.inner_dim == ref.inner_dim
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    assert isinstance(ours.transformer_blocks, torch.nn.ModuleList)
    assert isinstance(ours.single_transformer_blocks, torch.nn.ModuleList)
    with pytest.raises(AttributeError):
        ours.config.in_channels = 3  # type: ignore[misc]


def test_float32_bitwise_equal_with_guidance(tiny_pair: tuple[Any, FluxTransformer]) -> None:
    """FLUX.1-dev-like (guidance embedder): float32 output is bitwise diffusers'."""
    ref, ours = tiny_pair
    inputs = _inputs(CONFIGS["tiny"], guidance=True)
    expected, got = _run(ref, inputs), _run(ours, inputs)
    assert got.shape == (2, 48, 16)
    assert expected.abs().mean() > 0.01 and not torch.equal(got[0], got[1])
    assert torch.equal(got, expected)
    with torch.no_grad():  # return_dict=True: an object with .sample
        assert torch.equal(ours(**inputs).sample, expected)
    # Guidance takes part: another guidance scale gives another output.
    assert not torch.equal(_run(ours, {**inputs, "guidance": torch.full([2], 1.0)}), got)


def test_float32_bitwise_equal_without_guidance(schnell_pair: tuple[Any, FluxTransformer]) -> None:
    """FLUX.1-schnell-like (no guidance embedder, guidance=None), 2 double + 3 single blocks."""
    ref, ours = schnell_pair
    inputs = _inputs(SCHNELL_LIKE, guidance=False, height=5, width=7, text=9)
    expected, got = _run(ref, inputs), _run(ours, inputs)
    assert got.shape == (2, 35, 64) and expected.abs().mean() > 0.01
    assert torch.equal(got, expected)


def test_bfloat16_bitwise_equal(schnell_pair: tuple[Any, FluxTransformer]) -> None:
    """In bfloat16 the outputs are bitwise equal too (tolerance 0: the same ops in the same order)."""
    ref, ours = schnell_pair
    ref_bf, ours_bf = _reference(SCHNELL_LIKE, seed=4).to(torch.bfloat16), _ours_like(ref).to(torch.bfloat16)
    inputs = _inputs(SCHNELL_LIKE, guidance=False, dtype=torch.bfloat16)
    expected, got = _run(ref_bf, inputs), _run(ours_bf, inputs)
    assert got.dtype == torch.bfloat16 and ours_bf.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_bfloat16_with_guidance_bitwise_equal(tiny_pair: tuple[Any, FluxTransformer]) -> None:
    """bfloat16 with the guidance embedder (float32 guidance input, as the pipeline passes it)."""
    ref, ours = tiny_pair
    ref_bf = _reference(CONFIGS["tiny"], seed=3).to(torch.bfloat16)
    ours_bf = _ours_like(ref).to(torch.bfloat16)
    inputs = _inputs(CONFIGS["tiny"], guidance=True, dtype=torch.bfloat16)
    assert torch.equal(_run(ours_bf, inputs), _run(ref_bf, inputs))


def test_meta_build_then_assign_load(tiny_pair: tuple[Any, FluxTransformer]) -> None:
    """The loader's path: build on the meta device, ``load_state_dict(strict=True, assign=True)``;
    nothing stays on meta and the output is diffusers'."""
    ref, _ = tiny_pair
    with torch.device("meta"):
        ours = FluxTransformer.from_config(dict(ref.config))
    assert ours.device.type == "meta"
    ours.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    ours.eval()
    assert all(p.device.type == "cpu" for p in ours.parameters())
    inputs = _inputs(CONFIGS["tiny"], guidance=True, seed=7)
    assert torch.equal(_run(ours, inputs), _run(ref, inputs))


def test_3d_ids_use_the_first_entry(tiny_pair: tuple[Any, FluxTransformer],
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Batched (3-D) img_ids / txt_ids: diffusers warns and uses ``[0]``; so does ours."""
    ref, ours = tiny_pair
    inputs = _inputs(CONFIGS["tiny"], guidance=True)
    batched = {**inputs, "img_ids": inputs["img_ids"][None].expand(2, -1, -1),
               "txt_ids": inputs["txt_ids"][None].expand(2, -1, -1)}
    with caplog.at_level("WARNING", logger="fastlora_core.runtime.flux"):
        got = _run(ours, batched)
    assert "deprecated" in caplog.text
    assert torch.equal(got, _run(ours, inputs))
    assert torch.equal(got, _run(ref, batched))


def test_attention_goes_through_attend(tiny_pair: tuple[Any, FluxTransformer]) -> None:
    """Every block's attention runs through ``FluxAttention.attend`` (``attention_fn``), so another
    kernel can be swapped in there: a counting wrapper sees one call per block, and a kernel that
    returns something else changes the output."""
    _, ours = tiny_pair
    inputs = _inputs(CONFIGS["tiny"], guidance=True)
    baseline = _run(ours, inputs)
    calls: list[tuple[int, ...]] = []

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return native_attention(q, k, v)

    attns = [m for m in ours.modules() if isinstance(m, FluxAttention)]
    try:
        for m in attns:
            m.attention_fn = counting
        assert torch.equal(_run(ours, inputs), baseline)
        assert calls == [(2, 7 + 48, 2, 16)] * (len(ours.transformer_blocks) + len(ours.single_transformer_blocks))
        for m in attns:
            m.attention_fn = lambda q, k, v: torch.zeros_like(q)
        assert not torch.equal(_run(ours, inputs), baseline)
    finally:
        for m in attns:
            m.attention_fn = None


def test_unsupported_arguments_are_refused(tiny_pair: tuple[Any, FluxTransformer]) -> None:
    """ControlNet / IP-adapter inputs and attention kwargs are refused, not silently ignored; None
    ControlNet inputs and ``{"scale": 1.0}`` are accepted (no-ops in diffusers too)."""
    _, ours = tiny_pair
    inputs = _inputs(CONFIGS["tiny"], guidance=True)
    with torch.no_grad(), pytest.raises(TypeError, match="controlnet_block_samples"):
        ours(**inputs, controlnet_block_samples=[torch.zeros(2, 48, 32)])
    with torch.no_grad(), pytest.raises(TypeError, match="not_an_argument"):
        ours(**inputs, not_an_argument=1)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="ip_adapter_image_embeds"):
        ours(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(1)]})
    with torch.no_grad(), pytest.raises(NotImplementedError, match="scale"):
        ours(**inputs, joint_attention_kwargs={"scale": 0.5})
    baseline = _run(ours, inputs)
    with torch.no_grad():
        out = ours(**inputs, joint_attention_kwargs={"scale": 1.0}, controlnet_block_samples=None,
                   return_dict=False)[0]
    assert torch.equal(out, baseline)


def test_module_imports_no_diffusers_transformers_or_peft() -> None:
    """The point of the module: importing it pays for none of diffusers / transformers / peft."""
    code = ("import sys; import fastlora_core.runtime.flux; "
            "assert not any(m.split('.')[0] in ('diffusers','transformers','peft') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers','transformers','peft'))[:5]")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
