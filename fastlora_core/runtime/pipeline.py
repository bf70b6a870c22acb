"""Flux.1 text-to-image sampling without diffusers: the flow-matching Euler schedule and the loop of
diffusers' ``FluxPipeline.__call__`` for what FastLoRA asks of it (a prompt, size, steps, guidance, a
CPU generator, ``output_type="pt"``, a step callback).

Same arithmetic in the same order as diffusers 0.42 (``FluxPipeline.__call__``,
``FlowMatchEulerDiscreteScheduler.set_timesteps`` / ``step``, ``randn_tensor``,
``VaeImageProcessor.postprocess``), so with the same modules the images are bitwise the pipeline's
(``tests/test_runtime_pipeline.py``). What it does not do (negative prompts and true CFG, IP-adapters,
given latents or embeddings, offload hooks, other scheduler variants) stays with diffusers' pipeline:
:func:`unsupported_scheduler` says when a scheduler config needs it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Scheduler config keys whose non-default values this module does not implement (diffusers'
#: ``FlowMatchEulerDiscreteScheduler`` does); a config that sets one is sampled by diffusers.
_UNSUPPORTED_FLAGS = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                      "use_beta_sigmas", "stochastic_sampling", "use_flow_sigmas")


def unsupported_scheduler(config: Mapping[str, Any]) -> str | None:
    """Why :class:`FlowMatchEuler` cannot follow ``config`` (a diffusers scheduler config), or None."""
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        return f"scheduler {name}"
    for key in _UNSUPPORTED_FLAGS:
        if config.get(key):
            return f"scheduler option {key}={config[key]!r}"
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        return f"time_shift_type={config['time_shift_type']!r}"
    return None


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent ``mu`` of the time shift (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass(frozen=True)
class FlowMatchEuler:
    """The flow-matching Euler scheduler as Flux.1 dev/schnell configure it (the scheduler's
    ``config.json``), without per-call state: :meth:`schedule` gives the timesteps and sigmas of one
    sampling run and :meth:`step` one Euler update."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchEuler:
        """From a diffusers scheduler config; raises ValueError for options this class lacks."""
        why = unsupported_scheduler(config)
        if why is not None:
            raise ValueError(f"FastLoRA's own sampler does not implement {why}.")
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in fields and v is not None})

    @property
    def config(self) -> FlowMatchEuler:
        """diffusers-style ``scheduler.config`` access (the fields themselves)."""
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def _sigma_max_min(self) -> tuple[float, float]:
        """``sigma_max`` / ``sigma_min`` as diffusers' constructor derives them (float32 tensors)."""
        n = self.num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()).to(dtype=torch.float32)
        sigmas = timesteps / n
        if not self.use_dynamic_shifting:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        return sigmas[0].item(), sigmas[-1].item()

    def _time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def schedule(self, steps: int, image_seq_len: int, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [steps], sigmas [steps + 1])`` float32 for ``steps`` steps at ``image_seq_len``
        packed image tokens, as ``FluxPipeline`` asks its scheduler for them (``sigmas`` =
        linspace(1, 1/steps) and ``mu`` from the sequence length; the last sigma is 0)."""
        sigmas_np = np.array(np.linspace(1.0, 1 / steps, steps)).astype(np.float32)
        if self.use_dynamic_shifting:
            mu = calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                                 self.base_shift, self.max_shift)
            sigmas_np = self._time_shift(mu, 1.0, sigmas_np)
        else:
            sigmas_np = self.shift * sigmas_np / (1 + (self.shift - 1) * sigmas_np)
        sigmas = torch.from_numpy(sigmas_np).to(dtype=torch.float32, device=device)
        timesteps = sigmas * self.num_train_timesteps
        sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        return timesteps, sigmas

    @staticmethod
    def step(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
             sigma_next: torch.Tensor) -> torch.Tensor:
        """One Euler step in float32, returned in the model output's dtype (diffusers' ``step``)."""
        prev = sample.to(torch.float32) + (sigma_next - sigma) * model_output
        return prev.to(model_output.dtype)


# -- latents ---------------------------------------------------------------------------------------
def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[height * width, 3]`` positions of the packed latent patches (diffusers'
    ``_prepare_latent_image_ids``)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    h, w, c = ids.shape
    return ids.reshape(h * w, c).to(device=device, dtype=dtype)


def pack_latents(latents: torch.Tensor, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, C * 4]`` (2x2 patches)."""
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed ``[B, S, C * 4]`` -> ``[B, C, h, w]`` for an image of ``height`` x ``width`` pixels."""
    batch, _, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // (2 * 2), height, width)


def prepare_latents(batch: int, channels: int, height: int, width: int, vae_scale_factor: int,
                    dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed starting noise and its patch positions, drawn as diffusers' ``randn_tensor`` draws them
    (on the generator's device when that is the CPU, then moved)."""
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    rand_device = "cpu" if generator is not None and generator.device.type == "cpu" else device
    noise = torch.randn((batch, channels, height, width), generator=generator, device=rand_device,
                        dtype=dtype, layout=torch.strided).to(device)
    return (pack_latents(noise, batch, channels, height, width),
            latent_image_ids(height // 2, width // 2, device, dtype))


def text_positions(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[length, 3]`` positions of the text tokens: all zero (diffusers' ``encode_prompt``)."""
    return torch.zeros(length, 3).to(device=device, dtype=dtype)


def guidance_input(config: Any, scale: float, batch: int, device: torch.device) -> torch.Tensor | None:
    """The guidance a guidance-distilled transformer gets (float32, one per image), else None."""
    return torch.full([1], scale, device=device, dtype=torch.float32).expand(batch) if config.guidance_embeds else None


def transformer_inputs(latents: torch.Tensor, t: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor,
                       embeds: torch.Tensor, text_ids: torch.Tensor, image_ids: torch.Tensor) -> dict[str, Any]:
    """One step's keyword arguments for the transformer: the timestep ``t`` in the latents' dtype,
    divided by 1000, as diffusers' ``FluxPipeline`` passes it. Also what a compile for the expected
    first request feeds its specimen (:mod:`fastlora_core.expected_compile`)."""
    timestep = t.expand(latents.shape[0]).to(latents.dtype)
    return {"hidden_states": latents, "timestep": timestep / 1000, "guidance": guidance,
            "pooled_projections": pooled, "encoder_hidden_states": embeds, "txt_ids": text_ids,
            "img_ids": image_ids, "joint_attention_kwargs": {}, "return_dict": False}


class Tokenizer(Protocol):
    """What the sampler needs of a tokenizer: padded, truncated ids ``[len(prompts), max_length]``."""

    model_max_length: int

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor: ...

    def __len__(self) -> int: ...  # the vocabulary with added tokens


@dataclass
class PipelineOutput:
    images: torch.Tensor


#: ``callback(pipeline, step_index, timestep, {"latents": latents}) -> dict`` (diffusers'
#: ``callback_on_step_end``; a returned ``"latents"`` replaces the latents).
StepEndCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], Mapping[str, Any]]


class FluxRuntimePipeline:
    """Flux.1 text-to-image with FastLoRA's own modules (or any modules with the same interfaces:
    diffusers' and transformers' classes work too, which the tests use to compare).

    Holds the attributes FastLoRA's engine reads from a ``FluxPipeline`` (``transformer``,
    ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``vae``, ``scheduler``,
    ``vae_scale_factor``, ``_unpack_latents``)."""

    default_sample_size = 128

    def __init__(self, *, transformer: Any, text_encoder: Any, text_encoder_2: Any, tokenizer: Tokenizer | None,
                 tokenizer_2: Tokenizer | None, vae: Any, scheduler: FlowMatchEuler) -> None:
        """Modules are ``Any``: FastLoRA's own (``runtime.flux``, ``runtime.t5``, ``runtime.clip``, ``runtime.vae``) or
        the diffusers / transformers classes they stand for; text encoders, tokenizers and the VAE may be
        None for a transformer-only pipeline (which then cannot sample by itself)."""
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.vae = vae
        self.scheduler = scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77

    # -- what the engine and diffusers-style callers use --------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.transformer, self.text_encoder, self.text_encoder_2, self.vae) if m is not None]

    def to(self, device: torch.device | str) -> FluxRuntimePipeline:
        for m in self.modules():
            m.to(device)
        return self

    def set_progress_bar_config(self, **_: Any) -> None:
        """Accepted for diffusers compatibility; this pipeline draws no progress bar."""

    @property
    def _execution_device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    _unpack_latents = staticmethod(unpack_latents)

    # -- prompt encoding ---------------------------------------------------------------------
    def _clip_pooled(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        assert self.tokenizer is not None and self.text_encoder is not None
        ids = self.tokenizer(prompts, self.tokenizer_max_length)
        model_device = next(self.text_encoder.parameters()).device
        pooled = self.text_encoder(ids.to(model_device), output_hidden_states=False).pooler_output
        return pooled.to(dtype=self.text_encoder.dtype, device=device)

    def _t5_embeds(self, prompts: list[str], max_sequence_length: int, device: torch.device) -> torch.Tensor:
        assert self.tokenizer_2 is not None and self.text_encoder_2 is not None
        ids = self.tokenizer_2(prompts, max_sequence_length)
        model_device = next(self.text_encoder_2.parameters()).device
        embeds = self.text_encoder_2(ids.to(model_device), output_hidden_states=False)[0]
        return embeds.to(dtype=self.text_encoder_2.dtype, device=device)

    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int, max_sequence_length: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t5 embeds [B*n, L, D], pooled CLIP [B*n, P], text ids [L, 3])`` as ``encode_prompt``."""
        batch = len(prompts)
        pooled = self._clip_pooled(prompts, device)
        pooled = pooled.repeat(1, num_images_per_prompt).view(batch * num_images_per_prompt, -1)
        embeds = self._t5_embeds(prompts, max_sequence_length, device)
        _, seq_len, _ = embeds.shape
        embeds = embeds.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq_len, -1)
        dtype = (self.text_encoder if self.text_encoder is not None else self.transformer).dtype
        text_ids = text_positions(embeds.shape[1], device, dtype)
        return embeds, pooled, text_ids

    # -- sampling ------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, guidance_scale: float = 3.5, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, max_sequence_length: int = 512,
                 output_type: str = "pt", callback_on_step_end: StepEndCallback | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> PipelineOutput:
        """Sample images: ``.images`` float ``[B, 3, H, W]`` in 0..1 (``output_type="pt"``) or the
        packed latents (``"latent"``)."""
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type={output_type!r}: FastLoRA's own pipeline returns 'pt' or 'latent'.")
        if max_sequence_length > 512:
            raise ValueError(f"`max_sequence_length` cannot be greater than 512 but is {max_sequence_length}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError("callback_on_step_end_tensor_inputs: only 'latents' is provided.")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            logger.warning("height and width should be multiples of %d; the image is %dx%d, so the output "
                           "will be resized down to a multiple of it", multiple, width, height)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self._execution_device
        embeds, pooled, text_ids = self.encode_prompt(prompts, num_images_per_prompt, max_sequence_length, device)

        batch = len(prompts) * num_images_per_prompt
        channels = self.transformer.config.in_channels // 4
        latents, image_ids = prepare_latents(batch, channels, height, width, self.vae_scale_factor,
                                             embeds.dtype, device, generator)
        timesteps, sigmas = self.scheduler.schedule(num_inference_steps, latents.shape[1], device)
        guidance = guidance_input(self.transformer.config, guidance_scale, latents.shape[0], device)
        for i, t in enumerate(timesteps):
            noise_pred = self.transformer(**transformer_inputs(latents, t, guidance, pooled, embeds, text_ids,
                                                               image_ids))[0]
            latents = self.scheduler.step(noise_pred, latents, sigmas[i], sigmas[i + 1])
            if callback_on_step_end is not None:
                outputs = dict(callback_on_step_end(self, i, t, {"latents": latents}))
                latents = outputs.pop("latents", latents)
        if output_type == "latent":
            return PipelineOutput(latents)
        assert self.vae is not None
        latents = unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        latents = latents.to(next(self.vae.parameters()).device)
        image = self.vae.decode(latents, return_dict=False)[0]
        return PipelineOutput((image * 0.5 + 0.5).clamp(0, 1))


