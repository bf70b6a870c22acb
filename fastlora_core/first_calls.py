"""The text encoders' and the VAE's first calls, made on a thread while the engine finishes its build
(decision 55).

A module's first call on a GPU costs more than its later ones: each CUDA kernel it launches is loaded
at its first launch, and cuDNN builds an execution plan for each convolution and attention shape, which
PyTorch keeps for the whole process. In a warm start on an H100 the first image's text encoding took
0.30 s against 0.02-0.03 s later, and its VAE decode 0.23 s against 0.09 s (RESULTS, "A warm first image
by part"). That work happens inside PyTorch's operators, which release the GIL, so a thread of its own
does it while the loader's thread quantises the transformer and applies the first LoRA, and the first
image finds the kernels loaded and the plans built.

The thread encodes an empty prompt and decodes zero latents at the expected first request's size
(:data:`.expected_compile.EXPECTED`); what it computes is thrown away, it draws no random numbers and
writes no weight, so images stay what they were. It runs only where it cannot get in the way: on a GPU
with ample room (the weights read straight to it), FastLoRA's own pipeline with both text encoders and
the VAE, no offload, and T5 in the pipeline's dtype (a bitsandbytes T5 is quantised after the reads).
The engine waits for it before its own first use of these modules and before it frees or moves them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import torch

from .expected_compile import EXPECTED
from .specs import EngineOptions, GenerateRequest

logger = logging.getLogger(__name__)


def why_not(pipe: Any, options: EngineOptions, device: torch.device, ample_room: bool) -> str:
    """Why the first calls are not made ahead for this engine ("" when they are)."""
    from .runtime.pipeline import FluxRuntimePipeline

    if device.type != "cuda":
        return "not on a GPU"
    if not ample_room or options.offload != "none":
        return "the GPU has no room to spare, or the modules are offloaded"
    if options.t5_quantization != "none":
        return "T5 is quantised after the reads"
    if not isinstance(pipe, FluxRuntimePipeline):
        return "diffusers' pipeline"
    parts = (pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.tokenizer, pipe.tokenizer_2)
    if any(p is None for p in parts):
        return "the pipeline has no text encoders or VAE"
    modules = (pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
    if any(next(m.parameters()).device.type != device.type for m in modules):
        return "the modules are not on the GPU yet (the build moves them)"
    if any(m.training for m in modules):
        return "a module is in training mode (its dropout would draw random numbers)"
    return ""


class FirstCalls:
    """One daemon thread making the encoders' and the VAE's first calls; :meth:`wait` joins it."""

    def __init__(self, pipe: Any, device: torch.device, request: GenerateRequest) -> None:
        self._pipe = pipe
        self._device = device
        self._request = request  # the sizes the calls are made at
        self.seconds: float | None = None  # how long the calls took (None until done, or after a failure)
        self._thread = threading.Thread(target=self._run, name="fastlora-first-calls", daemon=True)

    @classmethod
    def start(cls, pipe: Any, options: EngineOptions, device: torch.device, ample_room: bool) -> FirstCalls | None:
        """Start the thread where :func:`why_not` allows it; None (logged) where it does not."""
        why = why_not(pipe, options, device, ample_room)
        if why:
            logger.debug("the encoders' and VAE's first calls are not made ahead: %s", why)
            return None
        calls = cls(pipe, device, EXPECTED)
        calls._thread.start()
        return calls

    def wait(self) -> None:
        """Return once the thread has finished (at once if it has)."""
        self._thread.join()

    def _run(self) -> None:
        t0 = time.perf_counter()
        pipe, request = self._pipe, self._request
        on_gpu = self._device.type == "cuda"
        try:
            with torch.inference_mode(), torch.cuda.device(self._device) if on_gpu else contextlib.nullcontext():
                pipe.encode_prompt([""], 1, request.max_sequence_length, self._device)
                scale = pipe.vae_scale_factor
                vae_param = next(pipe.vae.parameters())
                latents = torch.zeros(1, pipe.vae.config.latent_channels, 2 * (request.height // (2 * scale)),
                                      2 * (request.width // (2 * scale)), dtype=vae_param.dtype,
                                      device=vae_param.device)
                pipe.vae.decode(latents, return_dict=False)
                if on_gpu:  # done when the GPU is: the time measured is the calls', and so is any error
                    torch.cuda.current_stream(self._device).synchronize()
        except Exception as exc:  # noqa: BLE001 - the first image makes these calls itself, and reports
            logger.info("the encoders' and VAE's first calls ahead failed (%s: %s); the first image makes them",
                        type(exc).__name__, exc)
            return
        self.seconds = time.perf_counter() - t0
        logger.info("the encoders' and VAE's first calls made beside the loader in %.2f s", self.seconds)
