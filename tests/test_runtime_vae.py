"""FastLoRA's own Flux VAE (``fastlora_core.runtime.vae``) against diffusers' ``AutoencoderKL``.

What the pipeline and the engine rely on: the same checkpoint keys load strictly (Flux's real layout,
the tiny model's, with and without quant convs), ``decode`` gives the same images and
``encode(...).latent_dist`` the same posterior, bit for bit in float32 and in bfloat16, also when
built on the meta device and loaded with ``assign=True`` (the loader's path); and importing the
module pulls in no diffusers / transformers / peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fastlora_core.runtime.vae import FluxVAE

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
#: Flux's VAE layout at a small width (two levels, so down/upsampling and shortcut convolutions run).
SMALL: dict[str, Any] = {
    "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 2, "latent_channels": 16,
    "norm_num_groups": 8, "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "in_channels": 3, "out_channels": 3, "mid_block_add_attention": True,
    "act_fn": "silu", "force_upcast": True}
#: diffusers' default quant convs on (SD-style checkpoints have them; the state dict must too).
QUANT_CONV: dict[str, Any] = {**SMALL, "use_quant_conv": True, "use_post_quant_conv": True,
                              "block_out_channels": [16, 32], "layers_per_block": 1}
#: Three levels, no mid-block attention (keys only).
NO_ATTN: dict[str, Any] = {**SMALL, "block_out_channels": [8, 16, 16], "norm_num_groups": 4,
                           "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
                           "mid_block_add_attention": False}
#: The real Flux.1 autoencoder config the loader starts from (built on meta: keys and shapes only).
FLUX = json.loads((ROOT / "fastlora_core" / "configs" / "ae.json").read_text())


def _diffusers_vae(config: dict[str, Any], seed: int = 0) -> Any:
    """diffusers' model with seeded random weights plus seeded noise on every parameter (so group-norm
    scales are not ones and biases not zeros: a skipped or swapped weight shows)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ref = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def _ours_from(ref: Any) -> FluxVAE:
    """Ours built from the reference's own config, loaded strictly with its state dict, in the same
    ``requires_grad`` state: torch picks a different matmul path for ``nn.Linear`` on a 3-D strided
    input when the weight requires grad (even under ``inference_mode``), so the two only round alike
    when that flag matches too (the loaders set ``requires_grad_(False)``, as the tiny pipeline does)."""
    ours = FluxVAE.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.requires_grad_(next(ref.parameters()).requires_grad)


@pytest.fixture(scope="module")
def tiny_vae() -> Any:
    """The project's tiny VAE (``build_tiny_pipeline``), weights and config as the tests' model has them."""
    from fastlora_core.tiny import build_tiny_pipeline

    return build_tiny_pipeline().vae


def _layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("config", [SMALL, QUANT_CONV, NO_ATTN], ids=["small", "quant_conv", "no_attention"])
def test_state_dict_keys_and_shapes_match(config: dict[str, Any]) -> None:
    """A diffusers-layout checkpoint loads strictly: same keys, order and shapes, quant convs exactly
    when the config asks for them, the attention's ``to_q/to_k/to_v/to_out.0`` and ``group_norm``."""
    from diffusers import AutoencoderKL

    ref = AutoencoderKL(**config)
    ours = FluxVAE.from_config(config)
    assert _layout(ours) == _layout(ref)
    keys = set(ours.state_dict())
    assert ("quant_conv.weight" in keys) is config["use_quant_conv"]
    assert ("post_quant_conv.weight" in keys) is config["use_post_quant_conv"]
    assert ("decoder.mid_block.attentions.0.to_out.0.weight" in keys) is config["mid_block_add_attention"]
    assert not list(ours.buffers())


