"""FastLoRA's own Flux VAE (``fastlora_core.runtime.vae``) against diffusers' ``AutoencoderKL``.

What the pipeline and the engine rely on: the same checkpoint keys load strictly, ``decode`` gives the
same images and ``encode(...).latent_dist`` the same posterior, bit for bit in float32 and bfloat16."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlora_core.runtime.vae import FluxVAE

ROOT = Path(__file__).resolve().parents[1]
#: Flux's VAE layout at a small width (two levels, so down/upsampling and shortcut convolutions run).
SMALL = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
         "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 2, "latent_channels": 16,
         "norm_num_groups": 8, "use_quant_conv": False, "use_post_quant_conv": False,
         "scaling_factor": 0.3611, "shift_factor": 0.1159, "in_channels": 3, "out_channels": 3}
QUANT_CONV = {**SMALL, "use_quant_conv": True, "use_post_quant_conv": True, "block_out_channels": [16, 32],
              "layers_per_block": 1}


def _pair(config: dict, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ref = AutoencoderKL(**config).eval()
    with torch.no_grad():  # non-trivial norms and biases everywhere
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = FluxVAE.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _tiny_config() -> dict:
    from fastlora_core.tiny import build_tiny_pipeline

    return dict(build_tiny_pipeline().vae.config)


@pytest.mark.parametrize("name", ["small", "quant_conv", "tiny"])
def test_state_dict_keys_and_shapes_match(name) -> None:
    from diffusers import AutoencoderKL

    config = {"small": SMALL, "quant_conv": QUANT_CONV}.get(name) or _tiny_config()
    ref = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    ours = FluxVAE.from_config(config)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
           [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    assert not list(ours.buffers())


@pytest.mark.parametrize("config", [SMALL, QUANT_CONV], ids=["small", "quant_conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_and_encode_are_bitwise_diffusers(config, dtype) -> None:
    ref, ours = _pair(config)
    ref, ours = ref.to(dtype), ours.to(dtype)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, 8, 6, generator=g).to(dtype)
    images = torch.rand(2, 3, 32, 24, generator=g).to(dtype) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(ours.decode(z, return_dict=False)[0], ref.decode(z, return_dict=False)[0])
        a, b = ours.encode(images).latent_dist, ref.encode(images).latent_dist
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std) and torch.equal(a.mode(), b.mode())
        s1 = a.sample(torch.Generator().manual_seed(5))
        assert torch.equal(s1, b.sample(torch.Generator().manual_seed(5)))
    assert not torch.equal(ours.decode(z).sample, ours.decode(z * 0.5).sample)  # it does compute


def test_meta_build_then_assign_gives_the_same_decoder() -> None:
    ref, ours = _pair(SMALL, seed=2)
    with torch.device("meta"):
        empty = FluxVAE.from_config(SMALL)
    empty.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in empty.parameters())
    z = torch.randn(1, 16, 4, 4)
    with torch.inference_mode():
        assert torch.equal(empty.decode(z).sample, ref.decode(z).sample)


def test_config_reads_like_diffusers() -> None:
    vae = FluxVAE.from_config({**SMALL, "_class_name": "AutoencoderKL"})
    assert vae.config.scaling_factor == 0.3611 and vae.config["shift_factor"] == 0.1159
    assert vae.config.block_out_channels == (32, 64) and vae.config.force_upcast is True
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        FluxVAE.from_config({**SMALL, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})


def test_the_module_imports_no_diffusers_or_transformers() -> None:
    code = ("import sys, fastlora_core.runtime.vae; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
