"""Make FastLoRA engines visible to ComfyUI's memory manager (docs/ARCHITECTURE.md, decision 8).

ComfyUI frees memory only through the models in ``comfy.model_management.current_loaded_models``:
"Unload models" (``POST /free``), out-of-memory recovery and loading another model all end in
``LoadedModel.model_unload`` -> ``patcher.partially_unload`` or ``patcher.detach``. A pipeline kept
in a module global is invisible to all of that.

``EngineModel`` is a small duck-typed stand-in for ``comfy.model_patcher.ModelPatcher`` (the
methods ``LoadedModel`` and ``load_models_gpu`` call, nothing else): it is registered through
``comfy.model_management.load_models_gpu`` before every ``Generate``. Unloading moves the engine's
weights to CPU RAM (``engine.offload()``: the compiled graphs survive and the next run moves them
back) or, where that frees nothing (engine on CPU) or cannot work (quantised / offloaded engines),
releases the engine; the next ``Generate`` rebuilds it from the registry.

A duck type rather than a ModelPatcher subclass: ModelPatcher's constructor and loading code
assume a ComfyUI ``BaseModel`` whose weights ComfyUI patches and casts itself; the engine owns its
weights, so inheriting that code would only give ComfyUI ways to corrupt them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from . import comfy_bridge
from ._core import FluxEngine, registry

logger = logging.getLogger(__name__)

UNLOADS = 0  # times ComfyUI unloaded an engine (shown by /fastlora/stats)


class EngineModel:
    """What ComfyUI's model management sees of one engine."""

    parent = None  # LoadedModel follows clones through .parent; an engine has none

    def __init__(self, engine: FluxEngine, load_device: Any, offload_device: Any) -> None:
        self.engine = engine
        self.model = engine  # LoadedModel keeps a weak reference to .model and logs its class
        self.load_device = load_device
        self.offload_device = offload_device
        self.unloads = 0

    # sizes ----------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self.engine.released

    def model_size(self) -> int:
        if not self.alive:
            return 0
        return int(self.engine.memory_bytes())  # not cached: moving the masters to RAM changes it (decision 65)

    def loaded_size(self) -> int:
        if not self.alive or self.engine.offloaded:
            return 0
        return self.model_size()

    def current_loaded_device(self) -> Any:
        return self.load_device if self.loaded_size() else self.offload_device

    def model_dtype(self) -> Any:
        return getattr(self.engine, "dtype", None)

    def lowvram_patch_counter(self) -> int:
        return 0

    # ComfyUI patch plumbing: nothing to patch -------------------------------------------------------
    def model_patches_to(self, device: Any) -> None:
        return None

    def model_patches_models(self) -> list[Any]:
        return []

    def is_clone(self, other: Any) -> bool:
        # FastLoRA's MODEL (comfy_model.py) of the same engine is the same weights: ComfyUI then keeps
        # one entry for both in its loaded-model list instead of counting the engine twice.
        return other is self or getattr(other, "fastlora_current_engine", None) is self.engine

    def clone_has_same_weights(self, other: Any) -> bool:
        return other is self

    # load / unload --------------------------------------------------------------------------------
    def partially_load(self, device_to: Any, extra_memory: float = 0, force_patch_weights: bool = False) -> int:
        """ComfyUI wants the model on the device: move the engine back if it was offloaded."""
        if not self.alive:
            return 0
        if self.engine.offloaded:
            self.engine.reload()
            return self.model_size()
        return 0

    def partially_unload(self, device_to: Any, memory_to_free: float = 0) -> int:
        """ComfyUI needs ``memory_to_free`` bytes (:func:`partially_unload`)."""
        return partially_unload(self.engine, memory_to_free, self.loaded_size(), self._unload)

    def detach(self, unpatch_all: bool = True) -> None:
        """``detach(True)``: ``LoadedModel.model_unload`` from ``unload_all_models`` (/free, OOM
        recovery) and ``free_memory``. ``detach(False)``: ``load_models_gpu`` re-registering a model
        that is already loaded (it is its own clone); weights stay, like ModelPatcher's."""
        if unpatch_all:
            self._unload()

    def _unload(self) -> None:
        if not self.alive:
            return
        global UNLOADS
        self.unloads += 1
        UNLOADS += 1
        engine = self.engine
        if engine.device.type != "cpu":
            # Quantised or offloaded engines cannot move; engine.offload() releases those itself.
            logger.info("FastLoRA: ComfyUI unloads the engine; weights move to CPU RAM")
            engine.offload()
        else:
            logger.info("FastLoRA: ComfyUI unloads the engine; releasing it (rebuilt on next run)")
            registry.release(engine.key)
        # No bookkeeping here: ComfyUI may be iterating current_loaded_models right now. Wrappers of
        # released engines are pruned at the next Generate.

    def cleanup(self) -> None:
        return None

    def __repr__(self) -> str:
        state = "released" if not self.alive else ("offloaded" if self.engine.offloaded else "loaded")
        return f"EngineModel({self.engine.source.describe()}, {state})"


class _Manager:
    """One EngineModel per live engine, kept alive here (ComfyUI only holds weak references)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._wrappers: dict[int, EngineModel] = {}

    def wrapper_for(self, engine: FluxEngine) -> EngineModel:
        with self._lock:
            self.prune()
            wrapper = self._wrappers.get(id(engine))
            if wrapper is None or wrapper.engine is not engine:
                device = comfy_bridge.torch_device()
                wrapper = EngineModel(engine, device, _cpu())
                self._wrappers[id(engine)] = wrapper
            return wrapper

    def ensure_loaded(self, engine: FluxEngine) -> EngineModel:
        """Register the engine with ComfyUI as a loaded model (moving it back if offloaded)."""
        wrapper = self.wrapper_for(engine)
        comfy_bridge.load_model(wrapper)
        return wrapper

    def drop(self, wrapper: EngineModel) -> None:
        with self._lock:
            if self._wrappers.get(id(wrapper.engine)) is wrapper:
                del self._wrappers[id(wrapper.engine)]
        comfy_bridge.forget_model(wrapper)

    def prune(self) -> None:
        """Forget wrappers whose engine the registry released (e.g. replaced by new options)."""
        with self._lock:
            for wrapper in [w for w in self._wrappers.values() if not w.alive]:
                self.drop(wrapper)

    def wrappers(self) -> list[EngineModel]:
        with self._lock:
            return list(self._wrappers.values())


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


_MANAGER = _Manager()


def unload_engine(engine: FluxEngine) -> None:
    """What ComfyUI's unload does to an engine, for any wrapper of it (offload, or release)."""
    _MANAGER.wrapper_for(engine)._unload()


def partially_unload(engine: FluxEngine, memory_to_free: float, loaded: int, unload: Callable[[], None]) -> int:
    """ComfyUI's ``free_memory`` asks a model for ``memory_to_free`` bytes (before loading a text
    encoder or decoding, when the GPU is short) and unloads the model whole only when fewer come back.
    The engine's masters on the GPU (decision 64) go to system RAM first (decision 65): the engine
    stays, its swaps slower, instead of being released and rebuilt at the next run. When that is not
    enough the engine is unloaded as a whole by ``unload`` (offloaded, or released); ``loaded`` is its
    size before."""
    freed = engine.masters_to_ram()
    if freed >= memory_to_free > 0:
        return freed
    unload()
    return max(freed, loaded)


ensure_loaded = _MANAGER.ensure_loaded
prune = _MANAGER.prune
wrappers = _MANAGER.wrappers
