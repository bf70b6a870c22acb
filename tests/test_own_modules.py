"""The loaders and the engine with FastLoRA's own Flux modules (decision 39, issue 13's start-up).

What a user relies on: the same model files give the same weights and the same images whether they go
through FastLoRA's own modules (the default where the options allow) or through diffusers' and
transformers' classes, and a process that loads and samples with the defaults never imports
diffusers, transformers or peft (their imports cost seconds of every start)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastlora_core.engine import run_pipeline
from fastlora_core.loading import load_pipeline, write_single_files
from fastlora_core.optimize import why_not_own_modules
from fastlora_core.runtime.pipeline import FluxRuntimePipeline
from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource

ROOT = Path(__file__).resolve().parents[1]
REQUEST = GenerateRequest(prompt="a fox in the snow", steps=2, width=64, height=48, max_sequence_length=16, seed=3)
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def _same_weights(own, ref) -> None:
    for name in COMPONENTS:
        a, b = getattr(own, name).state_dict(), getattr(ref, name).state_dict()
        assert list(a) == list(b), name
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def single_files(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    from fastlora_core.tiny import build_tiny_pipeline

    paths = write_single_files(build_tiny_pipeline(), tmp_path_factory.mktemp("single"))
    return ModelSource.from_single_files(**paths)


@pytest.mark.parametrize("kind", ["diffusers", "single"])
def test_own_modules_load_the_same_weights_and_sample_the_same_images(kind, tiny_dir, single_files) -> None:
    source = ModelSource.from_diffusers(tiny_dir) if kind == "diffusers" else single_files
    own = load_pipeline(source, torch.float32, own_modules=True)
    ref = load_pipeline(source, torch.float32, own_modules=False)
    assert isinstance(own, FluxRuntimePipeline) and not isinstance(ref, FluxRuntimePipeline)
    assert type(own.transformer).__module__ == "fastlora_core.runtime.flux"
    _same_weights(own, ref)
    image = run_pipeline(own, REQUEST)
    assert image.shape == (1, 48, 64, 3)
    assert torch.equal(image, run_pipeline(ref, REQUEST))


def test_bf16_weights_match_too(tiny_dir) -> None:
    """bf16 (the GPU default): the same weights, T5's float32 rule included (none at bf16)."""
    own = load_pipeline(ModelSource.from_diffusers(tiny_dir), torch.bfloat16, own_modules=True)
    ref = load_pipeline(ModelSource.from_diffusers(tiny_dir), torch.bfloat16, own_modules=False)
    _same_weights(own, ref)
    assert torch.equal(run_pipeline(own, REQUEST), run_pipeline(ref, REQUEST))


def test_a_scheduler_variant_loads_through_diffusers(tiny_dir, tmp_path) -> None:
    """A folder whose scheduler config the own sampler does not implement is not refused: it loads as
    before, through diffusers' pipeline."""
    import json
    import shutil

    folder = tmp_path / "karras"
    shutil.copytree(tiny_dir, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_karras_sigmas"] = True
    cfg_path.write_text(json.dumps(cfg))
    pipe = load_pipeline(ModelSource.from_diffusers(folder), torch.float32, own_modules=True)
    assert type(pipe).__name__ == "FluxPipeline"


def test_which_options_keep_diffusers_classes() -> None:
    assert why_not_own_modules(EngineOptions(offload="none", t5_quantization="none")) is None
    assert why_not_own_modules(EngineOptions(attention="cudnn_fp8", t5_quantization="none")) is None
    assert "offload" in why_not_own_modules(EngineOptions(offload="model", t5_quantization="none"))
    assert why_not_own_modules(EngineOptions(t5_quantization="nf4")) is None  # decision 60
    assert "flash_attn" in why_not_own_modules(EngineOptions(attention="flash_attn", t5_quantization="none"))


def test_an_engine_process_with_defaults_imports_no_diffusers(tiny_dir, tiny_loras) -> None:
    """Load, apply a LoRA and sample through the public API in a fresh process: diffusers,
    transformers and peft are never imported (each costs seconds of a start, issue 13), and with
    ``compile=off`` (no Triton, sequential offload) neither is the compiler: ``torch._dynamo``, 1.4-1.8 s,
    once pulled in by the embeddings' random initialisation on the meta device."""
    lora = next(iter(tiny_loras.values()))
    code = textwrap.dedent(f"""
        import sys
        from fastlora_core import registry
        from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource
        engine = registry.get_engine(ModelSource.from_diffusers({str(tiny_dir)!r}),
                                     EngineOptions(device="cpu", dtype="float32", compile="off"))
        out = engine.generate(GenerateRequest(steps=2, width=64, height=64, max_sequence_length=16),
                              LoraStack.of(({lora!r}, 0.8)))
        assert out.images.shape == (1, 64, 64, 3), out.images.shape
        bad = sorted({{m.split('.')[0] for m in sys.modules}} & {{'diffusers', 'transformers', 'peft', 'accelerate'}})
        assert not bad, bad
        assert "torch._dynamo" not in sys.modules, "compile=off imported the compiler"
        print("ok", type(engine.pipe).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok FluxRuntimePipeline" in proc.stdout
