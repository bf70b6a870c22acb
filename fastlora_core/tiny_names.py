"""Names of the tiny smoke-test model as ``write-tiny --comfy`` writes it into a ComfyUI ``models/``
tree. Standard library only: the headless client (no torch) points workflows at them (``--tiny``)."""

from __future__ import annotations

TINY_DIFFUSERS_NAME = "fastlora-tiny-flux"  # models/diffusers/<name>/

# The same model as single files: loader input -> (ComfyUI models/ folder, file name).
TINY_SINGLE_FILES: dict[str, tuple[str, str]] = {
    "transformer": ("diffusion_models", "fastlora-tiny-flux.safetensors"),
    "clip_l": ("text_encoders", "fastlora-tiny-clip_l.safetensors"),
    "t5xxl": ("text_encoders", "fastlora-tiny-t5xxl.safetensors"),
    "vae": ("vae", "fastlora-tiny-ae.safetensors"),
}
TINY_TOKENIZERS = "fastlora-tiny-tokenizers"  # models/<name>/ (for the CLI; ComfyUI uses its own)

# models/loras/<name>.safetensors, in the order --tiny hands them to LoRA nodes.
TINY_LORA_NAMES = ("fastlora-tiny-style", "fastlora-tiny-character", "fastlora-tiny-wide", "fastlora-tiny-single")

# Generate settings that reach an image in seconds on a CPU (the workflows' 1024 px / 28 steps take
# minutes there even for the tiny model).
TINY_STEPS = 2
TINY_SIZE = 64
