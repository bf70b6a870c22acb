"""ComfyUI adapters of FastLoRA (see flux_nodes.py). Importing this needs fastlora_core's
dependencies (torch, diffusers, peft, ...) but not ComfyUI."""

from __future__ import annotations

from . import comfy_bridge
from .flux_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, PACK_DIR, stats
from .handle import EngineHandle, SlotSpec

STATS_ROUTE = "/fastlora/stats"
ROUTES_REGISTERED = comfy_bridge.register_stats_route(STATS_ROUTE, stats, PACK_DIR)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "EngineHandle", "SlotSpec", "stats"]
