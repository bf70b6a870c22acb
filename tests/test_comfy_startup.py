"""What ComfyUI's start-up does with the pack: the stats route with two copies installed
(tests/comfy_stub.py stands in for ComfyUI's server and, where it is not installed, aiohttp)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import subprocess
import sys
import textwrap
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
    assert set(second.NODE_CLASS_MAPPINGS) == {"OptimizedFluxLoader", "LoraHotswap", "LoraHotswapModel", "PadDummyLora",
                                                  "Generate"}
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


def test_error_type_names_do_not_contain_the_install_folder(tmp_path: Path) -> None:
    """ComfyUI imports the pack under its folder's path and names errors ``module.qualname``
    (execution.full_type_name); the UI must show ``fastlora_core.errors.LoraFormatError``."""
    install = tmp_path / "custom_nodes" / "ComfyUI-FastLoRA.v2"
    install.parent.mkdir()
    install.symlink_to(comfy_stub.ROOT, target_is_directory=True)
    code = textwrap.dedent(f"""
        import importlib.util, sys
        path = {str(install)!r}
        name = path.replace(".", "_x_")  # what ComfyUI's load_custom_node does
        spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        errors = sys.modules[name + ".fastlora_core.errors"]
        def full_type_name(klass):  # ComfyUI's execution.full_type_name
            return klass.__module__ + "." + klass.__qualname__
        classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.FastLoraError)]
        names = [full_type_name(c) for c in classes]
        names.append(full_type_name(type(errors.out_of_memory("testing", RuntimeError("x")))))
        print("NAMES", " ".join(names))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = next(x for x in proc.stdout.splitlines() if x.startswith("NAMES ")).split()[1:]
    assert "fastlora_core.errors.LoraFormatError" in names and len(names) >= 9
    assert all(n.startswith("fastlora_core.errors.") for n in names), names
    assert names[-1] == "fastlora_core.errors.EngineOutOfMemoryError"
