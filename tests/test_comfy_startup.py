"""What ComfyUI's start-up does with the pack: the stats route with two copies installed
(tests/comfy_stub.py stands in for ComfyUI's server and, where it is not installed, aiohttp)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import comfy_stub  # tests/ helper (pytest puts tests/ on sys.path)
import pytest

ROUTE = "/fastlora/stats"


def _served(instance: Any) -> dict[str, Any]:
    """Call the one GET /fastlora/stats handler and decode its JSON."""
    (route,) = [r for r in instance.routes if getattr(r, "path", None) == ROUTE]
    response = asyncio.run(route.handler(None))
    return json.loads(response.text)


@pytest.fixture(params=["stub", "aiohttp"])
def prompt_server(request: pytest.FixtureRequest) -> Any:
    real = request.param == "aiohttp"
    if real and importlib.util.find_spec("aiohttp") is None:
        pytest.skip("aiohttp is not installed (ComfyUI's requirements bring it)")
    instance = comfy_stub.install_server(real_aiohttp=real)
    yield instance
    comfy_stub.uninstall_server()
    for name in [m for m in sys.modules if m.startswith(("fastlora_copy_a", "fastlora_copy_b"))]:
        del sys.modules[name]


def test_two_copies_of_the_pack_start_comfyui_with_one_stats_route(
        prompt_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backup = tmp_path / "ComfyUI-FastLoRA-backup"
    backup.symlink_to(comfy_stub.ROOT, target_is_directory=True)
    caplog.set_level(logging.INFO)

    first = comfy_stub.load_pack("fastlora_copy_a")
    second = comfy_stub.load_pack("fastlora_copy_b", root=backup)
    prompt_server.app.add_routes(prompt_server.routes)  # what ComfyUI does once custom nodes are loaded

    assert first.nodes.ROUTES_REGISTERED and second.nodes.ROUTES_REGISTERED
    assert len([r for r in prompt_server.routes if r.path == ROUTE]) == 1
    assert set(second.NODE_CLASS_MAPPINGS) == {"OptimizedFluxLoader", "LoraHotswap", "PadDummyLora", "Generate"}
    # ComfyUI keeps the node classes of the copy loaded last: the route reports that copy's counters.
    second.nodes.flux_nodes.STATS["generates"] = 41
    served = _served(prompt_server)
    assert served["pack"] == str(backup) and served["generates"] == 41
    duplicate = [r.getMessage() for r in caplog.records if "installed twice" in r.getMessage()]
    assert len(duplicate) == 1 and str(comfy_stub.ROOT) in duplicate[0] and str(backup) in duplicate[0]
    assert "node classes of the copy it loads last" in duplicate[0]


def test_a_route_served_by_something_else_is_left_alone(prompt_server: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    @prompt_server.routes.get(ROUTE)
    async def other(request: Any) -> Any:  # e.g. an older FastLoRA copy without the shared holder
        return None

    pack = comfy_stub.load_pack("fastlora_copy_a")
    prompt_server.app.add_routes(prompt_server.routes)
    assert pack.nodes.ROUTES_REGISTERED is False and set(pack.NODE_CLASS_MAPPINGS)
    assert any("already served" in r.getMessage() for r in caplog.records)
