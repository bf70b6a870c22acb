"""Errors raised by fastlora_core.

Every error says what went wrong *and what to do next*. Frontends (ComfyUI nodes, the CLI) show
``str(error)`` to the user unchanged, so messages are written for users, not for developers.
"""

from __future__ import annotations


class FastLoraError(Exception):
    """Base class of every error this library raises on purpose."""


class OptionsError(FastLoraError, ValueError):
    """An option or a combination of options that cannot work; raised before any weight is read."""


class DependencyError(FastLoraError):
    """A required package is missing or too old; the message names each one and what to install."""


class ModelLoadError(FastLoraError):
    """A model file or folder that is missing, corrupt, not Flux, or a Flux variant we cannot run."""


class LoraError(FastLoraError):
    """Base class of LoRA problems. The engine is left exactly as it was before the call."""


class LoraFormatError(LoraError):
    """A LoRA file we cannot read: missing, corrupt, empty, another model family, unsupported type."""


class LoraFitError(LoraError):
    """A valid LoRA that does not fit: layers the model lacks or has in other sizes (a LoRA for another
    model), or the prepared adapter slot (rank above max_rank, new targets)."""


class EngineReleasedError(FastLoraError, RuntimeError):
    """The engine was released (by the registry, ComfyUI's unload, or another thread) before or
    while this call waited for it. Get a new engine from the registry."""


class EngineOutOfMemoryError(FastLoraError, MemoryError):
    """The device ran out of memory. The engine is left usable (previous LoRA stack intact); the
    message says which options reduce memory. Also a ``torch.OutOfMemoryError`` (see
    ``out_of_memory``) so frontends' own OOM recovery (ComfyUI unloads models) still triggers."""


def out_of_memory(what: str, exc: BaseException, options: object | None = None) -> Exception:
    """An error that is both ours (clear message) and ``torch.OutOfMemoryError``. With the engine's
    (resolved) ``options``, only changes that are not already in effect are suggested."""
    import torch

    class _OOM(EngineOutOfMemoryError, torch.OutOfMemoryError):
        pass

    def opt(name: str, default: str) -> str:
        return str(getattr(options, name, default))

    tips = ["lower width/height or batch"]
    if opt("quantization", "none") == "none":
        tips.append("quantization=fp8 (GPUs with compute capability >= 8.9) or int8_weight_only")
    if opt("t5_quantization", "none") == "none":
        tips.append("t5_quantization=nf4")
    if opt("compile", "full") == "full":
        tips.append("compile=regional")
    if opt("offload", "none") == "none" and opt("quantization", "none") == "none":
        tips.append("offload=model")
    if len(tips) == 1:
        tips.append("close other GPU programs or unload other models first")
    _OOM.__name__ = _OOM.__qualname__ = "EngineOutOfMemoryError"
    _OOM.__module__ = PUBLIC_MODULE
    return _OOM(f"Out of device memory while {what}. The engine is still usable. To fit: {'; '.join(tips)}. ({exc})")


# ComfyUI names an error by its class's ``__module__`` (execution.full_type_name), and it imports a
# custom node folder under its path ("/home/me/ComfyUI/custom_nodes/ComfyUI-FastLoRA"), so the UI and
# the API would show "/home/me/.../ComfyUI-FastLoRA.fastlora_core.errors.LoraFormatError". Every
# error class of this module (keep this loop last) is named after the package instead.
PUBLIC_MODULE = "fastlora_core.errors"
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, FastLoraError):
        _cls.__module__ = PUBLIC_MODULE
