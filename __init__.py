"""ComfyUI-FastLoRA: fast LoRA hot-swapping for Flux.1 in ComfyUI (classic V1 node API).

ComfyUI imports this folder as a package from ``custom_nodes/``. Start-up never fails because of
us: missing or mismatched dependencies are logged with what to install (``fastlora_core.deps``);
the nodes stay registered and raise the same message when run. Only without torch (no ComfyUI
can run then) are no nodes registered.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("ComfyUI-FastLoRA")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

from .fastlora_core import deps as _deps  # noqa: E402  (stdlib only: works without torch)

for _level, _line in _deps.startup_lines():
    logger.log(_level, "ComfyUI-FastLoRA: %s", _line)

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
except ImportError as exc:
    logger.error(
        "ComfyUI-FastLoRA: nodes disabled, a dependency is missing (%s). To fix, %s.", exc, _deps.INSTALL_HINT,
    )

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
