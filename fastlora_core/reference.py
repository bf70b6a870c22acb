"""Reference images from a fresh, uncompiled pipeline holding only a given LoRA stack.

Independent of our swap code: LoRAs are loaded with diffusers' own ``load_lora_weights`` and
``set_adapters`` (unfused PEFT layers). Used by the demo (``max_abs_diff``) and the tests. Works
for files diffusers can read (the diffusers/PEFT format used by the demo and tests).
"""

from __future__ import annotations

import torch

from .engine import run_pipeline
from .specs import GenerateRequest, LoraStack, ModelSource


def reference_images(source: ModelSource, stack: LoraStack, request: GenerateRequest,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from .loading import load_pipeline

    pipe = load_pipeline(source, dtype)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    names: list[str] = []
    weights: list[float] = []
    for i, spec in enumerate(stack.active()):
        name = f"ref{i}"
        pipe.load_lora_weights(spec.path, adapter_name=name)  # type: ignore[attr-defined]
        names.append(name)
        weights.append(spec.strength)
    if names:
        pipe.set_adapters(names, weights)  # type: ignore[attr-defined]
    return run_pipeline(pipe, request)
