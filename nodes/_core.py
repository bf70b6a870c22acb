"""The pack's single door to ``fastlora_core``.

Inside ComfyUI the pack is a package named after its folder, so the core is imported relatively
(``<pack>.fastlora_core``); a bare ``nodes`` package (never the case in ComfyUI, whose own top-level
module is called ``nodes``) falls back to the top-level ``fastlora_core``.
"""

from __future__ import annotations

try:
    from ..fastlora_core import errors, loading, registry, specs
    from ..fastlora_core.engine import FluxEngine, GenerateResult
    from ..fastlora_core.lora import base as lora_base
    from ..fastlora_core.lora import bfl as lora_bfl
    from ..fastlora_core.lora import mapped as lora_mapped
except ImportError as exc:  # pragma: no cover - only when `nodes` is imported top-level
    if "relative import" not in str(exc):
        raise
    from fastlora_core import errors, loading, registry, specs
    from fastlora_core.engine import FluxEngine, GenerateResult
    from fastlora_core.lora import base as lora_base
    from fastlora_core.lora import bfl as lora_bfl
    from fastlora_core.lora import mapped as lora_mapped

__all__ = ["FluxEngine", "GenerateResult", "errors", "loading", "lora_base", "lora_bfl", "lora_mapped", "registry", "specs"]
