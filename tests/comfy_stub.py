"""A stand-in for the parts of ComfyUI that ``nodes/comfy_bridge.py`` imports.

``install(models_dir)`` puts fake ``folder_paths``, ``comfy``, ``comfy.model_management`` and
``comfy.utils`` modules into ``sys.modules``; ``load_pack()`` then imports the repository root the way
ComfyUI imports a custom node folder (a package named after its path). The memory manager below is
a faithful, trimmed port of ComfyUI's ``LoadedModel`` / ``load_models_gpu`` / ``free_memory`` /
``unload_all_models`` (comfy/model_management.py at a125cd84, October 2025), so the engine wrapper is
exercised through the same calls a real ComfyUI makes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import weakref
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "fastlora_pack"
FOLDERS = {
    "loras": ["loras"],
    "diffusion_models": ["diffusion_models", "unet"],
    "text_encoders": ["text_encoders", "clip"],
    "vae": ["vae"],
    "diffusers": ["diffusers"],
}


def _folder_paths(models_dir: Path) -> types.ModuleType:
    m = types.ModuleType("folder_paths")

    def get_folder_paths(folder: str) -> list[str]:
        return [str(models_dir / sub) for sub in FOLDERS[folder]]

    def get_filename_list(folder: str) -> list[str]:
        out: list[str] = []
        for root in get_folder_paths(folder):
            if os.path.isdir(root):
                for dirpath, _dirs, files in os.walk(root):
                    out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files
                            if f.endswith((".safetensors", ".ckpt", ".pt", ".sft", ".gguf"))]
        return sorted(out)

    def get_full_path_or_raise(folder: str, name: str) -> str:
        for root in get_folder_paths(folder):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")

    m.get_folder_paths = get_folder_paths  # type: ignore[attr-defined]
    m.get_filename_list = get_filename_list  # type: ignore[attr-defined]
    m.get_full_path_or_raise = get_full_path_or_raise  # type: ignore[attr-defined]
    return m


def _model_management() -> types.ModuleType:
    m = types.ModuleType("comfy.model_management")
    m.current_loaded_models = []  # type: ignore[attr-defined]
    m.interrupt_processing = False  # type: ignore[attr-defined]
    m.device = torch.device("cpu")  # type: ignore[attr-defined]

    class InterruptProcessingException(Exception):
        pass

    class LoadedModel:
        def __init__(self, model: Any) -> None:
            assert model.parent is None
            self._model = weakref.ref(model)
            self.device = model.load_device
            self.real_model: Any = None
            self.currently_used = True
            self.model_finalizer: Any = None

        @property
        def model(self) -> Any:
            return self._model()

        def model_memory(self) -> int:
            return self.model.model_size()

        def model_offloaded_memory(self) -> int:
            return self.model.model_size() - self.model.loaded_size()

        def model_load(self, lowvram_model_memory: float = 0, force_patch_weights: bool = False) -> Any:
            self.model.model_patches_to(self.device)
            self.model.model_patches_to(self.model.model_dtype())
            self.model.partially_load(self.device, lowvram_model_memory or 1e32,
                                      force_patch_weights=force_patch_weights)
            real_model = self.model.model
            self.real_model = weakref.ref(real_model)
            self.model_finalizer = weakref.finalize(real_model, cleanup_models)
            return real_model

        def model_unload(self, memory_to_free: float | None = None, unpatch_weights: bool = True) -> bool:
            if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                freed = self.model.partially_unload(self.model.offload_device, memory_to_free)
                if freed >= memory_to_free:
                    return False
            self.model.detach(unpatch_weights)
            self.model_finalizer.detach()
            self.model_finalizer = None
            self.real_model = None
            return True

        def __eq__(self, other: object) -> bool:
            return self.model is other.model  # type: ignore[attr-defined]

        def is_dead(self) -> bool:
            return self.real_model is not None and self.real_model() is not None and self.model is None

    def cleanup_models() -> None:
        models = m.current_loaded_models  # type: ignore[attr-defined]
        for i in range(len(models) - 1, -1, -1):
            if models[i].real_model is not None and models[i].real_model() is None:
                models.pop(i)

    def free_memory(memory_required: float, device: Any, keep_loaded: list[Any] | None = None) -> list[Any]:
        models = m.current_loaded_models  # type: ignore[attr-defined]
        keep_loaded = keep_loaded or []
        can_unload = []
        for i in range(len(models) - 1, -1, -1):
            lm = models[i]
            if lm.device == device and lm not in keep_loaded and not lm.is_dead():
                can_unload.append((-lm.model_offloaded_memory(), sys.getrefcount(lm.model), lm.model_memory(), i))
                lm.currently_used = False
        unloaded = []
        for x in sorted(can_unload):
            i = x[-1]
            if models[i].model_unload(memory_required):
                unloaded.append(i)
        return [models.pop(i) for i in sorted(unloaded, reverse=True)]

    def load_models_gpu(models: list[Any], memory_required: float = 0, **kwargs: Any) -> None:
        current = m.current_loaded_models  # type: ignore[attr-defined]
        to_load = []
        for x in models:
            lm = LoadedModel(x)
            if lm in current:
                loaded = current[current.index(lm)]
                loaded.currently_used = True
                to_load.append(loaded)
            else:
                to_load.append(lm)
        for lm in to_load:
            for i in range(len(current) - 1, -1, -1):
                if lm.model.is_clone(current[i].model):
                    gone = current.pop(i)
                    gone.model.detach(unpatch_all=False)
                    gone.model_finalizer.detach()
        for lm in to_load:
            lm.model_load(0)
            current.insert(0, lm)

    def unload_all_models() -> None:
        free_memory(1e30, m.get_torch_device())  # type: ignore[attr-defined]

    def interrupt_current_processing(value: bool = True) -> None:
        m.interrupt_processing = value  # type: ignore[attr-defined]

    def throw_exception_if_processing_interrupted() -> None:
        if m.interrupt_processing:  # type: ignore[attr-defined]
            m.interrupt_processing = False  # type: ignore[attr-defined]
            raise InterruptProcessingException()

    m.InterruptProcessingException = InterruptProcessingException  # type: ignore[attr-defined]
    m.LoadedModel = LoadedModel  # type: ignore[attr-defined]
    m.get_torch_device = lambda: m.device  # type: ignore[attr-defined]
    m.extra_reserved_memory = lambda: 400 * 1024 * 1024  # type: ignore[attr-defined]
    m.free_memory = free_memory  # type: ignore[attr-defined]
    m.load_models_gpu = load_models_gpu  # type: ignore[attr-defined]
    m.unload_all_models = unload_all_models  # type: ignore[attr-defined]
    m.cleanup_models = cleanup_models  # type: ignore[attr-defined]
    m.interrupt_current_processing = interrupt_current_processing  # type: ignore[attr-defined]
    m.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted  # type: ignore[attr-defined]
    return m


def _utils(mm: types.ModuleType) -> types.ModuleType:
    m = types.ModuleType("comfy.utils")
    m.PROGRESS_BAR_HOOK = None  # type: ignore[attr-defined]
    m.progress_log = []  # type: ignore[attr-defined]

    class ProgressBar:
        def __init__(self, total: int, node_id: str | None = None) -> None:
            self.total = total
            self.current = 0
            self.hook = m.PROGRESS_BAR_HOOK  # type: ignore[attr-defined]

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            if self.hook is not None:
                self.hook(self.current, self.total, preview)

    def set_progress_bar_global_hook(function: Any) -> None:
        m.PROGRESS_BAR_HOOK = function  # type: ignore[attr-defined]

    def main_hook(value: int, total: int, preview: Any, prompt_id: Any = None, node_id: Any = None) -> None:
        # main.py's hook: interrupt check first, then the progress message
        mm.throw_exception_if_processing_interrupted()  # type: ignore[attr-defined]
        m.progress_log.append((value, total))  # type: ignore[attr-defined]

    m.ProgressBar = ProgressBar  # type: ignore[attr-defined]
    m.set_progress_bar_global_hook = set_progress_bar_global_hook  # type: ignore[attr-defined]
    set_progress_bar_global_hook(main_hook)
    return m


def _cli_args() -> types.ModuleType:
    """``comfy.cli_args``: the preview settings (``--preview-method``, default none; ``--preview-size``)."""
    import enum

    m = types.ModuleType("comfy.cli_args")

    class LatentPreviewMethod(enum.Enum):
        NoPreviews = "none"
        Auto = "auto"
        Latent2RGB = "latent2rgb"
        TAESD = "taesd"

    m.LatentPreviewMethod = LatentPreviewMethod  # type: ignore[attr-defined]
    m.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews, preview_size=512)  # type: ignore[attr-defined]
    return m


def install(models_dir: str | os.PathLike[str]) -> types.SimpleNamespace:
    """Install the fake ComfyUI modules; returns them."""
    mm = _model_management()
    utils = _utils(mm)
    cli_args = _cli_args()
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # type: ignore[attr-defined]
    comfy.model_management = mm  # type: ignore[attr-defined]
    comfy.utils = utils  # type: ignore[attr-defined]
    comfy.cli_args = cli_args  # type: ignore[attr-defined]
    fp = _folder_paths(Path(models_dir))
    sys.modules.update({"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                        "comfy.cli_args": cli_args, "folder_paths": fp})
    return types.SimpleNamespace(model_management=mm, utils=utils, cli_args=cli_args, folder_paths=fp)


def uninstall() -> None:
    for name in ("comfy", "comfy.model_management", "comfy.utils", "comfy.cli_args", "folder_paths"):
        sys.modules.pop(name, None)


# -- server.PromptServer and the part of aiohttp it relies on -----------------------------------------
_SAVED: dict[str, types.ModuleType | None] = {}


def _fake_aiohttp() -> types.ModuleType:
    """aiohttp's route table as ComfyUI uses it: ``routes.get(path)`` collects route definitions and
    ``Application.add_routes`` (called once custom nodes are loaded) refuses a path registered twice,
    with aiohttp's own message, which stops ComfyUI's start-up."""
    web = types.ModuleType("aiohttp.web")

    class RouteDef(types.SimpleNamespace):
        pass

    class RouteTableDef(list):  # type: ignore[type-arg]
        def get(self, path: str) -> Any:
            def register(handler: Any) -> Any:
                self.append(RouteDef(method="GET", path=path, handler=handler, kwargs={}))
                return handler
            return register

    class Application:
        def __init__(self) -> None:
            self.registered: dict[tuple[str, str], Any] = {}

        def add_routes(self, routes: list[Any]) -> None:
            for route in routes:
                for method in ("GET", "HEAD") if route.method == "GET" else (route.method,):
                    if (method, route.path) in self.registered:
                        raise RuntimeError(f"Added route will never be executed, method {method} is "
                                           "already registered")
                    self.registered[(method, route.path)] = route.handler

    class Response(types.SimpleNamespace):
        pass

    def json_response(data: Any) -> Any:
        import json

        return Response(text=json.dumps(data), content_type="application/json")

    web.RouteDef = RouteDef  # type: ignore[attr-defined]
    web.RouteTableDef = RouteTableDef  # type: ignore[attr-defined]
    web.Application = Application  # type: ignore[attr-defined]
    web.json_response = json_response  # type: ignore[attr-defined]
    aiohttp = types.ModuleType("aiohttp")
    aiohttp.web = web  # type: ignore[attr-defined]
    return aiohttp


def install_server(real_aiohttp: bool) -> Any:
    """Put a ``server`` module with a ``PromptServer.instance`` (its ``routes`` and ``app``) into
    ``sys.modules``, on the real aiohttp or on the fake above. Returns the instance."""
    _SAVED.update({n: sys.modules.get(n) for n in ("aiohttp", "aiohttp.web", "server")})
    if real_aiohttp:
        web = importlib.import_module("aiohttp.web")
    else:
        aiohttp = _fake_aiohttp()
        sys.modules.update({"aiohttp": aiohttp, "aiohttp.web": aiohttp.web})
        web = aiohttp.web
    server = types.ModuleType("server")

    class PromptServer:
        instance: Any = None

        def __init__(self) -> None:
            self.routes = web.RouteTableDef()
            self.app = web.Application()

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer  # type: ignore[attr-defined]
    sys.modules["server"] = server
    return PromptServer.instance


def uninstall_server() -> None:
    """Undo ``install_server`` (modules that were there before come back)."""
    for name, module in _SAVED.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    _SAVED.clear()


def load_pack(name: str = PACK_NAME, root: Path = ROOT) -> types.ModuleType:
    """Import the repository root (or ``root``, e.g. a second folder linking to it) as ComfyUI
    imports a custom node folder. The pack's relative ``..fastlora_core`` is aliased to the
    already-imported top-level ``fastlora_core`` so tests and nodes share one registry (ComfyUI
    itself only ever has the pack's copy)."""
    if name in sys.modules:
        return sys.modules[name]
    import fastlora_core
    import fastlora_core.engine
    import fastlora_core.errors
    import fastlora_core.registry
    import fastlora_core.specs  # noqa: F401

    for mod_name, mod in list(sys.modules.items()):
        if mod_name == "fastlora_core" or mod_name.startswith("fastlora_core."):
            sys.modules[f"{name}.{mod_name}"] = mod
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
