"""The only module of the pack that touches ComfyUI (``comfy.*``, ``folder_paths``, ``server``).

Every import is lazy (inside a function), so the pack imports cleanly without ComfyUI and tests
replace ComfyUI in exactly one place (``tests/comfy_stub.py`` installs fake modules). Everything
else in ``nodes/`` calls these functions and never imports ComfyUI itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

NONE = "None"


# -- model files (folder_paths) -------------------------------------------------------------------
def file_list(folder: str) -> list[str]:
    """File names ComfyUI knows in a model folder (``loras``, ``diffusion_models``, ...)."""
    import folder_paths

    try:
        return list(folder_paths.get_filename_list(folder))
    except KeyError:  # folder type unknown to this ComfyUI version
        return []


def full_path(folder: str, name: str) -> str:
    """Absolute path of a file picked in a dropdown; raises FileNotFoundError with the folder."""
    import folder_paths

    return str(folder_paths.get_full_path_or_raise(folder, name))


def _diffusers_roots() -> list[str]:
    import folder_paths

    try:
        return list(folder_paths.get_folder_paths("diffusers"))
    except KeyError:
        return []


def diffusers_folders() -> list[str]:
    """Diffusers model folders (holding ``model_index.json``) below ``models/diffusers``, as
    relative paths (the same list ComfyUI's DiffusersLoader shows)."""
    found: list[str] = []
    for root in _diffusers_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.append(os.path.relpath(dirpath, start=root))
    return sorted(set(found))


def diffusers_path(name: str) -> str:
    for root in _diffusers_roots():
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    raise FileNotFoundError(
        f"Diffusers folder {name!r} not found under {', '.join(_diffusers_roots()) or 'models/diffusers'} "
        "(it needs a model_index.json). Refresh the node (press R) after adding models."
    )


def has_model_patcher() -> bool:
    """Whether ComfyUI's model classes are importable (always inside ComfyUI; not with the tests'
    stand-in, where the loader's MODEL output is None)."""
    try:
        import comfy.model_patcher  # noqa: F401
    except ImportError:
        return False
    return True


# -- devices and memory (comfy.model_management) --------------------------------------------------
def torch_device() -> Any:
    """The device ComfyUI runs models on (honours --cpu, --cuda-device, ...)."""
    import comfy.model_management as mm

    return mm.get_torch_device()


def free_memory(bytes_needed: float, device: Any) -> None:
    """Ask ComfyUI to unload its own models until ``bytes_needed`` fit on ``device``."""
    import comfy.model_management as mm

    if getattr(device, "type", str(device)) == "cpu":
        return
    mm.free_memory(bytes_needed + mm.extra_reserved_memory(), device)


def load_model(wrapper: Any) -> None:
    """Register ``wrapper`` (a ModelPatcher look-alike) as loaded, the way ComfyUI loads its own
    models: other models are unloaded if memory is short, and ``/free`` / OOM recovery will call
    the wrapper's ``detach``."""
    import comfy.model_management as mm

    mm.load_models_gpu([wrapper])


def forget_model(wrapper: Any) -> None:
    """Drop ``wrapper`` from ComfyUI's loaded-model list without calling its unload (used when the
    engine behind it was already released)."""
    import comfy.model_management as mm

    models = mm.current_loaded_models
    for i in range(len(models) - 1, -1, -1):
        if models[i].model is wrapper:
            loaded = models.pop(i)
            finalizer = getattr(loaded, "model_finalizer", None)
            if finalizer is not None:
                finalizer.detach()


def is_loaded(wrapper: Any) -> bool:
    import comfy.model_management as mm

    return any(m.model is wrapper for m in mm.current_loaded_models)


# -- progress and cancel (comfy.utils / comfy.model_management) -----------------------------------
def progress_callbacks(total: int) -> tuple[Callable[[int, int], None],
                                            Callable[[int, int, Any], None] | None]:
    """``(on_step, on_preview)`` sharing one ComfyUI progress bar, one progress event per step.
    ``on_preview`` is None when ComfyUI runs with ``--preview-method none`` (its default) or has no
    preview settings, and ``on_step`` sends the event; otherwise ``on_preview`` sends it, with the
    engine's RGB preview ``[h, w, 3]`` (0..1) as ComfyUI's JPEG preview (the engine calls both after
    every step), and ``on_step`` only checks for Cancel."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def on_step(step: int, steps: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, steps)  # ComfyUI's hook also raises on interrupt

    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return on_step, None
    if getattr(args, "preview_method", LatentPreviewMethod.NoPreviews) == LatentPreviewMethod.NoPreviews:
        return on_step, None
    size = int(getattr(args, "preview_size", 512))

    def check_only(step: int, steps: int) -> None:
        mm.throw_exception_if_processing_interrupted()

    def on_preview(step: int, steps: int, rgb: Any) -> None:
        from PIL import Image

        image = Image.fromarray((rgb.numpy() * 255).round().clip(0, 255).astype("uint8"))
        bar.update_absolute(step, steps, ("JPEG", image, size))

    return check_only, on_preview


def cancel_check() -> Callable[[], None]:
    """Raises ComfyUI's InterruptProcessingException once the user pressed Cancel (the engine calls
    it between transformer blocks)."""
    import comfy.model_management as mm

    return mm.throw_exception_if_processing_interrupted


# -- HTTP route (server.PromptServer) -------------------------------------------------------------
# Attribute of ``PromptServer.instance`` holding the route's current payload and the pack folder it
# comes from. Every copy of the pack that ComfyUI imports (a clone plus a Manager install, a renamed
# backup ...) finds it there, so the route is added once and follows the copy loaded last.
_ROUTE_HOLDER = "fastlora_routes"


def register_stats_route(path: str, payload: Callable[[], dict[str, Any]], pack_dir: str) -> bool:
    """Add ``GET path`` returning ``payload()`` as JSON to ComfyUI's server, once per server.

    aiohttp refuses a second ``GET`` on the same path when ComfyUI starts serving (``Added route
    will never be executed``), which would stop ComfyUI and every other custom node. A second copy
    of the pack therefore does not add the route again: it points the existing route at its own
    ``payload`` (ComfyUI keeps the node classes of the copy it loads last, so the route reports the
    engines of the nodes that actually run) and logs which copies are involved. False outside a
    running ComfyUI (tests, CLI) or when something else already serves ``path``."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    holders: dict[str, dict[str, Any]] = getattr(instance, _ROUTE_HOLDER, None) or {}
    setattr(instance, _ROUTE_HOLDER, holders)
    holder = holders.get(path)
    if holder is not None:
        logger.warning(
            "ComfyUI-FastLoRA is installed twice: %s and %s. ComfyUI uses the node classes of the copy it "
            "loads last (%s), and GET %s now reports that copy; the other is a duplicate. Remove one of "
            "them from custom_nodes (or rename it with a .disabled suffix).",
            holder["pack_dir"], pack_dir, pack_dir, path)
        holder.update(payload=payload, pack_dir=pack_dir)
        return True
    taken = [r for r in instance.routes if getattr(r, "path", None) == path]
    if taken:
        logger.warning("ComfyUI-FastLoRA (%s): GET %s is already served by %s; not adding it again.",
                       pack_dir, path, getattr(taken[0], "handler", taken[0]))
        return False
    holder = holders[path] = {"payload": payload, "pack_dir": pack_dir}

    @instance.routes.get(path)
    async def _stats(request: Any) -> Any:
        return web.json_response(holder["payload"]())

    logger.info("ComfyUI-FastLoRA (%s): serving GET %s", pack_dir, path)
    return True
