"""FastLoRA's own sampling loop (``fastlora_core.runtime.pipeline``) against diffusers' FluxPipeline.

Same modules, same request -> the same images, bit for bit: the schedule, the noise, the Euler steps,
the guidance, the step callback and the decode follow diffusers' arithmetic exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlora_core.loading.own import TransformersTokenizer
from fastlora_core.runtime.pipeline import FlowMatchEuler, FluxRuntimePipeline, unsupported_scheduler
from fastlora_core.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _runtime_of(pipe) -> FluxRuntimePipeline:
    return FluxRuntimePipeline(transformer=pipe.transformer, text_encoder=pipe.text_encoder,
                               text_encoder_2=pipe.text_encoder_2, tokenizer=TransformersTokenizer(pipe.tokenizer),
                               tokenizer_2=TransformersTokenizer(pipe.tokenizer_2), vae=pipe.vae,
                               scheduler=FlowMatchEuler.from_config(dict(pipe.scheduler.config)))


def _sample(pipe, callback=None, **kw):
    args = {"prompt": "a red fox, snow", "height": 64, "width": 48, "num_inference_steps": 3,
            "guidance_scale": 3.5, "num_images_per_prompt": 1, "max_sequence_length": 16}
    args.update(kw)
    with torch.inference_mode():
        return pipe(generator=torch.Generator("cpu").manual_seed(7), output_type="pt",
                    callback_on_step_end=callback, **args).images


@pytest.mark.parametrize("kw", [
    {},
    {"prompt": ["two prompts", "in one batch, longer than sixteen tokens of t5 for sure"], "num_images_per_prompt": 2},
    {"num_inference_steps": 1, "guidance_scale": 1.0, "height": 32, "width": 32},
])
def test_images_are_bitwise_the_diffusers_pipelines(kw) -> None:
    pipe = build_tiny_pipeline(seed=3)
    ours = _runtime_of(pipe)
    expected = _sample(pipe, **kw)
    got = _sample(ours, **kw)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_schnell_schedule_and_no_guidance_embedding_match() -> None:
    """A schnell-style scheduler (no dynamic shift) and a transformer without guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from fastlora_core.tiny import TINY_TRANSFORMER_CONFIG

    base = build_tiny_pipeline(seed=4)
    torch.manual_seed(5)
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "guidance_embeds": False}).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                        text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, vae=base.vae,
                        transformer=transformer)
    assert torch.equal(_sample(_runtime_of(pipe), num_inference_steps=4), _sample(pipe, num_inference_steps=4))


def test_step_callback_sees_and_may_replace_the_latents() -> None:
    """The engine's progress, cancel and preview hooks: called once per step with the latents; latents
    it returns replace the sampler's, as in diffusers."""
    pipe = build_tiny_pipeline(seed=3)
    ours = _runtime_of(pipe)
    seen: dict[str, list] = {"diffusers": [], "ours": []}

    def recorder(key):
        def cb(_pipe, i, t, kwargs):
            seen[key].append((i, float(t), kwargs["latents"].clone()))
            return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}
        return cb

    expected = _sample(pipe, callback=recorder("diffusers"))
    got = _sample(ours, callback=recorder("ours"))
    assert [s[:2] for s in seen["ours"]] == [s[:2] for s in seen["diffusers"]] and len(seen["ours"]) == 3
    assert all(torch.equal(a[2], b[2]) for a, b in zip(seen["ours"], seen["diffusers"], strict=True))
    assert torch.equal(got, expected)
    assert not torch.equal(got, _sample(ours))  # the replaced latents changed the image


def test_schedule_matches_the_diffusers_scheduler() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastlora_core.runtime.pipeline import calculate_shift

    for cfg in ({"shift": 3.0, "use_dynamic_shifting": True}, {"shift": 1.0, "use_dynamic_shifting": False},
                {"shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "linear"}):
        ref = FlowMatchEulerDiscreteScheduler(**cfg)
        ours = FlowMatchEuler.from_config(dict(ref.config))
        for steps, seq in ((28, 4096), (4, 1024), (1, 256), (50, 6400)):
            mu = calculate_shift(seq)
            ref.set_timesteps(sigmas=list(__import__("numpy").linspace(1.0, 1 / steps, steps)), mu=mu)
            timesteps, sigmas = ours.schedule(steps, seq)
            assert torch.equal(timesteps, ref.timesteps) and torch.equal(sigmas, ref.sigmas), (cfg, steps, seq)


def test_scheduler_options_it_lacks_are_named() -> None:
    assert unsupported_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}) is None
    assert "use_karras_sigmas" in unsupported_scheduler({"use_karras_sigmas": True})
    assert "EulerDiscreteScheduler" in unsupported_scheduler({"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowMatchEuler.from_config({"stochastic_sampling": True})


def test_the_module_imports_no_diffusers_or_transformers() -> None:
    code = ("import sys, fastlora_core.runtime.pipeline; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
