"""ComfyUI-FastLoRA: fast LoRA hot-swapping for Flux.1 in ComfyUI (classic V1 node API).

ComfyUI imports this folder as a package from ``custom_nodes/``. If a dependency is missing the
pack registers no nodes and logs what to install, instead of breaking ComfyUI's start-up.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("ComfyUI-FastLoRA")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
except ImportError as exc:
    logger.error(
        "ComfyUI-FastLoRA: nodes disabled, a dependency is missing (%s). Install the pack's "
        "requirements into ComfyUI's Python: `python -m pip install -r requirements.txt` in "
        "custom_nodes/ComfyUI-FastLoRA (torch is never reinstalled), then restart ComfyUI.",
        exc,
    )

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