def test_flux_config_layout_matches_on_meta() -> None:
    """The real Flux.1 ``ae.safetensors`` layout (4 levels, 512 wide, attention, no quant convs), both
    built on meta so nothing is allocated; the config reads as the pipeline and engine read it."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL.from_config(FLUX)
        ours = FluxVAE.from_config(FLUX)
    assert _layout(ours) == _layout(ref)
    assert len(_layout(ours)) > 200 and "encoder.mid_block.attentions.0.group_norm.weight" in ours.state_dict()
    assert all(p.is_meta for p in ours.parameters()) and ours.device.type == "meta"
    cfg = ours.config
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.latent_channels, cfg.force_upcast) == (0.3611, 0.1159, 16, True)
    assert cfg.block_out_channels == (128, 256, 512, 512) and 2 ** (len(cfg.block_out_channels) - 1) == 8
    assert dict(ours.config) == {k: (tuple(v) if isinstance(v, list) else v) for k, v in ref.config.items()
                                 if not k.startswith("_")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [SMALL, QUANT_CONV], ids=["small", "quant_conv"])
def test_decode_and_encode_are_bitwise_diffusers(config: dict[str, Any], dtype: torch.dtype) -> None:
    """Same weights, same inputs -> the same images and posterior, bit for bit (bf16 too: the same ops
    in the same order give the same roundings), batch of two, non-square."""
    ref = _diffusers_vae(config).to(dtype)
    ours = _ours_from(ref).to(dtype)
    assert ours.dtype == dtype
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, 8, 6, generator=g).to(dtype)
    images = (torch.rand(2, 3, 32, 24, generator=g) * 2 - 1).to(dtype)
    with torch.inference_mode():
        out = ours.decode(z, return_dict=False)[0]
        assert out.shape == (2, 3, 16, 12) and out.dtype == dtype
        assert torch.equal(out, ref.decode(z, return_dict=False)[0])
        assert torch.equal(ours.decode(z).sample, out)
        a, b = ours.encode(images).latent_dist, ref.encode(images).latent_dist
        assert a.mean.shape == (2, 16, 16, 12)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std) and torch.equal(a.mode(), b.mode())
        assert torch.equal(a.var, b.var) and torch.equal(a.logvar, b.logvar)
        assert torch.equal(ours.encode(images, return_dict=False)[0].mean, b.mean)
        assert torch.equal(a.sample(torch.Generator().manual_seed(5)), b.sample(torch.Generator().manual_seed(5)))
        gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
        assert torch.equal(a.sample(gens), b.sample([torch.Generator().manual_seed(s) for s in (7, 8)]))
        assert torch.equal(ours(images).sample, ref(images).sample)
        # It computes: the output follows the input, and the posterior is not a constant.
        assert not torch.equal(out, ours.decode(z * 0.5).sample)
        assert a.std.std() > 0 and a.mean.std() > 0


def test_tiny_project_vae_is_bitwise_diffusers(tiny_vae: Any) -> None:
    """The tests' tiny model (one level, 4 channels, one norm group): its own config and weights."""
    ours = _ours_from(tiny_vae)
    assert _layout(ours) == _layout(tiny_vae)
    assert ours.config.scaling_factor == tiny_vae.config.scaling_factor
    assert ours.config.shift_factor == tiny_vae.config.shift_factor
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, tiny_vae.config.latent_channels, 8, 8, generator=g)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(ours.decode(z, return_dict=False)[0], tiny_vae.decode(z, return_dict=False)[0])
        a, b = ours.encode(images).latent_dist, tiny_vae.encode(images).latent_dist
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)


def test_meta_build_then_assign_gives_the_same_outputs() -> None:
    """The loader's path: build on meta, ``load_state_dict(strict=True, assign=True)``, then run."""
    ref = _diffusers_vae(SMALL, seed=2)
    with torch.device("meta"):
        empty = FluxVAE.from_config(SMALL)
    assert all(p.is_meta for p in empty.parameters())
    empty.load_state_dict(ref.state_dict(), strict=True, assign=True)
    empty.eval().requires_grad_(False)  # as the loaders leave it
    ref.requires_grad_(False)
    assert not any(p.is_meta for p in empty.parameters()) and empty.device.type == "cpu"
    z = torch.randn(2, 16, 4, 4)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(empty.decode(z).sample, ref.decode(z).sample)
        assert torch.equal(empty.encode(images).latent_dist.mean, ref.encode(images).latent_dist.mean)


def test_config_reads_like_diffusers_and_refuses_what_it_lacks() -> None:
    """Unknown and private keys are ignored, defaults are diffusers'; block types and tiling / slicing
    this module does not implement fail loudly instead of running something else."""
    vae = FluxVAE.from_config({**SMALL, "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
                               "some_future_key": 1})
    assert vae.config.scaling_factor == 0.3611 and vae.config["shift_factor"] == 0.1159
    assert vae.config.block_out_channels == (32, 64) and vae.config.force_upcast is True
    assert "_class_name" not in vae.config and vae.config.sample_size == 32
    assert FluxVAE.from_config({}).config.use_quant_conv is True  # diffusers' default
    with pytest.raises(AttributeError):
        _ = vae.config.no_such_key
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        FluxVAE.from_config({**SMALL, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(NotImplementedError, match="tiled"):
        vae.enable_tiling()
    with pytest.raises(NotImplementedError, match="sliced"):
        vae.enable_slicing()
    vae.disable_tiling()
    vae.disable_slicing()


def test_the_module_imports_no_diffusers_or_transformers() -> None:
    """The point of the module (start-up time): importing it loads none of the heavy libraries."""
    code = ("import sys, fastlora_core.runtime.vae; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}); "
            "assert 'torch' in sys.modules and not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
